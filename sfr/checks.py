"""Up-front checks of user input shared by the commands: fail in the first second, not after the work.

Each raises ``ValueError`` with a message that names the argument, so the CLI prints one line.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path


def check_output_dir(path, argument: str = "--output-dir") -> Path:
    """``path`` as a ``Path`` once it is known that it can be (or already is) a writable directory.

    Nothing is created. Raises ``ValueError`` when ``path`` is an existing file, when one of its
    existing ancestors is not a directory, or when the nearest existing ancestor is not writable.
    """
    if path is None or str(path) == "":
        raise ValueError(f"{argument} must be a directory path, got {path!r}")
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{argument} {out} is an existing file, not a directory; choose another path")
    existing = out
    while not existing.exists():  # the nearest ancestor that exists decides whether mkdir can work
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{argument} {out}: {existing} is a file, so no directory can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{argument} {out}: {existing} is not writable")
    return out


def check_no_earlier_results(path, overwrite: bool, files=("results.json", "report.md"),
                             argument: str = "--out") -> None:
    """Refuse an output directory that holds ``files`` of an earlier run (a comparison that took an hour
    must not be replaced silently) unless ``overwrite``: ``ValueError`` naming what is there."""
    found = [name for name in files if (Path(path).expanduser() / name).exists()]
    if found and not overwrite:
        raise ValueError(f"{argument} {path} holds the results of an earlier run ({', '.join(found)}): pass "
                         f"--overwrite to replace them, or choose another {argument}")


def check_device(device, argument: str = "--device") -> None:
    """Raise ``ValueError`` unless torch can use ``device`` here (``None`` = let the command choose)."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{argument} {device!r} is not a torch device ({error})") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"{argument} {device!r}: {parsed.type.upper()} is not available on this machine (use cpu)")
    count = getattr(backend, "device_count", lambda: 1)()
    if parsed.index is not None and parsed.index >= count:
        raise ValueError(f"{argument} {device!r}: this machine has {count} {parsed.type} device(s)")


def check_int(name: str, value, minimum: int = 1, *, optional: bool = False, why: str = ""):
    """``value`` once it is known to be an ``int`` >= ``minimum`` (a ``bool`` is not an int here);
    ``None`` passes when ``optional``. Otherwise ``ValueError``: ``NAME must be an int >= MIN[ or None]
    [ why], got VALUE``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}{why}, got {value!r}")
    return value


def check_local_or_hub(name_or_path, argument: str, what: str = "model", hub_ids=None) -> None:
    """``ValueError`` ``ARGUMENT NAME: why`` when :func:`why_not_loadable` finds ``name_or_path``
    neither a directory nor a hub model that can be fetched; in seconds, so it can run before any work."""
    reason = why_not_loadable(name_or_path, what, hub_ids)
    if reason is not None:
        raise ValueError(f"{argument} {name_or_path}: {reason}")


def why_not_loadable(name_or_path, what: str = "model", hub_ids=None) -> str | None:
    """``None`` when ``name_or_path`` can load, else why not, in one line.

    Loadable: an existing directory, a hub id in the local Hugging Face cache, or a hub id that the hub
    confirms. Not: a path-like name (``./x``, ``a/b/c``, ``/x``, ``~/x``: not a valid hub id) that is no
    directory -> "directory ... does not exist"; a hub-style name -> that, and why the hub did not help:
    offline mode (``HF_HUB_OFFLINE``: the hub is not asked), the hub could not be reached (one request
    with a 5 s timeout, instead of the ~55 s of retries ``from_pretrained`` spends) or it has no such
    model. Any other answer of the hub (a gated model, a server error) counts as loadable: the loader
    then reports what goes wrong.

    ``hub_ids``: the hub ids that ``name_or_path`` may stand for (default: the name itself; a sentence
    encoder's bare name is also looked up under ``sentence-transformers/``).
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return None
    if path.exists():
        return f"{os.path.abspath(path)} is a file, not a {what} directory"
    no_dir = f"directory {os.path.abspath(path)} does not exist"
    valid_ids = [repo_id for repo_id in (hub_ids or [text]) if is_hub_id(repo_id)]
    if not valid_ids:
        return no_dir
    if any(in_hub_cache(repo_id) for repo_id in valid_ids):
        return None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (f"{no_dir}, and no hub {what} {text} is in the Hugging Face cache (HF_HUB_OFFLINE is set, so "
                "the hub was not asked)")
    answers = [ask_hub(repo_id) for repo_id in valid_ids]
    if "exists" in answers:
        return None
    if all(answer == "missing" for answer in answers):
        return f"{no_dir}, and the Hugging Face hub has no {what} {text} (a private one needs `hf auth login`)"
    reason = next(answer for answer in answers if answer != "missing")
    return (f"{no_dir}, and the Hugging Face hub could not be reached to look it up ({reason}); it is not in "
            "the local cache either")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a valid hub repo id (``name`` or ``org/name``; not ``./x``, ``a/b/c``, ...)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds ``repo_id``'s ``config.json``."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


@functools.lru_cache(maxsize=64)  # one question per model and process
def ask_hub(repo_id: str, timeout: float = 5.0) -> str:
    """``"exists"`` (or gated, or any answer but "not found"), ``"missing"``, or why the hub could not be
    reached. One request, no retries."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        return "exists"
    except RepositoryNotFoundError:
        return "missing"
    except HfHubHTTPError:  # the hub answered, with something else: let the loader report it
        return "exists"
    except Exception as error:  # connection refused, DNS failure, timeout (httpx's errors, not OSError)
        return " ".join(f"{type(error).__name__}: {error}".split())[:200]
    return "exists"
