import numpy as np
import pytest
import torch

from sfr.collator import SFRDataCollator

E = 5


def make_row(length, anchors, seed):
    """A prepared row with random ids, labels on the second half and the given (t, end) anchors."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (length,), generator=g).tolist()
    labels = [-100] * (length // 2) + ids[length // 2:]
    targets = torch.nn.functional.normalize(torch.randn(len(anchors), E, generator=g), dim=-1)
    return {"input_ids": ids, "labels": labels, "anchor_positions": [t for t, _ in anchors],
            "anchor_segment_ends": [e for _, e in anchors], "anchor_targets": targets.tolist()}


def test_padding_and_flat_anchor_indices():
    rows = [make_row(7, [(3, 7), (5, 7)], 0), make_row(10, [(4, 9)], 1), make_row(4, [], 2)]
    batch = SFRDataCollator(pad_token_id=0)(rows)
    B, T = 3, 10
    assert batch["input_ids"].shape == (B, T) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == [7, 10, 4]
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        assert batch["input_ids"][b, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][b, n:] == 0).all() and (batch["labels"][b, n:] == -100).all()
        assert batch["labels"][b, :n].tolist() == row["labels"]
    assert batch["anchor_index"].tolist() == [0 * T + 3, 0 * T + 5, 1 * T + 4]
    assert batch["anchor_segment_end"].tolist() == [0 * T + 7, 0 * T + 7, 1 * T + 9]
    expected = torch.tensor(rows[0]["anchor_targets"] + rows[1]["anchor_targets"])
    assert batch["anchor_targets"].dtype == torch.float32 and torch.equal(batch["anchor_targets"], expected)
    assert "anchor_weight" not in batch
    hidden = torch.randn(B, T, 8)  # the index gathers the anchors' hidden states from the [B*T, D] view
    gathered = hidden.reshape(B * T, -1)[batch["anchor_index"]]
    assert torch.equal(gathered[2], hidden[1, 4])


def test_truncation_drops_anchors_without_a_surviving_segment_token():
    row = make_row(12, [(2, 6), (6, 11), (7, 12), (8, 12), (10, 12)], 3)
    batch = SFRDataCollator(pad_token_id=1, max_length=9)(
        [row, make_row(5, [(2, 5)], 4)])
    T = 9
    # kept iff t + 1 < 9: t = 2, 6, 7 survive; 8 and 10 lose every segment token; ends clip to 9
    assert batch["input_ids"].shape == (2, T)
    assert batch["anchor_index"].tolist() == [2, 6, 7, T + 2]
    assert batch["anchor_segment_end"].tolist() == [6, 9, 9, T + 5]
    assert torch.equal(batch["anchor_targets"][:3], torch.tensor(row["anchor_targets"][:3]))
    assert batch["input_ids"][0].tolist() == row["input_ids"][:9]


def test_pad_to_multiple_weights_and_array_inputs():
    rows = [make_row(6, [(2, 6)], 5), make_row(9, [(4, 8), (6, 9)], 6)]
    rows[1] = {k: np.asarray(v) for k, v in rows[1].items()}  # numpy (datasets' numpy format) works too
    seen = []

    def weight_fn(row, positions, ends):
        seen.append((positions, ends))
        return [1.0 / (e - t) for t, e in zip(positions, ends)]

    batch = SFRDataCollator(pad_token_id=0, pad_to_multiple_of=8, weight_fn=weight_fn)(rows)
    assert batch["input_ids"].shape == (2, 16)
    assert seen == [([2], [6]), ([4, 6], [8, 9])]
    assert torch.allclose(batch["anchor_weight"], torch.tensor([1 / 4, 1 / 4, 1 / 3]))
    assert batch["anchor_index"].tolist() == [2, 16 + 4, 16 + 6]


def test_batch_without_anchors():
    rows = [make_row(6, [], 7), make_row(4, [], 8)]
    batch = SFRDataCollator(pad_token_id=0, embed_dim=E, weight_fn=lambda r, p, e: [1.0] * len(p))(rows)
    assert batch["anchor_index"].shape == (0,) and batch["anchor_index"].dtype == torch.long
    assert batch["anchor_segment_end"].shape == (0,)
    assert batch["anchor_targets"].shape == (0, E) and batch["anchor_targets"].dtype == torch.float32
    assert batch["anchor_weight"].shape == (0,)
    # all anchors cut away by truncation: E comes from the rows
    cut = SFRDataCollator(pad_token_id=0, max_length=3)([make_row(8, [(4, 8)], 9)])
    assert cut["anchor_index"].shape == (0,) and cut["anchor_targets"].shape == (0, E)


def test_bad_rows_and_arguments():
    with pytest.raises(TypeError, match="pad_token_id"):
        SFRDataCollator(pad_token_id=None)
    with pytest.raises(ValueError, match="max_length"):
        SFRDataCollator(pad_token_id=0, max_length=1)
    collate = SFRDataCollator(pad_token_id=0)
    with pytest.raises(ValueError, match="non-empty"):
        collate([])
    row = make_row(6, [(2, 6)], 10)
    with pytest.raises(ValueError, match=r"lacks \['anchor_targets'\]"):
        collate([{k: v for k, v in row.items() if k != "anchor_targets"}])
    with pytest.raises(ValueError, match="do not agree"):
        collate([{**row, "anchor_positions": [2, 3]}])
    with pytest.raises(ValueError, match="weight_fn returned 2 weights"):
        SFRDataCollator(pad_token_id=0, weight_fn=lambda r, p, e: [1.0, 2.0])([row])
    with pytest.raises(ValueError, match="finite and >= 0"):
        SFRDataCollator(pad_token_id=0, weight_fn=lambda r, p, e: [-1.0])([row])
    for positions, ends in (([-1], [6]), ([2], [2]), ([2], [7])):  # t < 0, empty segment, end past the row
        with pytest.raises(ValueError, match=r"row 0: anchors must satisfy 0 <= t < segment_end <= 6"):
            collate([{**row, "anchor_positions": positions, "anchor_segment_ends": ends}])
    with pytest.raises(ValueError, match="dimension 3, expected 5"):
        collate([row, {**row, "anchor_targets": [[0.1, 0.2, 0.3]]}])
