"""One configuration of the frozen-LLM study's recipe sweep (``benchmarks/study_sweep/run.sh`` runs them all): stage 0
(text only) then frozen-LLM rows, through lynx_zoo's own model classes, processor, optimizer and ``save_llm``, in a
plain loop on in-memory scenes (no Lightning, no PNG decoding: fast on a GPU); teacher-forced exact-answer accuracy
per category on held-out scenes (training phrasing and held-out phrasings). Appends one JSON line per finished phase
(and a progress line every ``eval_every`` steps) to OUT/results.jsonl.

usage: python benchmarks/study_sweep/sweep.py OUT NAME 'JSON settings'   (DEVICE, DEADLINE, THREADS, EXTRA: env)
"""

import json
import os
import random
import sys
import tempfile
import time
import traceback

import torch

OUT, NAME, SETTINGS = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
DEVICE = os.environ.get("DEVICE", "cuda")
DEADLINE = float(os.environ.get("DEADLINE", time.time() + 300))
torch.set_num_threads(int(os.environ.get("THREADS", "1")))

from lynx_zoo.adapters import AdapterConfig  # noqa: E402
from lynx_zoo.bridge import BridgeConfig  # noqa: E402
from lynx_zoo.data.processor import IGNORE_INDEX, PromptConfig, Sample  # noqa: E402
from lynx_zoo.fusion.cross_attn import CrossAttnConfig, CrossAttnLynx  # noqa: E402
from lynx_zoo.fusion.prefix import PrefixLynx  # noqa: E402
from lynx_zoo.hub.export import save_llm  # noqa: E402
from lynx_zoo.llm import LLMConfig  # noqa: E402
from lynx_zoo.optim import OptimizerConfig, build_optimizer  # noqa: E402
from lynx_zoo.recipes.shapes_study import (  # noqa: E402
    PHRASINGS,
    caption,
    draw_scene,
    phrase,
    questions,
    render,
)
from lynx_zoo.vision import VisionConfig  # noqa: E402

S = {
    "width": 128,
    "layers": 4,
    "heads": 4,
    "s0_steps": 3000,
    "s0_lr": 2e-3,
    "s0_batch": 32,
    "s0_frac": 0.45,  # share of the remaining time stage 0 may use
    "fmt": "caption",
    "pt_steps": 1500,
    "pt_lr": 1e-3,
    "pt_batch": 32,
    "queries": 16,
    "rows": ["pt_none", "pt_every2", "pt_lora", "ca_frozen"],
    "eval_every": 250,
    "num_text": 8000,
    "num_train": 8000,
    "num_val": 300,
    "seed": 0,
}
S.update(SETTINGS)
S.update(json.loads(os.environ.get("EXTRA", "{}")))  # overrides for a quick test
TOKENIZER = "lynx_zoo/shapes-study-words"


def emit(record: dict) -> None:
    record = {"name": NAME, "settings": S, "device": DEVICE, **record}
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record)[:400], flush=True)


def progress(phase: str, point: dict) -> None:
    """An intermediate line (a kill loses little): the phase's latest curve point."""
    with open(os.path.join(OUT, "results.jsonl"), "a") as f:
        f.write(json.dumps({"name": NAME, "phase": phase, "progress": point}) + "\n")


def cap(objects):
    if S["fmt"] == "tele":
        return " , ".join(f"{o['colour']} {o['shape']} {o['pattern']} {o['quadrant']}" for o in objects) + " ."
    return caption(objects)


# ------------------------------------------------------------------ data
def text_samples(count, rng, all_phrasings=True):
    out = []
    for _ in range(count):
        objects = draw_scene(rng)
        for q in questions(rng, objects):
            template = rng.choice(PHRASINGS[q["category"]])
            out.append(Sample(f"{cap(objects)} {template.format(**q['fields'])}", q["answer"], category=q["category"]))
    return out


def image_scenes(count, rng):
    scenes = []
    for _ in range(count):
        objects = draw_scene(rng)
        background = tuple(rng.randint(200, 245) for _ in range(3))
        scenes.append((render(objects, 64, background), questions(rng, objects)))
    return scenes


def llm_config(**kw):
    w = S["width"]
    return LLMConfig(
        tokenizer=TOKENIZER,
        config=dict(
            model_type="llama",
            hidden_size=w,
            intermediate_size=4 * w,
            num_hidden_layers=S["layers"],
            num_attention_heads=S["heads"],
            num_key_value_heads=S["heads"],
            max_position_embeddings=256,
        ),
        **kw,
    )


def vision_config(size=64):
    return VisionConfig(
        model_name="vit_tiny_patch16_224",
        image_size=size,
        trainable=True,
        model_kwargs=dict(patch_size=16, embed_dim=128, depth=2, num_heads=4),
    )


def to_device(batch):
    return {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in batch.items()}


@torch.no_grad()
def accuracy(model, batches):
    """Teacher-forced: a question is right when every answer token (and the end) is the argmax."""
    model.eval()
    hits, counts = {}, {}
    for batch in batches:
        out = model(batch["input_ids"], batch["attention_mask"], batch.get("images"))
        labels = batch["labels"]
        logits = out.logits
        if logits.shape[1] > labels.shape[1]:
            labels = torch.cat(
                [labels.new_full((labels.shape[0], logits.shape[1] - labels.shape[1]), IGNORE_INDEX), labels], 1
            )
        pred, lab = logits[:, :-1].argmax(-1), labels[:, 1:]
        ok = ((pred == lab) | (lab == IGNORE_INDEX)).all(-1).tolist()
        for c, good in zip(batch["categories"], ok):
            hits[c] = hits.get(c, 0) + good
            counts[c] = counts.get(c, 0) + 1
    model.train()
    acc = {c: round(hits[c] / counts[c], 3) for c in sorted(counts)}
    acc["overall"] = round(sum(hits.values()) / sum(counts.values()), 3)
    return acc


def chance(samples):
    by = {}
    for s in samples:
        by.setdefault(s.category, {}).setdefault(s.answer, 0)
        by[s.category][s.answer] += 1
    out = {c: round(max(n.values()) / sum(n.values()), 3) for c, n in by.items()}
    out["overall"] = round(sum(max(n.values()) for n in by.values()) / len(samples), 3)
    return out


def chunks(samples, size, processor):
    return [to_device(processor(samples[i : i + size])) for i in range(0, len(samples), size)]


# ------------------------------------------------------------------ stage 0
def stage0(llm_dir):
    torch.manual_seed(S["seed"])
    model = PrefixLynx(
        vision=vision_config(),
        bridge=BridgeConfig(kind="mlp"),
        llm=llm_config(pretrained=False, trainable=True),
        adapters=AdapterConfig(every=None),
        optimizer=OptimizerConfig(lr=S["s0_lr"], min_lr=1e-4, warmup_ratio=0.05),
        prompt=PromptConfig(max_length=64),
    ).to(DEVICE)
    model.train()
    proc = model.processor
    train = text_samples(S["num_text"], random.Random(1000 + S["seed"]))
    val = text_samples(S["num_val"], random.Random(99))
    val_batches = chunks(val, 256, proc)
    opt, sched = build_optimizer(model.trainable_parameters(), S["s0_steps"], model.optimizer_config)
    rng = random.Random(S["seed"])
    budget = (DEADLINE - time.time()) * S["s0_frac"]
    started = time.time()
    curve, step = [], 0
    while step < S["s0_steps"] and time.time() - started < budget:
        batch = to_device(proc(rng.sample(train, S["s0_batch"])))
        loss = model(batch["input_ids"], batch["attention_mask"], None, batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % S["eval_every"] == 0:
            curve.append(
                {
                    "step": step,
                    "s": round(time.time() - started, 1),
                    "loss": round(loss.item(), 3),
                    "acc": accuracy(model, val_batches),
                }
            )
            progress("stage0", curve[-1])
    final = accuracy(model, val_batches)
    emit(
        {
            "phase": "stage0",
            "steps": step,
            "wall_s": round(time.time() - started, 1),
            "acc": final,
            "chance": chance(val),
            "curve": curve,
        }
    )
    model.cpu()
    save_llm(model, llm_dir)


# ------------------------------------------------------------------ frozen rows
ROWS = {
    "pt_none": dict(cls="pt", adapters=dict(every=None)),
    "pt_every2": dict(cls="pt", adapters=dict(kind="bottleneck", every=2)),
    "pt_every1": dict(cls="pt", adapters=dict(kind="bottleneck", every=1)),
    "pt_lora": dict(
        cls="pt",
        adapters=dict(kind="lora", every=1, rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")),
    ),
    "pt_every2_lowres": dict(cls="pt", adapters=dict(kind="bottleneck", every=2), size=32),
    "pt_every2_single": dict(cls="pt", adapters=dict(kind="bottleneck", every=2), phrasings="single"),
    "ca_frozen": dict(cls="ca", adapters=dict(every=None)),
    "ca_trainable": dict(cls="ca", adapters=dict(every=None), trainable=True, text_ratio=0.25),
}


def row(name, llm_dir, scenes, val_scenes, text_pool, time_budget):
    spec = ROWS[name]
    torch.manual_seed(S["seed"])
    kwargs = dict(
        vision=vision_config(spec.get("size", 64)),
        bridge=BridgeConfig(kind="resampler", num_queries=S["queries"], depth=2, num_heads=4, head_dim=32, ff_mult=2),
        llm=llm_config(model=llm_dir, trainable=spec.get("trainable", False)),
        adapters=AdapterConfig(**spec["adapters"]),
        optimizer=OptimizerConfig(lr=S["pt_lr"], min_lr=1e-4, warmup_ratio=0.05),
        prompt=PromptConfig(max_length=64),
    )
    if spec["cls"] == "ca":
        model = CrossAttnLynx(
            **kwargs, cross_attn=CrossAttnConfig(every=2, start=1, num_heads=4, head_dim=32, ff_mult=2)
        )
    else:
        model = PrefixLynx(**kwargs)
    model = model.to(DEVICE)
    model.train()
    proc = model.processor
    transform = model.vision.image_transform()
    pixels = torch.stack([transform(img) for img, _ in scenes]).to(DEVICE)
    val_pixels = torch.stack([transform(img) for img, _ in val_scenes]).to(DEVICE)
    rng = random.Random(S["seed"] + 7)
    phrasings = spec.get("phrasings", "diverse")
    items = [(i, q) for i, (_, qs) in enumerate(scenes) for q in qs]
    # fixed phrasings per item, as the manifests fix them
    train = [(i, phrase(q["category"], q["fields"], phrasings, rng), q) for i, q in items]

    def val_set(kind):
        r = random.Random(5)
        samples, idx = [], []
        for i, (_, qs) in enumerate(val_scenes):
            for q in qs:
                samples.append(Sample(phrase(q["category"], q["fields"], kind, r), q["answer"], category=q["category"]))
                idx.append(i)
        batches = []
        for k in range(0, len(samples), 256):
            b = to_device(proc(samples[k : k + 256]))
            b["images"] = val_pixels[idx[k : k + 256]]
            batches.append(b)
        return samples, batches

    val_samples, val_batches = val_set("single")
    _, held_batches = val_set("held_out")
    opt, sched = build_optimizer(model.trainable_parameters(), S["pt_steps"], model.optimizer_config)
    started, step, curve = time.time(), 0, []
    text_ratio = spec.get("text_ratio", 0.0)
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    while step < S["pt_steps"] and time.time() - started < time_budget:
        if text_ratio and rng.random() < text_ratio:
            batch = to_device(proc(rng.sample(text_pool, S["pt_batch"])))
            images = None
        else:
            chosen = rng.sample(train, S["pt_batch"])
            batch = to_device(proc([Sample(t, q["answer"], category=q["category"]) for _, t, q in chosen]))
            images = pixels[[i for i, _, _ in chosen]]
        loss = model(batch["input_ids"], batch["attention_mask"], images, batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in model.trainable_parameters()], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % S["eval_every"] == 0:
            curve.append(
                {
                    "step": step,
                    "s": round(time.time() - started, 1),
                    "loss": round(loss.item(), 3),
                    "acc": accuracy(model, val_batches),
                }
            )
            progress(name, curve[-1])
    emit(
        {
            "phase": name,
            "steps": step,
            "wall_s": round(time.time() - started, 1),
            "trainable_params": trainable,
            "acc": accuracy(model, val_batches),
            "acc_held_out": accuracy(model, held_batches),
            "chance": chance(val_samples),
            "curve": curve,
        }
    )


def main():
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        llm_dir = os.path.join(tmp, "llm")
        stage0(llm_dir)
        rng = random.Random(0)
        scenes = image_scenes(S["num_train"], rng)
        val_scenes = image_scenes(S["num_val"], random.Random(12345))
        text_pool = text_samples(2000, random.Random(77))
        rows = list(S["rows"])
        for k, name in enumerate(rows):
            left = DEADLINE - time.time() - 5
            if left < 10:
                emit({"phase": name, "skipped": "no time left"})
                continue
            try:
                row(name, llm_dir, scenes, val_scenes, text_pool, left / (len(rows) - k))
            except Exception:
                emit({"phase": name, "error": traceback.format_exc()[-3000:]})


if __name__ == "__main__":
    try:
        main()
    except Exception:
        emit({"phase": "error", "error": traceback.format_exc()[-3000:]})
        raise
