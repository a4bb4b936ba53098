"""Model cards (Hugging Face format) generated from configs and recorded evaluation results.

``python -m lynx_zoo cards`` writes ``model_cards/<id>.md`` for every variant of the ``lynx_zoo.variants``
table; an exported variant folder gets the same card as its ``README.md``. Parameter counts come from the
model itself, built on the meta device (no weights, no memory), so a 7B config is counted in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lynx_zoo.fusion.base import LynxModel
from lynx_zoo.fusion.config import ModelConfig
from lynx_zoo.hub.config import model_config_from_files
from lynx_zoo.hub.variants import VARIANTS, VariantInfo
from lynx_zoo.hub.weights import base_prefixes, variant_keys
from lynx_zoo.llm import BUILTIN_TOKENIZERS, base_llm
from lynx_zoo.resources import shipped

# what the paper's mixtures hold (front matter `datasets` of the variants of the paper's LLMs)
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
# the sections every LynxModel takes; any other dataclass argument is its fusion's own (e.g. cross_attn)
BASE_SECTIONS = ("vision", "bridge", "llm", "adapters", "optimizer", "prompt")


@dataclass
class CardFacts:
    """Everything a card states, gathered from a config (or an exported variant) and the model built from it."""

    id: str
    description: str
    config: ModelConfig
    counts: dict[str, int]
    tokens_per_image: int
    adapter_layers: list[int]
    fusion_layers: list[int]
    fusion_block: str
    vocab_size: int
    trainer: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    configs: tuple[str, ...] = ()
    results: list[dict[str, Any]] = field(default_factory=list)
    paper: dict[str, float] = field(default_factory=dict)
    hf_repo: str | None = None
    protocol: str = ""


def count_parameters(model: LynxModel, bases: tuple[str, ...] | None = None) -> dict[str, int]:
    """Parameters per part, trainable, and stored in an exported variant (works on the meta device; ``bases``:
    see :func:`variant_keys`)."""

    def n(modules: Any) -> int:
        return sum(p.numel() for module in modules for p in module.parameters())

    adapters = n(model.adapter_blocks.values())
    fusion = n(model.fusion_blocks().values())
    total, vision, bridge, llm = n([model]), n([model.vision]), n([model.bridge]), n([model.llm])
    state = model.state_dict()
    return {
        "total": total,
        "vision": vision,
        "bridge": bridge,
        "llm": llm - adapters - fusion,
        "adapters": adapters,
        "fusion_blocks": fusion,
        "other": total - vision - bridge - llm,
        "trainable": sum(p.numel() for _, p in model.trainable_parameters()),
        "stored": sum(state[k].numel() for k in variant_keys(model, bases=bases)),
    }


def model_facts(model: LynxModel, config: ModelConfig) -> dict[str, Any]:
    """The card facts that come from the built model (``config``: the configuration it stands for)."""
    blocks = model.fusion_blocks()
    return dict(
        config=config,
        counts=count_parameters(model, base_prefixes(config.vision, config.llm)),
        tokens_per_image=int(model.vision.num_tokens),
        adapter_layers=list(model.adapter_layers),
        fusion_layers=sorted(blocks),
        fusion_block=type(next(iter(blocks.values()))).__name__ if blocks else "",
        vocab_size=len(model.tokenizer),
    )


def variant_facts(info: VariantInfo) -> CardFacts:
    """The facts of a released variant: its resolved config, the model built on the meta device, its results."""
    config, resolved = model_config_from_files(info.config_paths)
    results = [
        json.loads(shipped(f"study_results/{r}").read_text(encoding="utf-8")) | {"file": f"docs/study/results/{r}"}
        for r in info.results
    ]
    return CardFacts(
        id=info.id,
        description=info.description,
        trainer=resolved.get("trainer") or {},
        data=resolved.get("data") or {},
        configs=info.configs,
        results=results,
        paper=info.paper,
        hf_repo=info.hf_repo,
        protocol=info.protocol,
        **model_facts(config.build_on_meta(), config),
    )


def exported_card(name: str, config: ModelConfig, model: LynxModel, source: str | None = None) -> str:
    """The ``README.md`` of an exported variant folder (facts from its config and the live model)."""
    info = VARIANTS.get(name)
    facts = CardFacts(
        id=name,
        description=info.description if info else f"A lynx_zoo variant exported from {source or 'a model'}",
        configs=info.configs if info else (),
        paper=info.paper if info else {},
        protocol=info.protocol if info else "",
        **model_facts(model, config),
    )
    return render_card(facts)


# ----------------------------------------------------------------------------------------------- rendering
def _yaml_list(key: str, items: list[str]) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(i)}" for i in items] if items else [f"{key}: []"]


def _front_matter(facts: CardFacts) -> list[str]:
    llm, vision = facts.config.llm, facts.config.vision
    known = base_llm(llm.model)
    bases = []
    if llm.pretrained and (known or _hub_id(llm.model)):
        bases.append(known.hub_id if known else llm.model)
    if vision.pretrained:
        bases.append(f"timm/{vision.model_name}")
    tags = ["lynx", "lynx_zoo", "multimodal", "visual-question-answering", facts.config.model_class.kind]
    if facts.adapter_layers:
        tags += ["adapters", "lora"] if facts.config.adapters.kind == "lora" else ["adapters"]
    study = str((facts.data or {}).get("class_path", "")).endswith("ShapesStudyDataModule")
    rendered = "lynx_zoo/shapes-study (rendered)" if study else "lynx_zoo/shapes-vqa (rendered)"
    datasets = LYNX_DATASETS if known and known.lynx_paper else [rendered]
    metrics = ["accuracy"] if facts.results or facts.paper else []
    license_id = known.license if known else "apache-2.0"
    lines = ["---", f"license: {license_id}", *_yaml_list("base_model", bases), "pipeline_tag: image-text-to-text"]
    lines += ["library_name: lynx_zoo", *_yaml_list("tags", tags), *_yaml_list("datasets", datasets)]
    lines += _yaml_list("metrics", metrics)
    if facts.results:
        lines += ["model-index:", f"- name: {facts.id}", "  results:"]
        for benchmark, runs in _by_benchmark(facts.results).items():
            lines += [
                "  - task: {type: visual-question-answering}",
                f"    dataset: {{name: {benchmark}, type: {benchmark}}}",
                "    metrics:",
            ]
            for key, values in _metric_values(runs).items():
                lines.append(f"    - {{type: accuracy, name: {key}, value: {round(statistics.fmean(values), 4)}}}")
    return [*lines, "---"]


def _by_benchmark(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        grouped.setdefault(result["benchmark"], []).append(result)
    return grouped


def _metric_values(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """``overall`` and each category's accuracy over the runs of one benchmark (its seeds)."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for key, value in [("overall", run["summary"]["overall"]), *run["metrics"].items()]:
            values.setdefault(key, []).append(value)
    return values


def _hub_id(model: str | None) -> bool:
    """Whether ``llm.model`` names a hub repository (``org/name``) rather than a local folder or a package."""
    return bool(model) and re.fullmatch(r"[\w.-]+/[\w.-]+", model) is not None and not Path(model).exists()


def _fmt(n: int) -> str:
    return f"{n:,}"


def _layers(indices: list[int]) -> str:
    return ", ".join(map(str, indices)) if indices else "none"


def _tower_weights(vision: Any) -> str:
    if vision.checkpoint_path:
        return f"weights from `{vision.checkpoint_path}`"
    return "pretrained" if vision.pretrained else "random init"


def _fields(section: Any) -> str:
    return ", ".join(f"{f.name} {getattr(section, f.name)}" for f in dataclasses.fields(section))


def _architecture(facts: CardFacts) -> list[str]:
    config = facts.config
    vision, bridge, llm, adapters = config.vision, config.bridge, config.llm, config.adapters
    llm_name = llm.model or f"random-weights {(llm.config or {}).get('model_type', '?')} (config below)"
    if llm.gguf_file:
        llm_name = f"{llm.model} / {llm.gguf_file}"
    bridge_text = (
        f"{bridge.kind}: {bridge.num_queries} queries, depth {bridge.depth}, "
        f"{bridge.num_heads} x {bridge.head_dim} heads, feed-forward x{bridge.ff_mult}"
        if bridge.kind == "resampler"
        else f"{bridge.kind} projector (one visual token per vision token)"
    )
    fusion = config.model_class
    rows = [
        ("fusion", f"{fusion.label} ({fusion.kind}): `{fusion.__name__}`"),
        ("image size", f"{vision.image_size} px"),
        ("vision tower", f"timm `{vision.model_name}`, blocks: {vision.num_blocks or 'all'}, "
         f"final norm: {'yes' if vision.final_norm else 'no'}, "
         f"{_tower_weights(vision)}, "
         f"{'trained' if vision.trainable else 'frozen'}"),
        ("visual tokens per image", f"{facts.tokens_per_image} from the tower"),
        ("video frames", f"{vision.num_frames}" if vision.num_frames else "no video"),
        ("bridge", bridge_text),
        ("LLM", f"`{llm_name}`"),
        ("LLM revision", f"`{llm.revision or 'default branch'}`"),
        ("LLM trains", "yes" if llm.trainable else "no (frozen)"),
        ("LLM dtype", llm.dtype or "float32"),
        ("vocabulary", f"{facts.vocab_size:,} tokens"),
        ("adapter layers", _layers(facts.adapter_layers)),
        ("adapter kind", adapters.describe() if facts.adapter_layers else "none"),
        ("fusion blocks", f"`{facts.fusion_block}` before layers {_layers(facts.fusion_layers)}"
         if facts.fusion_layers else "none"),
    ]  # fmt: skip
    for name, section in config.init_args.items():  # the fusion's own sections
        if name not in BASE_SECTIONS and dataclasses.is_dataclass(section):
            rows.append((f"`{name}`", _fields(section)))
    rows.append(("prompt", f"`{json.dumps(config.prompt.template)[1:-1]}`"))
    lines = ["## Architecture", "", "| part | this variant |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if not llm.model:
        lines += ["", f"LLM config: `{json.dumps(llm.config)}`"]
    return lines


def _parameters(facts: CardFacts) -> list[str]:
    c = facts.counts
    config = facts.config
    rows = [
        ("vision tower", c["vision"], config.vision.trainable),
        ("bridge", c["bridge"], True),
        ("LLM (without adapters / fusion blocks)", c["llm"], config.llm.trainable),
        ("adapters", c["adapters"], True),
        ("fusion blocks", c["fusion_blocks"], True),
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
    opt = facts.config.optimizer
    lines = ["## Training data and schedule", ""]
    if facts.configs:
        lines.append("Config: " + " + ".join(f"`{c}`" for c in facts.configs) + ".")
        lines.append("")
    sources: list[dict[str, Any]] = []
    if facts.data:
        data_args = dict(facts.data.get("init_args") or {})
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
        f"- optimiser: AdamW, peak lr {opt.lr}, floor {opt.min_lr}, warmup {opt.warmup_ratio:.0%} then "
        f"linear decay, weight decay {opt.weight_decay}, betas {tuple(opt.betas)}, eps {opt.eps}"
    )
    if sources:
        lines += ["", "| source | ratio | task | data |", "|---|---:|---|---|"]
        for source in sources:
            a = source.get("init_args", {})
            where = next((a[k] for k in ("shards", "manifest", "path", "root") if a.get(k)), "")
            lines.append(f"| {a.get('name', '?')} | {a.get('ratio', '')} | {a.get('task', '')} | `{where}` |")
    known = base_llm(facts.config.llm.model)
    if known and known.lynx_paper:
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
    for benchmark, runs in _by_benchmark(facts.results).items():
        files = ", ".join(f"`{r['file']}`" for r in runs)
        chance = runs[0].get("chance") or {}
        lines.append(
            f"Measured with `python -m lynx_zoo evaluate` on `{benchmark}` ({runs[0]['num_samples']} questions, "
            f"exact match; {files}):"
        )
        if len(runs) == 1:
            lines += [
                "",
                "| category | accuracy |" + (" chance |" if chance else ""),
                "|---|---:|" + ("---:|" * bool(chance)),
            ]
            for key, (value,) in _metric_values(runs).items():
                lines.append(f"| {key} | {value:.3f} |" + (f" {chance[key]:.3f} |" if key in chance else ""))
        else:
            seeds = [r["study"]["seed"] for r in runs if r.get("study")]
            over = f"over seeds {', '.join(map(str, seeds))}" if seeds else f"over {len(runs)} runs"
            lines += ["", f"| category | accuracy, mean ± std {over} | chance |", "|---|---:|---:|"]
            for key, values in _metric_values(runs).items():
                level = f"{chance[key]:.3f}" if key in chance else "–"
                lines.append(f"| {key} | {statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} | {level} |")
        lines.append("")
    if facts.paper:
        lines += ["Reported in the Lynx paper (arXiv 2307.02469) for this configuration; not measured by lynx_zoo:", ""]
        lines += ["| metric | value |", "|---|---:|"]
        lines += [f"| {PAPER_METRICS[k]} | {v} |" for k, v in facts.paper.items()]
    return lines


def _use(facts: CardFacts) -> list[str]:
    # a random-weights LLM, or one that speaks only a built-in (shapes) vocabulary
    demo = not facts.config.llm.pretrained or facts.config.llm.tokenizer in BUILTIN_TOKENIZERS
    known = base_llm(facts.config.llm.model)
    license_note = known.license_note if known else ""
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
        f'model = lynx_zoo.load_model("{facts.id}", device="cpu")',
        'print(model.generate(images=["photo.jpg"], prompts=["what is in the picture?"]))',
        "```",
        "",
        f'Or from the terminal: `python -m lynx_zoo ask --variant {facts.id} --image photo.jpg --question "..."`.',
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
