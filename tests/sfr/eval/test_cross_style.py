"""Cross-style metrics of a dialogue evaluation: groups of one question under several styles, per-group values."""
import random

import numpy as np
import pytest

from sfr import corpus
from sfr.eval import cross_style_self_bleu, cross_style_similarity, mode_statistics
from sfr.eval.cross_style import CROSS_STYLE_METRICS, cross_style_groups, score_cross_style
from sfr.eval.dialogue import DialoguePrompt


class WordEncoder:
    """A stand-in sentence encoder: unit bag-of-words vectors (equal texts embed equally)."""

    def encode(self, texts, **kwargs):
        out = np.zeros((len(texts), 64))
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, sum(map(ord, word)) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _prompt(system, user, persona=None, prompt_id=None):
    return DialoguePrompt([{"role": "system", "content": system}, {"role": "user", "content": user}], [],
                          persona, prompt_id)


def test_groups_are_one_question_under_at_least_two_system_prompts():
    prompts = [_prompt("pirate", "dinner?"), _prompt("robot", "weekend?"), _prompt("robot", "dinner?"),
               _prompt("poet", "dinner?"), _prompt("pirate", "pet?")]
    assert cross_style_groups(prompts) == [[0, 2, 3]]  # weekend? and pet? have one style each
    result = score_cross_style(prompts[1:2] + prompts[4:], [["a b", "c d"], ["e f", "g h"]])
    assert result["cross_style"]["styles"] == [] and all(result[m] is None for m in CROSS_STYLE_METRICS)


def test_values_are_the_per_question_metrics_averaged_over_questions():
    rng = random.Random(0)
    prompts, replies = [], []
    for prompt_id in ("dinner", "pet"):
        for persona in ("pirate", "robot", "chef"):
            prompts.append(_prompt(corpus.PERSONAS[persona].system_prompt, corpus.PROMPTS[prompt_id].user_text,
                                   persona, prompt_id))
            replies.append([reply for _, reply in corpus.draw_replies(persona, prompt_id, 4, rng)])
    prompts.append(_prompt("a lone style", "an unrelated question"))  # no group: left out
    replies.append(["whatever", "else"])
    encoder = WordEncoder()
    result = score_cross_style(prompts, replies, encoder)
    detail = result["cross_style"]
    assert detail["questions"] == [corpus.PROMPTS["dinner"].user_text, corpus.PROMPTS["pet"].user_text]
    assert detail["styles"] == [3, 3]
    for g, prompt_id in enumerate(("dinner", "pet")):
        styles = replies[3 * g:3 * g + 3]
        assert detail["cross_style_self_bleu"][g] == cross_style_self_bleu(styles)
        assert detail["cross_style_similarity"][g] == pytest.approx(
            cross_style_similarity([encoder.encode(s) for s in styles]), abs=1e-12)
        assert detail["cross_style_self_bleu_content"][g] == cross_style_self_bleu(
            [[corpus.strip_style(r) for r in s] for s in styles])
        pooled = [corpus.classify_mode(prompt_id, r) for s in styles for r in s]
        assert detail["pooled_mode_entropy"][g] == mode_statistics(pooled, corpus.mode_frequencies(prompt_id))["entropy"]
    for metric in CROSS_STYLE_METRICS:
        assert result[metric] == pytest.approx(np.mean(detail[metric]))
    # The content of the corpus' replies recurs across personas; their full text (the styles) much less.
    assert result["cross_style_self_bleu_content"] > result["cross_style_self_bleu"]


def test_identical_replies_across_styles_are_total_collapse():
    prompts = [_prompt(style, "dinner?") for style in ("a", "b", "c")]
    result = score_cross_style(prompts, [["pasta with tomato sauce tonight"] * 2] * 3, WordEncoder())
    assert result["cross_style_self_bleu"] == pytest.approx(100.0)
    assert result["cross_style_similarity"] == pytest.approx(1.0)
    assert result["cross_style_self_bleu_content"] is None  # not corpus prompts
    assert score_cross_style(prompts, [["x y"]] * 3)["cross_style_similarity"] is None  # no encoder
    with pytest.raises(ValueError, match="one reply list per prompt"):
        score_cross_style(prompts, [["x"]])
