"""Pre-train like launchers/pretrain.py, then dump this rank's module state for the test to compare."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from moce_ds.config import load_config  # noqa: E402
from moce_ds.engine import pretrain  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
resume = "--resume" in args
args = [a for a in args if a != "--resume"]
ds_config, overrides = args[0], args[1:]
result = pretrain(load_config([], overrides), ds_config, resume=resume)
rank = torch.distributed.get_rank()
torch.save({k: v.detach().clone() for k, v in result.model.state_dict().items()},
           result.run_dir / f"state_rank{rank}.pt")
