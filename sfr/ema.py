"""The EMA teacher: SFR targets computed online from a slowly moving copy of the backbone.

Instead of a frozen sentence encoder, the target of anchor ``a = (b, t)`` with future segment
``t+1 .. end-1`` (``end`` = its exclusive segment end) comes from the teacher's final hidden states::

    g_a = 1/(end - 1 - t) * sum_{p = t+1}^{end-1} H_teacher[b, p]      mean over the segment   [D]
    y_a = normalize(g_a P)                                             P: fixed random [D, E]

``P`` is drawn once from ``N(0, 1/E)`` with a seeded generator and stored as a buffer (so it is
checkpointed and identical on every rank). The teacher never receives gradients; after every
optimizer step it moves towards the student: ``theta_T <- decay * theta_T + (1 - decay) * theta_S``
(:class:`EMAUpdateCallback`). This is the paper's EMA-teacher variant, which stabilises the targets.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


def random_projection(hidden_size: int, embed_dim: int, seed: int) -> torch.Tensor:
    """The fixed projection ``P ~ N(0, 1/E)``: float32 ``[D, E]``, a pure function of the seed."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(hidden_size, embed_dim, generator=generator) / embed_dim**0.5


def segment_means(hidden: torch.Tensor, anchor_index: torch.Tensor, segment_end: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` over each anchor's segment ``anchor+1 .. end-1`` (flat positions): float32 [N, D].

    Args:
        hidden: ``[B, T, D]`` (or ``[B*T, D]``) states.
        anchor_index: int64 ``[N]`` flat anchor positions ``b*T + t``.
        segment_end: int64 ``[N]`` flat exclusive segment ends ``b*T + end``; ``end > t + 1``
            (an empty segment gives a zero mean, never a division by zero).

    From a prefix sum ``P[i] = sum_{p < i} hidden[p]``: ``mean_a = (P[end_a] - P[t_a + 1]) / (end_a - t_a - 1)``,
    one pass over ``hidden`` and no host sync. The prefix sum runs over all ``B*T`` positions, so it is
    accumulated in float64: in float32 the difference of two large prefix sums would lose about
    ``eps * B*T * |h|`` of absolute precision.
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).double()
    prefix = torch.cat([flat.new_zeros(1, flat.shape[-1]), flat.cumsum(0)])  # [B*T + 1, D]
    first, stop = anchor_index + 1, segment_end
    length = (stop - first).clamp(min=1).unsqueeze(-1).to(flat.dtype)
    return ((prefix[stop] - prefix[first]) / length).float()


class EMATeacher(nn.Module):
    """A frozen copy of the backbone's decoder plus a fixed projection to the target space.

    Args:
        decoder: the student's decoder (the module whose ``last_hidden_state`` the head reads); it is
            deep-copied, so later student updates reach the teacher only through :meth:`update`.
        hidden_size: ``D``, the size of the decoder's states.
        embed_dim: ``E``, the target dimension (the head's ``embed_dim``).
        decay: EMA decay in ``[0, 1)``; 0 copies the student after every step.
        projection_seed: seed of the projection ``P``.
    """

    def __init__(self, decoder: nn.Module, hidden_size: int, embed_dim: int, decay: float = 0.999,
                 projection_seed: int = 0):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.decoder = copy.deepcopy(decoder)
        self.decoder.requires_grad_(False)
        self.decoder.eval()
        device = next(self.decoder.parameters()).device
        self.register_buffer("projection", random_projection(hidden_size, embed_dim, projection_seed).to(device))

    def train(self, mode: bool = True):
        """The teacher always runs in eval mode (no dropout), whatever the student does."""
        return super().train(False)

    @torch.no_grad()
    def targets(self, input_ids: torch.Tensor, anchor_index: torch.Tensor, segment_end: torch.Tensor,
                attention_mask: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        """``y = normalize(segment_mean(H_teacher) P)``: float32 ``[N, E]``, no gradient."""
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pooled = segment_means(hidden, anchor_index, segment_end)
        return F.normalize(pooled @ self.projection.float(), dim=-1)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """``theta_T <- decay theta_T + (1 - decay) theta_S`` for every parameter; buffers are copied.

        ``student`` is the student's decoder (same architecture as the teacher's copy).
        """
        teacher_params = dict(self.decoder.named_parameters())
        student_params = dict(student.named_parameters())
        if teacher_params.keys() != student_params.keys():
            raise ValueError("EMATeacher.update: the student's parameters do not match the teacher's decoder")
        for name, param in student_params.items():
            teacher = _local_data(teacher_params[name])
            teacher.lerp_(_local_data(param).to(teacher.dtype), 1.0 - self.decay)
        teacher_buffers = dict(self.decoder.named_buffers())
        for name, buffer in student.named_buffers():
            if name in teacher_buffers:
                teacher_buffers[name].copy_(buffer)


def _local_data(param: torch.Tensor) -> torch.Tensor:
    """The values of ``param`` this process holds: under DeepSpeed ZeRO-3 its shard ``ds_tensor`` (the
    parameter itself is then an empty placeholder; teacher and student are partitioned alike, so the
    EMA is applied shard by shard), otherwise the parameter itself."""
    shard = getattr(param, "ds_tensor", None) if hasattr(param, "ds_id") else None
    return (shard if shard is not None else param).detach()
