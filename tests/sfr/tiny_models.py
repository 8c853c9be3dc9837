"""Shared by the training tests: tiny Llama backbones built from a config, and one CPU thread.

Import the fixture into a test module (``from tiny_models import one_thread  # noqa: F401``) to make it
active there.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def tiny_backbone(seed: int = 0, hidden_size: int = 32, vocab_size: int = 100, tie: bool = False):
    """A 2-layer Llama causal LM with random weights (``seed``), eager attention, float32."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=64, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread.

    The models are tiny: with two threads on two busy cores, OpenMP's spinning makes each matmul
    about 100x slower than on one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
