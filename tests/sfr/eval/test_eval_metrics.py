import math
import random

import numpy as np
import pytest
import torch

from sfr.eval import distinct_n, embedding_diversity, mode_statistics, pass_at_k, self_bleu
from sfr.eval.metrics import entropy


def test_pass_at_k_matches_exact_binomial_formula():
    rng = random.Random(7)
    cases = [(n, c, k) for n in (1, 2, 5, 10, 20, 200) for c in {0, 1, n // 3, n // 2, n - 1, n} if c >= 0
             for k in {1, 2, 5, 10, n} if k <= n]
    cases += [(n, rng.randint(0, n), rng.randint(1, n)) for n in (rng.randint(1, 300) for _ in range(200))]
    for n, c, k in cases:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10, abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_arrays():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 1, 5) == 1.0  # any 5 of 5 samples include the correct one
    n = np.array([10, 20, 30])
    c = np.array([1, 5, 0])
    values = pass_at_k(n, c, 5)
    assert isinstance(values, np.ndarray) and values.shape == (3,)
    for value, (nn, cc) in zip(values, zip(n, c)):
        assert value == pytest.approx(1 - math.comb(int(nn - cc), 5) / math.comb(int(nn), 5))
    grid = pass_at_k(np.array([[10], [20]]), np.array([[2], [4]]), np.array([1, 2, 10]))
    assert grid.shape == (2, 3)


@pytest.mark.parametrize("n, c, k, match", [(5, 1, 6, "k"), (5, 6, 1, "c"), (0, 0, 1, "n"), (5, -1, 1, "c"),
                                            (5, 1, 0, "k")])
def test_pass_at_k_rejects_bad_input(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)
    with pytest.raises(TypeError):
        pass_at_k(5.5, 1, 1)


def test_distinct_n_hand_computed():
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran over 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert distinct_n(["a a a a"], 1) == pytest.approx(1 / 4)
    assert distinct_n(["one", "two"], 2) == 0.0  # no bigram at all
    with pytest.raises(ValueError, match="n"):
        distinct_n(texts, 0)
    with pytest.raises(TypeError):
        distinct_n("not a list", 1)


def test_self_bleu_extremes_and_order():
    same = ["the quick brown fox jumps over the lazy dog"] * 4
    assert self_bleu(same) == pytest.approx(100.0)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue yellow"]
    assert self_bleu(disjoint) < 1.0
    partial = ["the quick brown fox jumps over the lazy dog", "the quick brown fox sleeps under the lazy cat"]
    assert 1.0 < self_bleu(partial) < 100.0
    with pytest.raises(ValueError, match="at least 2"):
        self_bleu(["only one"])


def test_embedding_diversity_exact_values():
    assert embedding_diversity(np.eye(3)) == pytest.approx(1.0)  # orthogonal: all cosines 0
    assert embedding_diversity(np.array([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(0.0)
    assert embedding_diversity(np.array([[1.0, 0.0], [-3.0, 0.0]])) == pytest.approx(2.0)
    # cos(e1, e1+e2) = 1/sqrt(2): pairs (0,1)=0, (0,2)=1/sqrt2, (1,2)=1/sqrt2
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert embedding_diversity(x) == pytest.approx(1 - (2 * (2 / math.sqrt(2))) / 6)
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 5))
    unit = e / np.linalg.norm(e, axis=1, keepdims=True)
    brute = np.mean([unit[i] @ unit[j] for i in range(6) for j in range(6) if i != j])
    assert embedding_diversity(e) == pytest.approx(1 - brute)
    with pytest.raises(ValueError, match="at least 2"):
        embedding_diversity(np.ones((1, 3)))
    with pytest.raises(ValueError, match="2-D"):
        embedding_diversity(np.ones(3))
    with pytest.raises(ValueError, match="zero"):
        embedding_diversity(np.zeros((2, 3)))


def test_embedding_diversity_of_identical_samples_is_exactly_zero_never_negative():
    # 1 - mean cosine is >= 0 in exact arithmetic; without the clamp, round-off gives e.g. -2.2e-16 here
    for seed in range(20):
        same = np.repeat(np.random.default_rng(seed).normal(size=(1, 384)), 3, axis=0)
        value = embedding_diversity(same)
        assert 0.0 <= value < 1e-12


def test_mode_statistics_hand_computed():
    reference = {"pasta": 0.6, "curry": 0.3, "salad": 0.1}
    stats = mode_statistics(["pasta", "pasta", "curry", None], reference)
    assert stats["coverage"] == pytest.approx(2 / 3)
    assert stats["unclassified_rate"] == pytest.approx(0.25)
    assert stats["entropy"] == pytest.approx(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3))
    assert stats["reference_entropy"] == pytest.approx(entropy([0.6, 0.3, 0.1]))
    # sampled (2/3, 1/3, 0) vs (0.6, 0.3, 0.1): 0.5 * (1/15 + 1/30 + 0.1)
    assert stats["total_variation"] == pytest.approx(0.5 * (2 / 3 - 0.6 + 1 / 3 - 0.3 + 0.1))
    collapsed = mode_statistics(["pasta"] * 5, reference)
    assert collapsed["entropy"] == 0.0 and collapsed["coverage"] == pytest.approx(1 / 3)
    assert mode_statistics([None, None], reference)["total_variation"] == 1.0


def test_self_bleu_hand_computed():
    # hypothesis "a b c d" vs reference "a b c e": 1-4-gram precisions 3/4, 2/3, 1/2, 0/1; sacrebleu's
    # "exp" smoothing turns the zero 4-gram precision into 1 / (2 * 1); equal lengths: no brevity penalty
    expected = 100 * (0.75 * (2 / 3) * 0.5 * 0.5) ** 0.25
    assert self_bleu(["a b c d", "a b c e"]) == pytest.approx(expected, rel=1e-9)
    # three samples: each one against the two others (multi-reference clipping takes the max count)
    texts = ["a b c d", "a b c e", "x y z w"]
    assert self_bleu(texts) == pytest.approx((expected + expected + 0.0) / 3, abs=1e-6)


def test_paired_bootstrap_interval():
    from sfr.eval.metrics import paired_bootstrap

    a = [0.1, 0.2, 0.3, 0.4]
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0 and same["n"] == 4
    shifted = paired_bootstrap(a, [v + 0.5 for v in a])
    assert shifted["diff"] == pytest.approx(0.5) and shifted["low"] == pytest.approx(0.5)
    noisy = paired_bootstrap([0.0] * 6, [1.0, -1.0, 1.0, -1.0, 1.0, -1.0], num_resamples=4000, seed=3)
    assert noisy["diff"] == 0.0 and noisy["low"] < 0 < noisy["high"]  # no clear difference
    better = paired_bootstrap([0.0] * 8, [0.9, 1.1, 1.0, 0.8, 1.2, 1.0, 0.95, 1.05])
    assert 0.8 <= better["low"] < better["diff"] < better["high"] <= 1.2
    single = paired_bootstrap([1.0], [2.0])
    assert single["diff"] == 1.0 and math.isnan(single["low"])
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_cross_style_self_bleu_equals_sacrebleu_against_the_other_styles():
    import sacrebleu

    from sfr.eval import cross_style_self_bleu

    words = "the a cat dog sat ran on under mat rug big small red old".split()
    rng = random.Random(3)
    groups = [[" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))) for _ in range(n)] for n in (3, 1, 2)]
    expected = []
    for i, group in enumerate(groups):
        refs = [r for j, other in enumerate(groups) if j != i for r in other]
        expected += [sacrebleu.sentence_bleu(r, refs).score for r in group]
    assert len(expected) == 6
    assert cross_style_self_bleu(groups) == pytest.approx(float(np.mean(expected)), abs=1e-12)


def test_cross_style_self_bleu_ignores_replies_of_the_same_style():
    from sfr.eval import cross_style_self_bleu

    same = "the quick brown fox jumps over the lazy dog"
    # Within style 0 the replies are identical; across styles they share nothing: near 0, not 100.
    assert cross_style_self_bleu([[same, same], ["red green blue yellow purple"]]) < 1.0
    # Every style says the same: collapsed, 100.
    assert cross_style_self_bleu([[same], [same, same], [same]]) == pytest.approx(100.0)
    # Shared content, different style words: in between.
    styles = [["Arr, " + same], ["BEEP. " + same + " END OF LINE."]]
    assert 1.0 < cross_style_self_bleu(styles) < 100.0


@pytest.mark.parametrize("groups, error", [([["only one style", "two replies"]], ValueError),
                                           ([["a reply"], []], ValueError), ([], ValueError),
                                           ("not a list", TypeError), ([["a reply"], [3]], TypeError)])
def test_cross_style_self_bleu_rejects_bad_input(groups, error):
    from sfr.eval import cross_style_self_bleu

    with pytest.raises(error):
        cross_style_self_bleu(groups)


def test_cross_style_similarity_exact_values():
    from sfr.eval import cross_style_similarity

    # Identical within a style, orthogonal across: the within-style cosines (1) must not count.
    assert cross_style_similarity([np.array([[1.0, 0.0], [3.0, 0.0]]), np.array([[0.0, 2.0]])]) == pytest.approx(0.0)
    # cos(e1, e1 + e2) = 1/sqrt(2), cos(e2, e1 + e2) = 1/sqrt(2), cos(e1, -e1) = -1: pairs (e1|e1+e2),
    # (e1|-e1), (e2|e1+e2), (e2|-e1), (e1+e2|-e1) across the three styles [e1, e2], [e1+e2], [-e1]
    styles = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, 0.0]])]
    s = 1 / math.sqrt(2)
    assert cross_style_similarity(styles) == pytest.approx((s - 1 + s + 0 - s) / 5)


def test_cross_style_similarity_matches_brute_force_on_random_embeddings():
    from sfr.eval import cross_style_similarity

    rng = np.random.default_rng(11)
    styles = [rng.normal(size=(n, 7)) * rng.uniform(0.5, 3.0) for n in (4, 1, 3, 2)]
    unit = [s / np.linalg.norm(s, axis=1, keepdims=True) for s in styles]
    cosines = [a @ b for i, x in enumerate(unit) for j, y in enumerate(unit) if i != j for a in x for b in y]
    assert cross_style_similarity(styles) == pytest.approx(float(np.mean(cosines)), rel=1e-12, abs=1e-12)


def test_cross_style_similarity_rejects_bad_input():
    from sfr.eval import cross_style_similarity

    with pytest.raises(ValueError, match="at least 2 styles"):
        cross_style_similarity([np.ones((3, 4))])
    with pytest.raises(ValueError, match="same E"):
        cross_style_similarity([np.ones((2, 4)), np.ones((2, 5))])
    with pytest.raises(ValueError, match="all-zero"):
        cross_style_similarity([np.ones((2, 4)), np.zeros((1, 4))])
    with pytest.raises(ValueError, match="at least 1 row,"):
        cross_style_similarity([np.ones((2, 4)), np.ones((0, 4))])
    with pytest.raises(TypeError, match="one per style"):
        cross_style_similarity(np.ones((3, 4)))
