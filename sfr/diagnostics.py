"""Lock/Fork diagnostics: where do a model's futures branch? (docs/design.md, "Lock/Fork diagnostics")

For an anchor with hidden state ``h``, the trained flow head defines an ODE ``dx/ds = v(x, s, h)``
that carries Gaussian source draws ``x0 ~ N(0, sigma^2 I)`` (s = 0) to samples of the future-segment
embedding (s = 1). Solving it from S draws (:func:`sfr.flow.sample_flow`) gives S plausible futures; their
dispersion

    fork_score(h) = 1 - mean_{i != j} cos(x1_i, x1_j)        (mean pairwise cosine distance)

is near 0 when the future is *locked* (every draw lands on one continuation) and large at a *fork*
(draws spread over several continuations). ``sfr diagnose`` scores every response position of a
data set and writes an HTML page (tokens coloured by fork score), a PNG histogram and JSON.
"""
from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sfr.checks import check_device, check_int, check_output_dir
from sfr.flow import ODE_METHODS, sample_flow
from sfr.head import HEAD_DIR


def pairwise_cosine_dispersion(x: torch.Tensor) -> torch.Tensor:
    """``1 - mean_{i != j} cos(x_i, x_j)`` over the second-to-last axis: [..., S, E] -> [...].

    Never negative: the mean cosine is at most 1, so the value is >= 0 in exact arithmetic, and the
    round-off of identical draws is clamped to 0."""
    s = x.shape[-2]
    if s < 2:
        raise ValueError(f"need at least 2 samples to measure dispersion, got {s}")
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    total = unit.sum(dim=-2)  # sum_i u_i; |sum u|^2 = sum_ij cos_ij = S + sum_{i != j} cos_ij
    off_diagonal = (total * total).sum(-1) - (unit * unit).sum(dim=(-2, -1))
    return (1.0 - off_diagonal / (s * (s - 1))).clamp_min(0.0)


@torch.no_grad()
def fork_scores(head, h: torch.Tensor, num_draws: int = 16, steps: int = 16, solver: str = "midpoint",
                source_std: float = 1.0, seed: int = 0, batch_size: int = 256, return_endpoint_norms: bool = False):
    """Fork score per anchor (see module doc): h [N, D] -> [N] float32, in [0, 2].

    ``x0 = source_std * randn`` from a CPU generator seeded with ``seed`` (the same draws on every
    device). With ``return_endpoint_norms``, also the mean norm of each anchor's endpoints ([N]): the
    targets of a head trained on normalised sentence embeddings have norm 1, so endpoints with a norm
    near the source's (``source_std * sqrt(E)``) mean the head has not learned to carry the noise to
    the targets yet, and the fork scores then mostly reflect the source noise.
    """
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2, got {num_draws}")
    dtype = next(head.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scores, norms = [], []
    for start in range(0, h.shape[0], batch_size):
        hb = h[start:start + batch_size].to(dtype)
        x0 = source_std * torch.randn(hb.shape[0], num_draws, head.embed_dim, generator=gen).to(hb.device, dtype)
        x1 = sample_flow(head, hb, x0, steps, solver)
        scores.append(pairwise_cosine_dispersion(x1))
        norms.append(x1.float().norm(dim=-1).mean(dim=-1))
    result = torch.cat(scores).float().cpu() if scores else torch.zeros(0)
    if return_endpoint_norms:
        return result, (torch.cat(norms).float().cpu() if norms else torch.zeros(0))
    return result


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

    def validate(self) -> None:
        """``ValueError`` naming the first bad setting."""
        for name, minimum in (("num_draws", 2), ("steps", 1), ("limit", 1), ("max_length", 2)):
            check_int(name, getattr(self, name), minimum)
        if self.solver not in ODE_METHODS:
            raise ValueError(f"solver must be one of {ODE_METHODS}, got {self.solver!r}")


def _head_dir(model_dir: str) -> Path:
    """``model_dir/sfr_head``; ``FileNotFoundError`` saying what is missing."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {model_dir!r} does not exist (pass a directory written by `sfr train`)")
    head_dir = root / HEAD_DIR
    if not head_dir.is_dir():
        raise FileNotFoundError(
            f"{model_dir} has no sfr_head/ folder: diagnostics need the flow head that `sfr train` saves next to "
            "the model (train with --objective sfr or mtp; an SFT model has no head)"
        )
    return head_dir


def _load(model_dir: str, device: torch.device):
    """``(model, tokenizer, head, head_config)`` of a directory written by ``sfr train``, in eval mode on
    ``device``; ``OSError`` when the backbone or tokenizer does not load (:mod:`sfr.loading`)."""
    from sfr.head import load_flow_head
    from sfr.loading import load_model_and_tokenizer

    head_dir = _head_dir(model_dir)
    head, head_config = load_flow_head(head_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir, device=device)
    if head.hidden_size != model.config.hidden_size:
        raise ValueError(f"{head_dir} expects hidden size {head.hidden_size}, the model in {model_dir} has "
                         f"{model.config.hidden_size}: the head belongs to another model")
    return model, tokenizer, head.to(device).eval(), head_config


def _final_hidden_states(model, input_ids: torch.Tensor) -> torch.Tensor:
    """``H`` [T, D] of one sequence: the base model's ``last_hidden_state`` (after the final norm, what
    the LM head reads and what the head was trained on), without the LM head's logits."""
    from sfr.model import find_decoder

    return find_decoder(model)(input_ids=input_ids, use_cache=False).last_hidden_state[0]


def diagnose(config: DiagnoseConfig, progress: bool = True) -> dict:
    """Score every response position of the first ``limit`` examples; write JSON, HTML and a PNG.

    A position ``t`` is scored when token ``t + 1`` is a response token (the anchors of SFR, at stride
    1): its fork score is the dispersion of ``num_draws`` flow endpoints from ``h_t``. The source std of
    the draws is the one the head was trained with (``sfr_head/config.json``). Returns the JSON summary
    (``anchors``, ``mean_fork_score``, ``median_fork_score``, ``examples`` with tokens, positions and
    scores, ``files``). ``FileNotFoundError`` for a missing model dir / ``sfr_head`` / data file,
    ``ValueError`` for bad settings or data.
    """
    from tqdm.auto import tqdm

    from sfr.data import IGNORE_INDEX, load_records, tokenize_example

    config.validate()
    check_output_dir(config.out, "--out")  # the cheap checks first: a bad --out or --device must not cost the run
    check_device(config.device, "--device")
    _head_dir(config.model)
    try:
        records = load_records(config.data)[: config.limit]
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as exc:  # unreadable, undecodable or malformed data
        message = str(exc) if str(config.data) in str(exc) else f"cannot read data {str(config.data)!r}: {exc}"
        raise ValueError(message) from exc
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer, head, head_config = _load(config.model, device)
    source_std = float(head_config.get("source_std", 1.0)) if isinstance(head_config, dict) else 1.0
    context = getattr(model.config, "max_position_embeddings", None)
    keep = min(config.max_length, context) if isinstance(context, int) and context > 1 else config.max_length
    examples = []
    for i, record in enumerate(tqdm(records, desc="diagnose", unit="example", disable=not progress)):
        tokens = tokenize_example(record, tokenizer)
        # over-long examples keep their end (the last reply) within the model's context
        tokens = {key: value[-keep:] for key, value in tokens.items()}
        ids = torch.tensor(tokens["input_ids"], device=device)[None]
        labels = torch.tensor(tokens["labels"])
        # Anchor t predicts token t+1: score every position whose next token is a response token.
        positions = [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE_INDEX]
        if not positions:
            continue
        with torch.no_grad():
            hidden = _final_hidden_states(model, ids)
        scores, norms = fork_scores(head, hidden[positions], config.num_draws, config.steps, config.solver,
                                    source_std, config.seed + i, return_endpoint_norms=True)
        pieces = [tokenizer.decode([tok]) for tok in tokens["input_ids"]]
        examples.append({
            "index": i,
            "tokens": pieces,
            "positions": positions,
            "fork_scores": [round(float(s), 5) for s in scores],
            "endpoint_norms": [round(float(n), 4) for n in norms],
        })
    if not examples:
        raise ValueError(f"no example in {config.data} has response tokens to diagnose")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    all_scores = [s for ex in examples for s in ex["fork_scores"]]
    files = {name: str(out / name) for name in ("fork_scores.json", "fork_scores.html", "fork_histogram.png")}
    summary = {
        "config": asdict(config),
        "source_std": source_std,
        "anchors": len(all_scores),
        "mean_fork_score": sum(all_scores) / len(all_scores),
        "median_fork_score": float(torch.tensor(all_scores).median()),
        "mean_endpoint_norm": float(torch.tensor([n for ex in examples for n in ex["endpoint_norms"]]).mean()),
        "source_norm": source_std * math.sqrt(head.embed_dim),
        "files": files,
        "examples": examples,
    }
    (out / "fork_scores.json").write_text(json.dumps(summary, indent=1))
    (out / "fork_scores.html").write_text(render_html(examples))
    plot_histogram(all_scores, out / "fork_histogram.png")
    return summary


def render_html(examples: list[dict]) -> str:
    """Tokens coloured by the fork score of the position *before* them (the state that generated them):
    white = the lowest score on the page, red = the highest (a linear scale between the two, printed in
    the legend; hover a token for its value). The colour of a token says how open the future was when
    it was about to be generated, relative to the rest of the page."""
    scores = [s for ex in examples for s in ex["fork_scores"]]
    low, high = (min(scores), max(scores)) if scores else (0.0, 1.0)
    span = high - low
    rows = []
    for ex in examples:
        score_at = {t + 1: s for t, s in zip(ex["positions"], ex["fork_scores"])}
        spans = []
        for t, piece in enumerate(ex["tokens"]):
            text = html.escape(piece).replace("\n", "&#8629;<br>")
            if t in score_at:
                alpha = (score_at[t] - low) / span if span > 0 else 0.5
                spans.append(f'<span title="fork {score_at[t]:.3f}" style="background: rgba(220,40,40,{alpha:.2f})">'
                             f'{text}</span>')
            else:
                spans.append(f'<span style="color:#888">{text}</span>')
        mean = sum(ex["fork_scores"]) / len(ex["fork_scores"]) if ex["fork_scores"] else float("nan")
        rows.append(f"<div class='ex'><h3>example {ex['index']} (mean fork score {mean:.3f})</h3>"
                    f"<p>{''.join(spans)}</p></div>")
    return (
        "<!doctype html><meta charset='utf-8'><title>sfr Lock/Fork diagnostics</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto} .ex p{font-family:monospace;line-height:1.8}"
        "</style><h1>Lock/Fork diagnostics</h1><p>Each response token is shaded by the fork score "
        "(1 − mean pairwise cosine of the flow endpoints) of the state that generated it: "
        f"<span style='background: rgba(220,40,40,0)'>white = {low:.3f}</span> (the lowest on this page, most "
        f"locked) to <span style='background: rgba(220,40,40,1)'>red = {high:.3f}</span> (the highest, most "
        "open). Hover a token for its value; grey = context.</p>"
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
