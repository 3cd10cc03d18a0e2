"""Where the step loop's numbers go: one sink interface, three sinks (JSON lines, Prometheus, console), one fan-out.

The loop calls the fan-out at five points and knows nothing about the sinks behind it:

- ``on_epoch``: an epoch starts (position and the cluster round in use);
- ``on_batch``: a micro-batch arrived (how long the loop waited for it, what the loader skipped);
- ``on_nonfinite``: a micro-step was skipped for a non-finite loss on some rank;
- ``on_step``: an optimizer step finished (its wall time and images);
- ``on_interval``: a log interval closed; ``record`` is the reduced metrics.jsonl record (mean losses over
  ranks, lr, throughput, skipped counts, the reduced expert load).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moce_ds.metrics.jsonl import JsonlWriter
from moce_ds.metrics.prometheus import MetricsExporter

__all__ = ["MetricsSink", "JsonlSink", "PrometheusSink", "ConsoleSink", "SinkFanout"]

log = logging.getLogger("moce_ds")


class MetricsSink:
    """Every hook is a no-op here; a sink overrides the ones it records."""

    def on_epoch(self, step: int, epoch: int, cluster_round: int | None) -> None:
        pass

    def on_batch(self, wait_s: float, skipped: dict[str, int]) -> None:
        pass

    def on_nonfinite(self, ranks: int, step: int, in_row: int) -> None:
        pass

    def on_step(self, step: int, seconds: float, images: int) -> None:
        pass

    def on_interval(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(MetricsSink):
    """metrics.jsonl: one record per log interval (rank 0). The writer's owner closes it."""

    def __init__(self, writer: JsonlWriter) -> None:
        self.writer = writer

    def on_interval(self, record: dict[str, Any]) -> None:
        self.writer.write(record)


class PrometheusSink(MetricsSink):
    """This rank's /metrics series; per-expert series only where ``is_main`` (they are already summed over ranks).
    ``moe_layers``: the (block, MoEMlp) pairs whose DeepSpeed all-to-all timers are exported. The exporter's owner
    closes it."""

    def __init__(self, exporter: MetricsExporter, is_main: bool, moe_layers: list[tuple[int, object]]) -> None:
        self.exporter, self.is_main, self.moe_layers = exporter, is_main, moe_layers

    def on_epoch(self, step: int, epoch: int, cluster_round: int | None) -> None:
        self.exporter.set_position(step, epoch, cluster_round)

    def on_batch(self, wait_s: float, skipped: dict[str, int]) -> None:
        self.exporter.observe_data_wait(wait_s)
        self.exporter.add_skipped(skipped)

    def on_nonfinite(self, ranks: int, step: int, in_row: int) -> None:
        self.exporter.add_nonfinite()

    def on_step(self, step: int, seconds: float, images: int) -> None:
        self.exporter.observe_step(seconds, images)

    def on_interval(self, record: dict[str, Any]) -> None:
        self.exporter.set_losses(record["loss"], record["recon_loss"], record["aux_loss"], record["lr"])
        self.exporter.set_step(record["step"])
        if self.is_main:
            self.exporter.add_expert_load(record["expert_load"])
        self.exporter.set_alltoall(self.moe_layers)


class ConsoleSink(MetricsSink):
    """The log lines (every rank's log file, rank 0's console) and, for a person at a terminal (rank 0 and a tty),
    a progress bar that the log lines are printed around."""

    def __init__(self, show_bar: bool, total_steps: int, start_step: int) -> None:
        self._stack = contextlib.ExitStack()
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not show_bar)
        self._stack.callback(self.bar.close)
        if show_bar:
            self._stack.enter_context(logging_redirect_tqdm([log]))

    @classmethod
    def for_rank(cls, is_main: bool, total_steps: int, start_step: int) -> ConsoleSink:
        # Rank 0 only, and only for a person at a terminal: a log file or CI output gets the log lines instead.
        return cls(is_main and sys.stdout.isatty(), total_steps, start_step)

    def on_nonfinite(self, ranks: int, step: int, in_row: int) -> None:
        log.warning("non-finite loss on %d rank(s) at step %d: step skipped (%d in a row)", ranks, step + 1, in_row)

    def on_step(self, step: int, seconds: float, images: int) -> None:
        self.bar.update(1)

    def on_interval(self, record: dict[str, Any]) -> None:
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:.1f}", refresh=False)
        log.info("step %d epoch %d loss %.4f (recon %.4f aux %.4f) lr %.2e %.1f img/s", record["step"],
                 record["epoch"], record["loss"], record["recon_loss"], record["aux_loss"], record["lr"],
                 record["images_per_s"])

    def close(self) -> None:
        self._stack.close()


class SinkFanout(MetricsSink):
    """Calls every sink in order; what the loop holds."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks

    def on_epoch(self, step: int, epoch: int, cluster_round: int | None) -> None:
        for s in self.sinks:
            s.on_epoch(step, epoch, cluster_round)

    def on_batch(self, wait_s: float, skipped: dict[str, int]) -> None:
        for s in self.sinks:
            s.on_batch(wait_s, skipped)

    def on_nonfinite(self, ranks: int, step: int, in_row: int) -> None:
        for s in self.sinks:
            s.on_nonfinite(ranks, step, in_row)

    def on_step(self, step: int, seconds: float, images: int) -> None:
        for s in self.sinks:
            s.on_step(step, seconds, images)

    def on_interval(self, record: dict[str, Any]) -> None:
        for s in self.sinks:
            s.on_interval(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
