"""Shared by the training tests: tiny Llama backbones built from a config, prepared rows for them,
training arguments, and one CPU thread.

Import the fixture into a test module (``from tiny_models import one_thread  # noqa: F401``) to make it
active there.
"""
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

from sfr.training_args import SFRTrainingArguments


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


D, E, V, T = 32, 8, 100, 12


def tiny_dataset(n=8, seed=0):
    """Prepared-data rows: equal lengths (padding-free), different prompt lengths and anchor counts."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, V, (T,), generator=g).tolist()
        prompt = 2 + i % 4
        labels = [-100] * prompt + ids[prompt:]
        positions = list(range(prompt - 1, T - 2, 2 + i % 2))
        targets = torch.nn.functional.normalize(torch.randn(len(positions), E, generator=g), dim=-1)
        rows.append(dict(input_ids=ids, labels=labels, anchor_positions=positions, anchor_targets=targets.tolist(),
                         anchor_segment_ends=[min(p + 4, T) for p in positions]))
    return Dataset.from_list(rows)



def make_args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                    logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                    seed=3, data_seed=3, phase_a_steps=1, ramp_steps=2, head_width=32, warmup_steps=0,
                    dataloader_num_workers=0)
    settings.update(overrides)
    return SFRTrainingArguments(**settings)


class StopAt(TrainerCallback):
    """Stop training after optimizer step ``step`` (to interrupt a run that a test then resumes)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
