"""Lock/Fork diagnostics: where do a model's futures branch?

For an anchor with hidden state ``h``, the trained flow head defines an ODE ``dx/ds = v(x, s, h)``
that carries Gaussian source draws ``x0 ~ N(0, sigma^2 I)`` (s = 0) to samples of the future-segment
embedding (s = 1). Integrating it from S draws gives S plausible futures; their dispersion

    fork_score(h) = 1 - mean_{i != j} cos(x1_i, x1_j)        (mean pairwise cosine distance)

is near 0 when the future is *locked* (every draw lands on one continuation) and large at a *fork*
(draws spread over several continuations). ``sfr diagnose`` scores every response position of a
data set and writes an HTML page (tokens coloured by fork score), a PNG histogram and JSON.
"""
from __future__ import annotations

import argparse
import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SOLVERS = ("euler", "midpoint")


@torch.no_grad()
def integrate_flow(head, h: torch.Tensor, x0: torch.Tensor, steps: int = 16, solver: str = "midpoint") -> torch.Tensor:
    """Solve ``dx/ds = head(x, s, h)`` from s = 0 to 1 with a fixed-step ``solver``.

    h [N, D], x0 [N, S, E] -> x1 [N, S, E]. The conditioning ``W_c h`` is computed once per anchor.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    c = head.condition(h.to(x0.dtype)).unsqueeze(1)  # [N, 1, Hd], shared by the S draws
    x, ds = x0, 1.0 / steps
    s = torch.zeros(x0.shape[:-1], dtype=x0.dtype, device=x0.device)
    for _ in range(steps):
        v = head.velocity(x, s, c)
        if solver == "midpoint":
            v = head.velocity(x + 0.5 * ds * v, s + 0.5 * ds, c)
        x, s = x + ds * v, s + ds
    return x


def pairwise_cosine_dispersion(x: torch.Tensor) -> torch.Tensor:
    """``1 - mean_{i != j} cos(x_i, x_j)`` over the second-to-last axis: [..., S, E] -> [...]."""
    s = x.shape[-2]
    if s < 2:
        raise ValueError(f"need at least 2 samples to measure dispersion, got {s}")
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    total = unit.sum(dim=-2)  # sum_i u_i; |sum u|^2 = sum_ij cos_ij = S + sum_{i != j} cos_ij
    off_diagonal = (total * total).sum(-1) - (unit * unit).sum(dim=(-2, -1))
    return 1.0 - off_diagonal / (s * (s - 1))


@torch.no_grad()
def fork_scores(head, h: torch.Tensor, num_draws: int = 16, steps: int = 16, solver: str = "midpoint",
                source_std: float = 1.0, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
    """Fork score per anchor (see module doc): h [N, D] -> [N] float32, in [0, 2]."""
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2, got {num_draws}")
    dtype = next(head.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scores = []
    for start in range(0, h.shape[0], batch_size):
        hb = h[start:start + batch_size].to(dtype)
        x0 = source_std * torch.randn(hb.shape[0], num_draws, head.embed_dim, generator=gen).to(hb.device, dtype)
        scores.append(pairwise_cosine_dispersion(integrate_flow(head, hb, x0, steps, solver)))
    if not scores:
        return torch.zeros(0)
    return torch.cat(scores).float().cpu()


@dataclass
class DiagnoseConfig:
    """Settings of ``sfr diagnose``."""

    model: str
    data: str
    out: str = "sfr-diagnose"
    num_draws: int = 16
    steps: int = 16
    solver: str = "midpoint"
    limit: int = 20
    max_length: int = 512
    seed: int = 0
    device: str | None = None


def _load(model_dir: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfr.model import load_flow_head

    head_dir = Path(model_dir) / "sfr_head"
    if not head_dir.is_dir():
        raise FileNotFoundError(
            f"{model_dir} has no sfr_head/ folder: diagnostics need the flow head that `sfr train` saves next to "
            "the model (train with --objective sfr or mtp)"
        )
    head, head_config = load_flow_head(head_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    return model, tokenizer, head.to(device).eval(), head_config


def _final_hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, output_hidden_states=True)
    return out.hidden_states[-1][0]  # after the final norm: what the LM head reads


def diagnose(config: DiagnoseConfig) -> dict:
    """Score every response position of the first ``limit`` examples; write JSON, HTML and a PNG."""
    from tqdm.auto import tqdm

    from sfr.data import load_records, tokenize_example

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, head, head_config = _load(config.model, device)
    source_std = float(head_config.get("source_std", 1.0)) if isinstance(head_config, dict) else 1.0
    records = load_records(config.data)[: config.limit]
    if not records:
        raise ValueError(f"{config.data} holds no examples")
    examples = []
    for i, record in enumerate(tqdm(records, desc="diagnose", unit="example")):
        tokens = tokenize_example(record, tokenizer, max_length=config.max_length)
        ids = torch.tensor(tokens["input_ids"], device=device)[None]
        labels = torch.tensor(tokens["labels"])
        # Anchor t predicts token t+1: score every position whose next token is a response token.
        positions = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
        if not positions:
            continue
        with torch.no_grad():
            hidden = _final_hidden_states(model, ids)
        scores = fork_scores(head, hidden[positions], config.num_draws, config.steps, config.solver,
                             source_std, config.seed + i)
        pieces = [tokenizer.decode([tok]) for tok in tokens["input_ids"]]
        examples.append({
            "index": i,
            "tokens": pieces,
            "positions": positions,
            "fork_scores": [round(float(s), 5) for s in scores],
        })
    if not examples:
        raise ValueError(f"no example in {config.data} has response tokens to diagnose")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    all_scores = [s for ex in examples for s in ex["fork_scores"]]
    summary = {
        "config": asdict(config),
        "anchors": len(all_scores),
        "mean_fork_score": sum(all_scores) / len(all_scores),
        "examples": examples,
    }
    (out / "fork_scores.json").write_text(json.dumps(summary, indent=1))
    (out / "fork_scores.html").write_text(render_html(examples))
    plot_histogram(all_scores, out / "fork_histogram.png")
    return summary


def render_html(examples: list[dict]) -> str:
    """Tokens coloured from white (locked) to red (fork) by the fork score of the position *before*
    them: the colour of a token says how open the future was when it was about to be generated."""
    peak = max((s for ex in examples for s in ex["fork_scores"]), default=1.0) or 1.0
    rows = []
    for ex in examples:
        score_at = {t + 1: s for t, s in zip(ex["positions"], ex["fork_scores"])}
        spans = []
        for t, piece in enumerate(ex["tokens"]):
            text = html.escape(piece).replace("\n", "&#8629;<br>")
            if t in score_at:
                alpha = min(1.0, score_at[t] / peak)
                spans.append(f'<span title="fork {score_at[t]:.3f}" style="background: rgba(220,40,40,{alpha:.2f})">{text}</span>')
            else:
                spans.append(f'<span style="color:#888">{text}</span>')
        rows.append(f"<div class='ex'><h3>example {ex['index']}</h3><p>{''.join(spans)}</p></div>")
    return (
        "<!doctype html><meta charset='utf-8'><title>sfr Lock/Fork diagnostics</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto} .ex p{font-family:monospace;line-height:1.8}"
        "</style><h1>Lock/Fork diagnostics</h1><p>Each response token is shaded by the fork score of the state "
        f"that generated it (white = locked, red = fork; max {peak:.3f}). Hover for the value; grey = context.</p>"
        + "".join(rows)
    )


def plot_histogram(scores: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=max(10, int(math.sqrt(len(scores)))), color="#c33")
    ax.set_xlabel("fork score (1 - mean pairwise cosine of flow endpoints)")
    ax.set_ylabel("anchors")
    ax.set_title("Lock (left) vs Fork (right)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a directory written by `sfr train` (model + sfr_head/)")
    parser.add_argument("--data", required=True, help="JSONL in messages or prompt/completion format")
    parser.add_argument("--out", default="sfr-diagnose", help="output folder (JSON, HTML, PNG)")
    parser.add_argument("--num-draws", type=int, default=16, help="source draws S per position")
    parser.add_argument("--steps", type=int, default=16, help="ODE steps from s=0 to s=1")
    parser.add_argument("--solver", choices=SOLVERS, default="midpoint")
    parser.add_argument("--limit", type=int, default=20, help="examples to score")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def main(args: argparse.Namespace) -> int:
    config = DiagnoseConfig(model=args.model, data=args.data, out=args.out, num_draws=args.num_draws,
                            steps=args.steps, solver=args.solver, limit=args.limit, max_length=args.max_length,
                            seed=args.seed, device=args.device)
    summary = diagnose(config)
    print(f"scored {summary['anchors']} positions; mean fork score {summary['mean_fork_score']:.4f}")
    print(f"wrote {config.out}/fork_scores.html, fork_histogram.png, fork_scores.json")
    return 0
