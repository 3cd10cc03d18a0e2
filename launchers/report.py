"""Build the run report of a pre-training run folder: <run>/report/report.md with PNG plots.

    python launchers/report.py runs/moce [--out runs/moce/report]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run folder written by launchers/pretrain.py")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run_dir>/report)")
    args = p.parse_args(argv)

    from moce_ds.metrics import setup_logging
    from moce_ds.report import build_report

    log = setup_logging(None, 0)
    try:
        path = build_report(args.run_dir, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
