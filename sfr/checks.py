"""Up-front checks of user input shared by the commands: fail in the first second, not after the work.

Each raises ``ValueError`` with a message that names the argument, so the CLI prints one line.
"""
from __future__ import annotations

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
