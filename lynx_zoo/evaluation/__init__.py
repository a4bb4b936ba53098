"""Evaluation: MME, Open-VQA-style judging, OwlEval-style answer dumps, reports, and an lmms-eval plugin."""

from typing import TYPE_CHECKING

from lynx_zoo.lazy import lazy_exports

if TYPE_CHECKING:
    from lynx_zoo.evaluation.judges import (
        JUDGE_PROMPT,
        ExactMatchJudge,
        Judge,
        JudgeError,
        Judgement,
        JudgementCache,
        OpenAIChatJudge,
        TransformersJudge,
        judge_all,
        judge_prompt,
        parse_judge_reply,
    )
    from lynx_zoo.evaluation.mme import MMEBenchmark, MMEFormatError, MMEQuestion, load_mme
    from lynx_zoo.evaluation.report import write_report
    from lynx_zoo.evaluation.runner import (
        Benchmark,
        Evaluator,
        Variant,
        write_side_by_side,
    )
    from lynx_zoo.metrics import (
        COGNITION,
        MME_SUBTASKS,
        PERCEPTION,
        CategoryAccuracy,
        MMEScore,
        mme_yes_no,
    )

__getattr__, __dir__ = lazy_exports(__name__, __file__)

__all__ = [
    "COGNITION",
    "JUDGE_PROMPT",
    "MME_SUBTASKS",
    "PERCEPTION",
    "Benchmark",
    "CategoryAccuracy",
    "Evaluator",
    "ExactMatchJudge",
    "Judge",
    "JudgeError",
    "Judgement",
    "JudgementCache",
    "MMEBenchmark",
    "MMEFormatError",
    "MMEQuestion",
    "MMEScore",
    "OpenAIChatJudge",
    "TransformersJudge",
    "Variant",
    "judge_all",
    "judge_prompt",
    "load_mme",
    "mme_yes_no",
    "parse_judge_reply",
    "write_report",
    "write_side_by_side",
]
