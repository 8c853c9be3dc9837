"""LoRA backbones with peft: adapters on the backbone, the full flow head, and what a run writes.

``sfr train --lora-r R`` wraps the loaded causal LM in a ``peft.PeftModel`` (:func:`apply_lora`); the
backbone's own weights are frozen and only the adapters and the head train. :class:`sfr.model.SFRModel`
reads the final hidden states and the LM head through the wrapper (``get_base_model``), and its
``save_pretrained`` goes through ``PeftModel.save_pretrained``, so ``OUTPUT_DIR`` holds the adapter
(``adapter_config.json``, ``adapter_model.safetensors``: ``PeftModel.from_pretrained(base, OUTPUT_DIR)``)
next to ``sfr_head/``. ``--merge-lora`` also writes ``OUTPUT_DIR/merged/``: the base model with the adapter
merged in (a plain transformers model) and a copy of ``sfr_head/`` (:func:`merge_saved_adapter`, from
the saved files, so it works whatever engine trained the run).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from torch import nn

MERGED_DIR = "merged"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA needs peft: pip install 'sfr[lora]' (or pip install peft)") from None
    return peft


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (without importing peft when it is not loaded)."""
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def apply_lora(backbone: nn.Module, r: int, alpha: float | None = None, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear"):
    """``backbone`` with LoRA adapters of rank ``r`` on ``target_modules`` (peft's ``get_peft_model``).

    ``alpha`` defaults to ``2 r``; ``target_modules="all-linear"`` is every linear layer but the output
    layer (peft's rule); a comma-separated string names modules (``"q_proj,v_proj"``). The base weights
    are frozen; the adapters start as a zero update (peft's initialisation), so step 0 is the base model.
    """
    peft = _peft()
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
    config = peft.LoraConfig(r=int(r), lora_alpha=float(alpha if alpha is not None else 2 * r),
                             lora_dropout=float(dropout), target_modules=target_modules, task_type="CAUSAL_LM")
    return peft.get_peft_model(backbone, config)


def load_adapter_weights(model, folder: str | Path) -> None:
    """Load ``folder/adapter_model.safetensors`` (a checkpoint of a LoRA run) into the PeftModel ``model``."""
    from safetensors.torch import load_file

    weights = Path(folder) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"resume_from_checkpoint: {folder} has no {ADAPTER_WEIGHTS} (not written by a LoRA run)")
    result = _peft().set_peft_model_state_dict(model, load_file(str(weights)))
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"resume_from_checkpoint: {weights} does not match the adapters: unexpected {unexpected[:3]}")


def merge_saved_adapter(output_dir: str | Path) -> Path:
    """Write ``output_dir/merged/``: the adapter saved in ``output_dir`` merged into its base model
    (``base_model_name_or_path`` of ``adapter_config.json``).

    The result is a plain transformers model (``AutoModelForCausalLM.from_pretrained``), with the
    tokenizer and a copy of ``sfr_head/`` when ``output_dir`` has them. Returns the folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sfr.head import HEAD_DIR

    output_dir = Path(output_dir)
    merged_dir = output_dir / MERGED_DIR
    base_model = _peft().PeftConfig.from_pretrained(str(output_dir)).base_model_name_or_path
    base = AutoModelForCausalLM.from_pretrained(str(base_model))
    merged = _peft().PeftModel.from_pretrained(base, str(output_dir)).merge_and_unload()
    merged.save_pretrained(merged_dir)
    if (output_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(output_dir)).save_pretrained(merged_dir)
    if (output_dir / HEAD_DIR).is_dir():
        shutil.copytree(output_dir / HEAD_DIR, merged_dir / HEAD_DIR, dirs_exist_ok=True)
    return merged_dir
