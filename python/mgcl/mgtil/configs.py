"""The run configs that ship with mgcl, by name: ``mgcl run NAME``.

They are the ``configs/*.yaml`` files of the source tree. A wheel installs them
as ``mgcl/configs/`` (CMakeLists.txt); an editable checkout reads them where
they are, so ``mgcl run configs/<name>.yaml`` keeps working from a checkout.
"""
from __future__ import annotations

import os
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent        # .../mgcl
_DIRS = (_PACKAGE / "configs",                           # installed from a wheel
         _PACKAGE.parent.parent / "configs")             # a checkout: python/mgcl -> configs/


def shipped() -> dict[str, str]:
    """Name (the file name without .yaml) -> path of each shipped config."""
    for d in _DIRS:
        if d.is_dir():
            return {p.stem: str(p) for p in sorted(d.glob("*.yaml"))}
    return {}


def resolve(name_or_path: str) -> str:
    """``name_or_path`` when it is an existing file; else the shipped config it
    names (``NAME``, ``NAME.yaml`` or ``configs/NAME.yaml``, as the README
    writes it); else ``name_or_path`` unchanged, for the caller to report."""
    if os.path.isfile(name_or_path):
        return name_or_path
    folder, name = os.path.split(name_or_path)
    if folder not in ("", "configs"):
        return name_or_path
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    return shipped().get(stem, name_or_path)
