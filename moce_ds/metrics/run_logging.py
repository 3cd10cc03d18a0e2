"""The one `moce_ds` logger: console on rank 0, a log file per rank in the run folder."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

__all__ = ["setup_logging", "LOGGER_NAME"]

LOGGER_NAME = "moce_ds"


def setup_logging(run_dir: Path | None, rank: int, level: int = logging.INFO) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        logger.addHandler(console)
    if run_dir is not None:
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "logs" / f"rank{rank}.log")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger
