"""Per-task instruction templates: one prompt per task, or several paraphrases (the "diverse prompts" switch).

Lynx wrote a few instructions per task by hand and expanded them to ~15 paraphrases each; its ablation
"w/o diverse prompts" trains with a single one. A templates file maps a task name to its templates
(YAML or JSON); ``{question}`` is replaced by the sample's question, and a template without it (a
captioning instruction) ignores the question. With ``diverse=False`` every sample of a task gets the
task's first template; a task with no templates passes its question through unchanged.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from lynx_zoo.resources import shipped

DEFAULT_TEMPLATES = shipped("data/templates.yaml")


class InstructionTemplates:
    """Turns a task's question into an instruction.

    Args:
        templates: task name -> templates (the first is the task's single template).
        diverse: draw one of the task's templates per sample (training) instead of always the first.
    """

    def __init__(self, templates: dict[str, list[str]], diverse: bool = True) -> None:
        for task, options in templates.items():
            if not isinstance(options, list) or not options or not all(isinstance(t, str) for t in options):
                raise ValueError(f"templates of task {task!r}: expected a non-empty list of strings, got {options!r}")
            for template in options:
                try:
                    template.format(question="")
                except (KeyError, IndexError, ValueError) as err:
                    raise ValueError(
                        f"template {template!r} of task {task!r}: only {{question}} can be filled in ({err!r}); "
                        "write a literal brace as {{ or }}"
                    ) from err
        self.templates = templates
        self.diverse = diverse

    @classmethod
    def from_file(cls, path: str | Path | None = None, diverse: bool = True) -> InstructionTemplates:
        """Templates from a YAML/JSON file (``None``: the zoo's own ``lynx_zoo/data/templates.yaml``)."""
        path = Path(path) if path else DEFAULT_TEMPLATES
        if not path.is_file():
            raise FileNotFoundError(f"templates file not found: {path}")
        with path.open(encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of task name -> list of templates")
        return cls(loaded, diverse)

    def render(self, task: str, question: str = "", rng: random.Random | None = None) -> str:
        """The instruction for ``question`` of ``task``; ``rng`` draws the template when diverse (training)."""
        options = self.templates.get(task)
        if not options:
            return question
        template = rng.choice(options) if self.diverse and rng is not None else options[0]
        return template.format(question=question.strip())
