"""Cross-style metrics of a dialogue evaluation: do replies to the same question differ between styles?

"Cross-Style Collapse" (arXiv 2605.27971): after fine-tuning on persona data, the replies to one
question under *different* system prompts (styles) become nearly the same. Prompts that ask the same
thing under different styles form a *group* (:func:`cross_style_groups`: equal conversation once the
system message is left out). Per group, over its styles (one prompt each):

* ``cross_style_self_bleu``: :func:`sfr.eval.metrics.cross_style_self_bleu` (sacrebleu, 0-100) of the
  styles' samples; 100 = every style says the same, lower = the styles differ more.
* ``cross_style_similarity``: :func:`sfr.eval.metrics.cross_style_similarity`, the mean cosine between
  sentence embeddings of replies of different styles (needs an encoder).
* Embedded corpus only (every prompt of the group has the same corpus ``prompt_id``):
  ``cross_style_self_bleu_content``, the same Self-BLEU after :func:`sfr.corpus.strip_style` (the
  persona's opener and closer removed: do the styles say the same *content*?), and
  ``pooled_mode_entropy``, the entropy (nats) of the modes of all the group's samples pooled over the
  styles (low = every style gives the same kind of answer).

Each metric is computed per group and then averaged over the groups (each group weighs the same);
the per-group values are kept under ``"cross_style"``.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from sfr.eval.metrics import cross_style_self_bleu, cross_style_similarity, mode_statistics

CROSS_STYLE_METRICS = ("cross_style_self_bleu", "cross_style_similarity", "cross_style_self_bleu_content",
                       "pooled_mode_entropy")


def _question_key(prompt) -> str:
    """The prompt without its system message: what is asked, whatever the style."""
    return json.dumps([[m for m in prompt.messages if m["role"] != "system"], prompt.text], sort_keys=True)


def cross_style_groups(prompts: Sequence) -> list[list[int]]:
    """Indices of the prompts (:class:`sfr.eval.dialogue.DialoguePrompt`) that ask the same question
    under at least 2 different system prompts, one list per question, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(_question_key(prompt), []).append(index)
    return [indices for indices in groups.values() if len({prompts[i].system for i in indices}) >= 2]


def score_cross_style(prompts: Sequence, replies: Sequence[Sequence[str]], encoder=None) -> dict:
    """The cross-style metrics of one model's ``replies[i]`` (the samples of ``prompts[i]``).

    Returns ``{metric: mean over groups or None, ..., "cross_style": {"questions": [...], "styles":
    [...], metric: [value or None per group]}}`` for the metrics of :data:`CROSS_STYLE_METRICS`
    (``None``: no group with 2 styles, no encoder, or not the embedded corpus).
    """
    from sfr.corpus import PROMPTS, classify_mode, mode_frequencies, strip_style
    from sfr.eval.dialogue import _embed, _mean

    if len(prompts) != len(replies):
        raise ValueError(f"need one reply list per prompt: {len(prompts)} prompts, {len(replies)} reply lists")
    groups = cross_style_groups(prompts)
    per_group: dict[str, list] = {name: [] for name in CROSS_STYLE_METRICS}
    for indices in groups:
        styles = [list(replies[i]) for i in indices]
        per_group["cross_style_self_bleu"].append(cross_style_self_bleu(styles))
        similarity = None
        if encoder is not None:
            embeddings = [_embed(encoder, samples) for samples in styles]
            if all(np.all(np.linalg.norm(e, axis=1) > 0) for e in embeddings):
                similarity = cross_style_similarity(embeddings)
        per_group["cross_style_similarity"].append(similarity)
        prompt_ids = {prompts[i].prompt_id for i in indices}
        corpus_group = len(prompt_ids) == 1 and next(iter(prompt_ids)) in PROMPTS
        content, pooled = None, None
        if corpus_group:
            prompt_id = next(iter(prompt_ids))
            content = cross_style_self_bleu([[strip_style(s) for s in samples] for samples in styles])
            pooled = mode_statistics([classify_mode(prompt_id, s) for samples in styles for s in samples],
                                     mode_frequencies(prompt_id))["entropy"]
        per_group["cross_style_self_bleu_content"].append(content)
        per_group["pooled_mode_entropy"].append(pooled)
    means = {name: _mean(values) for name, values in per_group.items()}
    detail = {"questions": [_question_text(prompts[g[0]]) for g in groups], "styles": [len(g) for g in groups],
              **per_group}
    return {**means, "cross_style": detail}


def _question_text(prompt) -> str:
    if prompt.text is not None:
        return prompt.text
    return " / ".join(m["content"] for m in prompt.messages if m["role"] != "system")
