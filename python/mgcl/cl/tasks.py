"""A task of the sequence (SPEC.md section 1)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Task:
    """One classification task: ``train`` / ``test`` are map-style datasets whose
    items are ``(image, label)`` with ``image`` a PIL image (the model adapter's
    ``transform`` turns it into a tensor) and ``label`` an int in
    ``range(len(classnames))``. ``templates`` are prompt formats with one ``{}``
    for the class name (e.g. ``"a fundus photograph of {}."``).
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
        if not self.templates:
            raise ValueError(f"Task {self.name!r}: no prompt templates")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"Task {self.name!r}: template {t!r} must contain exactly one '{{}}'")

    def prompts(self, template: int | None = 0) -> list[str]:
        """One prompt per class from template ``template`` (all templates when None)."""
        temps = self.templates if template is None else [self.templates[template]]
        return [t.format(c) for t in temps for c in self.classnames]
