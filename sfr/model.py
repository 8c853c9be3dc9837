"""``SFRModel``: a causal LM with the flow head attached, computing CE + SFR inside ``forward``
(docs/design.md, "Training").

Trainer, DDP, FSDP and DeepSpeed see one module whose ``forward`` returns the training loss::

    H      = decoder(input_ids).last_hidden_state                       [B, T, D]  after the final norm
    L_CE   = sum_{b,t} CE(lm_head(H[b, t]), labels[b, t+1]) / n_tokens   (labels -100 are ignored)
    L_SFR  = sfr_loss(H, y, head, anchor_index, grad_scale=lambda, reduction="sum") / n_anchors
    loss   = L_CE + L_SFR

``n_tokens`` / ``n_anchors`` are the counts (``n_anchors``: the anchor-weight sum when weights are
given) of the whole accumulated, all-device batch when the trainer passes them
(``num_items_in_batch`` / ``num_anchors_in_batch``), so ``k`` accumulated micro-batches give the
gradients of one batch ``k`` times larger; otherwise those of this micro-batch (plain means).
The backbone receives ``lambda * dL_SFR/dH`` and the head always its full gradient ``dL_SFR/dphi``.
The head runs at every step, even at ``lambda = 0`` (then on detached states), so DDP never sees
an unused parameter.

Only the last layer's ``H`` is computed (``last_hidden_state`` of the base model), never the stack of
all layers' hidden states. CE goes through Liger's fused linear cross-entropy on CUDA when
``liger-kernel`` is installed (the ``[B*T, V]`` logits are never materialised), otherwise
``lm_head`` + ``F.cross_entropy`` on float32 logits, as transformers does. SFR goes through
:func:`sfr_kernels.sfr_loss` (the fused Triton kernels on CUDA, the PyTorch reference elsewhere).
Under DeepSpeed ZeRO-3, which gathers weights only for modules that are called, CE takes the path
that calls ``lm_head`` (Liger's kernel reads its weight directly); the fused SFR loss runs inside the head's call,
as under FSDP (:mod:`sfr_kernels.sharding`). ``SFRModel.loss_path`` records the
:class:`sfr_kernels.LossPath` of the last SFR call (which implementation ran, and why the fused one
did not); a fallback is announced once.

Saving: :meth:`SFRModel.split_state_dict` separates backbone, head and teacher keys; the trainer
writes the backbone with ``save_pretrained`` (a plain transformers model) and the head with
:func:`sfr.head.save_flow_head` into ``sfr_head/`` (read back by :func:`sfr.head.load_flow_head`).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from transformers.utils import ModelOutput

from sfr.checks import check_int
from sfr.config import SFRConfig
from sfr.data import IGNORE_INDEX
from sfr.head import HEAD_DIR, FlowHead, save_flow_head
from sfr.lora import is_peft_model
from sfr_kernels import LossPath, loss_path, sfr_loss
from sfr_kernels.sharding import zero3_managed

OBJECTIVES = ("sft", "sfr", "mtp")
TARGET_SOURCES = ("precomputed", "ema")
CE_BACKENDS = ("auto", "liger", "torch")
LOSS_BACKENDS = ("auto", "triton", "torch")


def objective_config(objective: str, config: SFRConfig | None = None) -> SFRConfig | None:
    """The :class:`SFRConfig` an objective trains with: ``None`` for sft, the MTP preset for mtp.

    ``mtp`` keeps the head architecture of ``config`` and sets ``source_std=0``,
    ``time_sampling="zero"``, ``num_samples=1`` (:data:`sfr.config.MTP_PRESET`): the same code path
    as ``sfr``, so comparisons are controlled.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "sft":
        return None
    config = config or SFRConfig()
    return config.with_mtp_preset() if objective == "mtp" else config


def default_head_width(hidden_size: int, embed_dim: int | None = None) -> int:
    """Head width used when none is given: ``min(1024, max(2 D, E))`` rounded up to a multiple of 64.

    The paper-scale default (1024) for real LMs (D >= 512: Qwen2.5-0.5B and up). For small backbones
    the width still covers E: the head must carry ``x_s`` (E dims) through to ``v``, whose optimal
    value contains ``-x_s / (1 - s)``; a narrower head cannot represent it (measured on the embedded
    D = 128, E = 384 default: width 256 leaves the SFR loss near 0.92 after 200 head steps, width 768
    reaches 0.82). The embedded model gets 384.
    """
    width = max(2 * int(hidden_size), int(embed_dim or 0), 64)
    return min(1024, -(-width // 64) * 64)


def find_decoder(backbone: nn.Module) -> nn.Module:
    """The base model whose ``last_hidden_state`` feeds the LM head (``backbone.model`` for Llama/Qwen).

    Looks up ``backbone.<base_model_prefix>``, then ``backbone.get_decoder()``; raises ``ValueError``
    when neither gives a module distinct from ``backbone``. A peft ``PeftModel`` (LoRA) is looked through.
    """
    if is_peft_model(backbone):
        backbone = backbone.get_base_model()
    prefix = getattr(backbone, "base_model_prefix", "") or ""
    candidate = getattr(backbone, prefix, None) if prefix else None
    if not isinstance(candidate, nn.Module) or candidate is backbone:
        candidate = None
        get_decoder = getattr(backbone, "get_decoder", None)
        if callable(get_decoder):
            try:
                candidate = get_decoder()
            except Exception:  # noqa: BLE001 - some models raise for an unknown layout
                candidate = None
    if not isinstance(candidate, nn.Module) or candidate is backbone:
        raise ValueError(
            f"model: cannot reach the final hidden states of {type(backbone).__name__}: expected a base model at "
            f"model.{prefix or '<base_model_prefix>'} or from model.get_decoder() (a causal LM such as "
            "LlamaForCausalLM / Qwen2ForCausalLM)"
        )
    return candidate


def find_lm_head(backbone: nn.Module) -> nn.Module:
    """The output projection ``lm_head`` (``[V, D]`` weight); ``ValueError`` when the model has none."""
    get = getattr(backbone, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or getattr(head, "weight", None) is None or head.weight.dim() != 2:
        raise ValueError(f"model: {type(backbone).__name__} has no output embeddings (lm_head); a causal LM is needed")
    return head


def _liger_fused_linear_ce():
    """Liger's functional fused linear cross-entropy, or None when liger-kernel is not installed.

    The functional API (``liger_kernel.transformers.functional``) is required: it exists in every
    version that supports ``reduction="sum"`` and ``softcap``; older versions fall back to the
    standard path rather than silently averaging.
    """
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def _liger_runs_on(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


@dataclass
class SFRModelOutput(ModelOutput):
    """``loss = ce_loss + sfr_loss`` (``sfr_loss`` is None for sft) and this micro-batch's counts.

    ``ce_loss`` / ``sfr_loss`` are detached copies of the two (already normalised) terms, for logging.
    """

    loss: torch.Tensor | None = None
    ce_loss: torch.Tensor | None = None
    sfr_loss: torch.Tensor | None = None
    num_tokens: torch.Tensor | None = None
    num_anchors: int | None = None


class SFRModel(nn.Module):
    """A causal LM (``backbone``) plus the flow head (``head``), optionally an EMA teacher.

    Args:
        backbone: any ``AutoModelForCausalLM`` model (its base model must expose ``last_hidden_state``).
        head: the :class:`~sfr.FlowHead` (``hidden_size`` = the backbone's D); None for sft.
        sfr_config: the objective's settings (:meth:`SFRConfig.loss_kwargs`); the MTP preset is applied
            for ``objective="mtp"``; ignored for sft.
        objective: ``"sft"`` (CE only, no head) | ``"sfr"`` | ``"mtp"``.
        teacher: an :class:`~sfr.ema.EMATeacher` for ``target_source="ema"``; None for precomputed targets.
        ce_backend: ``"auto"`` (Liger fused linear CE on CUDA when installed), ``"liger"`` or ``"torch"``.
        loss_backend: the ``backend`` of :func:`sfr_kernels.sfr_loss` (``"auto"``: Triton on CUDA).

    Use :meth:`from_backbone` to create the head (and teacher) from a backbone and the target size E.
    """

    accepts_loss_kwargs = True  # the Trainer passes num_items_in_batch; the loss is already GA-scaled

    def __init__(self, backbone: nn.Module, head: FlowHead | None = None, *, sfr_config: SFRConfig | None = None,
                 objective: str = "sfr", teacher: nn.Module | None = None, ce_backend: str = "auto",
                 loss_backend: str = "auto"):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if ce_backend not in CE_BACKENDS:
            raise ValueError(f"ce_backend must be one of {CE_BACKENDS}, got {ce_backend!r}")
        if loss_backend not in LOSS_BACKENDS:
            raise ValueError(f"loss_backend must be one of {LOSS_BACKENDS}, got {loss_backend!r}")
        if (objective == "sft") != (head is None):
            raise ValueError(f"head: objective {objective!r} " + (
                "trains without a head (pass head=None)" if objective == "sft" else "needs a FlowHead"))
        if teacher is not None and head is None:
            raise ValueError("teacher: an EMA teacher needs a head (objective 'sfr' or 'mtp')")
        self.backbone = backbone
        self.decoder_path = self._decoder_path(backbone)  # raises for a model without a reachable base model
        # D, read once: an engine may hold lm_head's weight flattened and sharded later (FSDP1).
        hidden_size = self._hidden_size = int(find_lm_head(backbone).weight.shape[1])  # raises without an LM head
        if head is not None and head.hidden_size != hidden_size:
            raise ValueError(f"head.hidden_size must equal the model's hidden size {hidden_size}, got {head.hidden_size}")
        if teacher is not None and teacher.projection.shape != (hidden_size, head.embed_dim):
            raise ValueError(f"teacher: its projection must be [D, E] = [{hidden_size}, {head.embed_dim}], "
                             f"got {list(teacher.projection.shape)}")
        self.head = head
        self.teacher = teacher
        self.objective = objective
        self.sfr_config = objective_config(objective, sfr_config)
        self.ce_backend = ce_backend
        self.loss_backend = loss_backend
        # FSDP auto-wrapping (accelerate) reads the classes to wrap, each as a unit of its own, from the
        # root module: the backbone's layers and the head (whose call then gathers its weights; the fused
        # loss runs inside it, sfr_kernels.sharding).
        self._no_split_modules = list(getattr(backbone, "_no_split_modules", None) or [])
        if head is not None:
            self._no_split_modules.append(type(head).__name__)
        self._warned: set[str] = set()
        self.loss_path: LossPath | None = None  # of the last SFR loss computed (None before the first)

    # ---- construction -------------------------------------------------------------------
    @staticmethod
    def _decoder_path(backbone: nn.Module) -> str:
        decoder = find_decoder(backbone)
        for name, module in backbone.named_modules():
            if module is decoder:
                return name
        raise ValueError(f"model: the base model of {type(backbone).__name__} is not one of its submodules")

    @classmethod
    def from_backbone(cls, backbone: nn.Module, embed_dim: int | None, *, objective: str = "sfr",
                      sfr_config: SFRConfig | None = None, target_source: str = "precomputed",
                      ema_decay: float = 0.999, projection_seed: int = 0, **kwargs) -> SFRModel:
        """Attach a fresh head (``E = embed_dim``) and, for ``target_source="ema"``, an EMA teacher.

        ``kwargs`` (``ce_backend``, ``loss_backend``) go to the constructor. The head is created in
        float32 whatever the backbone's dtype (it is small; the loss accumulates in float32 anyway).
        """
        if target_source not in TARGET_SOURCES:
            raise ValueError(f"target_source must be one of {TARGET_SOURCES}, got {target_source!r}")
        config = objective_config(objective, sfr_config)
        hidden_size = find_lm_head(backbone).weight.shape[1]
        head = teacher = None
        if config is not None:
            check_int("embed_dim", embed_dim, why=f" for objective {objective!r}")
            device = find_lm_head(backbone).weight.device
            head = FlowHead(hidden_size=hidden_size, embed_dim=embed_dim, **config.head_kwargs()).to(device)
            if target_source == "ema":
                from sfr.ema import EMATeacher

                teacher = EMATeacher(find_decoder(backbone), hidden_size, embed_dim, decay=ema_decay,
                                     projection_seed=projection_seed)
        elif target_source == "ema":
            raise ValueError("target_source='ema' needs a head: use objective 'sfr' or 'mtp'")
        return cls(backbone, head, sfr_config=config, objective=objective, teacher=teacher, **kwargs)

    # ---- views ----------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The backbone's base model (``backbone.model`` for Llama/Qwen), whose output is ``H``."""
        return self.backbone.get_submodule(self.decoder_path)

    @property
    def config(self):
        """The backbone's ``PretrainedConfig`` (Trainer and accelerate read it)."""
        return self.backbone.config

    @property
    def hidden_size(self) -> int:
        """``D``, the input size of the LM head."""
        return self._hidden_size

    @property
    def target_source(self) -> str:
        return "precomputed" if self.teacher is None else "ema"

    # Activation checkpointing applies to the backbone (the head and the no-grad teacher are small). The
    # Trainer calls activation_checkpointing_enable (transformers >= 5.2x) or gradient_checkpointing_enable.
    def activation_checkpointing_enable(self, **kwargs):
        enable = getattr(self.backbone, "activation_checkpointing_enable", None)
        (enable or self.backbone.gradient_checkpointing_enable)(**kwargs)

    def activation_checkpointing_disable(self):
        disable = getattr(self.backbone, "activation_checkpointing_disable", None)
        (disable or self.backbone.gradient_checkpointing_disable)()

    def gradient_checkpointing_enable(self, **kwargs):
        self.backbone.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self):
        self.backbone.gradient_checkpointing_disable()

    def enable_input_require_grads(self):
        self.backbone.enable_input_require_grads()

    # ---- forward ----------------------------------------------------------------------------
    def final_hidden_states(self, input_ids, attention_mask=None, **model_kwargs) -> torch.Tensor:
        """``last_hidden_state`` of the base model: ``[B, T, D]``, after the final norm."""
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"model: the base model returned states of shape {tuple(hidden.shape)}, expected [B, T, {self.hidden_size}]"
            )
        return hidden

    def ce_implementation(self, device) -> str:
        """``"liger"`` or ``"torch"``: the CE path :meth:`ce_sum` takes for tensors on ``device``.

        ``ValueError`` for ``ce_backend="liger"`` where Liger cannot run (not installed, or not CUDA).
        """
        if self.ce_backend == "torch":
            return "torch"
        available = _liger_fused_linear_ce() is not None and _liger_runs_on(device)
        if self.ce_backend == "liger" and not available:
            raise ValueError("ce_backend='liger' needs liger-kernel installed and the model on a CUDA device")
        if not available:
            return "torch"
        reason = None
        if getattr(self.config, "logit_scale", None) not in (None, 1, 1.0):
            reason = "the model config has a logit_scale, which Liger's kernel does not apply"
        elif zero3_managed(find_lm_head(self.backbone)):
            reason = "DeepSpeed ZeRO-3 partitions lm_head, whose weight Liger reads directly"
        if reason is None:
            return "liger"
        self._warn_once(f"CE: using lm_head + CE instead of Liger's fused linear CE: {reason}")
        return "torch"

    def sfr_loss_path(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> LossPath:
        """The :class:`~sfr_kernels.LossPath` of the SFR loss for states like ``hidden`` (default targets:
        float32 ``[0, E]``, as the trainer's are)."""
        if targets is None:
            targets = hidden.new_empty((0, self.head.embed_dim), dtype=torch.float32)
        return loss_path(hidden, targets, self.head, backend=self.loss_backend)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            warnings.warn(message, stacklevel=3)
            self._warned.add(message)

    def ce_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token CE over the labelled positions, and their count.

        ``sum_{b, t : labels[b, t+1] != -100} CE(lm_head(H[b, t]), labels[b, t+1])`` as a float32 0-dim
        tensor, and the count as an int64 0-dim tensor. The labels are shifted (left, padded with -100)
        rather than the states, so no copy of ``H`` is made.
        """
        lm_head = find_lm_head(self.backbone)
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device).reshape(-1)  # [B*T]
        count = shift_labels.ne(IGNORE_INDEX).sum()
        flat = hidden.reshape(-1, hidden.shape[-1])  # [B*T, D]
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if self.ce_implementation(hidden.device) == "liger":
            out = _liger_fused_linear_ce()(flat, lm_head.weight, shift_labels, bias=getattr(lm_head, "bias", None),
                                           ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap or None)
            out = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)  # versions also returning z-loss
            return out.float(), count
        logits = lm_head(flat).float()  # [B*T, V]
        logit_scale = getattr(self.config, "logit_scale", None)
        if logit_scale not in (None, 1, 1.0):
            logits = logits * logit_scale
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"), count

    def forward(self, input_ids=None, attention_mask=None, labels=None, anchor_index=None, anchor_targets=None,
                anchor_segment_end=None, anchor_weight=None, *, sfr_lambda: float = 1.0, sfr_seed=0,
                num_items_in_batch=None, num_anchors_in_batch=None, sfr_noise=None, sfr_time=None,
                sfr_anchor_offset=0, **model_kwargs) -> SFRModelOutput:
        """CE + SFR on one micro-batch (see the module docstring for the formulas).

        Args:
            input_ids, attention_mask: ``[B, T]``; other base-model kwargs (``position_ids``) pass through.
            labels: ``[B, T]`` with -100 on non-target tokens (shifted inside, as HF causal LMs do).
            anchor_index: int64 ``[N]`` flat anchor positions ``b*T + t``.
            anchor_targets: ``[N, E]`` precomputed targets (ignored with an EMA teacher).
            anchor_segment_end: int64 ``[N]`` flat exclusive segment ends ``b*T + end`` (EMA targets only).
            anchor_weight: optional ``[N]`` non-negative anchor weights ``w_a``.
            sfr_lambda: ``lambda``, the scale of the SFR gradient into the backbone (0 in phase A).
            sfr_seed: int or 0-dim int64 tensor, the Philox seed of this micro-batch's draws.
            sfr_anchor_offset: int or 0-dim int64 tensor, the anchors of this micro-batch on the ranks
                before this one: the ranks of a data-parallel step then draw exactly what one process
                draws for the whole batch (``sfr_loss``'s ``anchor_offset``; :class:`sfr.trainer.SFRTrainer`).
            num_items_in_batch: the token count the summed CE is divided by (default: this micro-batch's).
            num_anchors_in_batch: the anchor count (or weight sum) the summed SFR loss is divided by.
            sfr_noise, sfr_time: explicit ``x0 [N, M, E]`` / ``s [N, M]`` (tests, diagnostics).
        """
        if labels is None:
            raise ValueError("labels are required: SFRModel computes the training loss")
        for key in ("return_dict", "output_hidden_states", "output_attentions", "use_cache"):
            model_kwargs.pop(key, None)
        hidden = self.final_hidden_states(input_ids, attention_mask, **model_kwargs)

        ce_total, num_tokens = self.ce_sum(hidden, labels)
        ce = ce_total / _divisor(num_tokens if num_items_in_batch is None else num_items_in_batch, ce_total)
        if self.head is None:
            return SFRModelOutput(loss=ce, ce_loss=ce.detach(), num_tokens=num_tokens)

        if anchor_index is None:
            raise ValueError(f"anchor_index is required for objective {self.objective!r} (use SFRDataCollator)")
        anchor_index = anchor_index.to(hidden.device)
        if self.teacher is not None:
            if anchor_segment_end is None:
                raise ValueError("anchor_segment_end is required for target_source='ema'")
            targets = self.teacher.targets(input_ids, anchor_index, anchor_segment_end.to(hidden.device),
                                           attention_mask=attention_mask, **model_kwargs)
        elif anchor_targets is None:
            raise ValueError("anchor_targets are required with precomputed targets (prepare the data with `sfr prepare`)")
        else:
            targets = anchor_targets.to(hidden.device)  # float32: sfr_loss accumulates in float32 anyway
        scale = self.sfr_config.target_multiplier(targets.shape[-1])
        if scale != 1.0:  # SFRConfig.target_scale: applied here, for precomputed and EMA targets alike
            targets = targets * scale
        weight = None if anchor_weight is None else anchor_weight.to(device=hidden.device, dtype=torch.float32)
        loss_kwargs = {**self.sfr_config.loss_kwargs(), "reduction": "sum"}  # normalised below, GA-exact
        self.loss_path = path = self.sfr_loss_path(hidden, targets)
        if path.fallback_reason is not None:
            self._warn_once(f"SFR: the PyTorch reference computes the loss instead of the fused kernels: "
                            f"{path.fallback_reason}")
        sfr_total = sfr_loss(hidden, targets, self.head, anchor_index=anchor_index, seed=sfr_seed,
                             anchor_offset=sfr_anchor_offset,
                             noise=sfr_noise, time=sfr_time, weight=weight, grad_scale=float(sfr_lambda),
                             backend=path.backend, **loss_kwargs)
        num_anchors = anchor_index.shape[0]
        if num_anchors_in_batch is None:
            num_anchors_in_batch = weight.sum() if weight is not None else num_anchors
        sfr = sfr_total / _divisor(num_anchors_in_batch, sfr_total)
        return SFRModelOutput(loss=ce + sfr, ce_loss=ce.detach(), sfr_loss=sfr.detach(), num_tokens=num_tokens,
                              num_anchors=num_anchors)

    # ---- state -----------------------------------------------------------------------------
    @staticmethod
    def split_state_dict(state_dict: dict) -> dict[str, dict]:
        """``{"backbone": .., "head": .., "teacher": ..}`` state dicts with their prefixes removed."""
        parts: dict[str, dict] = {"backbone": {}, "head": {}, "teacher": {}}
        for key, value in state_dict.items():
            prefix, _, rest = key.partition(".")
            if prefix not in parts:
                raise ValueError(f"unexpected key {key!r} in an SFRModel state dict")
            parts[prefix][rest] = value
        return parts

    def head_metadata(self) -> dict:
        """What :func:`save_flow_head` records next to the head's weights."""
        return {"objective": self.objective, "target_source": self.target_source}

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None, **kwargs) -> None:
        """Write the backbone as a plain transformers model and the head to ``save_directory/sfr_head/``.

        ``save_directory`` then loads with ``AutoModelForCausalLM.from_pretrained`` (no head or teacher
        keys) and :func:`load_flow_head`; a LoRA backbone (peft) writes its adapter instead
        (``PeftModel.from_pretrained``, :mod:`sfr.lora`). ``state_dict`` (a full SFRModel state dict, e.g. gathered
        from FSDP/DeepSpeed) defaults to this module's; ``kwargs`` go to the backbone's ``save_pretrained``.
        The EMA teacher is not saved: it is training state (the trainer keeps it in checkpoints).
        """
        parts = self.split_state_dict(state_dict if state_dict is not None else self.state_dict())
        self.backbone.save_pretrained(save_directory, state_dict=parts["backbone"], **kwargs)
        if self.head is not None:
            save_flow_head(self.head, Path(save_directory) / HEAD_DIR, self.sfr_config,
                           metadata=self.head_metadata(), state_dict=parts["head"])


def _divisor(count, like: torch.Tensor) -> torch.Tensor | float:
    """What a summed loss is divided by: ``count``, or 1 where it is 0 (an empty batch sums to 0).

    Not clamped to >= 1: an all-device count divided by the world size, or an anchor-weight sum, may
    legitimately lie in (0, 1). No host sync: a tensor count stays on ``like``'s device, and a Python
    count stays a Python number (a device tensor made from it would be a host-to-device copy per step).
    """
    if not isinstance(count, torch.Tensor):
        return float(count) if count > 0 else 1.0
    count = count.to(device=like.device, dtype=torch.float32)
    return torch.where(count > 0, count, torch.ones_like(count))
