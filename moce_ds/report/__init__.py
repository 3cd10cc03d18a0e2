"""The end-of-run report: curves, expert load, specialisation, routing heat maps and reconstructions.

It reads a run folder and draws on checkpoints, clustering, customisation and evaluation, so it sits above all of
them (and above metrics, whose JSON-lines log it reads).
"""

from moce_ds.report.run_report import build_report, reconstruct, to_pixels

__all__ = ["build_report", "reconstruct", "to_pixels"]
