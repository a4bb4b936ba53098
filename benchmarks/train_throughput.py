"""Training throughput on instruction data shaped like LLaVA-665K: lynx_zoo PT against HF transformers'
``LlavaForConditionalGeneration`` fed the way LLaVA's trainer feeds it, on the same samples, in one run.

Data (:func:`make_samples`, seeded; lengths in LLaMA tokens: each random word is one token):

* 10 % text-only samples (ShareGPT-like); the others have one image (224 px);
* turns: an image sample has 1 turn (50 %) or 2 + Geometric(0.35) turns (VQA-style multi-turn, at most 8); a
  text-only sample 1 to 4;
* prompt tokens of a turn: lognormal, median 14, sigma 0.9, clipped to 3..300;
* answer tokens of a turn: for image samples 45 % short (1 to 4 tokens: a word, yes/no, a number) and 55 % lognormal
  with median 60, sigma 1.0, clipped to 2..500; for text-only samples lognormal, median 120, sigma 0.9, 2..500;
* a sample keeps its turns while they fit ``--max-length`` text tokens (nothing is truncated by either system).

Only answer tokens (each with its ``</s>``) are targets. The prompt format is lynx_zoo's (``User: ...\\nBot:``) for
both systems: the same token ids, with LLaVA's image placeholders (one per visual token) before the text.

Models (random weights, no download): a frozen ViT-S/16 tower at 224 px (196 patch tokens), an 8-layer width-512
LLaMA with the 32,000-token LLaMA vocabulary (+ ``[PAD]``) and a bridge, the LLM and the bridge trained (LLaVA-1.5's
instruction-tuning stage, the one that trains on LLaVA-665K), AdamW:

========================  ===========================================================================================
``hf_llava``              HF LLaVA (CLIP tower, MLP projector, LLaMA): right-padded batches, the loss from the logits
                          of every position (``LlavaForConditionalGeneration(..., labels=...)``), as LLaVA's trainer
``lynx_mlp_full_logits``  lynx_zoo PT with the same MLP projector, padded batches, logits of every position
``lynx_mlp``              the same with the answer-only loss (the LM head on target positions only)
``lynx_mlp_packed``       the same with packed rows (``--pack-tokens`` per row)
``lynx_resampler_packed`` Lynx's bridge, the Perceiver resampler (32 visual tokens), answer-only, packed
``..._compiled``          with ``--compile``: the same with the decoder layers ``torch.compile``-d
========================  ===========================================================================================

Rounds: global batches of ``--batch`` samples drawn by lynx_zoo's :class:`ModalityLengthGroupedSampler` (one modality,
lengths grouped in megabatches: what LLaVA-1.5's trainer does with ``group_by_modality_length``); of the ``--rounds``
measured ones about 10 % (at least one) are text-only. Every arm takes one optimizer step per round on the same
rounds, collation included in its time, after ``--warmup`` rounds of other image samples that are not counted. The
arms run interleaved round by round in one process (the machine is shared: contention hits all alike);
``lynx_resampler_packed`` also trains through the Lightning Trainer, and its bare loop is the overhead baseline.
Throughput is over the measured rounds: samples (target tokens) / the arm's total time.

Peak memory: each arm in a fresh process, one step on the measured image round with the most tokens after a warm-up
step on it (the same samples for every arm):
the growth of the resident set (``VmHWM`` after resetting it, minus ``VmRSS`` before the step), with glibc's mmap
threshold fixed so that freed tensors go back to the system.

    python benchmarks/train_throughput.py                       # ~5 minutes on 2 cores
    python benchmarks/train_throughput.py --rounds 4 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
from scale_common import image_tokens, llava_model, lynx_model, measuring_trainer, report
from torch.utils.data import DataLoader

from lynx_zoo import BridgeConfig, OptimizerConfig
from lynx_zoo.data import IGNORE_INDEX, Sample
from lynx_zoo.data.packing import PackingCollate, samples_in
from lynx_zoo.data.sampler import ModalityLengthGroupedSampler
from lynx_zoo.fusion.base import model_inputs
from lynx_zoo.optim import build_optimizer
from lynx_zoo.training import compile_regions
from lynx_zoo.training.throughput import target_tokens_of

HF = "hf_llava"
LIGHTNING_ARM = "lynx_resampler_packed"
LIGHTNING = f"{LIGHTNING_ARM} (Lightning Trainer)"
RESAMPLER = BridgeConfig(kind="resampler", num_queries=32, depth=3, num_heads=8, head_dim=64, ff_mult=4)
OPTIMIZER = OptimizerConfig(lr=1e-4, min_lr=1e-5)  # every arm's AdamW and schedule (lynx_model's own)
COLUMNS = ["arm", "samples_per_s", "target_tokens_per_s", "padded_share", "peak_memory_MB", "vs_hf_samples_per_s",
           "vs_hf_peak_memory", "total_s", "median_round_s"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- data
def word_list(tokenizer: Any) -> list[str]:
    """Lower-case ASCII words that are one token each in the LLaMA vocabulary (``▁word``)."""
    words = [p[1:] for p in tokenizer.get_vocab() if p.startswith("▁") and p[1:].isascii() and p[1:].isalpha()]
    return sorted(w for w in words if w.islower() and len(w) >= 3)


def _lognormal(rng: np.random.Generator, median: float, sigma: float, low: int, high: int) -> int:
    return int(np.clip(round(rng.lognormal(np.log(median), sigma)), low, high))


def make_samples(n: int, seed: int, processor: Any, image_size: int) -> list[Sample]:
    """``n`` samples of the distribution in the module docstring, each fitting ``processor.prompt.max_length``."""
    rng = np.random.default_rng(seed)
    words = word_list(processor.tokenizer)
    pixels = torch.Generator().manual_seed(seed)

    def text(tokens: int) -> str:
        return " ".join(words[i] for i in rng.integers(0, len(words), tokens))

    samples = []
    for index in range(n):
        text_only = rng.random() < 0.10
        if text_only:
            turns = int(rng.integers(1, 5))
        else:
            turns = 1 if rng.random() < 0.5 else min(8, 2 + int(rng.geometric(0.35)) - 1)
        pairs = []
        for _ in range(turns):
            prompt = _lognormal(rng, 14, 0.9, 3, 300)
            if text_only:
                answer = _lognormal(rng, 120, 0.9, 2, 500)
            elif rng.random() < 0.45:
                answer = int(rng.integers(1, 5))
            else:
                answer = _lognormal(rng, 60, 1.0, 2, 500)
            pairs.append((text(prompt), text(answer)))
        image = None if text_only else torch.randn(3, image_size, image_size, generator=pixels)
        sample = Sample(pairs[-1][0], pairs[-1][1], image=image, id=str(index), history=pairs[:-1])
        while processor.encode(sample)[2]:  # keep whole turns that fit max_length: nothing gets truncated
            if sample.history:
                sample.history = sample.history[1:]
            else:  # a single turn too long: halve its question and its answer
                sample.instruction, sample.answer = (_halved(sample.instruction), _halved(sample.answer))
        samples.append(sample)
    return samples


def _halved(text: str) -> str:
    words = text.split()
    return " ".join(words[: max(1, len(words) // 2)])


def rounds_of(samples: list[Sample], processor: Any, batch: int, seed: int) -> list[list[Sample]]:
    """All global batches of ``samples`` (each modality a multiple of ``batch``) from the modality- and length-grouped
    sampler, in its order (the batch with the longest sample first)."""
    lengths = [len(processor.encode(s)[0]) + (0 if s.image is None else image_tokens()) for s in samples]
    modalities = ["text" if s.image is None else "image" for s in samples]
    sampler = ModalityLengthGroupedSampler(lengths, modalities, batch, megabatch=8, seed=seed)
    return [[samples[i] for i in b] for b in sampler]


def sample_sets(args: argparse.Namespace, processor: Any) -> tuple[list[list[Sample]], list[list[Sample]]]:
    """The warm-up rounds (image samples) and the measured rounds: ``--rounds`` global batches of which about 10 %
    (at least one) are text-only, each set drawn from its own samples."""
    text_batches = max(1, round(0.1 * args.rounds))
    need = {"text": text_batches * args.batch, "image": (args.rounds - text_batches + args.warmup) * args.batch}
    pool: list[Sample] = []
    seed = args.seed
    while sum(s.image is None for s in pool) < need["text"] or sum(s.image is not None for s in pool) < need["image"]:
        pool += make_samples(4 * args.batch, seed, processor, 224)
        seed += 1000
    texts = [s for s in pool if s.image is None][: need["text"]]
    images = [s for s in pool if s.image is not None][: need["image"]]
    warmup = images[: args.warmup * args.batch]
    measured = texts + images[args.warmup * args.batch :]
    return (
        rounds_of(warmup, processor, args.batch, args.seed) if warmup else [],
        rounds_of(measured, processor, args.batch, args.seed),
    )


# ---------------------------------------------------------------------------------------------- arms
@dataclass
class Arm:
    """One system under test: its model, how it collates samples, and its training loss on a collated batch."""

    model: Any
    collate: Callable[[list[Sample]], dict[str, Any]]
    loss: Callable[[dict[str, Any]], torch.Tensor]


def llava_collate(processor: Any, image_token: int) -> Callable[[list[Sample]], dict[str, Any]]:
    """LLaVA's trainer: the conversation's token ids with one image placeholder per visual token, right-padded to
    the longest of the batch, labels on the answers (the same ids and labels as lynx_zoo's processor)."""

    def collate(samples: list[Sample]) -> dict[str, Any]:
        kept, _ = processor.encode_batch(samples)
        rows = []
        for sample, ids, labels, _ in kept:
            prefix = [] if sample.image is None else [image_token] * image_tokens()
            rows.append((prefix + ids, [IGNORE_INDEX] * len(prefix) + labels))
        width = max(len(ids) for ids, _ in rows)
        pad = processor.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (ids, row_labels) in enumerate(rows):
            input_ids[r, : len(ids)], labels[r, : len(ids)], mask[r, : len(ids)] = (
                torch.tensor(ids), torch.tensor(row_labels), 1,
            )  # fmt: skip
        images = [s.image for s, *_ in kept if s.image is not None]
        pixel_values = torch.stack(images) if images else None
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}

    return collate


def build_arm(name: str, args: argparse.Namespace, processor: Any) -> Arm:
    """The arm ``name`` with fixed random weights (``processor``: lynx_zoo's, whose token ids HF LLaVA gets too)."""
    if name == HF:
        model = llava_model(len(processor.tokenizer), llm_trainable=True)
        model.train()
        model.model.vision_tower.eval()  # frozen, as lynx_zoo keeps its frozen tower
        collate = llava_collate(processor, model.config.image_token_index)

        def hf_loss(batch: dict[str, Any]) -> torch.Tensor:
            if batch["pixel_values"] is None:
                batch = {k: v for k, v in batch.items() if k != "pixel_values"}
            return model(**batch).loss

        return Arm(model, collate, hf_loss)
    bridge = RESAMPLER if "resampler" in name else None
    model = lynx_model(llm_trainable=True, bridge=bridge, max_length=args.max_length)
    model.train()
    full = name.endswith("full_logits")
    collate: Callable = model.processor
    if "packed" in name:
        collate = PackingCollate(model.processor, args.pack_tokens, model.media_tokens_in_sequence)
    if name.endswith("compiled"):
        compile_regions(model, ["llm_layers"], dynamic=True)  # packed rows change shape every step
    return Arm(model, collate, lambda batch: model(**model_inputs(batch), return_logits=full).loss)


def arm_names(args: argparse.Namespace) -> list[str]:
    names = [HF, "lynx_mlp_full_logits", "lynx_mlp", "lynx_mlp_packed", "lynx_resampler_packed"]
    return names + (["lynx_resampler_packed_compiled"] if args.compile else [])


def bare_loop(arm: Arm, steps: int) -> Callable[[list[Sample]], dict[str, Any]]:
    """One optimizer step of an arm on a round: collate, forward, backward, AdamW and schedule steps."""
    params = [(n, p) for n, p in arm.model.named_parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, steps, OPTIMIZER)

    def step(samples: list[Sample]) -> dict[str, Any]:
        batch = arm.collate(samples)
        arm.loss(batch).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return batch

    return step


def batch_facts(batch: dict[str, Any], visual_in_sequence: int) -> dict[str, int]:
    """Samples, target tokens, LLM input tokens and padded tokens of a collated batch."""
    mask = batch["attention_mask"]
    if "segment_ids" in batch:  # packed: the visual slots are in the rows already
        llm_tokens, padded = mask.numel(), int(batch["padded_tokens"])
    else:  # padded: a PT model puts `visual_in_sequence` tokens before each image sample's text
        visual = visual_in_sequence if batch.get("images") is not None else 0
        llm_tokens, padded = mask.shape[0] * (mask.shape[1] + visual), int((mask == 0).sum())
    return {
        "samples": samples_in(batch),
        "targets": target_tokens_of(batch),
        "llm_tokens": llm_tokens,
        "padded": padded,
    }


# ---------------------------------------------------------------------------------------------- timing
class Interleave(L.Callback):
    """After each Lightning step (a round), one step of every bare arm on the same round, each timed."""

    def __init__(self, rounds: list[list[Sample]], loops: dict[str, Callable], visual: dict[str, int]) -> None:
        self.rounds, self.loops, self.visual = rounds, loops, visual
        self.times: dict[str, list[float]] = {LIGHTNING: [], **{name: [] for name in loops}}
        self.facts: dict[str, list[dict[str, int]]] = {name: [] for name in loops}
        self.load: list[float] = []
        self.resumed: float | None = None

    def on_train_start(self, *args: Any) -> None:
        self.resumed = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.times[LIGHTNING].append(time.perf_counter() - self.resumed)
        for name, step in self.loops.items():
            start = time.perf_counter()
            collated = step(self.rounds[batch_idx])
            self.times[name].append(time.perf_counter() - start)
            self.facts[name].append(batch_facts(collated, self.visual[name]))
        self.load.append(os.getloadavg()[0])
        print(f"round {batch_idx}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in self.times.items()), flush=True)
        self.resumed = time.perf_counter()


def measure_memory(args: argparse.Namespace) -> None:
    """In a fresh process: the peak memory of one step of ``--memory-arm`` on round ``--memory-round``."""
    torch.set_num_threads(args.threads)
    processor = lynx_model(max_length=args.max_length).processor
    arm = build_arm(args.memory_arm, args, processor)
    round_ = sample_sets(args, processor)[1][args.memory_round]
    step = bare_loop(arm, 4)
    step(round_)  # warm-up: optimizer state, allocator pools

    def status(key: str) -> int:
        line = next(line for line in open("/proc/self/status") if line.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = status("VmRSS")
    step(round_)
    print(json.dumps({"arm": args.memory_arm, "peak_bytes": status("VmHWM") - before}))


def peak_memory(name: str, args: argparse.Namespace, round_index: int) -> float:
    """MB, measured by :func:`measure_memory` in a child process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
    shared = ("batch", "rounds", "warmup", "seed", "max_length", "pack_tokens", "threads")
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in shared]
    command = [sys.executable, __file__, "--memory-arm", name, "--memory-round", str(round_index), *options]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="samples per round (global batch)")
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1, help="rounds before them, not counted")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=512, help="text tokens per sample")
    parser.add_argument("--pack-tokens", type=int, default=1024, help="LLM tokens per packed row")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="add an arm with compiled decoder layers")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--memory-arm", help=argparse.SUPPRESS)
    parser.add_argument("--memory-round", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error(f"--rounds: at least 2 (at least one measured round is text-only), got {args.rounds}")
    if args.memory_arm:
        return measure_memory(args)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    load_at_start = os.getloadavg()

    processor = lynx_model(max_length=args.max_length).processor
    lightning_model = build_arm(LIGHTNING_ARM, args, processor)
    warmup_rounds, measured_rounds = sample_sets(args, processor)
    rounds = warmup_rounds + measured_rounds
    names = arm_names(args)
    arms = {name: build_arm(name, args, processor) for name in names}
    steps = len(rounds)
    loops = {name: bare_loop(arm, steps) for name, arm in arms.items()}
    visual = {name: 0 if name == HF or "packed" in name else arms[name].model.media_tokens_in_sequence(1)
              for name in names}  # fmt: skip
    interleave = Interleave(rounds, loops, visual)
    trainer = measuring_trainer(steps, interleave)
    # the model's own configure_optimizers: AdamW and the schedule over max_steps, as the bare loops
    loader = DataLoader(rounds, batch_size=None, collate_fn=lightning_model.collate)
    trainer.fit(lightning_model.model, train_dataloaders=loader)

    w = args.warmup
    totals = {name: sum(times[w:]) for name, times in interleave.times.items()}
    facts = {name: [f for f in per_round[w:]] for name, per_round in interleave.facts.items()}
    with_images = [r for r in range(args.rounds) if measured_rounds[r][0].image is not None]
    memory_round = max(with_images, key=lambda r: facts[HF][r]["llm_tokens"])  # of the measured rounds
    memory = {} if args.no_memory else {name: peak_memory(name, args, memory_round) for name in names}
    rows = []
    for name in names:
        total = sum(f["samples"] for f in facts[name])
        rows.append(
            {
                "arm": name,
                "samples_per_s": total / totals[name],
                "target_tokens_per_s": sum(f["targets"] for f in facts[name]) / totals[name],
                "padded_share": sum(f["padded"] for f in facts[name]) / sum(f["llm_tokens"] for f in facts[name]),
                "peak_memory_MB": memory.get(name),
                "total_s": totals[name],
                "median_round_s": float(np.median(interleave.times[name][w:])),
            }
        )
    hf = rows[0]
    for row in rows:
        row["vs_hf_samples_per_s"] = row["samples_per_s"] / hf["samples_per_s"]
        if memory:
            row["vs_hf_peak_memory"] = row["peak_memory_MB"] / hf["peak_memory_MB"]
    by_name = {row["arm"]: row for row in rows}

    def gain(faster: str, slower: str) -> float:
        return by_name[faster]["samples_per_s"] / by_name[slower]["samples_per_s"]

    speedups = {
        "answer_only_logits (lynx_mlp / lynx_mlp_full_logits)": gain("lynx_mlp", "lynx_mlp_full_logits"),
        "packing (lynx_mlp_packed / lynx_mlp)": gain("lynx_mlp_packed", "lynx_mlp"),
        "resampler bridge (lynx_resampler_packed / lynx_mlp_packed)": gain("lynx_resampler_packed", "lynx_mlp_packed"),
        "framework, like for like (lynx_mlp_full_logits / hf_llava)": gain("lynx_mlp_full_logits", HF),
    }
    if args.compile:
        speedups["compile (..._compiled / lynx_resampler_packed)"] = gain(
            "lynx_resampler_packed_compiled", "lynx_resampler_packed"
        )
    lightning_overhead = totals[LIGHTNING] / totals[LIGHTNING_ARM] - 1
    lengths = [len(processor.encode(s)[0]) for r in measured_rounds for s in r]
    data = {
        "samples": len(lengths),
        "text_only_share": sum(s.image is None for r in measured_rounds for s in r) / len(lengths),
        "text_tokens": {
            "mean": float(np.mean(lengths)),
            "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
            "max": int(max(lengths)),
        },  # fmt: skip
        "target_share_of_text": sum(f["targets"] for f in facts[HF]) / sum(lengths),
    }
    print(json.dumps({"speedups": speedups, "lightning_overhead": lightning_overhead, "data": data}, indent=2))
    report(
        "train_throughput",
        rows,
        COLUMNS,
        settings={k: v for k, v in vars(args).items() if not k.startswith("memory")},
        speedups=speedups,
        lightning_overhead_vs_bare_loop=lightning_overhead,
        lightning_total_s=totals[LIGHTNING],
        data=data,
        memory_round=memory_round,
        load_average={"at_start": load_at_start, "per_round_1min": interleave.load, "at_end": os.getloadavg()},
    )


if __name__ == "__main__":
    main()
