"""Stage-1 step time with the frozen vision tower's tokens read from a feature cache, against running the tower,
at Lynx's shapes scaled down.

Lynx's stage 1 at 420 px: a frozen EVA ViT-g/14 makes 901 tokens per image (30 x 30 patches + CLS), a 32-query
Perceiver resampler reads them, a frozen Vicuna-7B with adapters every 2nd layer reads the 32 visual tokens and a
short caption. Here: a 6-block width-384 ViT with 14 px patches at 420 px (the same 901 tokens), the same resampler
(32 queries, depth 3, 8 x 64 heads), a frozen 8-layer width-512 LLaMA (32,000-token vocabulary) with adapters every
2nd layer; captions of lognormal length (median 12 tokens). The tower's share of the step's model FLOPs is printed
for this model and for the real Lynx (``lynx_step_flops``), so the saving can be read against both.

The cache is written once by ``write_feature_cache`` (what ``python -m lynx_zoo cache-features`` runs) in fp16, and
read back by ``FeatureCacheSource``; the uncached arm gets its images as ready tensors (no JPEG decoding: in a real
run that is further work the cache also saves). Both arms take the same samples, one AdamW step per batch, collation
and reading included, interleaved batch by batch; the first ``--warmup`` batches are not counted.

    python benchmarks/feature_cache.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scale_common import LLM, llama_tokenizer_dir, report

from lynx_zoo import AdapterConfig, BridgeConfig, LLMConfig, OptimizerConfig, PrefixLynx, PromptConfig, VisionConfig
from lynx_zoo.data import InstructionTemplates, LoadContext, Sample, Source
from lynx_zoo.data.feature_cache import FeatureCacheSource, write_feature_cache
from lynx_zoo.fusion.base import model_inputs
from lynx_zoo.optim import build_optimizer
from lynx_zoo.training.throughput import lynx_step_flops, vision_forward_flops

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PIXELS, CACHED = "tower runs (pixels)", "feature cache (fp16 tokens from disk)"


class InMemorySource(Source):
    """Ready samples (transformed images, captions) as a source."""

    def __init__(self, samples: list[Sample]) -> None:
        super().__init__("captions", task="caption")
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int, seed: str) -> Sample:
        return self.samples[index]


def stage1_model(seed: int = 0) -> PrefixLynx:
    torch.manual_seed(seed)
    return PrefixLynx(
        vision=VisionConfig(
            model_name="vit_small_patch16_224",
            image_size=420,
            keep_cls_token=True,
            final_norm=False,
            model_kwargs=dict(patch_size=14, embed_dim=384, depth=6, num_heads=6),
        ),
        bridge=BridgeConfig(kind="resampler", num_queries=32, depth=3, num_heads=8, head_dim=64, ff_mult=4),
        llm=LLMConfig(pretrained=False, tokenizer=llama_tokenizer_dir(), config=dict(LLM)),
        adapters=AdapterConfig(every=2, bottleneck=256),
        optimizer=OptimizerConfig(lr=1e-4, min_lr=1e-5),
        prompt=PromptConfig(max_length=64),
    )


def captions(n: int, seed: int, tokenizer, image_size: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    vocab = tokenizer.get_vocab()
    words = sorted(p[1:] for p in vocab if p.startswith("▁") and p[1:].isascii() and p[1:].isalpha() and len(p) > 3)
    pixels = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(np.clip(round(rng.lognormal(np.log(12), 0.5)), 3, 40))
        caption = " ".join(words[j] for j in rng.integers(0, len(words), length))
        out.append(Sample("", caption, image=torch.randn(3, image_size, image_size, generator=pixels), id=str(i)))
    return out


def tower_share(model: PrefixLynx, text: int) -> float:
    """The frozen tower's share of a training step's model FLOPs (``lynx_step_flops``'s count of the tower)."""
    return vision_forward_flops(model.vision) / lynx_step_flops(model, 1, text)


def real_lynx_tower_share(text: int) -> float:
    """The same share for the real Lynx (EVA ViT-g/14 at 420 px, Vicuna-7B, adapters every 2nd layer), counted on
    the meta device from ``configs/pt_vicuna_420.yaml``."""
    from lynx_zoo.hub.config import model_config_from_files

    config, _ = model_config_from_files([CONFIGS / "pt_vicuna_420.yaml"])
    config = config.replace(llm={"tokenizer": llama_tokenizer_dir()})
    return tower_share(config.build_on_meta(), text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()

    pixels_model, cached_model = stage1_model(), stage1_model()
    n = args.batch * args.steps
    samples = captions(n, 0, pixels_model.tokenizer, pixels_model.vision_config.image_size)
    templates = InstructionTemplates.from_file()
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        index = write_feature_cache([InMemorySource(samples)], pixels_model.vision, Path(folder) / "cache", 8)
        write_s = time.perf_counter() - start
        disk = sum(f.stat().st_size for f in (Path(folder) / "cache").iterdir())
        cache = FeatureCacheSource(str(Path(folder) / "cache"))
        cache.prepare(LoadContext(lambda image: image, templates, training=True))
        cache.check_tower(cached_model.vision)
        source = InMemorySource(samples)
        source.prepare(LoadContext(lambda image: image, templates, training=True))

        def loop(model: PrefixLynx, read) -> callable:
            optimizer, scheduler = build_optimizer(model.trainable_parameters(), args.steps, model.optimizer_config)

            def step(j: int) -> None:
                batch = [read(i, f"0/{i}") for i in range(j * args.batch, (j + 1) * args.batch)]
                for sample in batch:  # the caption task's templates, as the mixture renders them
                    sample.instruction = templates.render("caption", "", None)
                model(**model_inputs(model.processor(batch))).loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            return step

        loops = {PIXELS: loop(pixels_model, source.load), CACHED: loop(cached_model, cache.load)}
        times: dict[str, list[float]] = {name: [] for name in loops}
        for j in range(args.steps):
            for name, step in loops.items():
                begin = time.perf_counter()
                step(j)
                times[name].append(time.perf_counter() - begin)
            print(f"step {j}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    text = int(np.mean([len(pixels_model.processor.encode(s)[0]) for s in samples]))
    median = {name: statistics.median(values[args.warmup :]) for name, values in times.items()}
    rows = [
        {"run": name, "median_step_s": median[name], "samples_per_s": args.batch / median[name],
         "vs_tower": median[PIXELS] / median[name]}
        for name in loops
    ]  # fmt: skip
    report(
        "feature_cache",
        rows,
        ["run", "median_step_s", "samples_per_s", "vs_tower"],
        settings=vars(args),
        step_time_saving=1 - median[CACHED] / median[PIXELS],
        tokens_per_image=index["tower"]["tokens"],
        cache_bytes_per_sample=disk / len(samples),
        cache_write_s_per_sample=write_s / len(samples),
        tower_share_of_step_flops={
            "this model": tower_share(pixels_model, text),
            "real Lynx": real_lynx_tower_share(text),
        },
        caption_text_tokens_mean=text,
        load_average={"at_start": load_at_start, "at_end": os.getloadavg()},
    )


if __name__ == "__main__":
    main()
