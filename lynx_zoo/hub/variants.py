"""The released variants (the ``lynx_zoo.variants`` table), a local registry of exported ones, and where a
variant name's folder is (:func:`resolve_variant`; :func:`lynx_zoo.load_model` loads it).

Where a variant's weights live: a local folder (``$LYNX_ZOO_VARIANTS/<id>``, default
``~/.cache/lynx_zoo/variants/<id>``, or wherever a local registration points), else an HF hub repository
when the entry names one (only its safetensors, JSON and tokenizer files are fetched).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lynx_zoo.hub.config import CONFIG_FILE
from lynx_zoo.resources import shipped

REGISTRY_FILE = "registry.json"
# what is fetched from a hub repository: never pickles
HUB_PATTERNS = ["config.json", "model.safetensors", "README.md", "tokenizer/*"]

LYNX_OBTAIN = (
    "convert the original release: python -m lynx_zoo convert-lynx --ckpt finetune_lynx.pt "
    "(from github.com/bytedance/lynx-llm) --out {folder}"
)
TRAIN_OBTAIN = (
    "train it, then export: python -m lynx_zoo fit {args} && python -m lynx_zoo export --ckpt RUN.ckpt --out {folder}"
)
PT = "lynx-pt-vicuna-420-"
FIT_OBTAIN = "python -m lynx_zoo fit {args} (its ExportVariant callback exports and registers it when fit ends)"
STAGES_OBTAIN = (
    "train it through the paper's stages, then export: python -m lynx_zoo stages {args} --out runs/{id} && "
    "python -m lynx_zoo export --ckpt runs/{id}/stage2/checkpoints/last.ckpt --out {folder}"
)
# how a variant is trained (its card's "protocol"): the paper's stages for the real Lynx and every grid row
PAPER_PROTOCOL = (
    "the paper's stages, each from the previous one's last checkpoint (`python -m lynx_zoo stages`): stage 1 at "
    "224 px (100,000 steps, peak lr 1e-4), stage 1 continued at {size} px (10,000 steps, 1e-5), stage 2 at {size} px "
    "(20,000 steps, 2e-5)"
)
LOW_RES_PROTOCOL = (
    "the paper's stages without the high-resolution one (`python -m lynx_zoo stages`): stage 1 at 224 px "
    "(100,000 steps, peak lr 1e-4), then stage 2 at 224 px from its last checkpoint (20,000 steps, 2e-5)"
)


@dataclass(frozen=True)
class VariantInfo:
    """One released variant.

    Args:
        id: the name ``load_model`` takes.
        configs: its config files under the shipped ``configs/`` (the repository's), base first (overlays after).
        description: one line.
        hf_repo: the HF hub repository holding its weights, if published.
        results: recorded lynx_zoo evaluation results of this variant: files of the shipped ``study_results/``
            (the repository's ``docs/study/results/``).
        paper: numbers the Lynx paper reports for this configuration (not measured by lynx_zoo).
        obtain: how to get the weights when they are not present (``{folder}``, ``{args}``, ``{id}`` filled in).
        protocol: how it is trained (empty: one ``fit`` run of its configs).
    """

    id: str
    configs: tuple[str, ...]
    description: str
    hf_repo: str | None = None
    results: tuple[str, ...] = ()
    paper: dict[str, float] = field(default_factory=dict)
    obtain: str = TRAIN_OBTAIN
    protocol: str = ""

    @property
    def card(self) -> Path:
        return shipped(f"model_cards/{self.id}.md")

    @property
    def config_paths(self) -> list[Path]:
        return [shipped(c) for c in self.configs]

    @property
    def folder(self) -> Path:
        """Where its weights are looked for locally (a registration elsewhere wins)."""
        return local_registry().get(self.id) or variants_home() / self.id

    def how_to_obtain(self) -> str:
        args = " ".join(f"--config {c}" for c in self.configs)
        return self.obtain.format(folder=variants_home() / self.id, args=args, id=self.id)


def _grid(stem: str, description: str, paper: dict[str, float] | None = None, prefix: str = "lynx-") -> VariantInfo:
    """A row of the ablation grid: ``configs/grid/<stem>.yaml`` over the real Lynx."""
    return VariantInfo(
        prefix + stem.replace("_", "-"),
        ("configs/pt_vicuna_420.yaml", f"configs/grid/{stem}.yaml"),
        description,
        paper=paper or {},
        obtain=STAGES_OBTAIN,
        protocol=LOW_RES_PROTOCOL if stem == "pt_vicuna_224" else PAPER_PROTOCOL.format(size=420),
    )


def _stage(stage: str, data: str, description: str, protocol: str, obtain: str = TRAIN_OBTAIN) -> VariantInfo:
    """A training stage of the real Lynx with its data mixture (``configs/stages/``, ``configs/data/``)."""
    return VariantInfo(
        f"lynx-{stage.replace('_', '-')}",
        ("configs/pt_vicuna_420.yaml", f"configs/stages/{stage}.yaml", f"configs/data/{data}.yaml"),
        description,
        obtain=obtain,
        protocol=protocol,
    )


STUDY_OBTAIN = (
    "train it in the frozen-LLM study, then export: python -m lynx_zoo study --rows {row} --seeds 0 && "
    "python -m lynx_zoo export --ckpt runs/study/{row}/seed0/checkpoints/last.ckpt --out {folder}"
)
STUDY_PROTOCOL = (
    "the frozen-LLM study (`python -m lynx_zoo study`, docs/study/): stage 0 trains the LLM on text only "
    "(configs/study/stage0.yaml), then one `fit` of these configs on the frozen stage-0 LLM per seed (0, 1, 2)"
)


def _study_results(row: str) -> tuple[str, ...]:
    """The recorded results of a study row, every seed run so far (``study_results/frozen_llm/<row>-s<N>__*.json``,
    written by ``python -m lynx_zoo study --report docs/study``)."""
    folder = shipped("study_results/frozen_llm")
    if not folder.is_dir():
        return ()
    return tuple(f"frozen_llm/{p.name}" for p in sorted(folder.glob(f"{row}-s*__*.json")))


def _study(row: str, overlay: str | None, description: str) -> VariantInfo:
    """A row of the frozen-LLM study: ``configs/study/pt.yaml`` and its overlay, results over its seeds."""
    configs = ("configs/study/pt.yaml",) + ((f"configs/study/{overlay}.yaml",) if overlay else ())
    return VariantInfo(
        f"lynx-study-{row.replace('_', '-')}",
        configs,
        description,
        results=_study_results(row),
        obtain=STUDY_OBTAIN.replace("{row}", row),
        protocol=STUDY_PROTOCOL,
    )


def _demo(stem: str, description: str, result: str) -> VariantInfo:
    return VariantInfo(
        f"lynx-demo-{stem.replace('_', '-')}",
        ("configs/demo.yaml", f"configs/demo_grid/{stem}.yaml"),
        description,
        results=(f"{result}__shapes.json",),
        obtain=FIT_OBTAIN,
    )


VARIANTS: dict[str, VariantInfo] = {
    v.id: v
    for v in [
        VariantInfo(
            "lynx-pt-vicuna-420",
            ("configs/pt_vicuna_420.yaml",),
            "Lynx: PT on frozen Vicuna-7B v1.1 with adapters every 2nd layer, EVA ViT-g/14 at 420 px",
            paper={
                "open_vqa_image": 76.16,
                "open_vqa_video": 66.22,
                "mme_perception": 1373.23,
                "mme_cognition": 215.71,
            },
            obtain=LYNX_OBTAIN,
            protocol=PAPER_PROTOCOL.format(size=420),
        ),
        _grid(
            "adapters_every_2nd", "Lynx with adapters on every 2nd decoder layer (the released placement)", prefix=PT
        ),
        _grid(
            "adapters_every_layer", "Lynx with an adapter on every decoder layer (the paper's text, M = 1)", prefix=PT
        ),
        _grid("adapters_none", "Lynx without adapters: only the resampler trains", prefix=PT),
        _grid(
            "ca_vicuna_420",
            "Lynx w/ cross-attn: gated cross-attention before every 4th layer of frozen Vicuna-7B",
            {"open_vqa_image": 31.79, "open_vqa_video": 51.35},
        ),
        _grid(
            "ca_vicuna_420_trainable_llm",
            "Lynx w/ cross-attn, trainable LLM: the CA model with Vicuna-7B trained too",
            {"open_vqa_image": 61.26, "open_vqa_video": 52.70},
        ),
        _grid(
            "pt_llama_420",
            "Lynx w/ LLaMA: the LLaMA-7B backbone instead of Vicuna",
            {"open_vqa_image": 70.86, "open_vqa_video": 60.81},
        ),
        _grid(
            "pt_vicuna_224", "Lynx w/o high resolution: 224 px only", {"open_vqa_image": 73.51, "open_vqa_video": 62.16}
        ),
        _stage(
            "stage1_224",
            "lynx_stage1",
            "Lynx stage 1 at 224 px: resampler and adapters aligned on image-text pairs",
            "the first of the paper's stages, from the pretrained bases",
        ),
        _stage(
            "stage1_420",
            "lynx_stage1",
            "Lynx stage 1 continued at 420 px (the release's pretrain_lynx.pt)",
            "the second of the paper's stages, from the last checkpoint of stage 1 at 224 px (`init_from`)",
            LYNX_OBTAIN.replace("finetune_lynx.pt", "pretrain_lynx.pt"),
        ),
        _stage(
            "stage2",
            "lynx_stage2",
            "Lynx stage 2: instruction tuning at 420 px (the release's finetune_lynx.pt)",
            "the third of the paper's stages, from the last checkpoint of stage 1 at 420 px (`init_from`)",
            LYNX_OBTAIN,
        ),
        VariantInfo(
            "lynx-pt-smollm2",
            ("configs/pt_smollm2.yaml",),
            "The Lynx recipe on frozen SmolLM2-135M-Instruct (offline GGUF), resampler and adapters every 2nd layer",
        ),
        VariantInfo(
            "lynx-demo",
            ("configs/demo.yaml",),
            "The embedded default: a small PT model trained from scratch on rendered shapes in ~10 CPU minutes",
            results=("pt_adapters_every_2nd__shapes.json",),
            obtain=FIT_OBTAIN,
        ),
        _demo("adapters_every_layer", "The demo with an adapter on every decoder layer", "pt_adapters_every_layer"),
        _demo("adapters_none", "The demo without adapters", "pt_no_adapters"),
        _demo("ca", "The demo with cross-attention fusion (CA, trainable LLM)", "ca"),
        VariantInfo(
            "lynx-study-stage0",
            ("configs/study/stage0.yaml",),
            "Stage 0 of the frozen-LLM study: the demo's small LLaMA (4 layers) trained on text only, captions of "
            "rendered scenes and questions about them; the frozen base of every study row",
            obtain="train it, then export: python -m lynx_zoo study (its first step trains stage 0) && "
            "python -m lynx_zoo export --ckpt runs/study/stage0/checkpoints/last.ckpt --out {folder}",
            protocol="one `fit` of its config (the first step of `python -m lynx_zoo study`)",
        ),
        _study(
            "pt_adapters_every_2nd",
            None,
            "The frozen-LLM study's reference row: PT on the frozen stage-0 LLM with bottleneck adapters on every "
            "2nd layer, 64 px, diverse phrasings",
        ),
        _study(
            "pt_adapters_every_layer", "pt_adapters_every_layer", "The frozen-LLM study with adapters on every layer"
        ),
        _study("pt_adapters_none", "pt_adapters_none", "The frozen-LLM study without adapters"),
        _study("pt_lora", "pt_lora", "The frozen-LLM study with LoRA (peft) on every layer instead of adapters"),
        _study("ca_frozen", "ca_frozen", "The frozen-LLM study with cross-attention fusion (CA, frozen LLM)"),
        _study(
            "ca_trainable_llm",
            "ca_trainable_llm",
            "The frozen-LLM study's CA row with the LLM trained too, on a mixture with text-only data",
        ),
        _study("pt_low_res", "pt_low_res", "The frozen-LLM study's reference row at 32 px"),
        _study(
            "pt_single_prompt", "pt_single_prompt", "The frozen-LLM study's reference row on one phrasing per question"
        ),
        VariantInfo(
            "lynx-tiny",
            ("configs/tiny.yaml",),
            "A tiny random-weights PT model that the tests fit; for tests only",
            obtain=FIT_OBTAIN,
        ),
    ]
}


def variants_home() -> Path:
    """The local variants folder: ``$LYNX_ZOO_VARIANTS``, else ``$LYNX_ZOO_CACHE/variants`` (``~/.cache/lynx_zoo``)."""
    explicit = os.environ.get("LYNX_ZOO_VARIANTS")
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("LYNX_ZOO_CACHE", Path.home() / ".cache" / "lynx_zoo")).expanduser() / "variants"


def local_registry() -> dict[str, Path]:
    """Locally registered variants: name -> folder (``variants_home()/registry.json``)."""
    path = variants_home() / REGISTRY_FILE
    if not path.is_file():
        return {}
    return {name: Path(folder) for name, folder in json.loads(path.read_text(encoding="utf-8")).items()}


def register_local(name: str, folder: str | Path) -> None:
    """Register an exported variant folder under ``name`` (written atomically)."""
    home = variants_home()
    home.mkdir(parents=True, exist_ok=True)
    entries = {k: str(v) for k, v in local_registry().items()}
    entries[name] = str(Path(folder).resolve())
    tmp = home / f".{REGISTRY_FILE}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, home / REGISTRY_FILE)


@dataclass(frozen=True)
class VariantStatus:
    """A row of :func:`list_variants`: the variant, where its weights are looked for, whether they are there."""

    id: str
    description: str
    location: str
    available: bool
    info: VariantInfo | None


def list_variants() -> list[VariantStatus]:
    """Every released variant and every locally registered one, with where its weights are and whether present."""
    rows = []
    registry = local_registry()
    for info in VARIANTS.values():
        folder = info.folder
        present = (folder / CONFIG_FILE).is_file()
        location = str(folder) if present or not info.hf_repo else f"hf://{info.hf_repo}"
        rows.append(VariantStatus(info.id, info.description, location, present, info))
    for name, folder in sorted(registry.items()):
        if name not in VARIANTS:
            rows.append(VariantStatus(name, "registered locally", str(folder), (folder / CONFIG_FILE).is_file(), None))
    return rows


def _from_hub(repo: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_PATTERNS))


def resolve_variant(name_or_dir: str | Path) -> Path:
    """The local folder of a variant: a folder path, a registered or released name, or ``hf://org/repo[@rev]``."""
    text = str(name_or_dir)
    if text.startswith("hf://"):
        repo, _, revision = text.removeprefix("hf://").partition("@")
        return _from_hub(repo, revision or None)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if len(path.parts) > 1 or path.suffix in (".ckpt", ".pt", ".pth"):  # a path, not a name
        raise FileNotFoundError(f"not found: {path} (no checkpoint file or variant folder there)")
    registry = local_registry()
    if text in registry:
        if not (registry[text] / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"variant {text!r} is registered at {registry[text]}, but that folder is gone")
        return registry[text]
    if text in VARIANTS:
        info = VARIANTS[text]
        if (info.folder / CONFIG_FILE).is_file():
            return info.folder
        if info.hf_repo:
            return _from_hub(info.hf_repo)
        raise FileNotFoundError(
            f"variant {text!r}: its weights are not present at {info.folder} and are published nowhere; "
            f"to get them: {info.how_to_obtain()}"
        )
    known = sorted({*VARIANTS, *registry})
    close = difflib.get_close_matches(text, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise FileNotFoundError(
        f"{text!r} is no variant folder and no known variant: {hint}known: {', '.join(known)} "
        "(or hf://org/repo for a variant on the HF hub)"
    )
