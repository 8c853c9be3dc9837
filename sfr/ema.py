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
    """Mean of ``hidden`` over each anchor's segment ``anchor+1 .. end-1`` (flat positions): [N, D].

    Args:
        hidden: ``[B, T, D]`` (or ``[B*T, D]``) states.
        anchor_index: int64 ``[N]`` flat anchor positions ``b*T + t``.
        segment_end: int64 ``[N]`` flat exclusive segment ends ``b*T + end``; ``end > t + 1``.

    Computed from a prefix sum in float32, so it costs one pass over ``hidden`` and no host sync.
    """
    flat = hidden.reshape(-1, hidden.shape[-1]).float()
    prefix = torch.cat([flat.new_zeros(1, flat.shape[-1]), flat.cumsum(0)])  # prefix[i] = sum(flat[:i])
    first, stop = anchor_index + 1, segment_end
    length = (stop - first).clamp(min=1).unsqueeze(-1).to(flat.dtype)
    return (prefix[stop] - prefix[first]) / length


class EMATeacher(nn.Module):
    """A frozen copy of the backbone's decoder plus a fixed projection to the target space.

    Args:
        decoder: the student's decoder (the module whose ``last_hidden_state`` the head reads); it is
            deep-copied, so later student updates reach the teacher only through :meth:`update`.
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
        self.register_buffer("projection", random_projection(hidden_size, embed_dim, projection_seed))

    def train(self, mode: bool = True):
        """The teacher always runs in eval mode (no dropout), whatever the student does."""
        return super().train(False)

    @torch.no_grad()
    def targets(self, input_ids: torch.Tensor, anchor_index: torch.Tensor, segment_end: torch.Tensor,
                attention_mask: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
        """``y = normalize(segment_mean(H_teacher) P)``: float32 ``[N, E]``, no gradient."""
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        pooled = segment_means(hidden, anchor_index, segment_end)
        return F.normalize(pooled @ self.projection.float(), dim=-1)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """``theta_T <- decay theta_T + (1 - decay) theta_S`` for every parameter; buffers are copied."""
        teacher_params = dict(self.decoder.named_parameters())
        for name, param in student.named_parameters():
            teacher_params[name].lerp_(param.detach().to(teacher_params[name].dtype), 1.0 - self.decay)
        teacher_buffers = dict(self.decoder.named_buffers())
        for name, buffer in student.named_buffers():
            if name in teacher_buffers:
                teacher_buffers[name].copy_(buffer)
