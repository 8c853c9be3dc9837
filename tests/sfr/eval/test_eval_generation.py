"""sfr.eval.generation: loading for sampling, prompts, batched sampling, the context budget, the backend."""
import math

import pytest
import torch
from tiny_chat import MESSAGES

from sfr.eval.dialogue import reply_nll
from sfr.eval.generation import load_model, render_prompts, resolve_backend, sample


def test_load_model_for_sampling_is_in_eval_mode_float32_on_the_cpu(tiny):
    model, tokenizer = tiny
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device == torch.device("cpu") and tokenizer.chat_template
    with pytest.raises(OSError, match="cannot load model"):
        load_model("/nonexistent/sfr-model", device="cpu")


def test_render_prompts_takes_strings_or_message_lists(tiny):
    _, tokenizer = tiny
    assert render_prompts(tokenizer, ["a", "b c"]) == (["a", "b c"], False)  # completion style: as is
    texts, templated = render_prompts(tokenizer, MESSAGES)
    expected = tokenizer.apply_chat_template(MESSAGES[1], tokenize=False, add_generation_prompt=True)
    assert templated and texts[1] == expected and "You are a robot." in texts[1]
    for bad in ("one string", [], ["text", MESSAGES[0]]):
        with pytest.raises(TypeError, match="prompts must"):
            render_prompts(tokenizer, bad)

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        render_prompts(NoTemplate(), MESSAGES)


def test_sampling_leaves_the_tokenizer_as_it_was(tiny):
    model, tokenizer = tiny
    before = (tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token)
    sample(model, tokenizer, MESSAGES, n=2, max_new_tokens=4, batch_size=3, progress=False)
    assert (tokenizer.padding_side, tokenizer.truncation_side, tokenizer.pad_token) == before


def test_sample_shapes_seed_and_greedy(tiny):
    model, tokenizer = tiny
    first = sample(model, tokenizer, MESSAGES, n=3, temperature=1.0, max_new_tokens=8, batch_size=4, seed=5,
                   progress=False)
    assert [len(replies) for replies in first] == [3, 3] and all(isinstance(r, str) for r in first[0])
    again = sample(model, tokenizer, MESSAGES, n=3, temperature=1.0, max_new_tokens=8, batch_size=4, seed=5,
                   progress=False)
    assert again == first
    greedy = sample(model, tokenizer, ["Hello there"], n=2, temperature=0.0, max_new_tokens=6, progress=False)
    assert greedy[0][0] == greedy[0][1]
    # left padding: a prompt's greedy reply does not depend on the other prompts of its batch
    alone = sample(model, tokenizer, MESSAGES[:1], n=1, temperature=0.0, max_new_tokens=6, progress=False)
    batched = sample(model, tokenizer, MESSAGES, n=1, temperature=0.0, max_new_tokens=6, batch_size=2, progress=False)
    assert batched[0] == alone[0]
    texts, templated = render_prompts(tokenizer, MESSAGES)
    assert templated and "You are a pirate." in texts[0]
    with pytest.raises(TypeError):
        render_prompts(tokenizer, ["text", MESSAGES[0]])
    with pytest.raises(ValueError, match="n must"):
        sample(model, tokenizer, MESSAGES, n=0)


def test_long_prompts_are_cut_from_the_left_to_fit_the_context(tiny, monkeypatch):
    model, tokenizer = tiny
    limit = model.config.max_position_embeddings
    long_turn = "pasta " * (3 * limit)
    messages = [[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": long_turn}]]
    replies = sample(model, tokenizer, messages, n=2, max_new_tokens=8, progress=False)
    assert len(replies[0]) == 2
    # A request as long as the context is capped at half of it, so the prompt keeps the other half.
    calls = []
    generate = model.generate

    def spy(**kwargs):  # what generate is asked for and the prompt length it gets
        calls.append((kwargs["input_ids"].shape[1], kwargs["max_new_tokens"]))
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", spy)
    with pytest.warns(RuntimeWarning, match=f"at most {limit // 2} new tokens"):
        capped = sample(model, tokenizer, messages, n=2, max_new_tokens=limit, progress=False)
    assert len(capped[0]) == 2
    assert calls == [(limit - limit // 2, limit // 2)]  # the prompt, cut from the left, fills the other half
    total, count = reply_nll(model, tokenizer, messages, [" Arr!"])
    assert count > 0 and math.isfinite(total)


def test_backend_choice(monkeypatch):
    from sfr.eval import generation

    assert resolve_backend("transformers", "sfr-tiny") == "transformers"
    assert resolve_backend("auto", object()) == "transformers"  # a loaded model: always transformers
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("onnx", "sfr-tiny")
    monkeypatch.setattr(generation, "vllm_available", lambda: False)
    assert resolve_backend("auto", "sfr-tiny") == "transformers"
    with pytest.raises(ValueError, match="vLLM is not installed"):
        resolve_backend("vllm", "sfr-tiny")
    monkeypatch.setattr(generation, "vllm_available", lambda: True)
    with pytest.raises(ValueError, match="needs a model name or path"):
        resolve_backend("vllm", object())
    assert resolve_backend("vllm", "sfr-tiny") == "vllm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto", "sfr-tiny") == "transformers"  # vLLM only with CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend("auto", "sfr-tiny") == "vllm"
