"""Evaluation metrics: pass@k for code; diversity, cross-style similarity and mode statistics for dialogue samples.

All functions are pure (no model); inputs are plain Python / NumPy / torch values.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Mapping, Sequence

import numpy as np

from sfr.checks import check_int


def _pass_at_k_scalar(n: int, c: int, k: int) -> float:
    if n - c < k:  # every size-k subset contains a correct sample
        return 1.0
    # 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k / i): no huge binomials, no overflow
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k(n, c, k):
    """Unbiased pass@k estimator (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``.

    ``n`` samples per problem, ``c`` of them correct, ``k`` the budget. Computed in the numerically
    stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (1.0 when ``n - c < k``).
    Ints give a float; arrays (broadcast together) give an array of the broadcast shape.
    ``ValueError`` unless ``n >= 1``, ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    n_arr, c_arr, k_arr = (np.asarray(v) for v in (n, c, k))
    for name, arr in (("n", n_arr), ("c", c_arr), ("k", k_arr)):
        if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
            raise TypeError(f"{name} must be integer(s), got {arr.dtype} values {arr!r}")
    n_arr, c_arr, k_arr = np.broadcast_arrays(n_arr.astype(np.int64), c_arr.astype(np.int64), k_arr.astype(np.int64))
    if np.any(n_arr < 1):
        raise ValueError(f"n (samples per problem) must be >= 1, got {n}")
    if np.any(c_arr < 0) or np.any(c_arr > n_arr):
        raise ValueError(f"c (correct samples) must satisfy 0 <= c <= n, got c={c}, n={n}")
    if np.any(k_arr < 1) or np.any(k_arr > n_arr):
        raise ValueError(f"k must satisfy 1 <= k <= n (cannot estimate pass@k from fewer than k samples), "
                         f"got k={k}, n={n}")
    values = np.array([_pass_at_k_scalar(int(a), int(b), int(d))
                       for a, b, d in zip(n_arr.ravel(), c_arr.ravel(), k_arr.ravel())], dtype=np.float64)
    if n_arr.ndim == 0:
        return float(values[0])
    return values.reshape(n_arr.shape)


def _check_texts(texts, minimum: int = 1) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must contain only strings")
    if len(texts) < minimum:
        raise ValueError(f"texts must hold at least {minimum} samples, got {len(texts)}")
    return list(texts)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n of one prompt's samples: ``#unique n-grams / #n-grams``, pooled over the samples.

    Tokens are whitespace-separated words (``str.split``); n-grams never cross samples.
    0.0 when the samples have no n-gram at all (all shorter than ``n`` words).
    """
    texts = _check_texts(texts)
    check_int("n", n)
    grams = Counter()
    for text in texts:
        words = text.split()
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def self_bleu(texts: Sequence[str]) -> float:
    """Self-BLEU on sacrebleu's 0-100 scale: mean over samples of sentence-BLEU(sample, other samples).

    Each sample is the hypothesis and all the other samples are its references
    (``sacrebleu.sentence_bleu``: exponential smoothing, effective order, 13a tokenisation).
    100 = all samples identical; near 0 = no shared n-grams. Lower is more diverse.
    Needs at least 2 samples.
    """
    import sacrebleu

    texts = _check_texts(texts, minimum=2)
    scores = [sacrebleu.sentence_bleu(text, texts[:i] + texts[i + 1:]).score for i, text in enumerate(texts)]
    return float(np.mean(scores))


def _check_style_groups(groups) -> list[list[str]]:
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of reply lists (one per style), got {type(groups).__name__}")
    groups = [_check_texts(group) for group in groups]  # every style needs at least one reply
    if len(groups) < 2:
        raise ValueError(f"cross-style metrics need replies of at least 2 styles, got {len(groups)}")
    return groups


def cross_style_self_bleu(groups: Sequence[Sequence[str]]) -> float:
    """Cross-style Self-BLEU of one prompt's replies, on sacrebleu's 0-100 scale.

    ``groups[i]`` holds the replies to the prompt under style ``i``. Every reply ``r`` of ``groups[i]``
    is scored with ``sacrebleu.sentence_bleu(r, refs)`` (default settings) where ``refs`` are all the
    replies of every *other* style; the result is the mean over all replies of all styles. 100 = every
    style gives the same replies ("Cross-Style Collapse"); lower = the styles differ more.
    ``ValueError`` for fewer than 2 styles or a style without replies.
    """
    import sacrebleu

    groups = _check_style_groups(groups)
    scores = []
    for i, group in enumerate(groups):
        refs = [reply for j, other in enumerate(groups) if j != i for reply in other]
        scores.extend(sacrebleu.sentence_bleu(reply, refs).score for reply in group)
    return float(np.mean(scores))


def _unit_rows(embeddings, name: str, minimum: int = 1) -> np.ndarray:
    """``embeddings`` [n, E] (NumPy or torch) as float64 rows of norm 1; ``ValueError`` for bad input."""
    if hasattr(embeddings, "detach"):  # torch tensor
        embeddings = embeddings.detach().cpu().double().numpy()
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, E], got shape {x.shape}")
    if x.shape[0] < minimum:
        raise ValueError(f"{name} need at least {minimum} row{'s' if minimum > 1 else ''}, got {x.shape[0]}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite with no all-zero row")
    return x / norms


def cross_style_similarity(embeddings_by_style) -> float:
    """Mean cosine between the embeddings of replies of *different* styles to one prompt.

    ``embeddings_by_style[i]`` is ``[n_i, E]`` (NumPy or torch), the sentence embeddings of the
    replies under style ``i``. Returns ``sum_{i != j} sum_{a in i, b in j} cos(a, b) / sum_{i != j} n_i n_j``
    (each cross-style pair weighs the same; pairs within a style are left out). 1 = every style
    replies in the same direction; lower = the styles differ more.
    ``ValueError`` for fewer than 2 styles, a style without rows, mismatched E or an all-zero row.
    """
    if isinstance(embeddings_by_style, np.ndarray) and embeddings_by_style.ndim == 2:
        raise TypeError("embeddings_by_style must be a list of [n_i, E] arrays, one per style (got one 2-D array)")
    styles = [_unit_rows(e, f"embeddings_by_style[{i}]") for i, e in enumerate(embeddings_by_style)]
    if len(styles) < 2:
        raise ValueError(f"cross-style metrics need replies of at least 2 styles, got {len(styles)}")
    if len({s.shape[1] for s in styles}) != 1:
        raise ValueError(f"every style's embeddings must have the same E, got {[s.shape[1] for s in styles]}")
    # sum over all pairs of the stacked rows minus the pairs within each style: ||sum||^2 - sum_i ||sum_i||^2
    sums = np.stack([s.sum(axis=0) for s in styles])  # [styles, E]
    total = sums.sum(axis=0)
    cross = float(total @ total - np.sum(sums * sums))
    sizes = np.array([s.shape[0] for s in styles], dtype=np.float64)
    pairs = float(sizes.sum() ** 2 - np.sum(sizes ** 2))
    return cross / pairs


def embedding_diversity(embeddings) -> float:
    """``1 - mean_{i != j} cos(e_i, e_j)`` over the rows of ``embeddings`` [n, E] (NumPy or torch).

    0 when all samples embed in the same direction; 1 for mutually orthogonal ones. Needs n >= 2
    and no all-zero row. Never negative: the mean cosine is at most 1, so the value is >= 0 in exact
    arithmetic, and the round-off of identical samples (e.g. ``-2e-16``) is clamped to 0.
    """
    unit = _unit_rows(embeddings, "embeddings", minimum=2)
    n = unit.shape[0]
    cos = unit @ unit.T
    off_diagonal = cos.sum() - np.trace(cos)
    return max(0.0, float(1.0 - off_diagonal / (n * (n - 1))))  # round-off of identical rows, see above


def entropy(probabilities: Mapping[str, float] | Sequence[float]) -> float:
    """Shannon entropy in nats, ``-sum p log p`` (0 log 0 = 0) of a normalised distribution."""
    values = np.asarray(list(probabilities.values()) if isinstance(probabilities, Mapping) else probabilities,
                        dtype=np.float64)
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(-(p * np.log(p)).sum())


def mode_statistics(labels: Sequence[str | None], reference: Mapping[str, float]) -> dict:
    """Compare the modes of sampled replies with the known mode distribution of their prompt.

    ``labels``: the mode of each sample (``None`` = no recognised mode). ``reference``: mode ->
    known probability. Returns (over the classified samples):

    * ``coverage``: fraction of the reference's modes (probability > 0) seen at least once;
    * ``entropy`` / ``reference_entropy``: Shannon entropy (nats) of the sampled / known distribution;
    * ``total_variation``: ``0.5 * sum_m |p_sample(m) - p_ref(m)|`` (1 if nothing was classified);
    * ``unclassified_rate``: fraction of samples with no recognised mode; ``counts``: mode -> count.
    """
    if not reference:
        raise ValueError("reference mode frequencies must not be empty")
    labels = list(labels)
    counts = Counter(label for label in labels if label is not None)
    classified = sum(counts.values())
    known = [mode for mode, p in reference.items() if p > 0]
    sampled = {mode: counts.get(mode, 0) / classified for mode in set(reference) | set(counts)} if classified else {}
    tv = 0.5 * sum(abs(sampled.get(m, 0.0) - reference.get(m, 0.0)) for m in set(reference) | set(sampled)) \
        if classified else 1.0
    return {
        "coverage": sum(1 for m in known if counts.get(m, 0) > 0) / len(known) if known else 0.0,
        "entropy": entropy(counts) if classified else 0.0,
        "reference_entropy": entropy(reference),
        "total_variation": float(tv),
        "unclassified_rate": (len(labels) - classified) / len(labels) if labels else 0.0,
        "counts": dict(counts),
    }


def bootstrap_interval(values: Sequence[float], num_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> dict:
    """Mean of ``values`` (e.g. one metric per prompt) with a percentile bootstrap confidence interval over
    the items: ``{"mean", "low", "high", "n"}`` (``low``/``high`` NaN with fewer than 2 items)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    check_int("num_resamples", num_resamples)
    n = values.size
    if n == 0:
        raise ValueError("need at least one value")
    mean = float(values.mean())
    if n < 2:
        return {"mean": mean, "low": float("nan"), "high": float("nan"), "n": n}
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, n, size=(num_resamples, n))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"mean": mean, "low": float(low), "high": float(high), "n": n}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], num_resamples: int = 2000, confidence: float = 0.95,
                     seed: int = 0) -> dict:
    """Mean difference ``mean(b - a)`` of paired per-item values (e.g. one metric per prompt for two
    models) with a percentile bootstrap confidence interval over the items (:func:`bootstrap_interval`
    of the differences).

    Returns ``{"diff", "low", "high", "n"}``; ``low``/``high`` are NaN with fewer than 2 items. The
    interval says how much the difference could move if other prompts had been drawn: when it
    contains 0, the two models are not distinguishable on this data.
    """
    a_arr, b_arr = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a_arr.shape != b_arr.shape or a_arr.ndim != 1:
        raise ValueError(f"a and b must be 1-D and of equal length, got shapes {a_arr.shape} and {b_arr.shape}")
    if a_arr.size == 0:
        raise ValueError("need at least one paired value")
    stats = bootstrap_interval(b_arr - a_arr, num_resamples, confidence, seed)
    return {"diff": stats["mean"], "low": stats["low"], "high": stats["high"], "n": stats["n"]}


def mean_or_nan(values) -> float:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else float("nan")
