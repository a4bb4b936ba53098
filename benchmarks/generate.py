"""Generation speed: tokens/s of lynx_zoo's ``generate()`` vs HF transformers' LLaVA ``generate`` at matched
size (the models of benchmarks/train_step.py, random weights), greedy with a KV cache, batch 1 and 16.

Both get the same prompts (lynx_zoo's prompt format, left-padded) and one image each and must produce exactly
``--new`` tokens (``min_new_tokens`` = ``max_new_tokens``). Turns alternate within one process; medians.

    python benchmarks/generate.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scale_common import image_tokens, llava_inputs, llava_model, lynx_model, report

from lynx_zoo.data.processor import Sample


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new", type=int, default=16, help="new tokens per sample")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    lynx = lynx_model().eval()
    llava = llava_model(len(lynx.tokenizer)).eval()
    settings = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, num_beams=1)
    questions = ["what is in the picture?", "how many shapes are there?", "describe the scene in detail please."]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for size in args.batches:
            prompts = [questions[i % len(questions)] for i in range(size)]
            images = torch.randn(size, 3, 224, 224, generator=torch.Generator().manual_seed(size))
            text = lynx.processor.prompts([Sample(p) for p in prompts])
            hf = llava_inputs(text["input_ids"], text["attention_mask"], llava.config.image_token_index)

            start = time.perf_counter()
            out = lynx.generate(images, prompts, **settings)
            times.setdefault(("lynx_zoo generate()", size), []).append(time.perf_counter() - start)
            assert len(out) == size

            start = time.perf_counter()
            ids = llava.generate(
                **hf,
                pixel_values=images,
                pad_token_id=lynx.tokenizer.pad_token_id,
                eos_token_id=lynx.tokenizer.eos_token_id,
                **settings,
            )
            times.setdefault(("HF LLaVA generate()", size), []).append(time.perf_counter() - start)
            assert ids.shape[1] - hf["input_ids"].shape[1] == args.new

    rows = [
        {
            "run": name,
            "batch": size,
            "median_s": statistics.median(measured),
            "new_tokens_per_s": size * args.new / statistics.median(measured),
            "prompt_tokens": f"{image_tokens()} visual + text",
        }
        for (name, size), measured in sorted(times.items(), key=lambda item: (item[0][1], item[0][0]))
    ]
    report("generate", rows, ["run", "batch", "median_s", "new_tokens_per_s", "prompt_tokens"], settings=vars(args))


if __name__ == "__main__":
    main()
