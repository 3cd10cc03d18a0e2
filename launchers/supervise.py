"""DeepSpeed's launcher, with signals handed to the ranks so a preempted run checkpoints and returns 0.

    python launchers/supervise.py --num_gpus 2 launchers/pretrain.py --deepspeed_config ds_configs/zero2.json ...

takes the `deepspeed` command's arguments. SIGTERM or SIGINT to this process (or its process group, as
Kubernetes and Ctrl-C send them) reach every rank once; they finish the step, checkpoint at the same step and
exit, and this command returns 0. The plain `deepspeed` command also checkpoints and leaves no process behind,
but exits 143 (SIGTERM) or 1 (SIGINT) itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without installing

from moce_ds.engine.preemption import supervise  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    sys.exit(supervise([sys.executable, "-m", "deepspeed.launcher.runner", *sys.argv[1:]]))
