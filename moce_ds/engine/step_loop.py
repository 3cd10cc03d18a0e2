"""The step loop: replay to the saved position, vote, micro-step, optimizer step, log, checkpoint, refresh.

`train_loop` runs `_Loop.run`, which reads as those named steps over a `LoopState` (position, interval sums,
faults). Everything the loop reports goes to one `SinkFanout` (metrics.jsonl, Prometheus, the console).

Host syncs: the loop reads the device once per micro-step, in `forward_and_vote` (the non-finite / stop /
bad-cluster-id vote, reduced over ranks as one tensor); loss sums stay on the device until a log interval.
With cluster routing, the routing plan adds the one documented in `moe/routing.py` (buffer sizes). So the
budget per micro-step is `SYNCS_PER_MICRO_STEP` plus that one; `tests/unit/test_host_syncs.py` counts them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from moce_ds.clustering.feature_sources import checkpoint_tags_in_use
from moce_ds.clustering.refresh import refresh_due, refresh_round
from moce_ds.data.loader import make_train_loader
from moce_ds.engine.checkpoint import checkpoint_dir, latest_tag, prune_checkpoints, save_checkpoint
from moce_ds.engine.distributed import DistInfo, all_reduce_sum, barrier
from moce_ds.engine.preemption import StopRequest
from moce_ds.engine.training_data import TrainingData, epoch_round
from moce_ds.metrics.expert_load import ExpertLoadMeter
from moce_ds.metrics.jsonl import JsonlWriter
from moce_ds.metrics.prometheus import MetricsExporter
from moce_ds.metrics.sinks import ConsoleSink, JsonlSink, MetricsSink, PrometheusSink, SinkFanout

__all__ = ["Faults", "NonFiniteLossError", "PretrainResult", "LoopSetup", "LoopState", "Vote", "SYNCS_PER_MICRO_STEP",
           "forward_and_vote", "nonfinite_message", "warn_small_run", "step_seed", "train_loop"]

log = logging.getLogger("moce_ds")

SYNCS_PER_MICRO_STEP = 1  # the vote's one read; cluster routing adds moe/routing.py's buffer sizes


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row; the last good checkpoint is left as it was."""


@dataclass
class Faults:
    nonfinite_total: int = 0
    nonfinite_in_row: int = 0
    stopped_by: str | None = None  # the signal that stopped the run early


@dataclass
class PretrainResult:
    run_dir: Path
    step: int
    epoch: int
    last_loss: float
    checkpoint: Path | None
    is_main: bool
    model: torch.nn.Module  # the trained module (this rank's experts), for in-process callers
    stopped_by: str | None = None  # e.g. "SIGTERM": stopped early after a checkpoint; resume with --resume
    nonfinite_skipped: int = 0


@dataclass(frozen=True)
class LoopSetup:
    """What the loop runs with; fixed for the run."""
    cfg: object  # moce_ds.config.Config
    info: DistInfo
    engine: object  # the DeepSpeed engine
    model: torch.nn.Module  # engine.module: the MaskedAutoencoderViT
    data: TrainingData
    micro: int  # micro-batch per rank
    accum: int  # micro-batches per optimizer step
    steps_per_epoch: int
    total_steps: int  # epochs x steps_per_epoch (train.max_steps may stop earlier)
    dtype: torch.dtype
    ep_size: int = 1  # expert-parallel group size (recorded in each checkpoint)


@dataclass
class LoopState:
    """Where the loop is, and what it has summed since the last log line."""
    step: int
    epoch: int
    skip_micro: int = 0  # micro-batches of the current epoch to replay (a resume mid-epoch); 0 after it
    faults: Faults = field(default_factory=Faults)
    micro_in_epoch: int = 0
    round: object = None  # the ClusterRound in use (None: no cluster ids)
    skipped: dict[str, int] = field(default_factory=dict)  # loader skips by reason, whole run
    interval_loss: torch.Tensor | None = None  # (3,) float64 on the device: loss, recon, aux summed over micro-steps
    interval_micro: int = 0
    interval_t0: float = field(default_factory=time.perf_counter)
    step_t0: float = field(default_factory=time.perf_counter)  # for moce_step_seconds
    step_images: int = 0  # for moce_images_processed_total
    last_loss: float = float("nan")
    checkpoint: Path | None = None  # the last checkpoint this loop saved


class Vote(NamedTuple):
    """One micro-step's decision, the same on every rank (summed over ranks)."""
    nonfinite: int  # ranks with a non-finite loss
    stop: int  # ranks that received a stop signal
    bad_clusters: int  # ranks whose batch had a cluster id outside the gate's table


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Masking and gate noise are drawn from this seed: different per rank, reproducible after a resume."""
    return (seed * 1_000_003 + rank * 7_919 + micro_step * 104_729) % (2**63 - 1)


def forward_and_vote(engine, images: torch.Tensor, cluster: torch.Tensor, stop_requested: bool):
    """The forward and the vote of one micro-step: -> (MAEOutput, Vote).

    Every rank must take the same decision (skip the step, stop, fail), or ZeRO's gradient reduction would hang, so
    the three flags are summed over ranks in one tiny all-reduce of a device tensor, and read once: the micro-step's
    one host sync. The cluster-id range check is part of it (the model clamps and flags instead of syncing).
    """
    out = engine(images, cluster, defer_checks=True)
    loss = out.loss.detach()
    bad = loss.new_zeros((), dtype=torch.bool) if out.bad_clusters is None else out.bad_clusters
    flags = torch.stack([~torch.isfinite(loss), loss.new_full((), stop_requested, dtype=torch.bool), bad]).double()
    nonfinite, stop, bad = all_reduce_sum(flags).tolist()
    return out, Vote(int(nonfinite), int(stop), int(bad))


def nonfinite_message(in_row: int, step: int, ckpt_dir: Path) -> str:
    tag = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
    kept = (f"the last good checkpoint {tag} in {ckpt_dir} is intact" if tag else
            f"no checkpoint was saved yet (none in {ckpt_dir}), so a --resume has nothing to start from")
    return (f"{in_row} non-finite losses in a row at step {step}: training stopped; {kept}. Lower train.lr, check the "
            f"data and model.mask_ratio{', or resume with --resume' if tag else ''}.")


def warn_small_run(cfg, steps_per_epoch: int, max_steps: int) -> list[str]:
    """One warning per schedule that cannot do what it says on a run this short; returns them (for tests)."""
    warnings = []
    if cfg.train.warmup_steps > max_steps:
        warnings.append(f"train.warmup_steps={cfg.train.warmup_steps} is longer than the run ({max_steps} steps): "
                        f"the learning rate never reaches train.lr={cfg.train.lr:g}; lower train.warmup_steps.")
    if steps_per_epoch < cfg.train.log_every:
        warnings.append(f"an epoch has {steps_per_epoch} optimizer steps, fewer than train.log_every="
                        f"{cfg.train.log_every}: metrics are logged once per epoch instead; lower train.log_every.")
    for w in warnings:
        log.warning(w)
    return warnings


def train_loop(setup: LoopSetup, state: LoopState, stop: StopRequest, load_meter: ExpertLoadMeter,
               metrics: JsonlWriter | None = None, exporter: MetricsExporter | None = None) -> PretrainResult:
    """Train from `state` to the end of the run (or a stop signal); `metrics` and `exporter` stay open (their owner
    closes them)."""
    max_steps = setup.cfg.train.max_steps or setup.total_steps
    sinks: list[MetricsSink] = [JsonlSink(metrics)] if metrics else []
    if exporter:
        sinks.append(PrometheusSink(exporter, setup.info.is_main, load_meter.layers))
    console = ConsoleSink.for_rank(setup.info.is_main, max_steps, state.step)
    try:
        return _Loop(setup, state, stop, load_meter, SinkFanout([*sinks, console]), max_steps).run()
    finally:
        console.close()


class _Loop:
    def __init__(self, setup: LoopSetup, state: LoopState, stop: StopRequest, load_meter: ExpertLoadMeter,
                 sinks: SinkFanout, max_steps: int) -> None:
        self.s, self.st, self.stop, self.load_meter, self.sinks = setup, state, stop, load_meter, sinks
        self.cfg, self.max_steps = setup.cfg, max_steps
        self.micro_per_epoch = setup.steps_per_epoch * setup.accum
        state.round = setup.data.round if state.round is None else state.round
        if state.interval_loss is None:
            state.interval_loss = torch.zeros(3, dtype=torch.float64, device=setup.info.device)

    # ------------------------------------------------------------------ the loop
    def run(self) -> PretrainResult:
        st = self.st
        warn_small_run(self.cfg, self.s.steps_per_epoch, self.max_steps)
        self.s.engine.train()
        while st.epoch < self.cfg.train.epochs and st.step < self.max_steps and not st.faults.stopped_by:
            for batch in self._epoch_batches():
                if self._replaying():
                    continue
                vote = self._micro_step(batch)
                if not self._at_step_boundary(vote):
                    continue
                self._optimizer_step_done()
                if self._log_due():
                    self._log()
                if st.step >= self.max_steps or st.faults.stopped_by:
                    break
                if self._checkpoint_due():
                    self._checkpoint(st.epoch, st.micro_in_epoch)
            self._end_epoch()  # refresh, epoch checkpoint, next epoch
        if st.faults.stopped_by:
            log.warning("stopped by %s at step %d after saving %s; continue with --resume", st.faults.stopped_by,
                        st.step, st.checkpoint)
        return PretrainResult(Path(self.cfg.output_dir), st.step, st.epoch, st.last_loss, st.checkpoint,
                              self.s.info.is_main, self.s.model, st.faults.stopped_by, st.faults.nonfinite_total)

    # ------------------------------------------------------------------ the named steps
    def _epoch_batches(self) -> Iterator[dict]:
        """Open the epoch's loader (the round rank 0 picks, seeded workers) and yield its batches, timing each wait."""
        s, st = self.s, self.st
        torch.manual_seed(step_seed(self.cfg.train.seed, s.info.rank, -1 - st.epoch))  # the loader workers' seeds
        st.round = epoch_round(self.cfg, s.data, st.round)  # rank 0 picks the round (a refresh may have added one)
        ids_path = None if st.round is None else st.round.path / "ids.npy"
        loader = make_train_loader(
            s.data.source, ids_path, batch_size=s.micro, steps_per_epoch=self.micro_per_epoch,
            image_size=s.model.spec.img_size, num_workers=self.cfg.data.num_workers, seed=self.cfg.train.seed,
            epoch=st.epoch, shuffle_buffer=self.cfg.data.shuffle_buffer, strict=self.cfg.data.strict,
            rank=s.info.rank, world_size=s.info.world_size, resampled=self.cfg.data.resampled,
            uint8=True)  # 4x fewer bytes through shared memory; the model normalises on the device
        st.micro_in_epoch = 0
        self.sinks.on_epoch(st.step, st.epoch, None if st.round is None else st.round.round)
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            for reason, n in batch["skipped"].items():
                st.skipped[reason] = st.skipped.get(reason, 0) + n
            self.sinks.on_batch(time.perf_counter() - t0, batch["skipped"])
            yield batch

    def _replaying(self) -> bool:
        """Resuming mid-epoch: replay the loader to the saved position (the batches are drawn, not trained)."""
        if self.st.micro_in_epoch < self.st.skip_micro:
            self.st.micro_in_epoch += 1
            return True
        return False

    def _micro_step(self, batch: dict) -> Vote:
        """Forward and vote; then backward and step, or skip a non-finite loss, or fail on bad cluster ids."""
        s, st = self.s, self.st
        global_micro = st.epoch * self.micro_per_epoch + st.micro_in_epoch
        torch.manual_seed(step_seed(self.cfg.train.seed, s.info.rank, global_micro))
        images = batch["images"].to(s.info.device, non_blocking=True)  # uint8: normalised in fp32 by the model
        cluster = batch["cluster"].to(s.info.device, non_blocking=True)
        out, vote = forward_and_vote(s.engine, images, cluster, self.stop.requested)
        st.micro_in_epoch += 1
        if vote.bad_clusters:
            self._fail_on_bad_clusters(cluster)
        if vote.nonfinite:
            self._skip_nonfinite(vote.nonfinite)
        else:
            st.faults.nonfinite_in_row = 0
            s.engine.backward(out.loss)
            s.engine.step()
            self.load_meter.update()
            st.interval_loss += torch.stack([out.loss, out.recon_loss, out.aux_loss]).detach().double()
            st.interval_micro += 1
            st.step_images += images.shape[0]
        return vote

    def _fail_on_bad_clusters(self, cluster: torch.Tensor) -> None:
        """The rank with the bad id raises the model's own error (it names the id); the others say where it is."""
        self.s.model.check_clusters(cluster)
        k = self.cfg.moe.num_clusters
        raise ValueError(f"a cluster id outside the gate's table of {k} clusters on another rank at step "
                         f"{self.st.step + 1} (that rank's log names it): set moe.num_clusters to the clustering "
                         f"round's k or re-cluster with k={k}.")

    def _skip_nonfinite(self, ranks: int) -> None:
        f = self.st.faults
        f.nonfinite_total += 1
        f.nonfinite_in_row += 1
        self.sinks.on_nonfinite(ranks, self.st.step, f.nonfinite_in_row)
        if f.nonfinite_in_row >= self.cfg.train.max_nonfinite_in_row:
            raise NonFiniteLossError(nonfinite_message(f.nonfinite_in_row, self.st.step + 1, checkpoint_dir(self.cfg)))

    def _at_step_boundary(self, vote: Vote) -> bool:
        """True after the last micro-batch of an optimizer step; a stop vote takes effect there."""
        st = self.st
        boundary = st.micro_in_epoch % self.s.accum == 0
        if vote.stop and boundary:
            st.faults.stopped_by = self.stop.signal_name or "a signal on another rank"
        return boundary

    def _optimizer_step_done(self) -> None:
        st = self.st
        st.step += 1
        now = time.perf_counter()
        self.sinks.on_step(st.step, now - st.step_t0, st.step_images)
        st.step_t0, st.step_images = now, 0

    def _log_due(self) -> bool:
        st = self.st
        return (st.step % self.cfg.train.log_every == 0 or st.step == self.max_steps
                or st.micro_in_epoch == self.micro_per_epoch)

    def _log(self) -> None:
        """Reduce the interval over ranks (one all-reduce for the losses and image count, one for the load) and
        hand the record to the sinks."""
        s, st = self.s, self.st
        elapsed = time.perf_counter() - st.interval_t0
        stats = all_reduce_sum(torch.cat([st.interval_loss / max(1, st.interval_micro),
                                          st.interval_loss.new_tensor([st.interval_micro * s.micro])]))
        loss, recon, aux, images = (stats / stats.new_tensor([s.info.world_size] * 3 + [1])).tolist()
        load = self.load_meter.reduce(all_reduce_sum)
        record = {
            "step": st.step, "epoch": st.epoch, "loss": loss, "recon_loss": recon, "aux_loss": aux,
            "lr": s.engine.get_lr()[0], "images_per_s": images / max(elapsed, 1e-9), "images": images,
            "skipped": {**st.skipped, "nonfinite_loss": st.faults.nonfinite_total}, "expert_load": load,
        }
        self.sinks.on_interval(record)
        st.last_loss = loss
        st.interval_loss.zero_()
        st.interval_micro, st.interval_t0 = 0, time.perf_counter()

    def _checkpoint_due(self) -> bool:
        """A mid-epoch checkpoint (epoch ends are saved by _end_epoch), never inside a non-finite streak."""
        st, every = self.st, self.cfg.train.save_every_steps
        return bool(every and st.step % every == 0 and st.micro_in_epoch < self.micro_per_epoch
                    and st.faults.nonfinite_in_row == 0)

    def _checkpoint(self, epoch: int, micro_in_epoch: int) -> None:
        s, st = self.s, self.st
        position = {"step": st.step, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
                    "cluster_round": None if st.round is None else str(st.round.path.resolve())}  # the round in use
        path = save_checkpoint(s.engine, self.cfg, f"step{st.step:08d}", position, s.info.is_main, barrier,
                               layout={"world_size": s.info.world_size, "ep_size": s.ep_size})
        if s.info.is_main:  # a checkpoint that a clustering round names as its feature source is kept
            prune_checkpoints(checkpoint_dir(self.cfg), self.cfg.train.keep_checkpoints,
                              checkpoint_tags_in_use(s.data.clusters_root, Path(self.cfg.output_dir)))
        log.info("saved checkpoint %s", path)
        st.checkpoint = path

    def _end_epoch(self) -> None:
        """Refresh the clusters if due (its round names this step's checkpoint, so that is saved now), save the
        epoch's checkpoint if due, and move on (a stopped or finished run saves where it is)."""
        s, st = self.s, self.st
        st.skip_micro = 0
        epoch_done = st.micro_in_epoch == self.micro_per_epoch
        next_epoch = st.epoch + 1 if epoch_done else st.epoch
        last = st.step >= self.max_steps or next_epoch >= self.cfg.train.epochs or bool(st.faults.stopped_by)
        refreshed = epoch_done and not last and st.round is not None and refresh_due(self.cfg, st.epoch + 1)
        if refreshed:  # a new round from the current encoder; _epoch_batches switches to it at the next epoch start
            refresh_round(self.cfg, s.model, s.data.urls, s.data.shard_counts, st.round, st.epoch, st.step, s.micro,
                          s.dtype, s.info.device)
        if last or refreshed or (epoch_done and (st.epoch + 1) % self.cfg.train.save_every_epochs == 0):
            self._checkpoint(next_epoch, 0 if epoch_done else st.micro_in_epoch)
        st.epoch = next_epoch
