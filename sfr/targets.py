"""Future-segment targets: anchors, segments, sentence-encoder embeddings and their on-disk cache.

:func:`prepare` (and ``sfr prepare``, :mod:`sfr.commands.prepare`) turns dialogue data into the training rows of SFR:
each example is tokenised with the model's chat template (completion-only labels, see
:mod:`sfr.data`), its anchors and future segments are found, and every segment text is embedded by a
frozen sentence encoder (:mod:`sfr.encoder`; default ``all-MiniLM-L6-v2``, E = 384).

Anchor rule (the contract; docs/design.md, "Anchors"). A *response span* is a maximal run ``[start, end)`` of positions with
``label != -100``. Its anchors are ``t = start - 1 + k * S`` for ``k = 0, 1, ...`` while ``t < end - 1``
(and ``t >= 0``), so the first anchor is the last context position, whose hidden state predicts the
first response token. In ``window`` mode the segment of anchor ``t`` is the tokens
``t + 1 ... min(t + K, end - 1)`` (exclusive end ``min(t + K + 1, end)``); in ``sentence`` mode it stops
earlier, after the first of those tokens whose decoded text contains ``.``, ``!``, ``?`` or a newline
(a token-level heuristic: "e.g." or "3.5" end a sentence too). Its text is
``tokenizer.decode(ids, skip_special_tokens=True).strip()``. Segments with fewer than ``m`` tokens
(special tokens count) or empty text are dropped. ``K = segment_tokens``, ``S = anchor_stride``,
``m = min_segment_tokens``. A segment never leaves its response span.

Target: ``y = Enc(text) / ||Enc(text)||_2`` (float32; on a GPU the encoder runs in fp16 and the result
is re-normalised in float32). Identical texts are encoded once.

Output (the contract; docs/design.md, "Prepared data"): ``datasets.load_from_disk(out)`` has one row per example with at least one
response token, columns ``input_ids``, ``labels`` (lists of int), ``anchor_positions`` (list of int
``t``), ``anchor_segment_ends`` (list of int: exclusive end of each anchor's segment), ``anchor_targets``
(``[n_anchors, E]`` float32) and ``source_index`` (the record's 0-based index in the source).
``out/sfr_targets.json`` records the encoder and tokenizer (loadable names or paths), ``embed_dim``,
the segmentation parameters (also under the issue's names ``E``, ``K``, ``S``, ``m``), ``max_length``,
the source's fingerprint (SHA-256 of its records), ``counts`` and the measured ``throughput``.

Cache. Calling :func:`prepare` again with the same inputs is a cache hit (nothing recomputed). A cache
whose metadata differs from the request, or whose rows do not match its own metadata (missing files,
other row/anchor counts or dimension), is rebuilt with a warning; a different embedding dimension is
an error unless ``overwrite=True``. Rows and metadata are written to a hidden sibling
``.<out>.tmp-<host>-<pid>-<random>`` and renamed to ``out`` (metadata last), so an interrupted run
never leaves a directory that passes as complete; the work directories of runs that were killed
outright are removed by the next run on the same host.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import socket
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sfr.checks import check_device, check_int, check_output_dir
from sfr.data import IGNORE_INDEX, load_records, tokenize_example, validate_records
from sfr.encoder import check_encoder, embedding_dimension, encode_texts, load_encoder, resolve_encoder
from sfr.loading import check_model

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: counts/throughput grouped, E/K/S/m keys, cache rows validated
METADATA_FILE = "sfr_targets.json"
SEGMENT_MODES = ("window", "sentence")
COLUMNS = ("input_ids", "labels", "anchor_positions", "anchor_segment_ends", "anchor_targets", "source_index")
_SENTENCE_END = re.compile(r"[.!?\n]")
# Metadata that must be equal for a cache hit (counts and timings are results, not inputs).
_CACHE_KEYS = ("format_version", "encoder", "tokenizer", "segment_tokens", "anchor_stride",
               "min_segment_tokens", "segment_mode", "max_length", "source_fingerprint")
# Records per tokenise + segment task: small enough that the progress bar moves and the workers stay
# balanced, large enough that pickling a chunk and its result costs little next to tokenising it.
_CHUNK_RECORDS = 512
# Starting a worker process costs 2-4 s (imports, tokenizer), as much as tokenising some 4k-16k records
# here: smaller data is always done in the main process.
_MIN_RECORDS_FOR_WORKERS = 8192


# ---------------------------------------------------------------------------------------------- anchors
@dataclass(frozen=True)
class Segment:
    """The future segment of one anchor: tokens ``position + 1 .. end - 1`` and their text."""

    position: int
    end: int
    text: str


def response_spans(labels) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of positions whose label is not -100, in order."""
    spans, start = [], None
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(labels)))
    return spans


def window_anchors(labels, segment_tokens: int, anchor_stride: int) -> list[tuple[int, int]]:
    """``(t, segment_end)`` of every anchor in window mode, before the minimum-length filter:
    ``t = start - 1 + k * S`` while ``t < end - 1``, ``t >= 0``; ``segment_end = min(t + K + 1, end)``."""
    check_int("segment_tokens", segment_tokens)
    check_int("anchor_stride", anchor_stride)
    anchors = []
    for start, end in response_spans(labels):
        for t in range(start - 1, end - 1, anchor_stride):
            if t >= 0:  # a response at position 0 has no context position to anchor on
                anchors.append((t, min(t + segment_tokens + 1, end)))
    return anchors


def segment_example(input_ids, labels, tokenizer, segment_tokens: int = 32, anchor_stride: int = 8,
                    min_segment_tokens: int = 4, segment_mode: str = "window",
                    token_texts: dict | None = None) -> list[Segment]:
    """The kept anchors of one tokenised example and their segment texts (the anchor rule of the
    module docstring), in position order.

    ``token_texts`` caches ``tokenizer.decode([id])`` across calls (sentence mode only).
    """
    _check_segment_args(segment_tokens, anchor_stride, min_segment_tokens, segment_mode)
    if len(input_ids) != len(labels):
        raise ValueError(f"input_ids and labels must have the same length, got {len(input_ids)} and {len(labels)}")
    token_texts = {} if token_texts is None else token_texts
    segments = []
    for t, end in window_anchors(labels, segment_tokens, anchor_stride):
        if segment_mode == "sentence":
            for j in range(t + 1, end):
                token_id = int(input_ids[j])
                if token_id not in token_texts:
                    token_texts[token_id] = tokenizer.decode([token_id])
                if _SENTENCE_END.search(token_texts[token_id]):
                    end = j + 1
                    break
        if end - (t + 1) < min_segment_tokens:
            continue
        text = tokenizer.decode(list(input_ids[t + 1:end]), skip_special_tokens=True).strip()
        if text:
            segments.append(Segment(t, end, text))
    return segments


# ---------------------------------------------------------------------------------------------- prepare
@dataclass
class PreparedTargets:
    """What :func:`prepare` returns: the directory, its rows (a ``datasets.Dataset``), its metadata
    (the content of ``sfr_targets.json``) and whether it came from the cache."""

    path: Path
    dataset: object
    metadata: dict
    cache_hit: bool
    timings: dict = field(default_factory=dict)


def prepare(data=None, out=None, *, model=None, encoder=None, segment_tokens: int = 32,
            anchor_stride: int = 8, min_segment_tokens: int = 4, max_length: int | None = None,
            segment_mode: str = "window", batch_size: int = 256, device=None, split: str = "train",
            overwrite: bool = False, progress: bool = True, num_proc: int | None = None) -> PreparedTargets:
    """Tokenise ``data``, find anchors and segments, embed them, and save the rows to ``out``.

    Args:
        data: a file, ``datasets`` directory or hub name (:func:`sfr.data.load_records`), a list of
            records, a ``datasets.Dataset`` of records, or ``None`` for the embedded default corpus
            (:mod:`sfr.corpus`, split ``split``).
        out: output directory; ``None`` -> ``<sfr cache>/targets/<source>-<hash of the settings>``.
        model: tokenizer source, ``None``/``"sfr-tiny"`` = the embedded tiny model.
        encoder: sentence-transformers name or path (:func:`sfr.encoder.resolve_encoder`).
        segment_tokens, anchor_stride, min_segment_tokens: ``K``, ``S``, ``m`` of the anchor rule.
        max_length: examples are cut to this many tokens before anchors are found (``None``: no cut).
        segment_mode: ``"window"`` or ``"sentence"``.
        batch_size, device: of the encoder (default device: CUDA in fp16 when available, else CPU).
        split: the split of a ``datasets`` directory, hub data set or the embedded corpus.
        overwrite: rebuild even on a cache hit, and replace a cache of another embedding dimension.
        progress: show progress bars.
        num_proc: worker processes that tokenise and segment (``None`` or 1: in this process). The
            output is identical for every value, so it is not part of the cache key. Data of fewer than
            ``_MIN_RECORDS_FOR_WORKERS`` (8192) records is done in this process anyway (starting a
            worker costs seconds). With ``num_proc > 1`` a script that calls this must guard its top level
            with ``if __name__ == "__main__":`` (the workers are spawned, and import the main module).

    Raises:
        FileNotFoundError: ``data`` names a missing file.
        ValueError: malformed or empty data, no example with a response token, an ``out`` that cannot
            be a directory (checked first), is not an sfr targets directory or holds targets of another
            dimension, a ``device`` torch cannot use here (checked first), an encoder or tokenizer that
            does not load, a non-finite embedding. Nothing is written in any of these cases.

    A stale cache is rebuilt with a ``UserWarning``. ``counts["skipped_without_response"]`` counts the
    examples left without a response token, ``counts["skipped_cut_by_max_length"]`` those of them
    whose response tokens were all cut away by ``max_length`` (it keeps the first tokens).
    """
    from sfr.tiny_lm import resolve_model_name_or_path

    _check_segment_args(segment_tokens, anchor_stride, min_segment_tokens, segment_mode)
    check_int("batch_size", batch_size)
    num_proc = 1 if num_proc is None else num_proc
    check_int("num_proc", num_proc)
    check_int("max_length", max_length, 2, optional=True)
    check_device(device, "--device")
    check_model(model, "--model")  # a model or encoder that cannot load: one line in seconds, not at the end
    if encoder is not None:
        check_encoder(encoder, "--encoder")
    if out is not None:  # before the data is loaded and tokenised, not when the rows are written
        out = check_output_dir(out, "--out")
    timings = {}
    started = time.perf_counter()
    records, source = _load_source(data, split)
    settings = {
        "format_version": FORMAT_VERSION,
        "encoder": resolve_encoder(encoder),
        "tokenizer": resolve_model_name_or_path(model),
        "segment_tokens": segment_tokens, "anchor_stride": anchor_stride,
        "min_segment_tokens": min_segment_tokens, "segment_mode": segment_mode, "max_length": max_length,
        "source": source, "source_fingerprint": _fingerprint(records),
    }
    out = out if out is not None else check_output_dir(_default_out_dir(settings), "--out")
    _remove_stale_work_dirs(out)

    existing = _read_metadata(out)
    stale_reason = None
    if existing == {} and not overwrite:
        stale_reason = f"its {METADATA_FILE} does not parse"
    elif existing is not None and not overwrite:
        changed = [k for k in _CACHE_KEYS if existing.get(k) != settings[k]]
        if not changed:
            dataset, problem = _load_cache(out, existing)
            if problem is None:
                timings["total_s"] = time.perf_counter() - started
                logger.info("sfr prepare: cache hit at %s (%.2f s)", out, timings["total_s"])
                return PreparedTargets(out, dataset, existing, cache_hit=True, timings=timings)
            stale_reason = f"its rows do not match its metadata: {problem}"
        else:
            stale_reason = f"different {', '.join(changed)}"
    if existing is None and out.exists() and any(out.iterdir()):
        raise ValueError(f"out {out} exists and is not an sfr targets directory (no {METADATA_FILE}); "
                         f"refusing to overwrite it; choose another --out")

    with _library_progress(progress):
        sentence_encoder = load_encoder(settings["encoder"], device=device)
    embed_dim = embedding_dimension(sentence_encoder)
    if existing is not None and existing.get("embed_dim") not in (None, embed_dim) and not overwrite:
        raise ValueError(
            f"out {out} holds targets of dimension {existing.get('embed_dim')} (encoder "
            f"{existing.get('encoder')!r}), but encoder {settings['encoder']!r} has dimension {embed_dim}; "
            f"choose another --out, or pass --overwrite to replace it")
    if stale_reason is not None:  # one message: `sfr prepare` prints it on one line (sfr.cli)
        warnings.warn(f"targets cache at {out} is stale ({stale_reason}); rebuilding", UserWarning, stacklevel=2)

    tokenizer = _load_tokenizer(settings["tokenizer"])
    t0 = time.perf_counter()
    rows, anchor_texts, skipped, cut_away, processes = _segment_records(records, tokenizer, settings, progress,
                                                                       num_proc)
    timings["tokenize_segment_s"] = time.perf_counter() - t0
    # Truncation keeps the first max_length tokens, so a long context can leave no response token.
    cut_hint = (f"; {cut_away} of them lost every response token to max_length={max_length}, which keeps each "
                f"example's first {max_length} tokens: use a larger --max-length" if cut_away else "")
    if not rows:
        raise ValueError(f"data set {source!r}: none of its {len(records)} examples has a response token "
                         f"(assistant/completion){cut_hint}")
    if skipped:
        warnings.warn(f"skipped {skipped} of {len(records)} examples without a response token{cut_hint}",
                      UserWarning, stacklevel=2)
    num_anchors = sum(len(texts) for texts in anchor_texts)
    unique_texts = list(dict.fromkeys(text for texts in anchor_texts for text in texts))

    t0 = time.perf_counter()
    embeddings = encode_texts(sentence_encoder, unique_texts, batch_size=batch_size, progress=progress)
    timings["encode_s"] = time.perf_counter() - t0
    _check_finite(embeddings, unique_texts, rows, anchor_texts, source)
    row_of_text = {text: i for i, text in enumerate(unique_texts)}
    for row, texts in zip(rows, anchor_texts):
        row["anchor_targets"] = embeddings[[row_of_text[t] for t in texts]].reshape(len(texts), embed_dim)

    metadata = {
        **settings, "embed_dim": embed_dim,
        # the notation for the same numbers
        "E": embed_dim, "K": segment_tokens, "S": anchor_stride, "m": min_segment_tokens,
        "counts": {"records": len(records), "examples": len(rows), "skipped_without_response": skipped,
                   "skipped_cut_by_max_length": cut_away,
                   "examples_without_anchors": sum(not texts for texts in anchor_texts),
                   "anchors": num_anchors, "unique_segments": len(unique_texts)},
        "throughput": {"device": str(getattr(sentence_encoder, "device", device)),
                       "tokenize_segment_windows_per_s": round(num_anchors / max(timings["tokenize_segment_s"], 1e-9), 1),
                       "tokenize_segment_processes": processes,
                       "encode_windows_per_s": round(len(unique_texts) / max(timings["encode_s"], 1e-9), 1)},
    }
    dataset = _write_atomically(rows, metadata, out, embed_dim, progress)
    timings["total_s"] = time.perf_counter() - started
    logger.info("sfr prepare: wrote %d examples, %d anchors (%d unique segments) to %s",
                len(rows), num_anchors, len(unique_texts), out)
    return PreparedTargets(out, dataset, metadata, cache_hit=False, timings=timings)


def _segment_records(records, tokenizer, settings, progress, num_proc: int = 1):
    """``(rows, anchor_texts, skipped, cut_away, processes)``: one row (without targets) and one list of
    segment texts per example that has a response token, in record order; ``skipped`` counts the
    examples without one, ``cut_away`` those of them that had response tokens before the ``max_length``
    cut; ``processes`` is how many processes did the work.

    The records are cut into contiguous chunks of ``_CHUNK_RECORDS``, each done by
    :func:`_segment_chunk`: here when ``num_proc == 1`` or there are fewer than
    ``_MIN_RECORDS_FOR_WORKERS`` records, else in ``num_proc`` spawned worker processes. The result is
    the same either way.
    """
    from tqdm.auto import tqdm

    starts = range(0, len(records), _CHUNK_RECORDS)
    processes = min(num_proc, len(starts)) if len(records) >= _MIN_RECORDS_FOR_WORKERS else 1
    parts = []
    with tqdm(total=len(records), desc="tokenise + segment", unit="example", disable=not progress) as bar:
        if processes == 1:
            token_texts = {}
            for start in starts:
                chunk = _record_slice(records, start, start + _CHUNK_RECORDS)
                parts.append(_segment_chunk(chunk, start, tokenizer, settings, token_texts))
                bar.update(len(chunk))
        else:
            # "spawn", not fork: the parent may already run threads (torch, the tokenizers' Rust pool, a
            # CUDA context) that a forked child would inherit half-initialised, which can deadlock.
            pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_segment_worker, initargs=(settings["tokenizer"],))
            try:
                futures = []
                for start in starts:  # queued up front; the pool hands them to the workers as they free up
                    chunk = _record_slice(records, start, start + _CHUNK_RECORDS)
                    futures.append((pool.submit(_segment_chunk_in_worker, chunk, start, settings), len(chunk)))
                for future, size in futures:  # in record order: the first failing chunk raises its own error
                    parts.append(future.result())
                    bar.update(size)
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # after an error: drop the chunks not started
    rows = [row for part in parts for row in part[0]]
    anchor_texts = [texts for part in parts for texts in part[1]]
    return rows, anchor_texts, sum(part[2] for part in parts), sum(part[3] for part in parts), processes


def _segment_chunk(records, start, tokenizer, settings, token_texts=None):
    """``(rows, anchor_texts, skipped, cut_away)`` of ``records``, the records ``start, start + 1, ...``
    of the source: ``source_index`` and error messages use those global 0-based indices. ``token_texts``
    caches single-token decodes across calls (see :func:`segment_example`)."""
    token_texts = {} if token_texts is None else token_texts
    rows, anchor_texts, skipped, cut_away = [], [], 0, 0
    for index, record in enumerate(records, start=start):
        try:
            example = tokenize_example(record, tokenizer)  # cut below: a response lost to the cut is told apart
        except Exception as error:
            raise ValueError(f"example {index} (0-based) of {settings['source']!r} could not be tokenised: "
                             f"{type(error).__name__}: {error}") from error
        had_response = any(label != IGNORE_INDEX for label in example["labels"])
        if settings["max_length"] is not None:
            example = {key: value[:settings["max_length"]] for key, value in example.items()}
        if all(label == IGNORE_INDEX for label in example["labels"]):
            skipped += 1
            cut_away += had_response
            continue
        segments = segment_example(example["input_ids"], example["labels"], tokenizer,
                                   settings["segment_tokens"], settings["anchor_stride"],
                                   settings["min_segment_tokens"], settings["segment_mode"], token_texts)
        rows.append({"input_ids": example["input_ids"], "labels": example["labels"],
                     "anchor_positions": [s.position for s in segments],
                     "anchor_segment_ends": [s.end for s in segments], "source_index": index})
        anchor_texts.append([s.text for s in segments])
    return rows, anchor_texts, skipped, cut_away


def _record_slice(records, start, stop) -> list[dict]:
    """``records[start:stop]`` as a list of dicts, which pickles to a worker (a ``datasets.Dataset``
    slice would be a dict of columns)."""
    if hasattr(records, "select") and hasattr(records, "column_names"):
        return records.select(range(start, min(stop, len(records)))).to_list()
    return list(records[start:stop])


_WORKER_STATE: dict = {}  # in a tokenise + segment worker process: its tokenizer and decode cache


def _init_segment_worker(tokenizer_name_or_path) -> None:
    # One process per core already: the tokenizers' own thread pool would only oversubscribe the CPU.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_STATE["tokenizer"] = _load_tokenizer(tokenizer_name_or_path)
    _WORKER_STATE["token_texts"] = {}


def _segment_chunk_in_worker(records, start, settings):
    return _segment_chunk(records, start, _WORKER_STATE["tokenizer"], settings, _WORKER_STATE["token_texts"])


def _check_finite(embeddings, unique_texts, rows, anchor_texts, source):
    bad = ~np.isfinite(embeddings).all(axis=1)
    if not bad.any():
        return
    bad_text = unique_texts[int(np.flatnonzero(bad)[0])]
    row, texts = next((row, texts) for row, texts in zip(rows, anchor_texts) if bad_text in texts)
    position = row["anchor_positions"][texts.index(bad_text)]
    raise ValueError(f"the encoder returned a non-finite embedding for the segment {bad_text!r} of example "
                     f"{row['source_index']} (0-based) of {source!r} (anchor at token {position}); "
                     f"{int(bad.sum())} distinct segment(s) affected; nothing was written")


def _load_tokenizer(name_or_path):
    from transformers import AutoTokenizer

    from sfr.loading import local_copy

    try:
        return AutoTokenizer.from_pretrained(local_copy(name_or_path))
    except Exception as error:
        raise ValueError(f"could not load the tokenizer of model {name_or_path!r}: {type(error).__name__}: "
                         f"{error}") from error


# ---------------------------------------------------------------------------------------------- on disk
def _load_cache(out: Path, metadata: dict):
    """``(dataset, None)`` when the rows at ``out`` match ``metadata``, else ``(None, what differs)``.
    Cheap: reads the Arrow schema and the list lengths, not the rows."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        dataset = datasets.load_from_disk(str(out))
    except Exception as error:
        return None, f"they do not load ({type(error).__name__}: {error})"
    if not isinstance(dataset, datasets.Dataset):
        return None, f"expected a Dataset, found a {type(dataset).__name__}"
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        return None, f"columns {missing} are missing"
    counts = metadata.get("counts") or {}
    if len(dataset) != counts.get("examples"):
        return None, f"{len(dataset)} rows, the metadata says {counts.get('examples')}"
    anchors = pc.sum(pc.list_value_length(dataset.data.column("anchor_positions"))).as_py() or 0
    if anchors != counts.get("anchors"):
        return None, f"{anchors} anchors, the metadata says {counts.get('anchors')}"
    vector = dataset.data.schema.field("anchor_targets").type.value_type
    dim = vector.list_size if pa.types.is_fixed_size_list(vector) else None
    if dim != metadata.get("embed_dim"):
        return None, f"anchor_targets of dimension {dim}, the metadata says {metadata.get('embed_dim')}"
    return dataset, None


@contextlib.contextmanager
def _library_progress(enabled: bool):
    """Silence the progress bars of ``datasets`` (saving) and ``transformers`` (loading weights) while
    ``enabled`` is False, then restore them."""
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as transformers_logging

    libraries = [lib for lib in (datasets_logging, transformers_logging) if lib.is_progress_bar_enabled()]
    if not enabled:
        for lib in libraries:
            lib.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled:
            for lib in libraries:
                lib.enable_progress_bar()


def target_features(embed_dim: int):
    """The ``datasets.Features`` of prepared rows (:data:`COLUMNS`) with targets of dimension ``embed_dim``."""
    import datasets

    list_type = getattr(datasets, "List", None) or datasets.Sequence  # datasets >= 4 calls it List
    return datasets.Features({
        "input_ids": list_type(datasets.Value("int32")),
        "labels": list_type(datasets.Value("int32")),
        "anchor_positions": list_type(datasets.Value("int32")),
        "anchor_segment_ends": list_type(datasets.Value("int32")),
        # fixed-size inner lists: stored as one contiguous float32 block per row
        "anchor_targets": list_type(list_type(datasets.Value("float32"), length=embed_dim)),
        "source_index": datasets.Value("int64"),
    })


def _write_atomically(rows, metadata, out: Path, embed_dim: int, progress: bool = True):
    import datasets

    dataset = datasets.Dataset.from_dict({name: [row[name] for row in rows] for name in COLUMNS},
                                         features=target_features(embed_dim))
    return save_atomically(dataset, metadata, out, progress)


def save_atomically(dataset, metadata, out: Path, progress: bool = True):
    """Save ``dataset`` and ``metadata`` to ``out`` through a hidden sibling renamed into place (metadata last)."""
    import datasets

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = _work_dir(out, "tmp"), _work_dir(out, "old")
    try:
        with _library_progress(progress):
            dataset.save_to_disk(str(tmp))
        # The metadata is written last: a directory without it never counts as a cache.
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2))
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return datasets.load_from_disk(str(out))


def _work_dir(out: Path, kind: str) -> Path:
    """A hidden sibling of ``out`` that names this host and process, so that a later run can tell
    whether its writer is gone (see :func:`_remove_stale_work_dirs`)."""
    return out.parent / f".{out.name}.{kind}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _remove_stale_work_dirs(out: Path) -> None:
    """Delete the work directories of ``out`` left by killed runs on this host (their process is gone).
    Directories of live processes and of other hosts (a shared file system) are left alone."""
    if os.name != "posix" or not out.parent.is_dir():  # liveness via os.kill(pid, 0) is POSIX-only
        return
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old|stream)-(.+)-(\d+)-[0-9a-f]{{8}}")
    host = socket.gethostname()
    for path in out.parent.glob(f".{glob.escape(out.name)}.*"):
        match = pattern.fullmatch(path.name)
        if match and match.group(1) == host and not _process_alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _load_source(data, split):
    """``(records, source name)``; the records are validated (:func:`sfr.data.validate_records`)."""
    if data is None:
        from sfr.corpus import SPLITS, build_corpus

        if split not in SPLITS:
            raise ValueError(f"split of the embedded corpus must be one of {SPLITS}, got {split!r}")
        return build_corpus(split), f"sfr-default-corpus:{split}"
    if isinstance(data, (list, tuple)):
        validate_records(list(data), "records")
        return list(data), "records"
    if hasattr(data, "to_list") and hasattr(data, "column_names"):  # a datasets.Dataset of records
        records = data.to_list()
        validate_records(records, "dataset")
        return records, "dataset"
    records = load_records(data, split=split)
    path = Path(data).expanduser()
    return records, str(path.resolve()) if path.exists() else str(data)


def _fingerprint(records) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def _default_out_dir(settings) -> Path:
    from sfr.corpus import sfr_cache_dir

    key = hashlib.sha256(json.dumps({k: settings[k] for k in _CACHE_KEYS}, sort_keys=True).encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(settings["source"]).name)[:40] or "data"
    return sfr_cache_dir() / "targets" / f"{stem}-{key[:12]}"


def _read_metadata(out: Path) -> dict | None:
    """The metadata at ``out``; ``{}`` when the file exists but does not parse (a stale cache of
    ours); ``None`` when there is none."""
    path = out / METADATA_FILE
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def _check_segment_args(segment_tokens, anchor_stride, min_segment_tokens, segment_mode) -> None:
    for name, value in (("segment_tokens", segment_tokens), ("anchor_stride", anchor_stride),
                        ("min_segment_tokens", min_segment_tokens)):
        check_int(name, value)
    if segment_mode not in SEGMENT_MODES:
        raise ValueError(f"segment_mode must be one of {SEGMENT_MODES}, got {segment_mode!r}")
