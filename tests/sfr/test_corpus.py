import json
import re
from collections import Counter

import pytest

from sfr.corpus import (
    NEUTRAL_SYSTEM_PROMPT,
    PERSONAS,
    PROMPTS,
    build_base_corpus,
    build_corpus,
    classify_mode,
    default_corpus_path,
    has_style_marker,
    mode_frequencies,
    split_pairs,
    strip_style,
    valid_replies,
    write_jsonl,
)


def _reply(record):
    return record["messages"][-1]["content"]


def test_corpus_is_deterministic_and_seeded():
    first, again = build_corpus("train"), build_corpus("train")
    assert first == again
    other_seed = build_corpus("train", seed=1)
    assert [r["mode"] for r in other_seed] != [r["mode"] for r in first]
    assert Counter(r["mode"] for r in other_seed) == Counter(r["mode"] for r in first)  # same allocation


def test_splits_are_disjoint_and_cover_every_persona_and_prompt():
    train, evaluation = build_corpus("train"), build_corpus("eval")
    train_pairs = {(r["persona"], r["prompt_id"]) for r in train}
    eval_pairs = {(r["persona"], r["prompt_id"]) for r in evaluation}
    assert len(PERSONAS) == 9 and len(PROMPTS) == 10
    assert len(train_pairs) == 72 and len(eval_pairs) == 18 and not train_pairs & eval_pairs
    assert len(train) == 720 and len(evaluation) == 180
    assert {p for p, _ in train_pairs} == set(PERSONAS) == {p for p, _ in eval_pairs}
    assert {q for _, q in train_pairs} == set(PROMPTS)
    for record in train[:5] + evaluation[:5]:
        roles = [m["role"] for m in record["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert record["messages"][0]["content"] == PERSONAS[record["persona"]].system_prompt
        assert record["messages"][1]["content"] == PROMPTS[record["prompt_id"]].user_text
    words = [len(_reply(r).split()) for r in train + evaluation]
    assert min(words) >= 8 and max(words) <= 19  # as documented
    assert split_pairs("train") == sorted(train_pairs, key=lambda pq: (list(PERSONAS).index(pq[0]), list(PROMPTS).index(pq[1])))


def test_mode_counts_follow_the_known_uneven_frequencies():
    train = build_corpus("train")
    for prompt_id in PROMPTS:
        freqs = mode_frequencies(prompt_id)
        assert sum(freqs.values()) == pytest.approx(1.0)
        assert len(set(freqs.values())) > 1  # uneven
        records = [r for r in train if r["prompt_id"] == prompt_id]
        counts = Counter(r["mode"] for r in records)
        for mode, p in freqs.items():  # 10 examples per pair: exact proportions
            assert counts[mode] == round(p * len(records)), (prompt_id, mode)
    for record in build_corpus("eval"):  # the eval split follows the same frequencies per pair
        assert record["mode"] in mode_frequencies(record["prompt_id"])
    evaluation = Counter((r["prompt_id"], r["mode"]) for r in build_corpus("eval"))
    for (prompt_id, mode), count in evaluation.items():
        pairs = sum(1 for _, q in split_pairs("eval") if q == prompt_id)
        assert count == round(mode_frequencies(prompt_id)[mode] * 10 * pairs)
    five = build_corpus("train", examples_per_pair=5)
    assert len(five) == 72 * 5
    per_pair = Counter((r["persona"], r["prompt_id"]) for r in five)
    assert set(per_pair.values()) == {5}


def test_style_markers_recognise_their_persona_only():
    for record in build_corpus("train") + build_corpus("eval"):
        text = _reply(record)
        for name in PERSONAS:
            assert has_style_marker(name, text) == (name == record["persona"]), (name, text)
    assert has_style_marker("pirate", "Arrr, the sea is calm.")
    assert not has_style_marker("pirate", "I will arrive tomorrow.")
    assert has_style_marker("robot", "BEEP. Hello.") and not has_style_marker("robot", "Hello. BEEP.")
    with pytest.raises(ValueError, match="persona"):
        has_style_marker("wizard", "hi")


def test_mode_classifier_recognises_every_template_and_rejects_others():
    for prompt_id, prompt in PROMPTS.items():
        for mode, spec in prompt.modes.items():
            for template in spec.templates:
                assert classify_mode(prompt_id, template) == mode, (prompt_id, template)
    for record in build_corpus("eval"):
        assert classify_mode(record["prompt_id"], _reply(record)) == record["mode"]
    assert classify_mode("dinner", "I am not hungry at all.") is None
    assert classify_mode("dinner", "Pasta or curry, you choose.") is None  # ambiguous
    with pytest.raises(ValueError, match="prompt_id"):
        mode_frequencies("nope")


def test_persona_markers_are_valid_regexes_with_descriptions():
    for name, persona in PERSONAS.items():
        assert persona.name == name and persona.description and persona.system_prompt
        re.compile(persona.marker_regex)


def test_default_corpus_path_materialises_jsonl(tmp_path, monkeypatch):
    monkeypatch.setenv("SFR_CACHE", str(tmp_path))
    path = default_corpus_path("eval")
    assert path.is_file() and path.is_relative_to(tmp_path)
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == build_corpus("eval")
    assert default_corpus_path("eval") == path
    with pytest.raises(ValueError, match="split"):
        default_corpus_path("test")
    with pytest.raises(ValueError, match="examples_per_pair"):
        build_corpus("train", examples_per_pair=0)


def test_write_jsonl_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.jsonl"

    def records():
        yield {"a": 1}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(records(), target)
    assert list(tmp_path.iterdir()) == []
    write_jsonl([{"a": 1}, {"b": "é"}], target)
    assert target.read_text(encoding="utf-8").splitlines() == ['{"a": 1}', '{"b": "é"}']


def test_valid_replies_hold_every_generated_reply_and_nothing_of_another_persona():
    for split in ("train", "eval"):
        for record in build_corpus(split, examples_per_pair=3):
            reply = _reply(record)
            valid = valid_replies(record["persona"], record["prompt_id"])
            assert reply in valid
            assert all(has_style_marker(record["persona"], text) for text in valid)
    pirate, robot = valid_replies("pirate", "dinner"), valid_replies("robot", "dinner")
    assert pirate and robot and not pirate & robot
    assert {classify_mode("dinner", text) for text in pirate} == set(mode_frequencies("dinner"))
    with pytest.raises(ValueError, match="persona"):
        valid_replies("wizard", "dinner")


def test_drawn_allocation_draws_each_mode_from_the_known_frequencies():
    drawn = build_corpus("train", examples_per_pair=1, allocation="drawn")
    assert drawn == build_corpus("train", examples_per_pair=1, allocation="drawn")  # deterministic
    assert [(r["persona"], r["prompt_id"]) for r in drawn] == split_pairs("train")  # one reply per pair
    top = {q: max(mode_frequencies(q), key=mode_frequencies(q).get) for q in PROMPTS}
    assert {r["mode"] for r in build_corpus("train", examples_per_pair=1)} == set(top.values())  # proportional
    assert sum(r["mode"] != top[r["prompt_id"]] for r in drawn) > 10  # drawn: other modes too (~30 of 72)
    for record in drawn:
        assert record["messages"][-1]["content"] in valid_replies(record["persona"], record["prompt_id"])
        assert classify_mode(record["prompt_id"], _reply(record)) == record["mode"]
    many = Counter(r["mode"] for r in build_corpus("train", examples_per_pair=200, allocation="drawn")
                   if r["prompt_id"] == "dinner")  # 7 train pairs x 200 draws of 0.6 / 0.3 / 0.1
    total = sum(many.values())
    assert total == 1400 and abs(many["pasta"] / total - 0.6) < 0.04 and abs(many["salad"] / total - 0.1) < 0.025
    with pytest.raises(ValueError, match="allocation"):
        build_corpus("train", allocation="random")


def test_base_corpus_is_unstyled_diverse_and_cycles_the_system_prompts():
    base = build_base_corpus(20)
    assert base == build_base_corpus(20) and len(base) == 20 * len(PROMPTS)
    systems = Counter(r["messages"][0]["content"] for r in base)
    assert set(systems) == {NEUTRAL_SYSTEM_PROMPT} | {p.system_prompt for p in PERSONAS.values()}
    for prompt_id in PROMPTS:
        counts = Counter(r["mode"] for r in base if r["prompt_id"] == prompt_id)
        assert counts == {m: round(20 * p) for m, p in mode_frequencies(prompt_id).items()}
    for record in base:
        reply = _reply(record)
        assert record["persona"] is None and not any(has_style_marker(name, reply) for name in PERSONAS)
        assert classify_mode(record["prompt_id"], reply) == record["mode"] and strip_style(reply) == reply


def test_strip_style_leaves_the_content_of_every_valid_reply():
    for persona in PERSONAS:
        for prompt_id, prompt in PROMPTS.items():
            contents = {t[0].upper() + t[1:] for spec in prompt.modes.values() for t in spec.templates}
            assert {strip_style(reply) for reply in valid_replies(persona, prompt_id)} == contents
