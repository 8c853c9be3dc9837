"""Sampling replies / completions from a causal LM: batched ``transformers`` generate, optional vLLM.

:func:`sample` takes prompts either as plain strings (used as is: completion style) or as chat
message lists (``[{"role": ..., "content": ...}, ...]``, rendered with the tokenizer's chat template
and ``add_generation_prompt=True``), and returns ``n`` decoded continuations per prompt.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from typing import Sequence

from sfr.checks import check_int

BACKENDS = ("auto", "transformers", "vllm")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(backend: str, model) -> str:
    """The sampling backend for ``model`` (a name/path or a loaded model): ``"transformers"`` or ``"vllm"``.

    ``"auto"`` picks vLLM only when it is installed, CUDA is available and ``model`` is a name/path (vLLM
    loads models itself); ``"vllm"`` without vLLM installed, or with a loaded model, is a ``ValueError``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    by_name = isinstance(model, (str, os.PathLike))
    if backend == "vllm":
        if not vllm_available():
            raise ValueError("backend='vllm' but vLLM is not installed (pip install vllm), or use --backend transformers")
        if not by_name:
            raise ValueError("backend='vllm' needs a model name or path, not a loaded model")
        return "vllm"
    if backend == "auto" and by_name and vllm_available():
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


def load_model(name_or_path, device: str | None = None, dtype=None):
    """``(model, tokenizer)`` for sampling, in eval mode (:func:`sfr.loading.load_model_and_tokenizer`):
    on ``device`` (default: CUDA when available), in ``dtype`` (default: bf16 on a CUDA device that supports
    it, else float32). ``OSError`` naming the model when it does not load."""
    import torch

    from sfr.loading import load_model_and_tokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return load_model_and_tokenizer(name_or_path, device=device, dtype=dtype)


def _is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in prompt)


def render_prompts(tokenizer, prompts) -> tuple[list[str], bool]:
    """Prompts -> strings; returns (texts, templated). Message lists need a chat template."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise TypeError("prompts must be a non-empty list of strings or of chat message lists")
    if all(isinstance(p, str) for p in prompts):
        return list(prompts), False
    if all(_is_messages(p) for p in prompts):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompts are chat message lists but the tokenizer has no chat template; "
                             "pass plain-text prompts instead")
        return [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
                for p in prompts], True
    raise TypeError("prompts must all be strings or all be chat message lists ([{'role':..., 'content':...}])")


@contextlib.contextmanager
def _left_padding(tokenizer):
    side, truncation_side = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right end
    tokenizer.truncation_side = "left"  # an over-long prompt keeps its end (the turn to answer)
    added_pad = tokenizer.pad_token is None
    if added_pad:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, truncation_side
        if added_pad:
            tokenizer.pad_token = None


def _context_budget(model, tokenizer, max_new_tokens: int) -> tuple[int, int | None]:
    """``(max_new_tokens, longest prompt)`` that fit the model's context together; ``None``: no limit.

    A request longer than half the context is capped at half (with a warning), so the prompt always
    keeps the other half: a small model (the embedded tiny LM has 256 positions) still runs with
    defaults meant for real ones (``sfr eval code`` asks for 512 new tokens).
    """
    limits = [getattr(getattr(model, "config", None), "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    limits = [int(v) for v in limits if isinstance(v, int) and 1 < v < 10**7]
    if not limits:
        return max_new_tokens, None
    context = min(limits)
    if max_new_tokens > context // 2:
        warnings.warn(f"max_new_tokens={max_new_tokens} does not fit the model's context of {context} tokens "
                      f"with a prompt: generating at most {context // 2} new tokens", RuntimeWarning, stacklevel=3)
        max_new_tokens = context // 2
    return max_new_tokens, context - max_new_tokens


def sample(model, tokenizer, prompts, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0, backend: str = "auto",
           progress: bool = True) -> list[list[str]]:
    """``n`` sampled continuations of each prompt: returns ``out[prompt_index][sample_index]`` (str).

    ``temperature == 0`` means greedy decoding (then the n samples are identical). Prompts are
    expanded n times and generated ``batch_size`` sequences at a time, left padded. Only the new
    tokens are decoded (special tokens skipped). ``max_new_tokens`` is capped at half the model's
    context (with a warning), and a prompt longer than the rest keeps its right end (left truncation). ``seed`` seeds torch before sampling, so a
    run is reproducible on the same device. ``backend`` (:func:`resolve_backend`): ``"vllm"`` (or
    ``"auto"`` with vLLM installed, CUDA and ``model`` a name/path) samples with vLLM instead.
    """
    check_int("n", n)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    check_int("max_new_tokens", max_new_tokens)
    check_int("batch_size", batch_size)
    if resolve_backend(backend, model) == "vllm":
        from sfr.tiny_lm import resolve_model_name_or_path  # lazy: builds the tiny model on first use

        return _sample_vllm(resolve_model_name_or_path(model), prompts, n, temperature, top_p, max_new_tokens, seed)
    if isinstance(model, (str, os.PathLike)):
        model, tokenizer = load_model(model)
    return _sample_transformers(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, batch_size,
                                seed, progress)


def _sample_transformers(model, tokenizer, prompts, n, temperature, top_p, max_new_tokens, batch_size, seed,
                         progress):
    import torch
    from tqdm.auto import tqdm

    texts, templated = render_prompts(tokenizer, prompts)
    expanded = [(i, text) for i, text in enumerate(texts) for _ in range(n)]
    outputs: list[list[str]] = [[] for _ in texts]
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    max_new_tokens, budget = _context_budget(model, tokenizer, max_new_tokens)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0)
    if temperature > 0:
        kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
    eos = [t for t in {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
           if t is not None]
    flat_eos = sorted({e for t in eos for e in (t if isinstance(t, list) else [t])})
    with _left_padding(tokenizer), torch.no_grad():
        kwargs.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=flat_eos or None)
        for start in tqdm(range(0, len(expanded), batch_size), desc="sampling", disable=not progress,
                          unit="batch"):
            chunk = expanded[start:start + batch_size]
            batch = tokenizer([text for _, text in chunk], return_tensors="pt", padding=True,
                              add_special_tokens=not templated, truncation=budget is not None,
                              max_length=budget).to(device)
            generated = model.generate(**batch, **kwargs)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            for (index, _), text in zip(chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                outputs[index].append(text)
    return outputs


def _sample_vllm(path, prompts, n, temperature, top_p, max_new_tokens, seed):  # pragma: no cover - no vLLM here
    import gc

    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, seed=seed)
    try:
        texts, _ = render_prompts(llm.get_tokenizer(), prompts)
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        return [[choice.text for choice in result.outputs] for result in llm.generate(texts, params)]
    finally:  # free the GPU for the transformers model that scores likelihoods next
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
