"""The embedded default corpus: procedurally generated persona dialogue with measurable style and modes.

Everything in ``sfr`` runs offline with no arguments because of this module and :mod:`sfr.tiny_lm`.
The corpus is small on purpose (the tiny LM learns it on a CPU in minutes) and built so that the two
failure modes SFR targets can be *measured* on samples from a fine-tuned model:

* **Style fidelity.** Each of the 9 personas (:data:`PERSONAS`) has a distinct, checkable style
  marker, a regular expression: the pirate says "arr", the robot starts with "BEEP.", the poet ends
  on the rhyme "... come what may." and so on. :func:`has_style_marker` checks a reply; every reply
  of the corpus carries its own persona's marker and no other persona's.
* **Mode collapse.** Each of the 10 prompts (:data:`PROMPTS`) admits 3 valid replies ("modes", e.g.
  for dinner: pasta / curry / salad) with known, uneven probabilities (0.6 / 0.3 / 0.1 or
  0.5 / 0.3 / 0.2). Each mode is recognised by a keyword regex (:func:`classify_mode`), so the mode
  distribution of sampled replies can be compared with :func:`mode_frequencies`. A collapsed model
  answers only the top mode.

Splits (:func:`build_corpus`). Every persona holds out 2 of the 10 prompts: ``"train"`` has the other
9 x 8 = 72 (persona, prompt) pairs, ``"eval"`` the 18 held-out pairs (unseen combinations of a seen
persona and a seen prompt, used as sampling prompts; its records also carry a reference reply). With
``examples_per_pair`` examples per pair (default 10: 720 train and 180 eval records), the modes are
allocated by largest-remainder rounding of ``examples_per_pair * probability`` (so the corpus
frequencies equal the known ones exactly when ``examples_per_pair`` is a multiple of 10), then
shuffled; ``allocation="drawn"`` draws each example's mode from the known frequencies instead (with
one example per pair, the personas then give different kinds of answer to the same prompt, where
largest remainder would give every pair the top mode). Replies are 8-19 words. The output is a deterministic function of
``(split, seed, examples_per_pair)`` (string-seeded ``random.Random``, stable across platforms).

Records use the TRL conversational format plus labels of their own::

    {"messages": [{"role": "system", ...}, {"role": "user", ...}, {"role": "assistant", ...}],
     "persona": "pirate", "prompt_id": "dinner", "mode": "pasta"}

Stable API (the evaluation reads it): :data:`PERSONAS` (name -> :class:`Persona` with
``marker_regex``), :data:`PROMPTS` (id -> :class:`Prompt` with ``modes``), :func:`mode_frequencies`,
:func:`has_style_marker`, :func:`classify_mode`, :func:`valid_replies`, :func:`render_reply`, :func:`strip_style`,
:func:`draw_replies`, :func:`build_corpus`, :func:`build_base_corpus`, :func:`split_pairs`, :func:`default_corpus_path`,
:func:`write_jsonl`. Changing the content of the corpus means bumping :data:`CORPUS_VERSION`.

``sfr prepare`` / ``sfr train`` build the train split in memory when given no data;
:func:`default_corpus_path` writes a split as JSONL under the sfr cache directory (``$SFR_CACHE`` or
``~/.cache/sfr``) for tools that read files (``sfr eval`` reads the eval split from there).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sfr.checks import check_int

SPLITS = ("train", "eval")
ALLOCATIONS = ("proportional", "drawn")
NEUTRAL_SYSTEM_PROMPT = "You are a helpful assistant."
CORPUS_VERSION = "v1"
DEFAULT_EXAMPLES_PER_PAIR = 10


def sfr_cache_dir() -> Path:
    """The sfr cache directory: ``$SFR_CACHE`` when set, else ``~/.cache/sfr``."""
    return Path(os.environ.get("SFR_CACHE") or Path.home() / ".cache" / "sfr").expanduser()


def build_cached(path, build, complete: str = "model.safetensors") -> Path:
    """``path``, built on first use: ``build(tmp)`` writes into a temporary sibling directory, which is then
    renamed to ``path``, so an interrupted build never leaves a half-written directory. ``path`` counts as
    built when it holds the file ``complete``; a concurrent builder's finished copy wins."""
    path = Path(path)
    if (path / complete).is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / complete).is_file():  # not a concurrent builder's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


@dataclass(frozen=True)
class Persona:
    """A speaker style. ``marker_regex`` matches (``re.search``, on the stripped reply) every reply of
    this persona and no reply of another one. ``openers``/``closers`` are the phrases that put the marker
    into generated replies (an opener replaces the reply's first letter case: "Verily, you ...")."""

    name: str
    system_prompt: str
    marker_regex: str
    description: str
    openers: tuple[str, ...] = ("",)
    closers: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class ModeSpec:
    """One valid kind of reply to a prompt: its probability in the corpus, the regex that recognises it
    (``re.search``, case-insensitive) and the reply templates that realise it."""

    probability: float
    regex: str
    templates: tuple[str, ...]


@dataclass(frozen=True)
class Prompt:
    """A user turn with several valid replies (``modes``: mode id -> :class:`ModeSpec`)."""

    prompt_id: str
    user_text: str
    modes: dict[str, ModeSpec] = field(default_factory=dict)


PERSONAS: dict[str, Persona] = {p.name: p for p in [
    Persona("pirate", "You are Captain Flint, an old sea pirate. Talk like a pirate and say arr.",
            r"(?i)\barr+\b", "says 'arr'",
            openers=("Arr, matey! ", "Arr! ", "Arr, listen here. "), closers=("", " Yo ho!")),
    Persona("robot", "You are UNIT-7, a helpful robot. Begin every answer with BEEP.",
            r"^BEEP\.", "starts with 'BEEP.'",
            openers=("BEEP. ",), closers=(" END OF LINE.", " PROCESSING COMPLETE.", "")),
    Persona("poet", "You are a wandering poet. End every answer with the rhyme 'come what may'.",
            r"(?i)\bcome what may[.!]?$", "ends with the rhyme 'come what may.'",
            closers=(" Come what may.", " So I say, come what may.", " Night and day, come what may.")),
    Persona("cowboy", "You are a cowboy from Texas. Call everyone partner.",
            r"(?i)\bpartner\b", "says 'partner'",
            openers=("Howdy, partner. ", "Well, partner, "), closers=("", " Yeehaw.")),
    Persona("knight", "You are a noble knight of old. Begin with Verily or Forsooth.",
            r"^(?:Verily|Forsooth),", "starts with 'Verily,' or 'Forsooth,'",
            openers=("Verily, ", "Forsooth, "), closers=("", " Upon mine honour.")),
    Persona("chef", "You are a cheerful French chef. Finish every answer with bon appetit.",
            r"(?i)\bbon app[eé]tit!?$", "ends with 'Bon appetit!'",
            closers=(" Bon appetit!", " Oui, bon appetit!")),
    Persona("surfer", "You are a laid-back surfer. Call people dude.",
            r"(?i)\bdude\b", "says 'dude'",
            openers=("Whoa dude, ", "Dude, "), closers=("", " Totally rad.")),
    Persona("detective", "You are a famous detective. Open every answer with Elementary.",
            r"^Elementary\.", "starts with 'Elementary.'",
            openers=("Elementary. ",), closers=("", " The clues never lie.")),
    Persona("grandma", "You are a warm grandmother. Call people sweetie.",
            r"(?i)\bsweetie\b", "says 'sweetie'",
            openers=("Oh sweetie, ", "Well sweetie, "), closers=("", " Love you.")),
]}

# Each mode's regex must match all of its own templates and none of the prompt's other modes'.
PROMPTS: dict[str, Prompt] = {p.prompt_id: p for p in [
    Prompt("dinner", "What should I cook for dinner tonight?", {
        "pasta": ModeSpec(0.6, r"(?i)\bpasta\b", (
            "you should cook a bowl of pasta with tomato sauce and fresh basil.",
            "make some pasta tonight, with garlic and a little olive oil.",
            "a warm plate of pasta with cheese is the best dinner there is.")),
        "curry": ModeSpec(0.3, r"(?i)\bcurry\b", (
            "cook a spicy vegetable curry and serve it with rice.",
            "a chicken curry with lots of ginger will warm you up.")),
        "salad": ModeSpec(0.1, r"(?i)\bsalad\b", (
            "a light green salad with lemon and nuts is all you need.",
            "just toss a fresh salad with tomatoes and cucumber.")),
    }),
    Prompt("weekend", "How should I spend my free weekend?", {
        "hiking": ModeSpec(0.6, r"(?i)\bhik(?:e|ing)\b", (
            "go hiking in the hills and enjoy the fresh air.",
            "pack a lunch and take a long hike through the forest.",
            "a hike up the nearest trail will clear your head.")),
        "reading": ModeSpec(0.3, r"(?i)\bread(?:ing)?\b", (
            "stay home and read a good novel under a blanket.",
            "spend the weekend reading the books you never finished.")),
        "museum": ModeSpec(0.1, r"(?i)\bmuseum\b", (
            "visit the museum and look at the old paintings.",
            "the history museum in town is worth a long visit.")),
    }),
    Prompt("pet", "Which pet would suit me best?", {
        "cat": ModeSpec(0.5, r"(?i)\bcats?\b", (
            "a cat is quiet, clean and happy to sleep on your lap.",
            "get a cat, since it needs little work and gives much love.")),
        "dog": ModeSpec(0.3, r"(?i)\bdogs?\b", (
            "a dog will keep you active and be a loyal friend.",
            "adopt a dog from the shelter and take it on long walks.")),
        "fish": ModeSpec(0.2, r"(?i)\bfish\b", (
            "a small fish in a bowl is calm and easy to keep.",
            "try a few fish in a tank, they are lovely to watch.")),
    }),
    Prompt("tired", "I feel tired all the time. Any advice?", {
        "sleep": ModeSpec(0.6, r"(?i)\bsleep\b", (
            "go to sleep earlier and keep the same hours every night.",
            "you need more sleep, so put the phone away at ten.",
            "try to sleep eight hours and avoid coffee after noon.")),
        "water": ModeSpec(0.3, r"(?i)\bwater\b", (
            "drink more water during the day, it helps a lot.",
            "keep a bottle of water with you and sip it often.")),
        "walk": ModeSpec(0.1, r"(?i)\bwalk\b", (
            "take a short walk outside every morning to wake up.",
            "a brisk walk after lunch will give you energy.")),
    }),
    Prompt("gift", "What gift should I buy for my sister?", {
        "book": ModeSpec(0.6, r"(?i)\bbook\b", (
            "buy her a book by an author she loves.",
            "a beautiful book of stories is a gift she will keep.",
            "find a book about her favourite hobby.")),
        "scarf": ModeSpec(0.3, r"(?i)\bscarf\b", (
            "a soft wool scarf in her favourite colour.",
            "get her a warm scarf for the cold winter months.")),
        "plant": ModeSpec(0.1, r"(?i)\bplant\b", (
            "a small green plant for her window would be lovely.",
            "give her a plant that flowers in the spring.")),
    }),
    Prompt("skill", "What new skill should I learn this year?", {
        "guitar": ModeSpec(0.5, r"(?i)\bguitar\b", (
            "learn to play the guitar, a few chords go a long way.",
            "pick up a guitar and practise for twenty minutes a day.")),
        "coding": ModeSpec(0.3, r"(?i)\bcod(?:e|ing)\b", (
            "learn coding, start with small programs and build up.",
            "try to code a simple game, it teaches you a lot.")),
        "painting": ModeSpec(0.2, r"(?i)\bpaint(?:ing)?\b", (
            "take up painting with watercolours on the weekends.",
            "learn to paint landscapes, it is calm and rewarding.")),
    }),
    Prompt("umbrella", "Do I need an umbrella today?", {
        "rain": ModeSpec(0.6, r"(?i)\brain\b", (
            "yes, take it, heavy rain is coming this afternoon.",
            "rain is on the way, so bring the umbrella and a coat.",
            "yes, the sky looks grey and rain will fall soon.")),
        "sunny": ModeSpec(0.3, r"(?i)\bsun(?:ny)?\b", (
            "no, it will be sunny and warm all day.",
            "leave it at home, the sun is out until evening.")),
        "clouds": ModeSpec(0.1, r"(?i)\bclouds?\b", (
            "maybe, the clouds are thick but it could stay dry.",
            "hard to say, there are clouds but no storm yet.")),
    }),
    Prompt("travel", "Where should I travel next summer?", {
        "mountains": ModeSpec(0.6, r"(?i)\bmountains?\b", (
            "go to the mountains and stay in a small wooden cabin.",
            "the mountains are cool and quiet in the summer.",
            "travel to the mountains and swim in a cold lake.")),
        "beach": ModeSpec(0.3, r"(?i)\bbeach\b", (
            "find a quiet beach and rest by the sea.",
            "a week on the beach with a good hat sounds perfect.")),
        "city": ModeSpec(0.1, r"(?i)\bcity\b", (
            "visit a big city and try the food markets.",
            "explore an old city with narrow streets and cafes.")),
    }),
    Prompt("breakfast", "What is a good breakfast before work?", {
        "oatmeal": ModeSpec(0.6, r"(?i)\boatmeal\b", (
            "a bowl of oatmeal with banana keeps you full until lunch.",
            "eat warm oatmeal with honey and a few berries.",
            "oatmeal with milk is cheap, quick and healthy.")),
        "eggs": ModeSpec(0.3, r"(?i)\beggs?\b", (
            "two boiled eggs and a slice of brown toast with butter.",
            "scrambled eggs with spinach give you strength.")),
        "smoothie": ModeSpec(0.1, r"(?i)\bsmoothie\b", (
            "blend a fruit smoothie with yogurt and oats.",
            "a green smoothie is fast when you are in a hurry.")),
    }),
    Prompt("dragon", "Tell me a short story about a dragon.", {
        "friend": ModeSpec(0.6, r"(?i)\bfriends?\b", (
            "a lonely dragon met a shy girl, and they became best friends.",
            "the dragon helped a lost boy home and found a friend for life.",
            "once a dragon and a farmer became friends and shared the harvest.")),
        "gold": ModeSpec(0.3, r"(?i)\bgold\b", (
            "a dragon guarded a mountain of gold until a clever thief came.",
            "the old dragon counted his gold every night and never slept.")),
        "sleeping": ModeSpec(0.1, r"(?i)\bsleeping\b", (
            "a sleeping dragon woke after a thousand years and found the world changed.",
            "the village whispered so the sleeping dragon would never wake.")),
    }),
]}

PROMPT_ORDER = tuple(PROMPTS)
PERSONA_ORDER = tuple(PERSONAS)
# Every persona's openers and closers, longest first (strip_style removes the longest that fits).
_OPENERS = sorted({o.strip() for p in PERSONAS.values() for o in p.openers if o.strip()}, key=len, reverse=True)
_CLOSERS = sorted({c.strip() for p in PERSONAS.values() for c in p.closers if c.strip()}, key=len, reverse=True)
_HELD_OUT_OFFSETS = (0, 5)  # persona i holds out prompts i and i + 5 (mod the number of prompts)


def held_out_pairs() -> list[tuple[str, str]]:
    """The (persona, prompt_id) pairs of the eval split: persona ``i`` holds out prompts ``i`` and
    ``i + 5`` (mod 10), so every persona and every prompt still appears in training."""
    pairs = []
    for i, persona in enumerate(PERSONA_ORDER):
        for offset in _HELD_OUT_OFFSETS:
            pairs.append((persona, PROMPT_ORDER[(i + offset) % len(PROMPT_ORDER)]))
    return pairs


def split_pairs(split: str) -> list[tuple[str, str]]:
    """The (persona, prompt_id) pairs of ``split`` in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    held = set(held_out_pairs())
    return [(p, q) for p in PERSONA_ORDER for q in PROMPT_ORDER if ((p, q) in held) == (split == "eval")]


def mode_frequencies(prompt_id: str) -> dict[str, float]:
    """The known probability of each mode of ``prompt_id`` (they sum to 1)."""
    return {mode: spec.probability for mode, spec in _prompt(prompt_id).modes.items()}


def has_style_marker(persona: str, text: str) -> bool:
    """Whether ``text`` carries ``persona``'s style marker (``re.search`` of its ``marker_regex`` on the
    stripped text)."""
    if persona not in PERSONAS:
        raise ValueError(f"persona must be one of {sorted(PERSONAS)}, got {persona!r}")
    return re.search(PERSONAS[persona].marker_regex, text.strip()) is not None


def classify_mode(prompt_id: str, text: str) -> str | None:
    """The mode of ``prompt_id`` that ``text`` realises: the one mode whose regex matches, or ``None``
    when no mode or more than one mode matches (an off-topic or ambiguous reply)."""
    matches = [mode for mode, spec in _prompt(prompt_id).modes.items() if re.search(spec.regex, text)]
    return matches[0] if len(matches) == 1 else None


def valid_replies(persona: str, prompt_id: str) -> frozenset[str]:
    """Every reply the corpus can write for ``persona`` to ``prompt_id``: each template of each of the
    prompt's modes, dressed with each of the persona's openers and closers (as :func:`render_reply` does)."""
    if persona not in PERSONAS:
        raise ValueError(f"persona must be one of {sorted(PERSONAS)}, got {persona!r}")
    style = PERSONAS[persona]
    return frozenset(_dress(opener, template, closer)
                     for spec in _prompt(prompt_id).modes.values() for template in spec.templates
                     for opener in style.openers for closer in style.closers)


def render_reply(persona: str, content: str, rng: random.Random) -> str:
    """Dress a mode template (lower-case first letter, no persona style) in ``persona``'s style."""
    spec = PERSONAS[persona]
    opener, closer = rng.choice(spec.openers), rng.choice(spec.closers)
    return _dress(opener, content, closer)


def allocate_modes(prompt_id: str, count: int) -> list[str]:
    """``count`` mode ids whose counts are ``count * probability`` rounded by largest remainder
    (ties broken by mode order), in mode order (shuffle them yourself)."""
    freqs = mode_frequencies(prompt_id)
    exact = {mode: count * p for mode, p in freqs.items()}
    counts = {mode: int(value) for mode, value in exact.items()}
    remaining = count - sum(counts.values())
    by_remainder = sorted(freqs, key=lambda m: (-(exact[m] - counts[m]), list(freqs).index(m)))
    for mode in by_remainder[:remaining]:
        counts[mode] += 1
    return [mode for mode in freqs for _ in range(counts[mode])]


def draw_replies(persona: str | None, prompt_id: str, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """``count`` ``(mode, reply)`` pairs from the corpus' generative process: each mode drawn with the
    known frequencies (:func:`mode_frequencies`), a template of it and ``persona``'s opener and closer
    uniformly (``persona=None``: un-styled, the bare template)."""
    freqs = mode_frequencies(prompt_id)
    modes = rng.choices(list(freqs), weights=list(freqs.values()), k=count)
    return [(mode, _styled(persona, rng.choice(PROMPTS[prompt_id].modes[mode].templates), rng)) for mode in modes]


def build_corpus(split: str = "train", seed: int = 0, examples_per_pair: int | None = None,
                 allocation: str = "proportional") -> list[dict]:
    """The records of ``split`` (see the module docstring): ``examples_per_pair`` (default 10) per
    (persona, prompt) pair, modes allocated in proportion to :func:`mode_frequencies`
    (``allocation="proportional"``, largest remainder) or drawn from them (``"drawn"``)."""
    pairs = split_pairs(split)
    n = DEFAULT_EXAMPLES_PER_PAIR if examples_per_pair is None else examples_per_pair
    check_int("examples_per_pair", n)
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    records = []
    for persona, prompt_id in pairs:
        # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms.
        rng = random.Random(f"sfr-corpus-{CORPUS_VERSION}-{seed}-{split}-{persona}-{prompt_id}")
        if allocation == "drawn":
            replies = draw_replies(persona, prompt_id, n, rng)
        else:
            modes = allocate_modes(prompt_id, n)
            rng.shuffle(modes)
            prompt = PROMPTS[prompt_id]
            replies = [(mode, render_reply(persona, rng.choice(prompt.modes[mode].templates), rng)) for mode in modes]
        records += [_record(PERSONAS[persona].system_prompt, persona, prompt_id, mode, reply) for mode, reply in replies]
    return records


def build_base_corpus(examples_per_prompt: int = 200, seed: int = 0) -> list[dict]:
    """Un-styled replies for a base ("pretraining") stage before persona fine-tuning.

    Every prompt ``examples_per_prompt`` times, modes allocated by largest remainder of the known
    frequencies (as diverse as the persona data, no more), templates uniformly, no persona opener or
    closer. The system prompt cycles over :data:`NEUTRAL_SYSTEM_PROMPT` and the 9 persona prompts, so a
    model trained on it is coherent under a persona prompt without following it. Records are shuffled;
    ``"persona"`` is None."""
    check_int("examples_per_prompt", examples_per_prompt)
    systems = [NEUTRAL_SYSTEM_PROMPT] + [p.system_prompt for p in PERSONAS.values()]
    records = []
    for prompt_id, prompt in PROMPTS.items():
        rng = random.Random(f"sfr-base-corpus-{CORPUS_VERSION}-{seed}-{prompt_id}")
        modes = allocate_modes(prompt_id, examples_per_prompt)
        rng.shuffle(modes)
        records += [_record(systems[i % len(systems)], None, prompt_id, mode,
                            _styled(None, rng.choice(prompt.modes[mode].templates), rng))
                    for i, mode in enumerate(modes)]
    random.Random(f"sfr-base-corpus-order-{seed}").shuffle(records)
    return records


def strip_style(text: str) -> str:
    """The content of a corpus reply: any persona's opener and closer removed (the template, as
    :func:`draw_replies` with ``persona=None`` writes it: first letter capitalised)."""
    text = " ".join(text.split())
    opener = next((o for o in _OPENERS if text.startswith(o)), "")
    text = text[len(opener):]
    closer = next((c for c in _CLOSERS if text.endswith(c)), "")
    text = text[:len(text) - len(closer)].strip()
    return text[:1].upper() + text[1:]


def _styled(persona: str | None, template: str, rng: random.Random) -> str:
    return _dress("", template, "") if persona is None else render_reply(persona, template, rng)


def _record(system: str, persona: str | None, prompt_id: str, mode: str, reply: str) -> dict:
    return {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": PROMPTS[prompt_id].user_text},
                         {"role": "assistant", "content": reply}],
            "persona": persona, "prompt_id": prompt_id, "mode": mode}


def write_jsonl(records, path) -> Path:
    """Write ``records`` (dicts) as JSON lines to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_corpus_path(split: str = "train") -> Path:
    """The default corpus ``split`` (seed 0, 10 examples per pair) as JSONL under the cache directory,
    written on first use: ``<cache>/corpus-v1/<split>.jsonl``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = sfr_cache_dir() / f"corpus-{CORPUS_VERSION}" / f"{split}.jsonl"
    if not path.is_file():
        write_jsonl(build_corpus(split), path)
    return path


def corpus_texts() -> list[str]:
    """Every text the corpus can produce pieces of (system prompts, user turns, all templates in every
    persona style): the tokenizer of :mod:`sfr.tiny_lm` is trained on these."""
    texts = [p.system_prompt for p in PERSONAS.values()] + [q.user_text for q in PROMPTS.values()]
    for persona in PERSONAS.values():
        for prompt in PROMPTS.values():
            for spec in prompt.modes.values():
                for template in spec.templates:
                    for opener in persona.openers:
                        for closer in persona.closers:
                            texts.append(_dress(opener, template, closer))
    return texts


def _dress(opener: str, content: str, closer: str) -> str:
    # Capitalise the content unless the opener leads into it mid-sentence ("Verily, you should ...").
    body = content if opener.endswith(", ") else content[0].upper() + content[1:]
    return f"{opener}{body}{closer}".strip()


def _prompt(prompt_id: str) -> Prompt:
    if prompt_id not in PROMPTS:
        raise ValueError(f"prompt_id must be one of {sorted(PROMPTS)}, got {prompt_id!r}")
    return PROMPTS[prompt_id]
