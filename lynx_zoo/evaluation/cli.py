"""``python -m lynx_zoo evaluate ...`` and ``python -m lynx_zoo report ...`` (argparse; see docs/evaluation.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lynx_zoo.evaluation.judges import Judge

# The options are parsed before the runner, the judges and torch are imported, so --help answers at once.


def evaluate_parser() -> argparse.ArgumentParser:
    """The options of ``evaluate``."""
    parser = argparse.ArgumentParser(
        prog="python -m lynx_zoo evaluate",
        description="Evaluate lynx_zoo models on benchmarks; one results JSON per variant x benchmark.",
    )
    parser.add_argument(
        "models",
        nargs="*",
        metavar="[NAME=]MODEL",
        help="models to evaluate: Lightning checkpoints (named after their run folder unless NAME= is given), "
        "variant folders or variant names",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="[NAME=]MODEL",
        help="a model to evaluate, as the positional arguments take them (repeatable)",
    )
    bench = parser.add_argument_group("benchmarks (each repeatable; NAME= names the results)")
    bench.add_argument(
        "--vqa",
        action="append",
        default=[],
        metavar="[NAME=]MANIFEST",
        help="JSONL manifest; exact match (normalised), accuracy per category",
    )
    bench.add_argument(
        "--openvqa",
        action="append",
        default=[],
        metavar="[NAME=]MANIFEST",
        help="JSONL manifest of open-ended questions, judged by --judge",
    )
    bench.add_argument(
        "--mme", action="append", default=[], metavar="[NAME=]ROOT", help="MME folder (14 subtask folders)"
    )
    bench.add_argument(
        "--owleval",
        action="append",
        default=[],
        metavar="[NAME=]JSONL",
        help="open instructions (image, instruction, id): answers and a side-by-side table to rate",
    )
    parser.add_argument("--results", type=Path, default=Path("results"), help="results folder (default: results)")
    parser.add_argument("--limit", type=int, help="at most N questions per benchmark (MME: N images per subtask)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions per generate call (default: 8)")
    parser.add_argument("--max-new-tokens", type=int, help="default: the model's eval_generation")
    parser.add_argument("--num-beams", type=int, help="default: the model's eval_generation")
    parser.add_argument("--device", help="default: cuda where available, else cpu")
    parser.add_argument("--model-class", help="for checkpoints that record no class: a registered one (PrefixLynx)")
    judge = parser.add_argument_group("judge (openvqa benchmarks)")
    judge.add_argument(
        "--judge",
        choices=("exact", "openai", "hf"),
        default="exact",
        help="exact: normalised match; openai: an OpenAI-compatible endpoint; hf: a local transformers LLM",
    )
    judge.add_argument("--judge-model", help="openai: the model name; hf: an HF id, a local folder or package://NAME")
    judge.add_argument("--judge-url", help="openai: the API root, e.g. https://api.openai.com/v1")
    judge.add_argument(
        "--judge-api-key-env",
        default="OPENAI_API_KEY",
        help="openai: NAME of the environment variable with the API key ('' for none)",
    )
    judge.add_argument("--judge-timeout", type=float, default=30.0, help="openai: seconds per request")
    judge.add_argument("--judge-retries", type=int, default=4, help="openai: retries on 429, 5xx and timeouts")
    judge.add_argument("--judge-rps", type=float, help="openai: at most this many requests per second")
    judge.add_argument(
        "--judge-max-failures",
        type=int,
        default=5,
        help="end the run (non-zero) after this many failed judgements in a row (default 5; 0: never)",
    )
    judge.add_argument(
        "--judge-time-limit", type=float, help="end the run (non-zero) once judging has taken this many seconds"
    )
    judge.add_argument("--judge-gguf-file", help="hf: a GGUF file inside --judge-model")
    judge.add_argument("--judge-cache", type=Path, help="judgement cache (default: RESULTS/judge_cache.sqlite)")
    judge.add_argument("--no-judge-cache", action="store_true", help="ask the judge again for every triple")
    return parser


def build_judge(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Judge:
    """The judge the ``--judge*`` options describe."""
    from lynx_zoo.evaluation.judges import ExactMatchJudge, OpenAIChatJudge, TransformersJudge
    from lynx_zoo.llm.causal_lm import LLMConfig

    if args.judge == "exact":
        return ExactMatchJudge()
    if not args.judge_model:
        parser.error(f"--judge {args.judge} needs --judge-model")
    if args.judge == "openai":
        if not args.judge_url:
            parser.error("--judge openai needs --judge-url")
        return OpenAIChatJudge(
            args.judge_url,
            args.judge_model,
            api_key_env=args.judge_api_key_env or None,
            timeout=args.judge_timeout,
            max_retries=args.judge_retries,
            requests_per_second=args.judge_rps,
        )
    config = LLMConfig(model=args.judge_model, gguf_file=args.judge_gguf_file)
    return TransformersJudge.from_config(config, device=args.device)


def evaluate_main(argv: list[str]) -> list[Path]:
    """``evaluate``: run the benchmarks for every model; returns the results files written."""
    parser = evaluate_parser()
    args = parser.parse_args(argv)
    import torch

    from lynx_zoo.evaluation.judges import ExactMatchJudge, JudgeBudget, JudgementCache
    from lynx_zoo.evaluation.runner import BENCHMARK_KINDS, Evaluator, parse_benchmark, parse_variant

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    benchmarks = [parse_benchmark(kind, spec) for kind in BENCHMARK_KINDS for spec in getattr(args, kind)]
    if not benchmarks:
        parser.error("no benchmark given: use --vqa, --openvqa, --mme or --owleval")
    variants = [parse_variant(spec) for spec in [*args.models, *args.variant]]
    if not variants:
        parser.error("no model given: name checkpoints, variant folders or variant names (or --variant NAME)")
    uses_judge = any(b.kind == "openvqa" for b in benchmarks)
    judge = build_judge(args, parser) if uses_judge else ExactMatchJudge()
    cache = None
    if uses_judge and judge.cacheable and not args.no_judge_cache:
        cache = JudgementCache(args.judge_cache or args.results / "judge_cache.sqlite")
    generation = {
        k: v for k, v in (("max_new_tokens", args.max_new_tokens), ("num_beams", args.num_beams)) if v is not None
    }
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    evaluator = Evaluator(
        results_dir=args.results,
        judge=judge,
        cache=cache,
        batch_size=args.batch_size,
        generation=generation,
        limit=args.limit,
        device=args.device,
        model_class=args.model_class,
        judge_budget=JudgeBudget(args.judge_max_failures or None, args.judge_time_limit),
    )
    try:
        written = evaluator.run(variants, benchmarks)
    finally:
        if cache is not None:
            cache.close()
    print("\n".join(str(p) for p in written))
    return written


def report_main(argv: list[str]) -> Path:
    """``report``: the Markdown table and the charts of results files or folders."""
    parser = argparse.ArgumentParser(
        prog="python -m lynx_zoo report",
        description="A Markdown table (variants x benchmark metrics) and PNG bar charts from evaluate's results.",
    )
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files or folders")
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: report)")
    args = parser.parse_args(argv)
    from lynx_zoo.evaluation.report import write_report

    report = write_report(args.results, args.out)
    print(report)
    return report
