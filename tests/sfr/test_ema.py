"""The EMA teacher: segment-mean targets through a fixed projection, no gradient, exact EMA update."""
import pytest
import torch
from tiny_models import one_thread, tiny_backbone  # noqa: F401  (one_thread: an autouse fixture)
from torch import nn

from sfr.ema import EMATeacher, random_projection, segment_means


def tiny_decoder(seed=0):
    return tiny_backbone(seed, hidden_size=16, vocab_size=50).model


def test_segment_means_match_a_loop():
    hidden = torch.randn(2, 9, 5)
    anchor_index = torch.tensor([0, 3, 9 + 2, 9 + 6])
    segment_end = torch.tensor([4, 9, 9 + 5, 9 + 9])  # exclusive ends; positions anchor+1 .. end-1
    got = segment_means(hidden, anchor_index, segment_end)
    flat = hidden.reshape(-1, 5)
    expected = torch.stack([flat[a + 1:e].mean(0) for a, e in zip(anchor_index.tolist(), segment_end.tolist())])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_segment_means_stay_exact_far_into_a_long_batch():
    # Large, same-signed states over many positions: a float32 prefix sum would lose ~1e-2 here.
    hidden = 100.0 + torch.randn(1, 50_000, 4)
    anchor_index, segment_end = torch.tensor([49_900]), torch.tensor([49_909])
    expected = hidden[0, 49_901:49_909].double().mean(0, keepdim=True).float()
    torch.testing.assert_close(segment_means(hidden, anchor_index, segment_end), expected, rtol=0, atol=1e-5)


def test_teacher_targets_are_unit_vectors_from_the_projected_segment_mean():
    decoder = tiny_decoder()
    teacher = EMATeacher(decoder, hidden_size=16, embed_dim=6, decay=0.9, projection_seed=3)
    ids = torch.randint(0, 50, (2, 8))
    anchor_index, segment_end = torch.tensor([1, 8 + 2]), torch.tensor([5, 8 + 7])
    y = teacher.targets(ids, anchor_index, segment_end)
    assert y.shape == (2, 6) and not y.requires_grad
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        h = decoder(input_ids=ids).last_hidden_state
    expected = nn.functional.normalize(segment_means(h, anchor_index, segment_end) @ random_projection(16, 6, 3), dim=-1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(teacher.projection, random_projection(16, 6, 3))
    assert not torch.equal(random_projection(16, 6, 3), random_projection(16, 6, 4))


def test_teacher_gets_no_gradient_and_stays_in_eval_mode():
    teacher = EMATeacher(tiny_decoder(), 16, 6)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.decoder.training


def test_update_is_the_exact_ema_formula():
    student = tiny_decoder(0)
    teacher = EMATeacher(student, 16, 6, decay=0.75)
    before = {k: v.clone() for k, v in teacher.decoder.named_parameters()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(student)
    student_params = dict(student.named_parameters())
    for name, p in teacher.decoder.named_parameters():
        torch.testing.assert_close(p, 0.75 * before[name] + 0.25 * student_params[name])
        assert not torch.equal(p, student_params[name])


def test_update_under_zero3_moves_the_local_shards():
    # DeepSpeed ZeRO-3 leaves an empty placeholder in each parameter and this rank's values in ds_tensor.
    student = tiny_decoder(0)
    teacher = EMATeacher(student, 16, 6, decay=0.5)
    pairs = list(zip(teacher.decoder.parameters(), student.parameters()))
    for teacher_param, student_param in pairs:
        for param, value in ((teacher_param, 1.0), (student_param, 3.0)):
            param.ds_id, param.ds_tensor = 0, torch.full((5,), value)
            param.data = torch.empty(0)
    teacher.update(student)
    assert all(torch.equal(t.ds_tensor, torch.full((5,), 2.0)) for t, _ in pairs)


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="ema_decay"):
        EMATeacher(tiny_decoder(), 16, 6, decay=1.0)
