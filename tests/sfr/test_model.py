"""SFRModel: CE + SFR in one forward, gradient routing, GA-exact scaling, the MTP identity, bad input."""
import pytest
import torch
from tiny_models import one_thread, tiny_backbone  # noqa: F401  (one_thread: an autouse fixture)
from torch import nn

from sfr.config import SFRConfig
from sfr.head import FlowHead, load_flow_head, save_flow_head
from sfr.model import SFRModel, default_head_width, find_decoder, objective_config
from sfr_kernels import sfr_loss

D, E, V, T = 32, 12, 100, 10


def wrap(objective="sfr", seed=0, randomize_head=True, **kwargs):
    model = SFRModel.from_backbone(tiny_backbone(seed), None if objective == "sft" else E, objective=objective,
                                   sfr_config=SFRConfig(head_width=48, num_samples=2), **kwargs)
    if randomize_head and model.head is not None:
        # The output layer is zero-initialised (dL/dh = 0 at step 0); give it weights so routing is visible.
        torch.manual_seed(seed + 1)
        nn.init.normal_(model.head.out.weight, std=0.1)
    return model


def make_batch(rows=4, anchors_per_row=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, T), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a 4-token "prompt"
    positions = torch.tensor([3, 5, 7][:anchors_per_row])
    anchor_index = (torch.arange(rows)[:, None] * T + positions).reshape(-1)
    targets = nn.functional.normalize(torch.randn(anchor_index.numel(), E, generator=g), dim=-1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, anchor_index=anchor_index,
                anchor_targets=targets, anchor_segment_end=anchor_index + 3)


def backbone_grads(model):
    return {k: p.grad.clone() for k, p in model.backbone.named_parameters() if p.grad is not None}


def test_forward_is_ce_plus_sfr_from_one_pass_over_the_last_hidden_state():
    model = wrap()
    batch = make_batch()
    decoder, calls = model.decoder, []
    original = decoder.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    decoder.forward = spy  # nn.Module.__call__ dispatches to the instance attribute
    out = model(**batch, sfr_lambda=1.0, sfr_seed=3)
    del decoder.forward
    assert len(calls) == 1 and not calls[0].get("output_hidden_states")  # one pass, last layer only
    torch.testing.assert_close(out.loss.detach(), out.ce_loss + out.sfr_loss)
    with torch.no_grad():
        reference_ce = model.backbone(input_ids=batch["input_ids"], labels=batch["labels"]).loss  # HF's shifted CE
        hidden = decoder(input_ids=batch["input_ids"]).last_hidden_state  # what lm_head reads (after the norm)
        reference_sfr = sfr_loss(hidden, batch["anchor_targets"], model.head, anchor_index=batch["anchor_index"],
                                 num_samples=2, seed=3, reduction="mean")
    torch.testing.assert_close(out.ce_loss, reference_ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.sfr_loss, reference_sfr, rtol=1e-5, atol=1e-7)
    assert out.num_anchors == batch["anchor_index"].numel()
    assert int(out.num_tokens) == int(batch["labels"][:, 1:].ne(-100).sum())


def test_phase_a_backbone_gradients_equal_sft_exactly():
    sfr_model, sft_model = wrap("sfr"), wrap("sft")
    sft_model.backbone.load_state_dict(sfr_model.backbone.state_dict())
    batch = make_batch()
    sfr_model(**batch, sfr_lambda=0.0, sfr_seed=5).loss.backward()
    sft_model(**batch).loss.backward()
    g_sfr, g_sft = backbone_grads(sfr_model), backbone_grads(sft_model)
    assert g_sfr.keys() == g_sft.keys() and g_sfr
    for name in g_sft:
        assert torch.equal(g_sfr[name], g_sft[name]), name
    # ... while the head learns on the detached features
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sfr_model.head.parameters())


def test_lambda_scales_only_the_backbone_share_of_the_sfr_gradient():
    batch = make_batch()
    grads, head_grads = {}, {}
    for lam in (0.0, 0.5, 1.0):
        model = wrap()
        model(**batch, sfr_lambda=lam, sfr_seed=7).loss.backward()
        grads[lam] = backbone_grads(model)
        head_grads[lam] = [p.grad.clone() for p in model.head.parameters()]
    name = "model.layers.1.mlp.down_proj.weight"
    delta_half, delta_full = grads[0.5][name] - grads[0.0][name], grads[1.0][name] - grads[0.0][name]
    assert delta_full.abs().max() > 1e-6  # SFR does reach the backbone for lambda > 0
    torch.testing.assert_close(delta_half, 0.5 * delta_full, rtol=1e-4, atol=1e-7)
    for a, b in zip(head_grads[0.0], head_grads[1.0]):  # the head's gradient does not depend on lambda
        torch.testing.assert_close(a, b)


def _split(batch, rows):
    """Rows ``rows`` of a batch, with their anchors re-indexed into the smaller batch."""
    part = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}
    row_of_anchor = batch["anchor_index"] // T
    keep = (row_of_anchor >= rows.start) & (row_of_anchor < rows.stop)
    part["anchor_index"] = batch["anchor_index"][keep] - rows.start * T
    for key in ("anchor_targets", "anchor_weight"):
        if key in batch:
            part[key] = batch[key][keep]
    return part, keep


@pytest.mark.parametrize("objective, weighted", [("sfr", False), ("sfr", True), ("mtp", False)])
def test_gradient_accumulation_equals_one_large_batch(objective, weighted):
    batch = make_batch(rows=4)
    batch["labels"][2, :7] = -100  # unequal token counts per row
    n = batch["anchor_index"].numel()
    if weighted:
        batch["anchor_weight"] = torch.rand(n) + 0.1
    noise, time = torch.randn(n, 2, E), torch.rand(n, 2)  # the same draws per anchor in both runs
    if objective == "mtp":
        noise, time = torch.zeros(n, 1, E), torch.zeros(n, 1)

    merged = wrap(objective)
    merged(**batch, sfr_lambda=0.7, sfr_noise=noise, sfr_time=time).loss.backward()

    accumulated = wrap(objective)
    tokens = batch["labels"][:, 1:].ne(-100).sum()
    anchors = batch["anchor_weight"].sum() if weighted else n
    for rows in (slice(0, 1), slice(1, 4)):  # unequal micro-batches: per-micro-batch means would differ
        part, keep = _split(batch, rows)
        out = accumulated(**part, sfr_lambda=0.7, sfr_noise=noise[keep], sfr_time=time[keep],
                          num_items_in_batch=tokens, num_anchors_in_batch=anchors)
        out.loss.backward()
    for (name, p), q in zip(merged.named_parameters(), accumulated.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_counts_divide_the_summed_losses_and_an_empty_micro_batch_still_runs_the_head():
    model = wrap()
    batch = make_batch()
    tokens, n = batch["labels"][:, 1:].ne(-100).sum(), batch["anchor_index"].numel()
    plain = model(**batch, sfr_seed=4)  # this micro-batch's own counts
    # Counts below 1 are legitimate (an all-device count / world size, an anchor-weight sum): no clamping.
    scaled = model(**batch, sfr_seed=4, num_items_in_batch=torch.tensor(0.5), num_anchors_in_batch=torch.tensor(0.25))
    torch.testing.assert_close(scaled.ce_loss, plain.ce_loss * tokens / 0.5)
    torch.testing.assert_close(scaled.sfr_loss, plain.sfr_loss * n / 0.25)

    empty = {**batch, "anchor_index": batch["anchor_index"][:0], "anchor_targets": batch["anchor_targets"][:0]}
    out = model(**empty, sfr_lambda=1.0, num_items_in_batch=tokens, num_anchors_in_batch=torch.tensor(0.0))
    assert float(out.sfr_loss) == 0.0 and torch.isfinite(out.loss)
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    # The head is part of the graph (zero gradients, not None): DDP sees no unused parameter.
    assert all(p.grad is not None and not p.grad.any() for p in model.head.parameters())


def test_mtp_preset_loss_identity():
    model = wrap("mtp")
    assert (model.sfr_config.source_std, model.sfr_config.time_sampling, model.sfr_config.num_samples) == (0.0, "zero", 1)
    batch = make_batch()
    out = model(**batch, sfr_lambda=1.0, sfr_seed=11)
    with torch.no_grad():
        h = model.final_hidden_states(batch["input_ids"]).reshape(-1, D)[batch["anchor_index"]]
        y = batch["anchor_targets"]
        n = y.shape[0]
        v = model.head(torch.zeros(n, 1, E), torch.zeros(n, 1), h)[:, 0]  # x_s = 0, s = 0, u = y
        expected = (v - y).square().mean()
    torch.testing.assert_close(out.sfr_loss, expected, rtol=1e-5, atol=1e-7)
    # The preset holds however the model is built, and keeps the head settings.
    direct = SFRModel(tiny_backbone(), FlowHead(D, E, width=16), sfr_config=SFRConfig(head_width=16, num_samples=3),
                      objective="mtp")
    assert (direct.sfr_config.source_std, direct.sfr_config.time_sampling, direct.sfr_config.num_samples,
            direct.sfr_config.head_width) == (0.0, "zero", 1, 16)


def test_sfr_loss_falls_when_training_on_a_fixed_batch():
    model = wrap(randomize_head=False)
    batch = make_batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(**batch, sfr_lambda=1.0, sfr_seed=1)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.sfr_loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_ema_targets_replace_the_precomputed_ones():
    model = wrap(target_source="ema", ema_decay=0.9)
    with torch.no_grad():  # a teacher that differs from the student: its states, not the student's, make y
        for p in model.teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    batch = make_batch()
    batch.pop("anchor_targets")
    out = model(**batch, sfr_lambda=1.0, sfr_seed=2)
    y = model.teacher.targets(batch["input_ids"], batch["anchor_index"], batch["anchor_segment_end"],
                              attention_mask=batch["attention_mask"])
    teacher, model.teacher = model.teacher, None
    expected = model(**batch, anchor_targets=y, sfr_lambda=1.0, sfr_seed=2)
    model.teacher = teacher
    torch.testing.assert_close(out.sfr_loss, expected.sfr_loss)
    out.loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None for p in model.backbone.parameters())
    with pytest.raises(ValueError, match="anchor_segment_end"):
        model(**{k: v for k, v in batch.items() if k != "anchor_segment_end"})


def test_head_round_trip(tmp_path):
    model = wrap()
    save_flow_head(model.head, tmp_path / "sfr_head", model.sfr_config, metadata=model.head_metadata())
    head, config = load_flow_head(tmp_path / "sfr_head")
    assert (head.hidden_size, head.embed_dim, head.width) == (D, E, 48)
    for a, b in zip(head.state_dict().values(), model.head.state_dict().values()):
        assert torch.equal(a, b)
    assert config["num_samples"] == 2 and config["objective"] == "sfr" and config["source_std"] == 1.0
    with pytest.raises(FileNotFoundError, match="saved flow head"):
        load_flow_head(tmp_path)


def test_defaults_and_presets():
    assert default_head_width(128, 384) == 384 and default_head_width(896, 384) == 1024
    assert default_head_width(8) == 64 and default_head_width(100, 10) == 256 and default_head_width(4096, 384) == 1024
    assert objective_config("sft") is None
    assert objective_config("mtp", SFRConfig(head_width=8)).head_width == 8


def test_bad_input_is_rejected_clearly():
    with pytest.raises(ValueError, match="objective"):
        SFRModel.from_backbone(tiny_backbone(), E, objective="dpo")
    with pytest.raises(ValueError, match="final hidden states"):
        find_decoder(nn.Linear(3, 3))

    class NoBaseModel(nn.Module):  # an LM head but no reachable base model
        def get_output_embeddings(self):
            return nn.Linear(D, V)

    with pytest.raises(ValueError, match="final hidden states"):
        SFRModel(NoBaseModel(), None, objective="sft")
    with pytest.raises(ValueError, match="embed_dim"):
        SFRModel.from_backbone(tiny_backbone(), None, objective="sfr")
    with pytest.raises(ValueError, match="without a head"):
        SFRModel(tiny_backbone(), FlowHead(D, E, width=8), objective="sft")
    with pytest.raises(ValueError, match="hidden_size"):
        SFRModel(tiny_backbone(), FlowHead(D + 1, E, width=8))
    with pytest.raises(ValueError, match="loss_backend"):
        SFRModel(tiny_backbone(), FlowHead(D, E, width=8), loss_backend="cuda")
    with pytest.raises(ValueError, match="needs a head"):
        SFRModel.from_backbone(tiny_backbone(), E, objective="sft", target_source="ema")
    model = wrap()
    batch = make_batch()
    batch["anchor_targets"] = torch.randn(batch["anchor_index"].numel(), E + 1)  # data E != head E
    with pytest.raises(ValueError, match="target"):
        model(**batch)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="anchor_index"):
        model(**{k: v for k, v in batch.items() if k != "anchor_index"})


def test_liger_path_computes_the_same_ce(monkeypatch):
    """The Liger call (flat states, lm_head weight, flat shifted labels, sum) gives the standard CE.

    Liger needs CUDA; a stand-in with the interface of ``liger_kernel.transformers.functional.
    liger_fused_linear_cross_entropy`` checks the arguments the wrapper passes.
    """
    import sfr.model as model_module

    calls = []

    def fake_liger(_input, weight, target, bias=None, ignore_index=-100, reduction="mean", softcap=None, **kwargs):
        calls.append((_input.shape, target.shape, reduction, softcap))
        logits = nn.functional.linear(_input, weight, bias).float()
        return nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)

    model = wrap()
    batch = make_batch()
    standard = model(**batch, sfr_seed=1)
    assert model.ce_implementation(torch.device("cpu")) == "torch"
    monkeypatch.setattr(model_module, "_liger_fused_linear_ce", lambda: fake_liger)
    monkeypatch.setattr(model_module, "_liger_runs_on", lambda device: True)
    assert model.ce_implementation(torch.device("cpu")) == "liger"
    fused = model(**batch, sfr_seed=1)
    assert calls == [(torch.Size([4 * T, D]), torch.Size([4 * T]), "sum", None)]
    torch.testing.assert_close(fused.ce_loss, standard.ce_loss)
    model.ce_backend = "torch"
    model(**batch, sfr_seed=1)
    assert len(calls) == 1


def test_liger_backend_without_liger_is_a_clear_error():
    model = wrap(ce_backend="liger")
    with pytest.raises(ValueError, match="liger"):
        model(**make_batch())


def test_zero3_partitioned_lm_head_takes_the_ce_path_that_calls_it(monkeypatch):
    """DeepSpeed ZeRO-3 marks partitioned parameters with ``ds_id`` and gathers them only in module calls:
    Liger (reads lm_head.weight) may not be used; the fused SFR loss stays (it runs inside the head's call)."""
    import sfr.model as model_module

    model = wrap(loss_backend="triton")
    monkeypatch.setattr(model_module, "_liger_fused_linear_ce", lambda: object())
    monkeypatch.setattr(model_module, "_liger_runs_on", lambda device: True)
    assert model.ce_implementation(torch.device("cpu")) == "liger"
    for param in [*model.head.parameters(), model.backbone.get_output_embeddings().weight]:
        param.ds_id = 0  # what deepspeed.zero.Init sets
    with pytest.warns(UserWarning, match="ZeRO-3"):
        assert model.ce_implementation(torch.device("cpu")) == "torch"
    assert model.sfr_loss_path(torch.zeros(1, 2, D)).backend == "triton"


@pytest.mark.parametrize("objective, scale", [("sfr", 3.5), ("mtp", "sqrt_e")])
def test_target_scale_multiplies_the_targets_before_the_loss_exactly(objective, scale):
    def model_with(target_scale):
        model = SFRModel.from_backbone(tiny_backbone(0), E, objective=objective, sfr_config=SFRConfig(
            head_width=48, num_samples=2, target_scale=target_scale))
        torch.manual_seed(1)
        nn.init.normal_(model.head.out.weight, std=0.1)
        return model

    batch = make_batch()
    multiplier = E ** 0.5 if scale == "sqrt_e" else scale
    by_config, by_hand, unscaled = model_with(scale), model_with(1.0), model_with(1.0)
    outputs = [by_config(**batch, sfr_seed=5),
               by_hand(**{**batch, "anchor_targets": batch["anchor_targets"] * multiplier}, sfr_seed=5),
               unscaled(**batch, sfr_seed=5)]
    for out in outputs:
        out.loss.backward()
    assert torch.equal(outputs[0].sfr_loss, outputs[1].sfr_loss)
    assert not torch.allclose(outputs[0].sfr_loss, outputs[2].sfr_loss)  # the scale does change the loss
    for (name, a), b in zip(by_config.named_parameters(), by_hand.parameters()):
        assert torch.equal(a.grad, b.grad), name
