"""End-to-end overhead of SFR: one optimizer step of a causal LM, SFT vs SFT+SFR.

Run from the repository root::

    python -m bench.step --model-config qwen2.5-1.5b          # on a GPU (bf16)
    python -m bench.step --quick --out "$TMPDIR/r"              # tiny model on the CPU (CI smoke run)

The LM is built from a real model's config with random weights (``transformers`` ``Qwen2Config`` +
``AutoModelForCausalLM.from_config``; bf16 on CUDA, fp32 on the CPU). Both variants run the very
code a user trains with, :class:`sfr.model.SFRModel` ``forward`` on the same backbone and batch:
``objective="sft"`` (CE only) and ``objective="sfr"`` (CE + SFR, head from
``SFRModel.from_backbone``: float32, as the trainer makes it). On CUDA the forward runs under
bf16 autocast, as ``sfr train --bf16`` runs it, so the float32 head uses the bf16 kernels. So attention (``flash_attention_2``
when flash-attn is installed on CUDA, else ``sdpa``: ``sfr.loading.attention_implementation``) and
CE (Liger's fused linear cross-entropy on CUDA when installed, else ``lm_head`` + CE: the model's
``ce_implementation``) are the same for both. One step is::

    hidden = decoder(input_ids, attention_mask).last_hidden_state                 # [B, T, D]
    loss   = CE(lm_head, hidden, labels) / num_tokens
    loss  += sfr_loss(hidden, targets, head, anchor_index=anchors, num_samples=M,
                      grad_scale=1.0, reduction="sum") / num_anchors            # sfr only
    loss.backward(); AdamW.step()

The second half of each sequence is the response (labels of the first half are -100); anchors are
the positions ``t = T/2 - 1 + 8k < T - 1`` of every sequence (the first one predicts the first
response token), targets are random unit vectors of size E (384, MiniLM), the head has width 1024,
depth 2, and uses ``backend="auto"`` (the Triton kernels on CUDA, the reference on the CPU).
SFT runs first (warm-up, then timed steps); then the head is created and added to the optimizer,
and SFT+SFR runs (warm-up, then timed steps), so SFT's peak memory holds no SFR state at all.

Rows (``step.csv``): ``kernel=step``, ``provider=<attention>+<CE>`` (e.g. ``sdpa+torch-ce``),
``mode`` ``sft`` | ``sft+sfr``, metric ``time`` (ms per step: median, 20/80 % quantiles of the timed
steps) and ``memory`` (MB, peak allocated during the timed steps, CUDA only), and for ``sft+sfr``
``time_overhead`` / ``memory_overhead`` (% over SFT, from the medians / peaks; ``p20``/``p80`` empty).
Columns: ``N`` = tokens per step ``B·T``, ``M`` = samples per anchor, ``D`` = the model's hidden
size, ``E`` = target size, ``width``/``depth`` = the head's. The number of anchors is printed.
On the CPU the numbers only check the harness (tiny model, fp32): never quote them.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from bench import common

# Architecture of the real checkpoints (config.json), randomly initialised here.
MODEL_CONFIGS = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}
TARGET_DIM = 384  # all-MiniLM-L6-v2, the default encoder
HEAD_WIDTH, HEAD_DEPTH = 1024, 2
ANCHOR_STRIDE = 8


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                        help="LM architecture (default: qwen2.5-1.5b on CUDA, tiny on the CPU / with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: 4; --quick: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 2048; --quick: 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default: 10; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default: 3; --quick: 1)")
    parser.add_argument("--num-samples", type=int, default=1, help="SFR samples per anchor M (default: 1)")
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS_DIR,
                        help="directory whose step.csv the rows are appended to (default: bench/results)")
    parser.add_argument("--quick", action="store_true", help="tiny model, short sequences, few steps (CPU smoke run)")


@dataclass
class StepSettings:
    device: torch.device
    dtype: torch.dtype
    model_config: str
    batch_size: int
    seq_len: int
    steps: int
    warmup: int
    num_samples: int


def settings_from_args(args: argparse.Namespace) -> StepSettings:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    model_config = args.model_config or ("tiny" if args.quick or not on_gpu else "qwen2.5-1.5b")
    values = dict(batch_size=args.batch_size or (2 if args.quick else 4),
                  seq_len=args.seq_len or (64 if args.quick else 2048),
                  steps=args.steps or (3 if args.quick else 10),
                  warmup=args.warmup if args.warmup is not None else (1 if args.quick else 3),
                  num_samples=args.num_samples)
    minimum = dict(batch_size=1, seq_len=4, steps=1, warmup=0, num_samples=1)
    for name, value in values.items():
        if value < minimum[name]:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum[name]}, got {value}")
    if values["seq_len"] % 2:
        raise ValueError(f"--seq-len must be even (prompt half + response half), got {values['seq_len']}")
    return StepSettings(device, torch.bfloat16 if on_gpu else torch.float32, model_config, **values)


def build_backbone(settings: StepSettings, attn: str):
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(max_position_embeddings=max(32768, settings.seq_len), use_cache=False,
                         **MODEL_CONFIGS[settings.model_config])
    torch.manual_seed(0)
    with torch.device(settings.device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(settings.dtype).train()


def make_batch(settings: StepSettings, vocab_size: int):
    """Random tokens, labels on the response half, anchors every 8 tokens there, unit targets."""
    b, t, device = settings.batch_size, settings.seq_len, settings.device
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, vocab_size, (b, t), generator=generator)
    labels = input_ids.clone()
    labels[:, : t // 2] = -100
    positions = torch.arange(t // 2 - 1, t - 1, ANCHOR_STRIDE)
    anchor_index = (torch.arange(b).unsqueeze(1) * t + positions).reshape(-1)
    targets = F.normalize(torch.randn(anchor_index.numel(), TARGET_DIM, generator=generator), dim=-1)
    return dict(input_ids=input_ids.to(device), attention_mask=torch.ones(b, t, dtype=torch.long, device=device),
                labels=labels.to(device), anchor_index=anchor_index.to(device),
                anchor_targets=targets.to(device))


def run_variant(step, settings: StepSettings, label: str) -> tuple[list[float], float | None]:
    """Warm-up, then timed steps: (per-step ms, peak MB during the timed steps or None on the CPU)."""
    on_gpu = settings.device.type == "cuda"
    for _ in range(settings.warmup):
        step()
    common.synchronize(settings.device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(settings.device)
    times = []
    for _ in range(settings.steps):
        start = time.perf_counter()
        step()
        common.synchronize(settings.device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(settings.device) / 2**20 if on_gpu else None
    print(f"  {label:<8} {statistics.median(times):10.2f} ms/step" + (f"  peak {peak:10.1f} MB" if peak else ""),
          flush=True)
    return times, peak


def quantiles(times: list[float]) -> tuple[float, float, float]:
    q = torch.quantile(torch.tensor(times, dtype=torch.float64), torch.tensor(common.QUANTILES, dtype=torch.float64))
    return float(q[0]), float(q[1]), float(q[2])


def run(settings: StepSettings, out_dir: Path) -> list[dict]:
    from sfr.config import SFRConfig
    from sfr.loading import attention_implementation
    from sfr.model import SFRModel

    on_gpu = settings.device.type == "cuda"
    env = common.environment(settings.device)
    attn = attention_implementation(half_precision=on_gpu)
    backbone = build_backbone(settings, attn)
    sft = SFRModel(backbone, None, objective="sft")
    ce_name = {"liger": "liger-flce", "torch": "torch-ce"}[sft.ce_implementation(settings.device)]
    provider = f"{attn}+{ce_name}"
    batch = make_batch(settings, backbone.config.vocab_size)
    n_anchors = batch["anchor_index"].numel()
    dims = MODEL_CONFIGS[settings.model_config]
    print(f"device: {env['device']}" + ("" if on_gpu else " (CPU: a check of the harness, NOT a result)"))
    print(f"model {settings.model_config} (D={dims['hidden_size']}, {dims['num_hidden_layers']} layers, "
          f"random init, {common.DTYPE_NAMES[settings.dtype]}); attention {attn}; CE {ce_name}; "
          f"batch {settings.batch_size}x{settings.seq_len}; {n_anchors} SFR anchors, M={settings.num_samples}, "
          f"E={TARGET_DIM}, head {HEAD_WIDTH}x{HEAD_DEPTH}; SFR backend auto "
          f"({'triton' if on_gpu else 'torch reference'})", flush=True)

    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-5)
    model = sft
    seed = [0]

    def step():
        optimizer.zero_grad(set_to_none=True)
        seed[0] += 1
        extra = {} if model is sft else dict(sfr_lambda=1.0, sfr_seed=seed[0])
        # The forward under bf16 autocast on CUDA, as `sfr train --bf16` (the HF Trainer) runs it: the
        # float32 head then uses the bf16 kernels, like the backbone's bf16 matmuls.
        with torch.autocast(settings.device.type, dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(**batch, **extra).loss
        loss.backward()
        optimizer.step()

    sft_times, sft_peak = run_variant(step, settings, "sft")
    torch.manual_seed(2)  # SFT ran without any SFR state; now the head joins the same backbone and optimizer
    config = SFRConfig(num_samples=settings.num_samples, head_width=HEAD_WIDTH, head_depth=HEAD_DEPTH)
    model = SFRModel.from_backbone(backbone, TARGET_DIM, objective="sfr", sfr_config=config)
    optimizer.add_param_group({"params": list(model.head.parameters())})
    sfr_times, sfr_peak = run_variant(step, settings, "sft+sfr")

    base = dict(kernel="step", provider=provider, N=settings.batch_size * settings.seq_len, M=settings.num_samples,
                D=dims["hidden_size"], E=TARGET_DIM, width=HEAD_WIDTH, depth=HEAD_DEPTH,
                dtype=common.DTYPE_NAMES[settings.dtype])
    rows = []
    for mode, times, peak in (("sft", sft_times, sft_peak), ("sft+sfr", sfr_times, sfr_peak)):
        p50, p20, p80 = quantiles(times)
        rows.append(common.make_row(env, mode=mode, metric="time", unit="ms", p50=p50, p20=p20, p80=p80, **base))
        if peak is not None:
            rows.append(common.make_row(env, mode=mode, metric="memory", unit="MB", p50=peak, p20=peak, p80=peak,
                                        **base))
    time_overhead = (statistics.median(sfr_times) / statistics.median(sft_times) - 1) * 100
    rows.append(common.make_row(env, mode="sft+sfr", metric="time_overhead", unit="%", p50=time_overhead, **base))
    summary = f"SFR overhead: time {time_overhead:+.2f}%"
    if sft_peak is not None:
        memory_overhead = (sfr_peak / sft_peak - 1) * 100
        rows.append(common.make_row(env, mode="sft+sfr", metric="memory_overhead", unit="%", p50=memory_overhead,
                                    **base))
        summary += f", peak memory {memory_overhead:+.2f}%"
    else:
        summary += " (memory not measured on the CPU)"
    print(summary)
    path = common.append_rows(Path(out_dir) / "step.csv", rows)
    print(f"wrote {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    sys.exit(common.cli("python -m bench.step", __doc__, add_arguments, settings_from_args, run))
