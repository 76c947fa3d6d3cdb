"""Hugging Face Hub repo ids wherever surgeon takes a folder.

An existing path always wins; otherwise a string shaped like ``org/name`` is fetched with
``huggingface_hub.snapshot_download`` into its cache (``HF_HUB_CACHE``/``HF_HOME``, offline mode,
tokens and progress bars behave as in transformers), downloading only the files surgeon reads:
never pickles. The folder handed back is the cached snapshot, so everything after this point sees
a local folder.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePath

from surgeon.errors import SpecError

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
"""The safetensors of a transformers checkpoint, whole or sharded (never pytorch_model.bin)."""

_REPO_ID_SHAPE = re.compile(r"[^/\\]+/[^/\\]+")
_TRUE = {"1", "ON", "YES", "TRUE"}


def repo_id(source: str | PurePath) -> str | None:
    """``source`` as a Hub repo id (``org/name``), or None when it cannot be one: a path that
    starts at a root, ``.`` or ``~``, or has more than one folder in it, is a local path."""
    text = source.as_posix() if isinstance(source, PurePath) else str(source)
    if not _REPO_ID_SHAPE.fullmatch(text) or text.startswith((".", "~")):
        return None
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return text  # shaped like one: `snapshot` says huggingface_hub is needed
    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def local_folder(
    source: str | PurePath,
    required: Sequence[str],
    *,
    weights: Sequence[str] = (),
    extras: Sequence[str] = (),
    revision: str | None = None,
) -> Path:
    """The folder ``source`` names: itself when it exists (or is no repo id, for the caller's
    own "no such folder" error), else the snapshot of Hub repo ``source`` holding the
    ``required`` files, what matches one of the ``weights`` patterns (one at least) and what
    matches the ``extras`` patterns (if the repo has them)."""
    path = Path(source)
    if path.exists():
        if revision is not None:
            raise SpecError(
                f"revision={revision!r} applies to Hub repo ids; {str(source)!r} is a local "
                f"folder: leave revision out"
            )
        return path
    repo = repo_id(source)
    if repo is None:
        return path
    folder = snapshot(repo, [*required, *weights, *extras], revision)
    _check_snapshot(folder, repo, revision, required, weights)
    return folder


def snapshot(repo: str, patterns: Sequence[str], revision: str | None = None) -> Path:
    """The cached snapshot of Hub repo ``repo`` with the files matching ``patterns``, downloaded
    when missing (huggingface_hub's progress bars show) unless offline."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise SpecError(
            f"{repo!r} is not a local folder; loading it from the Hugging Face Hub needs "
            f"huggingface_hub (pip install huggingface_hub), or pass a local folder"
        ) from None
    offline = offline_mode()
    cache = cache_dir()
    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=list(patterns),
            cache_dir=cache,
            local_files_only=offline,
        )
    except RevisionNotFoundError:
        raise SpecError(f"Hub repo {repo!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo!r} is neither a local folder nor a Hub repo you can access (private or gated "
            f"repos need a token: `hf auth login` or HF_TOKEN)"
        ) from None
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(_not_cached(repo, revision, cache, offline, err)) from None
    return Path(folder)


def _not_cached(
    repo: str, revision: str | None, cache: str | None, offline: bool, err: Exception
) -> str:
    where = f"{repo!r} (revision {revision or 'main'})"
    cached = (
        f"is not a local folder and has no complete copy in the Hub cache ({cache or 'default'})"
    )
    if offline:
        return (
            f"{where} {cached}, and HF_HUB_OFFLINE=1 forbids downloading it: run once online "
            f"(HF_HUB_OFFLINE=0), or pass a local folder"
        )
    cause = err.__cause__ or err.__context__
    reason = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return (
        f"{where} {cached}, and the Hub could not be reached{reason}: check the network and "
        f"run once online, or pass a local folder"
    )


def _check_snapshot(
    folder: Path, repo: str, revision: str | None, required: Sequence[str], weights: Sequence[str]
) -> None:
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    where = f"Hub repo {repo!r} (revision {revision or 'main'})"
    missing = [name for name in required if name not in names]
    if missing:
        raise SpecError(
            f"{where} has no {', '.join(missing)} (snapshot {folder}); if only part of it is "
            f"cached, run once online (HF_HUB_OFFLINE=0)"
        )
    if weights and not any(fnmatch.filter(names, pattern) for pattern in weights):
        raise SpecError(
            f"{where} has no safetensors weights ({' or '.join(weights[:2])}); surgeon never "
            f"unpickles files (.bin, .pt): use a revision with safetensors (the "
            f"Hub's conversion bot opens them as refs/pr/N), or save_pretrained(safe_serialization"
            f"=True) to a local folder"
        )


def offline_mode() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as it is now: huggingface_hub reads it once, at
    import, and a notebook that sets it afterwards expects it to count."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or now.upper() in _TRUE


def cache_dir() -> str | None:
    """The Hub cache the environment names now (HF_HUB_CACHE, else HF_HOME/hub), or None for
    huggingface_hub's own default; read at each call for the same reason as `offline_mode`."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return _expand(os.environ[variable])
    if os.environ.get("HF_HOME"):
        return os.path.join(_expand(os.environ["HF_HOME"]), "hub")
    return None


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))
