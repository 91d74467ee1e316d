"""Hugging Face hub names, checked before a library is asked to load them.

Loaders given a hub name (sentence-transformers, open_clip) retry the network
for a minute or more and then fail with several chained tracebacks when the
machine is offline. ``check(name)`` answers at once instead: it returns the
snapshot folder when the local Hugging Face cache holds the model (load from
there, offline), None when the hub answers and has it (let the loader
download it), and otherwise raises ``HubUnavailable`` with one line on how to
pass a local folder. One request, no retries.
"""
from __future__ import annotations

import os


class HubUnavailable(ValueError):
    """A hub model that is neither in the local cache nor downloadable now."""


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the hub is not to be asked."""
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def check(repo_ids, *, what: str, how: str) -> str | None:
    """``repo_ids``: the name, or the names a loader would try in turn.
    ``what`` names the input in the message (e.g. ``--embedder 'x'``), ``how``
    says how to pass a local folder instead."""
    from huggingface_hub import model_info, snapshot_download  # noqa: PLC0415
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError  # noqa: PLC0415

    ids = [repo_ids] if isinstance(repo_ids, str) else list(repo_ids)
    for rid in ids:
        try:
            return snapshot_download(rid, local_files_only=True)
        except (LocalEntryNotFoundError, OSError, ValueError):
            continue
    if offline():
        raise HubUnavailable(f"{what}: not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE is "
                             f"set; {how}")
    missing = None
    for rid in ids:
        try:
            model_info(rid, timeout=10)
            return None
        except RepositoryNotFoundError:
            missing = rid
        except HfHubHTTPError as exc:
            raise HubUnavailable(f"{what}: the hub refused {rid!r} ({str(exc).splitlines()[0]}); {how}") from None
        except Exception as exc:  # noqa: BLE001 - the HTTP client's network errors (DNS, refused, timeout)
            raise HubUnavailable(f"{what}: not a local folder, not in the Hugging Face cache, and the hub cannot be "
                                 f"reached ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                                 f"{how}") from None
    raise HubUnavailable(f"{what}: no such model on the Hugging Face hub ({missing!r}) and no such local folder; {how}")
