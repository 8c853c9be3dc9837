"""TRL users: SFT + SFR with `SFRSFTTrainer`, a drop-in for `trl.SFTTrainer` (offline, CPU, ~30 s).

Trains the embedded tiny LM on the embedded persona corpus (TRL's conversational "messages" format)
with LoRA adapters, then reads back the adapter and the flow head. Swap in your own model id, data
set and SFTConfig values; `pip install -e ".[trl]"` installs trl and peft.

    python examples/trl_sft.py [OUTPUT_DIR] [MAX_STEPS]
"""
import sys

from datasets import Dataset
from peft import LoraConfig

from sfr.corpus import build_corpus
from sfr.head import load_flow_head
from sfr.integrations.trl import SFRSFTConfig, SFRSFTTrainer
from sfr.tiny_lm import default_model_path


def main(output_dir: str = "sfr-trl-example", max_steps: int = 40, examples: int | None = None) -> dict:
    records = build_corpus("train", examples_per_pair=1)[:examples]  # {"messages": [...]} rows (720)
    train_dataset = Dataset.from_list(records)
    args = SFRSFTConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=8, learning_rate=1e-3,
        logging_steps=max(1, max_steps // 4), save_strategy="no", report_to="none", use_cpu=True,
        assistant_only_loss=False,  # TRL's default: CE (and SFR anchors) on every token of the conversation
        # SFR's settings: lambda is 0 for a quarter of the run (the head learns alone), then ramps to 0.5
        phase_a_steps=max_steps // 4, ramp_steps=max_steps // 4, lambda_max=0.5, num_samples=4, head_width=384)
    trainer = SFRSFTTrainer(model=str(default_model_path()), args=args, train_dataset=train_dataset,
                            peft_config=LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model()  # the LoRA adapter (PeftModel.from_pretrained) and OUTPUT_DIR/sfr_head/
    head, config = load_flow_head(f"{output_dir}/sfr_head")
    logged = [h for h in trainer.state.log_history if "sfr_loss" in h]
    print(f"sfr_loss {logged[0]['sfr_loss']:.4f} -> {logged[-1]['sfr_loss']:.4f}, ce_loss {logged[0]['ce_loss']:.3f} -> "
          f"{logged[-1]['ce_loss']:.3f}, head {sum(p.numel() for p in head.parameters()):,} parameters, "
          f"objective {config['objective']}")
    return logged[-1]


if __name__ == "__main__":
    main(*(sys.argv[1:2] or []), *(int(a) for a in sys.argv[2:3]))
