"""Loading a causal LM and its tokenizer: the one place every command gets a model from.

``sfr train`` (:mod:`sfr.train`), the evaluation (:mod:`sfr.eval.generation`), the Lock/Fork
diagnostics (:mod:`sfr.diagnostics`) and the demo (:mod:`sfr.demo`) all call
:func:`load_model_and_tokenizer`; ``bench.step`` picks its attention with
:func:`attention_implementation`. A model is named by a local directory, a hub id (from the Hugging
Face cache when offline), or ``"sfr-tiny"`` / ``None``: the embedded tiny LM (:mod:`sfr.tiny_lm`).
Every command checks its ``--model`` / ``--reference-model`` with :func:`check_model` before any other
work, so a name that cannot load is a one-line error in seconds.
"""
from __future__ import annotations

import os

from sfr.checks import ask_hub, check_local_or_hub, in_hub_cache, is_hub_id, why_not_loadable


def check_model(name_or_path, argument: str = "--model") -> None:
    """``ValueError`` in one line, in seconds, when ``name_or_path`` is neither ``None`` / ``"sfr-tiny"``,
    an existing directory, nor a hub model that is cached or that the hub confirms
    (:func:`sfr.checks.why_not_loadable`). Model objects pass (they are not names)."""
    if _is_name(name_or_path):
        check_local_or_hub(name_or_path, argument, "model")


def local_copy(path: str) -> str:
    """The cached snapshot directory of hub id ``path`` when the hub cannot be reached, else ``path``.

    ``from_pretrained`` of a cached hub id with no network retries the hub for minutes before it falls
    back to the cache (measured: 3 min, ``local_files_only=True`` still 26 s: transformers' adapter
    lookup ignores it); from the snapshot directory it loads at once. Offline mode
    (``HF_HUB_OFFLINE``) already loads from the cache without asking."""
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE or os.path.isdir(path) or not is_hub_id(path) or not in_hub_cache(path):
        return path
    if ask_hub(path) in ("exists", "missing"):  # the hub answered: let from_pretrained use it
        return path
    return snapshot_download(path, local_files_only=True)


def _is_name(name_or_path) -> bool:
    from sfr.tiny_lm import DEFAULT_MODEL

    return isinstance(name_or_path, (str, os.PathLike)) and str(name_or_path) != DEFAULT_MODEL


def attention_implementation(requested: str | None = None, half_precision: bool = False) -> str:
    """``requested``; else ``flash_attention_2`` when flash-attn 2 is installed, CUDA is up and training runs
    in bf16/fp16 (its kernels have no float32 path); else ``sdpa``."""
    if requested:
        return requested
    import torch
    from transformers.utils import is_flash_attn_2_available

    if half_precision and torch.cuda.is_available() and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def load_model_and_tokenizer(name_or_path=None, *, device=None, dtype=None, attn_implementation: str | None = None):
    """``(model, tokenizer)``: ``AutoModelForCausalLM`` and ``AutoTokenizer`` of ``name_or_path``.

    The model is in eval mode, as ``from_pretrained`` returns it (the ``Trainer`` switches it to training).

    Args:
        name_or_path: a local directory, a hub id, or ``None`` / ``"sfr-tiny"`` for the embedded tiny LM
            (:func:`sfr.tiny_lm.resolve_model_name_or_path`).
        device: move the model there (default: where ``from_pretrained`` puts it, the CPU).
        dtype: the weights' dtype (default: ``from_pretrained``'s).
        attn_implementation: passed to ``from_pretrained`` when given (see :func:`attention_implementation`).

    Raises:
        OSError: the model or its tokenizer does not load (a missing directory, a hub id that is not
            cached offline, a folder without a model); the message names the model and the cause.
        TypeError: ``name_or_path`` is neither a name, a path nor None.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfr.tiny_lm import resolve_model_name_or_path

    path = resolve_model_name_or_path(name_or_path)
    reason = why_not_loadable(path, "model") if _is_name(name_or_path) else None
    if reason is not None:  # in seconds, not after from_pretrained's retries
        raise OSError(f"cannot load model {str(name_or_path)!r}: {reason}")
    path = local_copy(path)
    kwargs = {}
    if dtype is not None:
        kwargs["dtype" if _transformers_version() >= (4, 56) else "torch_dtype"] = dtype  # its name before 4.56
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load model {path!r} (a local directory, a cached hub id, or 'sfr-tiny'): {exc}") from exc
    if device is not None:
        model = model.to(device)
    return model, tokenizer


def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
