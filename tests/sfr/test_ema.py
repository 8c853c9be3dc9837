"""The EMA teacher: segment-mean targets through a fixed projection, no gradient, exact EMA update."""
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig

from sfr.ema import EMATeacher, random_projection, segment_means


def tiny_decoder(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=50)
    return AutoModelForCausalLM.from_config(config).model


def test_segment_means_match_a_loop():
    hidden = torch.randn(2, 9, 5)
    anchor_index = torch.tensor([0, 3, 9 + 2, 9 + 6])
    segment_end = torch.tensor([4, 9, 9 + 5, 9 + 9])  # exclusive ends; positions anchor+1 .. end-1
    got = segment_means(hidden, anchor_index, segment_end)
    flat = hidden.reshape(-1, 5)
    expected = torch.stack([flat[a + 1:e].mean(0) for a, e in zip(anchor_index.tolist(), segment_end.tolist())])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


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


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="ema_decay"):
        EMATeacher(tiny_decoder(), 16, 6, decay=1.0)
