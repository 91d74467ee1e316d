"""What a continual run resumes from: the checkpoint after each finished task,
the zero-shot row, and the training log trimmed to match.

Files under ``<out_dir>/checkpoint/``::

    latest.json        {"dir": "task-XXX", "finished": t, "sha256": <state.json's>}
    task-XXX/          model / optimizer / strategy / rng .safetensors + state.json
                       (settings, R so far, optimizer and strategy scalars, RNG
                       states, and the sha256 of every .safetensors file)
    zero_shot.json     {"tasks", "z", "z_auc", "sha256": <of the other keys>}

Every file is written atomically (``mgcl._io``); ``latest.json`` last, then
older ``task-*`` folders are removed, so a kill at any point leaves the
previous checkpoint or the new one. On resume every file is checked against
its checksum before anything is loaded, ``latest.json`` may only name a
``task-NNN`` folder inside ``checkpoint/``, and every problem (missing,
truncated, edited, other settings) is one ``CheckpointError`` line naming
the file. Tensors go through safetensors and the rest through JSON: nothing is
unpickled.

``trim_log`` keeps ``train_log.jsonl`` to the rows of the finished tasks, so a
resumed run never logs a (task, step) twice.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from typing import Optional

import numpy as np
import torch

from .._io import atomic_write_bytes, atomic_write_json, atomic_write_tensors

FORMAT = "mgcl.cl.checkpoint"
VERSION = 3
FILES = ("model", "optimizer", "strategy", "rng")
LOG = "train_log.jsonl"
# Settings that may change between a run and its resumption.
RESUME_FREE = ("log_every", "eval_batch_size", "num_workers", "progress")
_TASK_DIR = re.compile(r"task-\d{3,6}")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


def _sha256(path: str) -> str:
    from ..retrieval.store import sha256_file  # noqa: PLC0415

    return sha256_file(path)


def _digest(obj) -> str:
    import hashlib  # noqa: PLC0415

    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _read_json(path: str, what: str):
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"resume: {path} is missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"resume: {path} cannot be read as JSON ({what}): {exc}") from None


def _inside(path: str, folder: str) -> str:
    """``path``, refused unless it resolves (links followed) to a plain file or folder inside ``folder``."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    if os.path.dirname(real) != base or os.path.basename(real) != os.path.basename(path):
        raise CheckpointError(f"resume: {path} resolves to {real}, outside {base}")
    return real


def _split_state(sd: dict) -> tuple[dict, dict]:
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    rest = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
    return tensors, rest


def _optimizer_state(trainer) -> tuple[dict, Optional[dict]]:
    if trainer.optimizer is None:
        return {}, None
    osd = trainer.optimizer.state_dict()
    tensors = {f"state.{i}.{k}": v for i, st in osd["state"].items() for k, v in st.items()
               if isinstance(v, torch.Tensor)}
    scalars = {f"{i}.{k}": v for i, st in osd["state"].items() for k, v in st.items() if not isinstance(v, torch.Tensor)}
    spec, groups = trainer.optimizer_made
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars, "spec": dataclasses.asdict(spec),
                     "groups": [dataclasses.asdict(g) for g in groups]}


def _restore_optimizer(trainer, saved: dict, tensors: dict):
    """The optimizer as saved: made of the saved spec and groups, then its state."""
    from .strategies.base import OptimizerSpec, ParamGroup  # noqa: PLC0415

    spec = OptimizerSpec(**{**saved["spec"], "betas": tuple(saved["spec"]["betas"])})
    opt = trainer.new_optimizer(spec, [ParamGroup(**g) for g in saved["groups"]])
    st: dict = {}
    for key, v in tensors.items():
        _, i, k = key.split(".", 2)
        st.setdefault(int(i), {})[k] = v
    for key, v in saved["scalars"].items():
        i, k = key.split(".", 1)
        st.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": st, "param_groups": saved["param_groups"]})
    return opt


def _rng_state(device: torch.device) -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_state = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
    py = random.getstate()
    return tensors, {"python": [py[0], list(py[1]), py[2]],
                     "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}


def save(trainer, t: int, *, z, z_auc, R, auc) -> None:
    """The checkpoint after task ``t`` (module doc)."""
    root = os.path.join(trainer.out_dir, "checkpoint")
    name = f"task-{t:03d}"
    d = os.path.join(root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    opt_tensors, opt_json = _optimizer_state(trainer)
    s_tensors, s_json = _split_state(trainer.strategy.state_dict())
    rng_tensors, rng_json = _rng_state(trainer.device)
    files = {}
    for kind, tensors in zip(FILES, (trainer.model.state_dict(), opt_tensors, s_tensors, rng_tensors)):
        path = os.path.join(d, f"{kind}.safetensors")
        atomic_write_tensors(path, tensors)
        files[f"{kind}.safetensors"] = _sha256(path)
    state = os.path.join(d, "state.json")
    atomic_write_json(state, {"format": FORMAT, "version": VERSION, "finished": t, "config": trainer.config(),
                              "z": z, "z_auc": z_auc, "R": R, "auc": auc, "optimizer": opt_json,
                              "strategy": s_json, "rng": rng_json, "files": files})
    atomic_write_json(os.path.join(root, "latest.json"), {"dir": name, "finished": t, "sha256": _sha256(state)})
    for other in os.listdir(root):
        if other.startswith("task-") and other != name:
            shutil.rmtree(os.path.join(root, other), ignore_errors=True)


def load(trainer) -> Optional[dict]:
    """Restore the trainer (model, optimizer, strategy, RNG) from its latest
    checkpoint; returns the saved state (``finished``, ``z``, ``z_auc``, ``R``,
    ``auc``), or None when ``out_dir`` holds no checkpoint. CheckpointError on
    anything that does not check out."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    root = os.path.join(trainer.out_dir, "checkpoint")
    latest = os.path.join(root, "latest.json")
    if not os.path.lexists(latest):
        return None
    head = _read_json(_inside(latest, root), "the pointer to the last checkpoint")
    if not isinstance(head, dict) or not isinstance(head.get("dir"), str) or not _TASK_DIR.fullmatch(head["dir"]) \
            or not isinstance(head.get("sha256"), str):
        raise CheckpointError(f"resume: {latest} is not a checkpoint pointer (expected {{\"dir\": \"task-NNN\", "
                              f"\"finished\", \"sha256\"}}), got {str(head)[:120]}")
    d = os.path.join(root, head["dir"])
    _inside(d, root)
    state_path = os.path.join(d, "state.json")
    if not os.path.isfile(state_path):
        raise CheckpointError(f"resume: {state_path} is missing")
    if _sha256(_inside(state_path, d)) != head["sha256"]:
        raise CheckpointError(f"resume: {state_path} does not match the checksum in {latest} (edited or truncated)")
    state = _read_json(state_path, "the checkpoint's state")
    T = len(trainer.tasks)
    keys = ("format", "finished", "config", "z", "z_auc", "R", "auc", "optimizer", "strategy", "rng", "files")
    if not isinstance(state, dict) or any(k not in state for k in keys) or state["format"] != FORMAT \
            or state.get("version") != VERSION:
        raise CheckpointError(f"resume: {state_path} is not an mgcl checkpoint of format {FORMAT} v{VERSION}")
    t = state["finished"]
    if t != head.get("finished") or not isinstance(t, int) or not 0 <= t < T or len(state["R"]) != t + 1:
        raise CheckpointError(f"resume: {state_path}: finished task {t!r} does not fit {latest} or {T} tasks")
    saved, now = state["config"], trainer.config()
    diff = {k: (saved.get(k), now[k]) for k in now if k not in RESUME_FREE and saved.get(k) != now[k]}
    if diff:
        raise CheckpointError(f"resume: the checkpoint in {d} was made with other settings (saved, now): {diff}")
    tensors = {}
    for kind in FILES:
        path = os.path.join(d, f"{kind}.safetensors")
        want = state["files"].get(f"{kind}.safetensors") if isinstance(state["files"], dict) else None
        if not os.path.isfile(path):
            raise CheckpointError(f"resume: {path} is missing")
        if want is None or _sha256(_inside(path, d)) != want:
            raise CheckpointError(f"resume: {path} does not match its checksum in {state_path} (edited or truncated)")
        try:
            tensors[kind] = load_file(path, device="cpu" if kind == "rng" else str(trainer.device))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"resume: {path}: {exc}") from None
    try:
        trainer.model.load_state_dict(tensors["model"])
        if state["optimizer"] is not None:
            trainer.optimizer = _restore_optimizer(trainer, state["optimizer"], tensors["optimizer"])
        trainer.strategy.load_state_dict({**state["strategy"], **tensors["strategy"]})
        _set_rng(tensors["rng"], state["rng"], trainer.device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"resume: {d} does not fit this run: {str(exc).splitlines()[0]}") from None
    return state


def _set_rng(tensors: dict, saved: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda":
        states = [tensors[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in tensors]
        torch.cuda.set_rng_state_all(states)
    py = saved["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npn = saved["numpy"]
    np.random.set_state((npn[0], tensors["numpy"].numpy().astype(np.uint32), npn[1], npn[2], npn[3]))


# ---- the zero-shot row and the log -----------------------------------------------------------

def save_zero_shot(out_dir: str, tasks: list, z, z_auc) -> None:
    body = {"tasks": tasks, "z": z, "z_auc": z_auc}
    atomic_write_json(os.path.join(out_dir, "checkpoint", "zero_shot.json"), {**body, "sha256": _digest(body)})


def load_zero_shot(out_dir: str, tasks: list) -> Optional[tuple]:
    """``(z, z_auc)`` saved for these tasks, or None (none saved, or for other tasks)."""
    path = os.path.join(out_dir, "checkpoint", "zero_shot.json")
    if not os.path.lexists(path):
        return None
    d = _read_json(_inside(path, os.path.dirname(path)), "the zero-shot row")
    body = {k: d.get(k) for k in ("tasks", "z", "z_auc")} if isinstance(d, dict) else None
    if body is None or d.get("sha256") != _digest(body):
        raise CheckpointError(f"resume: {path} does not match its checksum (edited or truncated)")
    return (body["z"], body["z_auc"]) if body["tasks"] == tasks else None


def trim_log(out_dir: str, last_task: int) -> None:
    """Keep the complete rows of ``train_log.jsonl`` with task <= ``last_task``
    (-1: none), so the tasks a resumed run trains again are logged once."""
    path = os.path.join(out_dir, LOG)
    if not os.path.lexists(path):
        return
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue                    # a line cut by a kill, or empty
        if isinstance(row, dict) and isinstance(row.get("task"), int) and row["task"] <= last_task:
            keep.append(line)
    atomic_write_bytes(path, b"".join(x + b"\n" for x in keep))


__all__ = ["save", "load", "save_zero_shot", "load_zero_shot", "trim_log", "CheckpointError", "FORMAT", "VERSION",
           "RESUME_FREE"]
