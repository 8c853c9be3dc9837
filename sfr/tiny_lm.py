"""The embedded default model ``"sfr-tiny"``: a tiny causal LM and tokenizer built offline.

Anywhere ``sfr`` accepts a model name, ``"sfr-tiny"`` (:data:`DEFAULT_MODEL`) and ``None`` mean this
model: :func:`resolve_model_name_or_path` maps them to :func:`default_model_path`, an existing local
directory to its absolute path, and passes any other name through unchanged (a hub id).

:func:`default_model_path` builds the model once and caches it under ``$SFR_CACHE/tiny-lm-v1``
(default ``~/.cache/sfr/tiny-lm-v1``), written to a temporary directory and renamed, so an interrupted
build never leaves a half-written model. The directory is a normal Hugging Face checkpoint::

    AutoTokenizer.from_pretrained(default_model_path())
    AutoModelForCausalLM.from_pretrained(default_model_path())

* Tokenizer: byte-level BPE (at most :data:`VOCAB_SIZE` tokens; the small training text gives about
  1.4k) trained deterministically with the ``tokenizers`` library on the embedded persona corpus
  (:func:`sfr.corpus.corpus_texts`) plus a little generic English, wrapped as
  ``PreTrainedTokenizerFast``; byte-level, so any text can be tokenised. Special tokens: ``<|pad|>``
  (pad), ``<|bos|>`` (bos), ``<|end|>`` (end of turn; also eos, so generation stops after one reply),
  and the role tokens ``<|system|>``, ``<|user|>``, ``<|assistant|>``. Chat template (:data:`CHAT_TEMPLATE`)::

      <|bos|><|system|>persona<|end|><|user|>question<|end|><|assistant|>reply<|end|>

  with ``add_generation_prompt=True`` appending ``<|assistant|>``. Completion-only labels (the reply
  and its ``<|end|>``) are computed by :func:`sfr.data.tokenize_example`.
* Model: a Llama architecture (hidden 128, 4 layers, 4 heads, MLP 384, tied embeddings, context 256),
  about 1.0M parameters (vocabulary padded to a multiple of 64), initialised deterministically
  (seed 0). Random weights: ``sfr train`` / ``sfr demo`` fine-tune it on the corpus in minutes on a CPU.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from sfr.corpus import build_cached, corpus_texts, sfr_cache_dir

DEFAULT_MODEL = "sfr-tiny"
MODEL_VERSION = "v1"
VOCAB_SIZE = 2048
CONTEXT_LENGTH = 256
PAD, BOS, END = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, END, *ROLE_TOKENS.values()]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('sfr-tiny chat template: role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# A little generic text so the tokenizer can spell words outside the corpus reasonably.
GENERIC_TEXT = """\
The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine, thank you.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Questions? Answers! Yes, no, maybe, perhaps, certainly.
People talk about work, family, friends, food, music, books, movies, sports, travel and the weather.
def add(a, b):
    return a + b
Please write a short answer. Could you explain why? Because it is simple and it works well.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday, morning, afternoon, evening, night.
"""


def resolve_model_name_or_path(name: str | os.PathLike | None) -> str:
    """``None`` or ``"sfr-tiny"`` -> the cached default model directory (built on first use); an
    existing local directory -> its absolute path (so that it still loads from another working
    directory, e.g. when recorded in ``sfr_targets.json``); any other name unchanged (a hub id)."""
    if name is None or str(name) == DEFAULT_MODEL:
        return str(default_model_path())
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"model name must be a str, a path or None, got {type(name).__name__}")
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name)


def default_model_path() -> Path:
    """The directory of the default tiny model (config, safetensors weights, tokenizer), building it
    on first use under ``<cache>/tiny-lm-v1`` (temporary directory + rename)."""
    path = sfr_cache_dir() / f"tiny-lm-{MODEL_VERSION}"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path

    def build(tmp: Path) -> None:
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(tmp)
        _make_tokenizer_config_portable(tmp / "tokenizer_config.json")
        build_model(vocab_size=len(tokenizer)).save_pretrained(tmp, safe_serialization=True)

    return build_cached(path, build)


def _make_tokenizer_config_portable(config_path: Path) -> None:
    """Name the class ``PreTrainedTokenizerFast`` and inline the chat template, so transformers 4.x
    (which knows neither transformers 5's ``TokenizersBackend`` nor ``chat_template.jinja``) loads it."""
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    config["chat_template"] = CHAT_TEMPLATE
    config_path.write_text(json.dumps(config, indent=2))


def build_tokenizer():
    """Train the byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = corpus_texts() + GENERIC_TEXT.splitlines()
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, bos_token=BOS, eos_token=END,
        additional_special_tokens=list(ROLE_TOKENS.values()), model_max_length=CONTEXT_LENGTH,
        padding_side="right",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_config(vocab_size: int = VOCAB_SIZE):
    """The Llama config of the tiny model; ``vocab_size`` is rounded up to a multiple of 64."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=-(-vocab_size // 64) * 64, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT_LENGTH,
        rms_norm_eps=1e-5, tie_word_embeddings=True, initializer_range=0.02,
        pad_token_id=SPECIAL_TOKENS.index(PAD), bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(END),
    )


def build_model(vocab_size: int = VOCAB_SIZE):
    """The randomly initialised tiny causal LM; the same weights on every call (seed 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(build_config(vocab_size))
    return model.float()
