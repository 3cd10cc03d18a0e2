"""Metrics: JSON-lines log, logging set-up, expert-load accounting."""

from moce_ds.metrics.expert_load import ExpertLoadMeter
from moce_ds.metrics.jsonl import JsonlWriter, append_jsonl, read_jsonl
from moce_ds.metrics.run_logging import LOGGER_NAME, setup_logging

__all__ = ["JsonlWriter", "append_jsonl", "read_jsonl", "setup_logging", "LOGGER_NAME", "ExpertLoadMeter"]
