"""Batching prepared rows (the output of ``sfr prepare``) for training.

:class:`SFRDataCollator` right-pads a list of rows into tensors and flattens the anchors of the batch
into index/target tensors that :func:`sfr.sfr_loss` consumes directly (``anchor_index`` indexes the
``[B*T, D]`` view of the final hidden states).
"""
from __future__ import annotations

import torch

from sfr.checks import check_int
from sfr.data import IGNORE_INDEX


class SFRDataCollator:
    """Pad rows with ``input_ids``, ``labels``, ``anchor_positions``, ``anchor_segment_ends`` and
    ``anchor_targets`` (lists, numpy arrays or tensors) into a training batch.

    Returns a dict with ``B`` rows, padded length ``T`` and ``N`` kept anchors::

        input_ids           LongTensor[B, T]   right-padded with pad_token_id
        attention_mask      LongTensor[B, T]   1 on real tokens
        labels              LongTensor[B, T]   -100 on padding
        anchor_index        LongTensor[N]      b * T + t (row-major flat position of each anchor)
        anchor_targets      FloatTensor[N, E]  float32
        anchor_segment_end  LongTensor[N]      b * T + (exclusive segment end, clipped to the row length)
        anchor_weight       FloatTensor[N]     only when weight_fn is given

    Truncation rule (``max_length``): a row keeps its first ``L = min(len, max_length)`` tokens; an
    anchor ``t`` survives iff ``t + 1 < L`` (its first segment token survives, hence at least one),
    and its segment end becomes ``min(end, L)``. Its target stays the embedding of the *whole*
    (untruncated) segment. ``T = max L`` over the batch, rounded up to ``pad_to_multiple_of``.

    ``weight_fn(row, positions, segment_ends) -> sequence of n floats`` is called once per row with the
    row's kept anchor positions and (clipped) segment ends as lists, and returns their weights (finite,
    >= 0; e.g. ``lambda row, t, end: [e - p - 1 for p, e in zip(t, end)]`` weighs by segment length).
    Rows are checked (``ValueError`` naming the row): equal lengths, as many targets as anchors, and
    ``0 <= t < segment_end <= len(row)``.
    ``embed_dim`` gives E for a batch without any anchor when the rows do not reveal it (a batch with
    ``N = 0`` yields ``anchor_index`` of shape [0] and ``anchor_targets`` of shape [0, E]).
    """

    def __init__(self, pad_token_id: int, max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 weight_fn=None, embed_dim: int | None = None):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
        for name, value, low in (("max_length", max_length, 2), ("pad_to_multiple_of", pad_to_multiple_of, 1),
                                 ("embed_dim", embed_dim, 1)):
            check_int(name, value, low, optional=True)
        if weight_fn is not None and not callable(weight_fn):
            raise TypeError(f"weight_fn must be callable or None, got {type(weight_fn).__name__}")
        self.pad_token_id = pad_token_id
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        self.weight_fn = weight_fn
        self.embed_dim = embed_dim

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("rows must be a non-empty list of prepared rows")
        lengths = []
        for i, row in enumerate(rows):
            missing = [k for k in ("input_ids", "labels", "anchor_positions", "anchor_segment_ends", "anchor_targets")
                       if k not in row]
            if missing:
                raise ValueError(f"row {i} lacks {missing}; rows must come from sfr prepare (sfr.targets)")
            n = len(row["input_ids"])
            if len(row["labels"]) != n:
                raise ValueError(f"row {i}: input_ids has {n} tokens but labels has {len(row['labels'])}")
            lengths.append(n if self.max_length is None else min(n, self.max_length))
        T = max(lengths)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        B = len(rows)
        input_ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        index, ends, targets, weights = [], [], [], []
        embed_dim = self.embed_dim
        for b, (row, L) in enumerate(zip(rows, lengths)):
            input_ids[b, :L] = torch.as_tensor(row["input_ids"][:L], dtype=torch.long)
            labels[b, :L] = torch.as_tensor(row["labels"][:L], dtype=torch.long)
            attention_mask[b, :L] = 1
            positions = torch.as_tensor(row["anchor_positions"], dtype=torch.long).reshape(-1)
            seg_ends = torch.as_tensor(row["anchor_segment_ends"], dtype=torch.long).reshape(-1)
            row_targets = torch.as_tensor(row["anchor_targets"], dtype=torch.float32)
            if row_targets.ndim == 2:
                if embed_dim is None:
                    embed_dim = row_targets.shape[1]
                elif row_targets.shape[1] != embed_dim and row_targets.shape[0] > 0:
                    raise ValueError(f"row {b}: anchor_targets has dimension {row_targets.shape[1]}, expected {embed_dim}")
            num_targets = row_targets.shape[0] if row_targets.ndim == 2 else row_targets.numel()
            if not len(positions) == len(seg_ends) == num_targets:
                raise ValueError(f"row {b}: {len(positions)} anchor_positions, {len(seg_ends)} anchor_segment_ends and "
                                 f"anchor_targets of shape {tuple(row_targets.shape)} do not agree")
            n = len(row["input_ids"])
            if len(positions) and not (bool((positions >= 0).all()) and bool((seg_ends > positions).all())
                                       and bool((seg_ends <= n).all())):
                raise ValueError(f"row {b}: anchors must satisfy 0 <= t < segment_end <= {n} (the row's length), "
                                 f"got anchor_positions {positions.tolist()} and anchor_segment_ends "
                                 f"{seg_ends.tolist()}")
            keep = positions + 1 < L  # the first segment token must survive truncation
            positions, seg_ends = positions[keep], torch.clamp(seg_ends[keep], max=L)
            index.append(b * T + positions)
            ends.append(b * T + seg_ends)
            if len(positions):
                targets.append(row_targets[keep])
            if self.weight_fn is not None:
                row_weights = torch.as_tensor(self.weight_fn(row, positions.tolist(), seg_ends.tolist()),
                                              dtype=torch.float32).reshape(-1)
                if row_weights.numel() != len(positions):
                    raise ValueError(f"weight_fn returned {row_weights.numel()} weights for row {b}, "
                                     f"expected {len(positions)} (one per kept anchor)")
                if not bool((torch.isfinite(row_weights) & (row_weights >= 0)).all()):
                    raise ValueError(f"weight_fn returned {row_weights.tolist()} for row {b}; "
                                     f"weights must be finite and >= 0")
                weights.append(row_weights)
        batch = {
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "anchor_index": torch.cat(index),
            "anchor_targets": torch.cat(targets) if targets else torch.zeros((0, embed_dim or 0), dtype=torch.float32),
            "anchor_segment_end": torch.cat(ends),
        }
        if self.weight_fn is not None:
            batch["anchor_weight"] = torch.cat(weights)
        return batch
