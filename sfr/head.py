"""The flow-matching head: a small MLP velocity field ``v_phi(x_s, s, h)``.

It reads the LM's final hidden state ``h`` at an anchor and predicts the velocity that carries a
Gaussian source sample towards the sentence embedding of the future segment (docs/design.md, "The flow head")::

    c   = W_c h + b_c                      # cond:   [N, Hd], once per anchor, shared by its M samples
    e_s = timestep features of s           # [.., F], fixed sinusoids (no parameters), see below
    z   = W_x x_s + W_t e_s + c            # in_x, in_t (no bias: b_c is the only input bias)
    a   = silu(z); a = silu(W_l a + b_l)   # depth - 1 hidden layers
    v   = W_o a + b_o                      # out: [.., E], zero-initialised

Timestep features (``sfr_kernels.timestep_features``)::

    f_k = 1000 * 10000**(-k / (F/2)),  k = 0 .. F/2 - 1
    e_s = [cos(f_0 s) .. cos(f_{F/2-1} s), sin(f_0 s) .. sin(f_{F/2-1} s)]

The zero-initialised output layer makes the untrained head predict ``v = 0``, so the first SFR loss
equals ``E||u||^2 / E`` and early gradients into the backbone are small. The head is used only for
training and diagnostics; it is thrown away at inference.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from sfr.checks import check_int
from sfr.config import SFRConfig
from sfr_kernels import timestep_features, timestep_frequencies

HEAD_DIR = "sfr_head"  # a trained model's head: OUTPUT/sfr_head/{model.safetensors, config.json}
HEAD_WEIGHTS = "model.safetensors"
HEAD_CONFIG = "config.json"


class FlowHead(nn.Module):
    """MLP velocity field; ``head(x_s, s, h)`` with the flow state ``x_s [..., E]``, the flow time
    ``s [...]`` and the hidden state ``h [..., D]`` (positional, as :func:`sfr_kernels.sfr_loss` calls it).

    ``h`` may have one dimension fewer than ``x_s`` (``h [N, D]`` with ``x_s [N, M, E]``): its
    conditioning is then computed once per anchor and shared by the M samples. Otherwise leading
    dimensions broadcast as usual. ``s`` is a tensor broadcastable to ``x_s.shape[:-1]`` or a float.
    """

    kind = "mlp"  # the head variant the fused kernels implement

    def __init__(self, hidden_size: int, embed_dim: int, width: int = 1024, depth: int = 2,
                 time_features: int = 64):
        super().__init__()
        for name, value, minimum in (("hidden_size", hidden_size, 1), ("embed_dim", embed_dim, 1),
                                     ("width", width, 1), ("depth", depth, 1), ("time_features", time_features, 2)):
            check_int(name, value, minimum)
        self.hidden_size, self.embed_dim, self.width, self.depth = hidden_size, embed_dim, width, depth
        self.time_features = time_features
        self.cond = nn.Linear(hidden_size, width)
        self.in_x = nn.Linear(embed_dim, width, bias=False)
        self.in_t = nn.Linear(time_features, width, bias=False)
        self.hidden_layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth - 1))
        self.out = nn.Linear(width, embed_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # Not a parameter and not saved: it is a pure function of time_features.
        self.register_buffer("time_frequencies", timestep_frequencies(time_features), persistent=False)

    def condition(self, h: torch.Tensor) -> torch.Tensor:
        """``c = W_c h + b_c``: [..., Hd]."""
        return self.cond(h)

    def velocity(self, x_s: torch.Tensor, s: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``v`` from the flow state, the flow time and a precomputed (broadcastable) conditioning ``c``."""
        e_s = timestep_features(s, self.time_frequencies).to(x_s.dtype)
        a = F.silu(self.in_x(x_s) + self.in_t(e_s) + c)
        for layer in self.hidden_layers:
            a = F.silu(layer(a))
        return self.out(a)

    def forward(self, x_s: torch.Tensor, s, h: torch.Tensor) -> torch.Tensor:
        if x_s.shape[-1] != self.embed_dim:
            raise ValueError(f"x_s must have last dimension {self.embed_dim} (embed_dim), got shape {tuple(x_s.shape)}")
        if h.shape[-1] != self.hidden_size:
            raise ValueError(f"h must have last dimension {self.hidden_size} (hidden_size), got shape {tuple(h.shape)}")
        if not isinstance(s, torch.Tensor):
            s = torch.tensor(float(s), device=x_s.device)
        s = s.expand(x_s.shape[:-1])
        c = self.condition(h)
        if h.dim() == x_s.dim() - 1:  # h [N, D] with x_s [N, M, E]: share c across the M samples
            c = c.unsqueeze(-2)
        return self.velocity(x_s, s, c)

    def init_kwargs(self) -> dict:
        """The constructor arguments of this head: ``FlowHead(**head.init_kwargs())`` is one like it."""
        return {"hidden_size": self.hidden_size, "embed_dim": self.embed_dim, "width": self.width,
                "depth": self.depth, "time_features": self.time_features}

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, embed_dim={self.embed_dim}, width={self.width}, "
                f"depth={self.depth}, time_features={self.time_features}")


# ---- the head on disk ----------------------------------------------------------------------------
def save_flow_head(head: FlowHead, directory: str | os.PathLike, sfr_config: SFRConfig | dict | None = None,
                   metadata: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write ``directory/model.safetensors`` and ``directory/config.json`` (FlowHead kwargs + SFRConfig).

    Written into a temporary folder that is renamed into place, so a crash leaves no half-written head.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if isinstance(sfr_config, SFRConfig):
        sfr_config = sfr_config.to_dict()
    config = {"format": "sfr_flow_head", "version": 1, "kind": getattr(head, "kind", "mlp"),
              "head": head.init_kwargs(), "sfr_config": dict(sfr_config or {}), "metadata": dict(metadata or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state_dict or head.state_dict()).items()}
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / HEAD_WEIGHTS), metadata={"format": "pt"})
        (tmp / HEAD_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_flow_head(directory: str | os.PathLike, device=None) -> tuple[FlowHead, dict]:
    """Load a head saved by :func:`save_flow_head` (``OUTPUT/sfr_head/``).

    Returns:
        ``(head, config)``: the :class:`FlowHead` with its weights, and a flat dict of the
        :class:`SFRConfig` fields (``source_std``, ``num_samples``, ...) plus the training metadata
        (``objective``, ``target_source``).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / HEAD_CONFIG, directory / HEAD_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} is not a saved flow head: expected {HEAD_CONFIG} and {HEAD_WEIGHTS}")
    config = json.loads(config_path.read_text())
    if "head" not in config:
        raise ValueError(f"{config_path} has no 'head' entry (FlowHead arguments)")
    head = FlowHead(**config["head"])
    head.load_state_dict(load_file(str(weights_path)), strict=True)
    if device is not None:
        head = head.to(device)
    return head, {**config.get("sfr_config", {}), **config.get("metadata", {})}
