"""Lock/Fork diagnostics: where do a model's futures branch? (docs/design.md, "Lock/Fork diagnostics")

For an anchor with hidden state ``h``, the trained flow head defines an ODE ``dx/ds = v(x, s, h)``
that carries Gaussian source draws ``x0 ~ N(0, sigma^2 I)`` (s = 0) to samples of the future-segment
embedding (s = 1). Solving it from S draws (:func:`sfr.flow.sample_flow`) gives S plausible futures; their
dispersion

    fork_score(h) = 1 - mean_{i != j} cos(x1_i, x1_j)        (mean pairwise cosine distance)

is near 0 when the future is *locked* (every draw lands on one continuation) and large at a *fork*
(draws spread over several continuations). ``sfr diagnose`` scores every response position of a
data set and writes an HTML page (tokens coloured by fork score on a fixed scale, 0 = white to 1 =
red), a PNG histogram and JSON. Each score comes with its standard error (the unbiased variance
estimate of a U-statistic, from the S draws); when the scores' spread across positions is below twice that noise, the page and the command
line say so (:func:`noise_verdict`).
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

# The fixed colour scale of the HTML page: a fork score of 0 (every draw lands on one direction, locked)
# is white, FORK_SCALE_MAX = 1 (as spread as independent random directions) and above is full red.
FORK_SCALE_MAX = 1.0
NOISE_FACTOR = 2.0  # a spread below NOISE_FACTOR x the sampling noise is called noise (noise_verdict)


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


def dispersion_standard_error(x: torch.Tensor) -> torch.Tensor:
    """Standard error of :func:`pairwise_cosine_dispersion` over the S draws: [..., S, E] -> [...].

    The dispersion is ``1 - U`` with ``U = A / (S(S-1))`` the U-statistic of the pairwise cosines
    ``c_ij`` (``A = sum_{i != j} c_ij``). ``Var(U) = E[U^2] - theta^2``, and the mean of ``c_ij c_kl``
    over ordered pairs with four distinct indices is an unbiased estimate of ``theta^2``; expanding
    ``A^2`` by shared indices gives that sum as ``A^2 + 2 B - 4 sum_i r_i^2`` (``B = sum_{i != j}
    c_ij^2``, ``r_i = sum_{j != i} c_ij``). So ``Var = U^2 - (A^2 + 2B - 4 sum r^2) / (S(S-1)(S-2)(S-3))``,
    unbiased whatever the draws' distribution (the jackknife overestimates it about 2x when the draws are
    isotropic noise), clamped at 0 for the square root. How much the score would move with other
    source draws; NaN for S < 4."""
    s = x.shape[-2]
    if s < 4:
        return torch.full(x.shape[:-2], float("nan"))
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    cos = unit @ unit.transpose(-1, -2)
    cos = cos - torch.diag_embed(torch.diagonal(cos, dim1=-2, dim2=-1))  # i != j only
    total = cos.sum((-2, -1))  # A
    squares = (cos * cos).sum((-2, -1))  # B
    rows = cos.sum(-1)  # r_i
    distinct_four = total * total + 2 * squares - 4 * (rows * rows).sum(-1)
    variance = (total / (s * (s - 1))) ** 2 - distinct_four / (s * (s - 1) * (s - 2) * (s - 3))
    return variance.clamp_min(0.0).sqrt().float()


@torch.no_grad()
def fork_statistics(head, h: torch.Tensor, num_draws: int = 16, steps: int = 16, solver: str = "midpoint",
                    source_std: float = 1.0, seed: int = 0, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Per anchor of h [N, D]: ``fork_score`` (see the module doc), its ``standard_error``
    (:func:`dispersion_standard_error`, the noise of scoring with ``num_draws`` draws) and
    ``endpoint_norm`` (the mean norm of the endpoints); each [N] float32 on the CPU.

    ``x0 = source_std * randn`` from a CPU generator seeded with ``seed`` (the same draws on every
    device). The targets of a head trained on normalised sentence embeddings have norm 1, so endpoints
    with a norm near the source's (``source_std * sqrt(E)``) mean the head has not learned to carry
    the noise to the targets yet, and the fork scores then mostly reflect the source noise.
    """
    if num_draws < 2:
        raise ValueError(f"num_draws must be >= 2, got {num_draws}")
    dtype = next(head.parameters()).dtype
    gen = torch.Generator(device="cpu").manual_seed(seed)
    parts = {"fork_score": [], "standard_error": [], "endpoint_norm": []}
    for start in range(0, h.shape[0], batch_size):
        hb = h[start:start + batch_size].to(dtype)
        x0 = source_std * torch.randn(hb.shape[0], num_draws, head.embed_dim, generator=gen).to(hb.device, dtype)
        x1 = sample_flow(head, hb, x0, steps, solver)
        parts["fork_score"].append(pairwise_cosine_dispersion(x1))
        parts["standard_error"].append(dispersion_standard_error(x1))
        parts["endpoint_norm"].append(x1.float().norm(dim=-1).mean(dim=-1))
    return {name: torch.cat(values).float().cpu() if values else torch.zeros(0) for name, values in parts.items()}


def fork_scores(head, h: torch.Tensor, num_draws: int = 16, steps: int = 16, solver: str = "midpoint",
                source_std: float = 1.0, seed: int = 0, batch_size: int = 256, return_endpoint_norms: bool = False):
    """Fork score per anchor: h [N, D] -> [N] float32, in [0, 2] (:func:`fork_statistics`); with
    ``return_endpoint_norms``, also the mean norm of each anchor's endpoints ([N])."""
    stats = fork_statistics(head, h, num_draws, steps, solver, source_std, seed, batch_size)
    if return_endpoint_norms:
        return stats["fork_score"], stats["endpoint_norm"]
    return stats["fork_score"]


def noise_verdict(scores, standard_errors, factor: float = NOISE_FACTOR) -> dict:
    """How the spread of ``scores`` across positions compares with their own sampling noise.

    ``spread`` = the standard deviation of the scores across positions; ``noise`` = the root mean
    square of their standard errors (:func:`dispersion_standard_error`). If every position had the same
    true score, the spread would be about the noise; ``below_noise`` is ``spread < factor * noise``
    (default 2): the scores' differences are then mostly noise, and colour differences between tokens
    mean little. ``below_noise`` is None when the noise is unknown (``num_draws`` < 4) or there are fewer
    than two scores."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    errors = torch.as_tensor(standard_errors, dtype=torch.float64)
    spread = float(scores.std()) if scores.numel() > 1 else float("nan")
    noise = float(errors.pow(2).mean().sqrt()) if errors.numel() else float("nan")
    known = not (math.isnan(spread) or math.isnan(noise))
    return {"spread": spread, "noise": noise, "factor": factor, "below_noise": (spread < factor * noise) if known else None}


def noise_message(verdict: dict, num_draws: int) -> str | None:
    """One sentence for the page and the command line when the spread is below noise (else None)."""
    if verdict["below_noise"] is None:
        return (f"the scores' sampling noise is unknown with --num-draws {num_draws} (at least 4 are needed to "
                "estimate it)") if not math.isnan(verdict["spread"]) else None
    if not verdict["below_noise"]:
        return None
    return (f"the fork scores vary across positions by std {verdict['spread']:.3g}, less than {verdict['factor']:g}x "
            f"their own sampling noise ({verdict['noise']:.3g} per position with {num_draws} draws): the differences "
            "between tokens are mostly noise (more --num-draws lowers the noise; an untrained head scores about 1 "
            "everywhere)")


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
    (``anchors``, ``mean_fork_score``, ``median_fork_score``, ``score_spread`` / ``score_noise`` /
    ``below_noise`` / ``noise_note`` (:func:`noise_verdict`), ``colour_scale``, ``examples`` with tokens,
    positions, scores and their standard errors, ``files``). ``FileNotFoundError`` for a missing model dir / ``sfr_head`` / data file,
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
        stats = fork_statistics(head, hidden[positions], config.num_draws, config.steps, config.solver,
                                source_std, config.seed + i)
        pieces = [tokenizer.decode([tok]) for tok in tokens["input_ids"]]
        examples.append({
            "index": i,
            "tokens": pieces,
            "positions": positions,
            "fork_scores": [round(float(s), 5) for s in stats["fork_score"]],
            "standard_errors": [_finite_or_none(e, 5) for e in stats["standard_error"]],  # None: S < 4
            "endpoint_norms": [round(float(n), 4) for n in stats["endpoint_norm"]],
        })
    if not examples:
        raise ValueError(f"no example in {config.data} has response tokens to diagnose")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    all_scores = [s for ex in examples for s in ex["fork_scores"]]
    errors = [float("nan") if e is None else e for ex in examples for e in ex["standard_errors"]]
    verdict = noise_verdict(all_scores, errors)
    note = noise_message(verdict, config.num_draws)
    files = {name: str(out / name) for name in ("fork_scores.json", "fork_scores.html", "fork_histogram.png")}
    summary = {
        "config": asdict(config),
        "source_std": source_std,
        "anchors": len(all_scores),
        "mean_fork_score": sum(all_scores) / len(all_scores),
        "median_fork_score": float(torch.tensor(all_scores).median()),
        "mean_endpoint_norm": float(torch.tensor([n for ex in examples for n in ex["endpoint_norms"]]).mean()),
        "source_norm": source_std * math.sqrt(head.embed_dim),
        "score_spread": _finite_or_none(verdict["spread"]),
        "score_noise": _finite_or_none(verdict["noise"]),
        "below_noise": verdict["below_noise"],
        "noise_note": note,
        "colour_scale": [0.0, FORK_SCALE_MAX],
        "files": files,
        "examples": examples,
    }
    (out / "fork_scores.json").write_text(json.dumps(summary, indent=1))
    (out / "fork_scores.html").write_text(render_html(examples, note))
    plot_histogram(all_scores, out / "fork_histogram.png")
    return summary


def _finite_or_none(value, digits: int | None = None):
    """``value`` as a float for JSON (rounded to ``digits``), or None when it is NaN or infinite."""
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, digits) if digits is not None else value


def render_html(examples: list[dict], note: str | None = None) -> str:
    """Tokens coloured by the fork score of the position *before* them (the state that generated them),
    on a fixed scale: white = 0 (locked: every draw lands on one direction) to red = ``FORK_SCALE_MAX``
    = 1 (as spread as independent random directions; scores above it are full red), the same on every
    page, so pages compare and noise is not stretched into structure. Hover a token for its score (±
    its standard error when known). ``note`` (e.g. :func:`noise_message`) is shown above the text."""
    rows = []
    for ex in examples:
        errors = ex.get("standard_errors") or [None] * len(ex["fork_scores"])
        score_at = {t + 1: (s, e) for t, s, e in zip(ex["positions"], ex["fork_scores"], errors)}
        spans = []
        for t, piece in enumerate(ex["tokens"]):
            text = html.escape(piece).replace("\n", "&#8629;<br>")
            if t in score_at:
                score, error = score_at[t]
                alpha = min(max(score, 0.0), FORK_SCALE_MAX) / FORK_SCALE_MAX
                title = f"fork {score:.3f}" + ("" if error is None else f" ± {error:.3f}")
                spans.append(f'<span title="{title}" style="background: rgba(220,40,40,{alpha:.2f})">{text}</span>')
            else:
                spans.append(f'<span style="color:#888">{text}</span>')
        mean = sum(ex["fork_scores"]) / len(ex["fork_scores"]) if ex["fork_scores"] else float("nan")
        rows.append(f"<div class='ex'><h3>example {ex['index']} (mean fork score {mean:.3f})</h3>"
                    f"<p>{''.join(spans)}</p></div>")
    warning = f"<p class='note'><b>Note:</b> {html.escape(note)}.</p>" if note else ""
    return (
        "<!doctype html><meta charset='utf-8'><title>sfr Lock/Fork diagnostics</title>"
        "<style>body{font-family:sans-serif;max-width:60em;margin:auto} .ex p{font-family:monospace;line-height:1.8}"
        " .note{background:#fff3cd;padding:.5em}</style><h1>Lock/Fork diagnostics</h1><p>Each response token is "
        "shaded by the fork score (1 − mean pairwise cosine of the flow endpoints) of the state that generated it, "
        "on a fixed scale: <span style='background: rgba(220,40,40,0)'>white = 0</span> (locked: every draw "
        f"lands on one continuation) to <span style='background: rgba(220,40,40,1)'>red = {FORK_SCALE_MAX:g}</span> "
        "(as spread as random directions; higher scores are red too). Hover a token for its score ± its "
        "standard error (from the source draws); grey = context.</p>"
        + warning + "".join(rows)
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
