"""What every benchmark shares: where results go, how runs are launched, the statistics and the figures.

A benchmark is run as ``python benchmarks/<name>.py``, so this folder is on ``sys.path`` and ``import harness``
comes first; it puts the repository root on the path, so the scripts run from a clone without installing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"  # <name>.jsonl and <name>.png per benchmark
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moce_ds.engine.distributed import free_port  # noqa: E402
from moce_ds.engine.launch_command import deepspeed_command  # noqa: E402
from moce_ds.metrics import append_jsonl  # noqa: E402

__all__ = ["ROOT", "RESULTS", "write_results", "run_command", "run_deepspeed", "run_single_process",
           "deepspeed_command", "cv", "figure", "save_figure"]


def write_results(records: Iterable[dict], name: str | None = None, path: Path | None = None) -> Path:
    """Appends JSON lines to ``results/<name>.jsonl`` (or ``path``); returns the file."""
    return append_jsonl(path if path is not None else RESULTS / f"{name}.jsonl", records)


def run_command(cmd: list[str], env: dict | None = None, timeout: float | None = None, log: Path | None = None,
                check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    """Runs ``cmd`` from the repository root; returns the process and its wall time (raises on failure)."""
    t0 = time.perf_counter()
    if log is not None:  # long stages: the output goes to a file, the error shows its tail
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                  timeout=timeout)
        output = log.read_text()
    else:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output = (proc.stdout or "") + (proc.stderr or "")
    seconds = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{output[-3000:]}")
    return proc, seconds


def run_deepspeed(script: str | Path, args: list[str], ranks: int, *, env: dict | None = None,
                  timeout: float | None = None, log: Path | None = None,
                  check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    """``script args`` on ``ranks`` CPU/GPU ranks under the real deepspeed launcher, from the repository root.
    Returns the finished process and its wall time; raises with the output's tail on failure when ``check``."""
    return run_command(deepspeed_command(script, args, ranks), env, timeout, log, check)


def run_single_process(script: str | Path, args: list[str], *, timeout: float | None = None,
                       log: Path | None = None, check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    """``python script args`` as a world of one (the launcher's start-up cost left out, for many short runs)."""
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    return run_command([sys.executable, str(script), *args], env, timeout, log, check)


def cv(x: np.ndarray, axis: int | None = None) -> float | np.ndarray:
    """Coefficient of variation: population std / mean (along ``axis``); nan where the mean is 0."""
    x = np.asarray(x, np.float64)
    mean = x.mean(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(mean > 0, x.std(axis=axis) / np.where(mean > 0, mean, 1.0), np.nan)
    return float(out) if np.ndim(out) == 0 else out


def figure(ncols: int = 1, nrows: int = 1, panel: tuple[float, float] = (6.0, 4.0), **kwargs):
    """A matplotlib figure on the file-only backend, ``panel`` inches per subplot; returns (fig, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), **kwargs)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
