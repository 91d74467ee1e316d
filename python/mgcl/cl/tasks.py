"""A task of the sequence (SPEC.md section 1)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Task:
    """One classification task: ``train`` / ``test`` are map-style datasets whose
    items are ``(image, label)`` with ``image`` a PIL image or an image tensor
    ``[3,H,W]`` (the model adapter's ``transform`` prepares it) and ``label`` an
    int in ``range(len(classnames))``. ``templates`` are prompt formats with one
    ``{}`` for the class name (e.g. ``"a fundus photograph of {}."``), or
    callables mapping a class name to a prompt (open_clip / ZSCL style); a
    single string is one template. ``meta`` is free-form; results files take
    their ``benchmark`` and ``synthetic`` from it (the benchmark loaders fill them).
    """

    name: str
    domain: str
    classnames: Sequence[str]
    templates: Sequence[str]
    train: Any
    test: Any
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.name:
            raise ValueError("Task: empty name")
        if len(self.classnames) < 2:
            raise ValueError(f"Task {self.name!r}: needs at least 2 classes, got {len(self.classnames)}")
        if len(set(self.classnames)) != len(self.classnames):
            raise ValueError(f"Task {self.name!r}: duplicated class names")
        if isinstance(self.templates, str):
            self.templates = [self.templates]
        if not self.templates:
            raise ValueError(f"Task {self.name!r}: no prompt templates")
        for t in self.templates:
            if callable(t):
                if not isinstance(t(str(self.classnames[0])), str):
                    raise ValueError(f"Task {self.name!r}: template {t!r} must return a string")
            elif not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(f"Task {self.name!r}: template {t!r} must be a string with exactly one '{{}}' "
                                 "or a callable")

    def prompts(self, template: int | None = 0) -> list[str]:
        """One prompt per class from template ``template`` (all templates when None)."""
        temps = self.templates if template is None else [self.templates[template]]
        return [t(c) if callable(t) else t.format(c) for t in temps for c in self.classnames]

    def finished(self):
        """This task as the retrieval side sees a finished one
        (:class:`mgcl.retrieval.FinishedTask`: name, domain, the class prompts of
        template 0, the training images)."""
        from ..retrieval.siphon import FinishedTask  # noqa: PLC0415

        return FinishedTask(self.name, self.domain, tuple(self.prompts(0)), self.train)
