"""``sfr prepare --stream``: targets for corpora larger than RAM, encoded on one or several devices.

:func:`prepare_streaming` writes exactly the rows and metadata :func:`sfr.targets.prepare` writes (same
columns, same anchor rule, same cache), but never holds the corpus: records are read with ``datasets``'
streaming JSON reader, ``chunk_records`` at a time; each chunk is tokenised and segmented
(:func:`sfr.targets._segment_chunk`), its segments embedded, and its rows appended to an Arrow file as
one record batch (targets as float32 blocks, never Python floats). Segment texts already embedded are
looked up in a bounded cache (the ``cache_segments`` most recent), so repeated segments are encoded
once per appearance in that window. ``encode_devices`` (``["cuda:0", "cuda:1", ...]``) spreads each
chunk's segments over one sentence-transformers process per device
(``SentenceTransformer.start_multi_process_pool``).

Memory bound (besides the encoder and tokenizer): one chunk of records, tokens and segment texts, its
targets (``anchors x E x 4`` bytes), the segment cache (``cache_segments x (E x 4 + text)`` bytes: 77 MB
for 50,000 MiniLM segments), one Arrow record batch, and ``datasets``' read buffer; none of it grows
with the corpus. The streamed source is fingerprinted by its files' bytes (SHA-256), not its records.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from sfr.checks import check_int, check_output_dir
from sfr.data import validate_records
from sfr.encoder import embedding_dimension, encode_texts, load_encoder, resolve_encoder
from sfr.targets import (
    _CACHE_KEYS,
    FORMAT_VERSION,
    PreparedTargets,
    _check_segment_args,
    _library_progress,
    _load_cache,
    _load_tokenizer,
    _read_metadata,
    _remove_stale_work_dirs,
    _segment_chunk,
    _work_dir,
    save_atomically,
    target_features,
)

STREAM_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def stream_files(data) -> list[Path]:
    """The JSON(L) files of ``data`` (a file, or a directory of them), sorted; ``ValueError`` otherwise."""
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    files = [p for p in files if p.name.endswith(STREAM_SUFFIXES)]
    if not files:
        raise ValueError(f"--stream reads JSON/JSONL files ({', '.join(STREAM_SUFFIXES)}); {path} has none")
    return files


def file_fingerprint(files: list[Path]) -> str:
    """SHA-256 of the files' names and bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def record_chunks(files: list[Path], chunk_records: int):
    """Lists of up to ``chunk_records`` records, read with ``datasets``' streaming JSON reader."""
    import datasets

    stream = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train", streaming=True)
    for batch in stream.iter(batch_size=chunk_records):
        names = list(batch)
        # Keys a record lacks come back as None (one schema for all); drop them, as the record had none.
        yield [{k: v for k, v in zip(names, values) if v is not None} for values in zip(*batch.values())]


class SegmentCache:
    """The embeddings of the ``size`` most recently used segment texts (least recently used leave)."""

    def __init__(self, size: int):
        self.size, self.entries = size, OrderedDict()

    def embed(self, texts: list[str], encode) -> tuple[dict, int]:
        """``({text: embedding} for every text of texts, how many were encoded)``: cached texts become the
        most recent, the others are encoded with ``encode(list of texts) -> [n, E]`` and cached."""
        found, missing = {}, []
        for text in dict.fromkeys(texts):
            if text in self.entries:
                self.entries.move_to_end(text)
                found[text] = self.entries[text]
            else:
                missing.append(text)
        if missing:
            embeddings = encode(missing)
            found.update(zip(missing, embeddings))
            self.entries.update(zip(missing, embeddings))
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return found, len(missing)


def _record_batch(rows, anchor_texts, embedding_of: dict, embed_dim: int, schema):
    """One Arrow record batch of ``rows`` with their targets (``embedding_of`` their segment texts)."""
    import pyarrow as pa

    def int_lists(name):
        return pa.array([row[name] for row in rows], type=pa.list_(pa.int32()))

    targets = np.zeros((sum(len(t) for t in anchor_texts), embed_dim), dtype=np.float32)
    offsets, at = [0], 0
    for texts in anchor_texts:
        for text in texts:
            targets[at] = embedding_of[text]
            at += 1
        offsets.append(at)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(targets.reshape(-1), type=pa.float32()), embed_dim)
    columns = {"input_ids": int_lists("input_ids"), "labels": int_lists("labels"),
               "anchor_positions": int_lists("anchor_positions"), "anchor_segment_ends": int_lists("anchor_segment_ends"),
               "anchor_targets": pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), vectors),
               "source_index": pa.array([row["source_index"] for row in rows], type=pa.int64())}
    return pa.record_batch([columns[field.name].cast(field.type) for field in schema], schema=schema)


def prepare_streaming(data, out=None, *, model=None, encoder=None, segment_tokens: int = 32, anchor_stride: int = 8,
                      min_segment_tokens: int = 4, max_length: int | None = None, segment_mode: str = "window",
                      batch_size: int = 256, device=None, encode_devices: list[str] | None = None,
                      chunk_records: int = 4096, cache_segments: int = 50_000, num_proc: int = 1,
                      overwrite: bool = False, progress: bool = True) -> PreparedTargets:
    """:func:`sfr.targets.prepare` of JSON(L) ``data`` (a file or a directory of them), streamed (module doc).

    ``encode_devices``: encode on these devices, one process each (e.g. ``["cuda:0", "cuda:1"]``;
    ``["cpu", "cpu"]`` works too); default: one encoder on ``device``. ``num_proc``: processes that
    tokenise and segment, at most ``2 num_proc`` chunks in flight. The result is the same rows as
    :func:`sfr.targets.prepare` would write, and the same metadata except ``source_fingerprint`` (of the
    files' bytes) and ``streaming`` (the settings above and the peak memory).
    """
    import pyarrow as pa
    from tqdm.auto import tqdm

    from sfr.tiny_lm import resolve_model_name_or_path

    _check_segment_args(segment_tokens, anchor_stride, min_segment_tokens, segment_mode)
    for name, value in (("batch_size", batch_size), ("chunk_records", chunk_records), ("cache_segments", cache_segments),
                        ("num_proc", num_proc)):
        check_int(name, value)
    check_int("max_length", max_length, 2, optional=True)
    started = time.perf_counter()
    files = stream_files(data)
    settings = {"format_version": FORMAT_VERSION, "encoder": resolve_encoder(encoder),
                "tokenizer": resolve_model_name_or_path(model), "segment_tokens": segment_tokens,
                "anchor_stride": anchor_stride, "min_segment_tokens": min_segment_tokens,
                "segment_mode": segment_mode, "max_length": max_length,
                "source": str(Path(data).expanduser().resolve()), "source_fingerprint": file_fingerprint(files)}
    if out is None:
        from sfr.targets import _default_out_dir

        out = _default_out_dir(settings)
    out = check_output_dir(out, "--out")
    _remove_stale_work_dirs(out)
    existing = _read_metadata(out)
    if existing and not overwrite and all(existing.get(k) == settings[k] for k in _CACHE_KEYS):
        dataset, problem = _load_cache(out, existing)
        if problem is None:
            return PreparedTargets(out, dataset, existing, cache_hit=True,
                                   timings={"total_s": time.perf_counter() - started})

    with _library_progress(progress):
        sentence_encoder = load_encoder(settings["encoder"], device=device)
    embed_dim = embedding_dimension(sentence_encoder)
    tokenizer = _load_tokenizer(settings["tokenizer"])
    schema = target_features(embed_dim).arrow_schema
    pool = sentence_encoder.start_multi_process_pool(target_devices=list(encode_devices)) if encode_devices else None
    cache = SegmentCache(cache_segments)
    counts = dict(records=0, examples=0, skipped_without_response=0, skipped_cut_by_max_length=0,
                  examples_without_anchors=0, anchors=0, encoded_segments=0)
    timings = {"tokenize_segment_s": 0.0, "encode_s": 0.0}
    work = _work_dir(out, "stream")
    work.mkdir(parents=True)
    arrow_file = work / "rows.arrow"
    try:
        with pa.OSFile(str(arrow_file), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer, \
                tqdm(unit="record", desc="prepare (streaming)", disable=not progress) as bar:
            for rows, anchor_texts, skipped, cut_away, records in _segmented_chunks(
                    files, chunk_records, tokenizer, settings, num_proc, timings):
                t0 = time.perf_counter()
                embedding_of, encoded = cache.embed(
                    [text for texts in anchor_texts for text in texts],
                    lambda missing: encode_texts(sentence_encoder, missing, batch_size=batch_size, progress=False,
                                                 pool=pool))
                timings["encode_s"] += time.perf_counter() - t0
                if rows:
                    writer.write_batch(_record_batch(rows, anchor_texts, embedding_of, embed_dim, schema))
                counts.update(records=counts["records"] + records, examples=counts["examples"] + len(rows),
                              skipped_without_response=counts["skipped_without_response"] + skipped,
                              skipped_cut_by_max_length=counts["skipped_cut_by_max_length"] + cut_away,
                              examples_without_anchors=counts["examples_without_anchors"]
                              + sum(not texts for texts in anchor_texts),
                              anchors=counts["anchors"] + sum(len(t) for t in anchor_texts),
                              encoded_segments=counts["encoded_segments"] + encoded)
                bar.update(records)
        if counts["examples"] == 0:
            raise ValueError(f"data set {settings['source']!r}: none of its {counts['records']} examples has a "
                             "response token (assistant/completion)")
        streamed_peak_mb = _peak_rss_mb()  # saving below reads the rows back through a memory map (file pages)
        import datasets

        dataset = datasets.Dataset.from_file(str(arrow_file))
        total_s = time.perf_counter() - started
        counts["unique_segments"] = counts.pop("encoded_segments")  # unique within the cache window
        metadata = {**settings, "embed_dim": embed_dim, "E": embed_dim, "K": segment_tokens, "S": anchor_stride,
                    "m": min_segment_tokens, "counts": counts,
                    "throughput": {"device": ",".join(encode_devices) if encode_devices else str(sentence_encoder.device),
                                   "records_per_s": round(counts["records"] / max(total_s, 1e-9), 1),
                                   "tokenize_segment_windows_per_s": round(
                                       counts["anchors"] / max(timings["tokenize_segment_s"], 1e-9), 1),
                                   "tokenize_segment_processes": num_proc,
                                   "encode_windows_per_s": round(
                                       counts["unique_segments"] / max(timings["encode_s"], 1e-9), 1)},
                    "streaming": {"chunk_records": chunk_records, "cache_segments": cache_segments,
                                  "encode_devices": list(encode_devices or []),
                                  "peak_rss_mb_streaming": streamed_peak_mb}}
        dataset = save_atomically(dataset, metadata, out, progress)
    finally:
        if pool is not None:
            sentence_encoder.stop_multi_process_pool(pool)
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - started
    return PreparedTargets(out, dataset, metadata, cache_hit=False, timings=timings)


def _segmented_chunks(files, chunk_records, tokenizer, settings, num_proc: int, timings: dict):
    """``(rows, anchor_texts, skipped, cut_away, records)`` per chunk, in order: segmented here, or by
    ``num_proc`` spawned workers with at most ``2 num_proc`` chunks in flight (bounded memory)."""
    import concurrent.futures
    import multiprocessing
    from collections import deque

    from sfr.targets import _init_segment_worker, _segment_chunk_in_worker

    token_texts: dict = {}
    start = 0
    if num_proc == 1:
        for chunk in record_chunks(files, chunk_records):
            validate_records(chunk, f"{settings['source']} (records {start + 1}..)")
            t0 = time.perf_counter()
            result = _segment_chunk(chunk, start, tokenizer, settings, token_texts)
            timings["tokenize_segment_s"] += time.perf_counter() - t0
            start += len(chunk)
            yield (*result, len(chunk))
        return
    workers = concurrent.futures.ProcessPoolExecutor(  # spawned, as sfr.targets does (no half-copied threads)
        max_workers=num_proc, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_segment_worker, initargs=(settings["tokenizer"],))
    pending = deque()
    try:
        t0 = time.perf_counter()
        for chunk in record_chunks(files, chunk_records):
            validate_records(chunk, f"{settings['source']} (records {start + 1}..)")
            pending.append((workers.submit(_segment_chunk_in_worker, chunk, start, settings), len(chunk)))
            start += len(chunk)
            while len(pending) >= 2 * num_proc or (pending and pending[0][0].done()):
                future, size = pending.popleft()
                yield (*future.result(), size)
        while pending:
            future, size = pending.popleft()
            yield (*future.result(), size)
        timings["tokenize_segment_s"] += time.perf_counter() - t0  # wall time of the overlapped pipeline
    finally:
        workers.shutdown(wait=True, cancel_futures=True)


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    scale = 1 if os.uname().sysname == "Linux" else 1 / 1024  # macOS reports bytes
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024, 1)

