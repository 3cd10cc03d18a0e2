"""The command line that starts a script under DeepSpeed's launcher, for the tests and the benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

from moce_ds.engine.distributed import free_port

__all__ = ["deepspeed_command"]


def deepspeed_command(script: str | Path, args: list[str], num_gpus: int, master_port: int | None = None) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args``, spelled through this interpreter (so the deepspeed
    of the running environment starts it) on a free port unless one is given."""
    port = free_port() if master_port is None else master_port
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_gpus), "--master_port",
            str(port), str(script), *args]
