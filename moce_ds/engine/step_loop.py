"""The step loop: replay to the saved position, the per-micro-step vote, backward and step, logging,
checkpoints and the in-training clustering refresh."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from moce_ds.clustering.feature_sources import checkpoint_tags_in_use
from moce_ds.clustering.refresh import refresh_due, refresh_round
from moce_ds.data.loader import make_train_loader
from moce_ds.engine.checkpoint import checkpoint_dir, prune_checkpoints, save_checkpoint
from moce_ds.engine.distributed import DistInfo, all_reduce_sum, barrier
from moce_ds.engine.preemption import StopRequest
from moce_ds.engine.training_data import TrainingData, epoch_round
from moce_ds.metrics.prometheus import MetricsExporter

__all__ = ["Faults", "NonFiniteLossError", "PretrainResult", "step_seed", "train_loop"]

log = logging.getLogger("moce_ds")


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


def step_seed(seed: int, rank: int, micro_step: int) -> int:
    """Masking and gate noise are drawn from this seed: different per rank, reproducible after a resume."""
    return (seed * 1_000_003 + rank * 7_919 + micro_step * 104_729) % (2**63 - 1)


def _timed_batches(loader, exporter: MetricsExporter | None):
    """Yields the loader's batches, recording how long the step loop waited for each (a data stall)."""
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            return
        if exporter:
            exporter.observe_data_wait(time.perf_counter() - t0)
        yield batch


def train_loop(cfg, info: DistInfo, engine, model, data: TrainingData, metrics, load_meter, micro: int, accum: int,
                steps_per_epoch: int, total_steps: int, dtype, step: int, epoch: int,
                skip_micro: int, stop: StopRequest, faults: Faults,
                exporter: MetricsExporter | None = None) -> PretrainResult:
    max_steps = cfg.train.max_steps or total_steps
    # Rank 0 only, and only for a person at a terminal: a log file or CI output gets the log lines instead.
    show_bar = info.is_main and sys.stdout.isatty()
    bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True, disable=not show_bar)
    with logging_redirect_tqdm([log]) if show_bar else contextlib.nullcontext():
        try:
            return _steps(cfg, info, engine, model, data, metrics, load_meter, micro, accum, steps_per_epoch,
                          max_steps, dtype, step, epoch, skip_micro, stop, faults, exporter, bar)
        finally:
            bar.close()


def _steps(cfg, info: DistInfo, engine, model, data: TrainingData, metrics, load_meter, micro: int, accum: int,
           steps_per_epoch: int, max_steps: int, dtype, step: int, epoch: int, skip_micro: int,
           stop: StopRequest, faults: Faults, exporter: MetricsExporter | None, bar: tqdm) -> PretrainResult:
    rnd = data.round
    skipped: dict[str, int] = {}
    last_loss, ckpt_path = float("nan"), None
    interval_loss = torch.zeros(3, dtype=torch.float64)  # loss, recon, aux summed over micro-batches
    interval_micro, t_last = 0, time.perf_counter()
    t_step, step_images = time.perf_counter(), 0  # for moce_step_seconds and moce_images_processed_total

    def position(ep: int, micro_in_epoch: int) -> dict:
        return {"step": step, "epoch": ep, "micro_in_epoch": micro_in_epoch,
                "cluster_round": None if rnd is None else str(rnd.path.resolve())}  # the round in use

    def checkpoint(ep: int, micro_in_epoch: int) -> Path:
        tag = f"step{step:08d}"
        path = save_checkpoint(engine, cfg, tag, position(ep, micro_in_epoch), info.is_main, barrier)
        if info.is_main:  # a checkpoint that a clustering round names as its feature source is kept
            prune_checkpoints(checkpoint_dir(cfg), cfg.train.keep_checkpoints,
                              checkpoint_tags_in_use(data.clusters_root, Path(cfg.output_dir)))
        log.info("saved checkpoint %s", path)
        return path

    engine.train()
    while epoch < cfg.train.epochs and step < max_steps and not faults.stopped_by:
        micro_per_epoch = steps_per_epoch * accum
        torch.manual_seed(step_seed(cfg.train.seed, info.rank, -1 - epoch))  # fixes the loader workers' seeds
        rnd = epoch_round(cfg, data, rnd)  # rank 0 picks the round (a refresh may have added one), all follow
        ids_path = None if rnd is None else rnd.path / "ids.npy"
        loader = make_train_loader(
            data.source, ids_path, batch_size=micro, steps_per_epoch=micro_per_epoch,
            image_size=model.spec.img_size, num_workers=cfg.data.num_workers, seed=cfg.train.seed, epoch=epoch,
            shuffle_buffer=cfg.data.shuffle_buffer, strict=cfg.data.strict, rank=info.rank,
            world_size=info.world_size, resampled=cfg.data.resampled)
        micro_in_epoch = 0
        if exporter:
            exporter.set_position(step, epoch, None if rnd is None else rnd.round)
        for batch in _timed_batches(loader, exporter):
            for reason, n in batch["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
            if exporter:
                exporter.add_skipped(batch["skipped"])
            if micro_in_epoch < skip_micro:  # resuming mid-epoch: replay the loader to the saved position
                micro_in_epoch += 1
                continue
            global_micro = epoch * micro_per_epoch + micro_in_epoch
            torch.manual_seed(step_seed(cfg.train.seed, info.rank, global_micro))
            images = batch["images"].to(info.device, dtype, non_blocking=True)
            cluster = batch["cluster"].to(info.device, non_blocking=True)
            out = engine(images, cluster)
            # One tiny all-reduce per micro-step: did any rank get a non-finite loss, or a stop signal?
            # Every rank must take the same decision, or ZeRO's gradient reduction would hang.
            votes = all_reduce_sum(torch.tensor([float(not torch.isfinite(out.loss.detach()).item()),
                                                 float(stop.requested)], dtype=torch.float64))
            micro_in_epoch += 1
            if votes[0] > 0:
                faults.nonfinite_total += 1
                faults.nonfinite_in_row += 1
                if exporter:
                    exporter.add_nonfinite()
                log.warning("non-finite loss on %d rank(s) at step %d: step skipped (%d in a row)", int(votes[0]),
                            step + 1, faults.nonfinite_in_row)
                if faults.nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                    raise NonFiniteLossError(
                        f"{faults.nonfinite_in_row} non-finite losses in a row at step {step + 1}: training stopped; "
                        f"the last good checkpoint in {checkpoint_dir(cfg)} is intact. Lower train.lr, check the "
                        f"data, or resume with --resume.")
            else:
                faults.nonfinite_in_row = 0
                engine.backward(out.loss)
                engine.step()
                load_meter.update()
                # one device-to-host copy for the three losses
                interval_loss += torch.stack([out.loss, out.recon_loss, out.aux_loss]).detach().double().cpu()
                interval_micro += 1
                step_images += images.shape[0]
            if votes[1] > 0 and micro_in_epoch % accum == 0:
                faults.stopped_by = stop.signal_name or "a signal on another rank"
            if micro_in_epoch % accum:
                continue
            step += 1
            bar.update(1)
            if exporter:
                now = time.perf_counter()
                exporter.observe_step(now - t_step, step_images)
                t_step, step_images = now, 0
            if step % cfg.train.log_every == 0 or step == max_steps or micro_in_epoch == micro_per_epoch:
                record = _log_interval(cfg, info, engine, metrics, load_meter, interval_loss, interval_micro,
                                       t_last, micro, step, epoch,
                                       {**skipped, "nonfinite_loss": faults.nonfinite_total}, exporter)
                last_loss = record["loss"]
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{record['images_per_s']:.1f}", refresh=False)
                interval_loss.zero_()
                interval_micro, t_last = 0, time.perf_counter()
            if step >= max_steps or faults.stopped_by:
                break
            if (cfg.train.save_every_steps and step % cfg.train.save_every_steps == 0
                    and micro_in_epoch < micro_per_epoch  # epoch ends are saved below
                    and faults.nonfinite_in_row == 0):  # never checkpoint in the middle of a non-finite streak
                ckpt_path = checkpoint(epoch, micro_in_epoch)
        skip_micro = 0
        epoch_done = micro_in_epoch == micro_per_epoch
        next_epoch = epoch + 1 if epoch_done else epoch
        last = step >= max_steps or next_epoch >= cfg.train.epochs or bool(faults.stopped_by)
        refreshed = epoch_done and not last and rnd is not None and refresh_due(cfg, epoch + 1)
        if refreshed:
            # a new round from the current encoder; epoch_round() switches to it at the next epoch start. The
            # round names this step's checkpoint as its feature source, so that checkpoint is saved now.
            refresh_round(cfg, model, data.urls, data.shard_counts, rnd, epoch, step, micro, dtype, info.device)
        if last or refreshed or (epoch_done and (epoch + 1) % cfg.train.save_every_epochs == 0):
            ckpt_path = checkpoint(next_epoch, 0 if epoch_done else micro_in_epoch)
        epoch = next_epoch
    if faults.stopped_by:
        log.warning("stopped by %s at step %d after saving %s; continue with --resume", faults.stopped_by, step,
                    ckpt_path)
    return PretrainResult(Path(cfg.output_dir), step, epoch, last_loss, ckpt_path, info.is_main, model,
                          faults.stopped_by, faults.nonfinite_total)


def _log_interval(cfg, info: DistInfo, engine, metrics, load_meter, interval_loss, interval_micro, t_last, micro,
                  step, epoch, skipped, exporter: MetricsExporter | None = None) -> dict:
    elapsed = time.perf_counter() - t_last
    # One reduction for the losses and the image count (means over ranks).
    stats = all_reduce_sum(torch.cat([interval_loss / max(1, interval_micro),
                                      torch.tensor([interval_micro * micro], dtype=torch.float64)]))
    loss, recon, aux = (stats[:3] / info.world_size).tolist()
    images = stats[3].item()
    load = load_meter.reduce(all_reduce_sum)
    record = {
        "step": step, "epoch": epoch, "loss": loss, "recon_loss": recon, "aux_loss": aux,
        "lr": engine.get_lr()[0], "images_per_s": images / max(elapsed, 1e-9), "images": images,
        "skipped": dict(skipped), "expert_load": load,
    }
    if metrics:
        metrics.write(record)
    if exporter:
        exporter.set_losses(loss, recon, aux, record["lr"])
        exporter.step.set(step)
        if info.is_main:  # per-expert series from one rank, already summed over all of them
            exporter.add_expert_load(load)
        exporter.set_alltoall(load_meter.layers)
    log.info("step %d epoch %d loss %.4f (recon %.4f aux %.4f) lr %.2e %.1f img/s", step, epoch, loss, recon, aux,
             record["lr"], record["images_per_s"])
    return record
