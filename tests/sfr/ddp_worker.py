"""Run by ``test_trainer.py`` under torchrun: train the tiny setup on this rank, rank 0 saves the result.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 ddp_worker.py OUT_DIR SETTINGS_JSON``.
"""
import json
import sys
from pathlib import Path

import torch

import sfr.trainer

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import make_args, make_trainer  # noqa: E402


def main(out: str, settings: str) -> None:
    torch.set_num_threads(1)
    trainer = make_trainer(make_args(Path(out), **json.loads(settings)))
    trainer.train()
    if trainer.args.process_index == 0:
        weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        torch.save({"weights": weights, "log_history": trainer.state.log_history,
                    "world_size": trainer.args.world_size, "sfr_file": sfr.trainer.__file__}, Path(out) / "result.pt")


if __name__ == "__main__":
    main(*sys.argv[1:3])
