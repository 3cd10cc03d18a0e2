"""Runs a script under the real `deepspeed` launcher with N CPU ranks (gloo) and returns its output."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from moce_ds.engine.launch_command import deepspeed_command

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "dist" / "workers" / "pretrain_and_dump.py"  # pretrain, then dump each rank's weights


def two_rank_overrides(run: Path, cache: Path, steps: int) -> list[str]:
    """The 2-rank, ep_size=2 test configuration (micro-batch 16 comes from write_ds_config)."""
    return [f"output_dir={run}", f"data.cache_dir={cache}", f"train.max_steps={steps}", "train.log_every=1",
            "data.num_workers=1", "moe.ep_size=2", "moe.num_experts=4", "train.warmup_steps=5", "train.epochs=2"]


def write_ds_config(path: Path, micro_batch: int = 16, **extra) -> Path:
    cfg = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg.update(extra)
    path.write_text(json.dumps(cfg))
    return path


def run_deepspeed(script: str | Path, args: list[str], num_gpus: int = 2, timeout: int = 600,
                  check: bool = True) -> subprocess.CompletedProcess:
    cmd = deepspeed_command(script, args, num_gpus)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
