"""Pre-training set-up: checks, deepspeed.initialize, resume; the step loop itself is in step_loop.py.

The model owns its loss; the engine owns backward and step. Every input is checked before anything
is written, so a bad config or an incompatible resume destroys nothing on disk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import deepspeed

from moce_ds.atomic_files import atomic_write_text
from moce_ds.checkpoints.dense_weights import DenseWeights, read_dense_mae
from moce_ds.config import Config, ConfigChange, flatten_keys, save_config
from moce_ds.engine.checkpoint import (
    check_resume_compatible,
    check_resume_ep_size,
    checkpoint_dir,
    latest_tag,
    read_meta,
)
from moce_ds.engine.distributed import DistInfo, barrier, init_distributed, resolve_ep_size
from moce_ds.engine.ds_config import check_ds_config, compute_dtype, grad_accum_steps, load_ds_config, micro_batch_size
from moce_ds.engine.preemption import StopRequest
from moce_ds.engine.schedule import build_optimizer
from moce_ds.engine.step_loop import LoopSetup, LoopState, NonFiniteLossError, PretrainResult, step_seed, train_loop
from moce_ds.engine.training_data import TrainingData, prepare_training_data, steps_per_epoch
from moce_ds.engine.watchdog import PeerWatchdog
from moce_ds.metrics import ExpertLoadMeter, JsonlWriter, setup_logging
from moce_ds.metrics.prometheus import MetricsExporter
from moce_ds.model import MaskedAutoencoderViT, build_model, get_spec, upcycle_from_dense
from moce_ds.moe.policies import RoutingPolicy, routing_policy

__all__ = ["PretrainResult", "pretrain", "step_seed", "NonFiniteLossError"]

log = logging.getLogger("moce_ds")


def _check_output_dir(cfg: Config, resume: bool, world_size: int) -> tuple[str | None, dict | None]:
    ckpt = checkpoint_dir(cfg)
    tag = latest_tag(ckpt) if ckpt.is_dir() else None
    if resume:
        if tag is None:
            raise ValueError(f"--resume was given but {ckpt} holds no complete checkpoint; drop --resume to start "
                             f"a new run there.")
        meta = read_meta(ckpt, tag)
        check_resume_compatible(cfg, meta, tag, world_size)
        return tag, meta
    if tag is not None:
        raise ValueError(f"output_dir={cfg.output_dir} already holds checkpoints (latest '{tag}'): pass --resume to "
                         f"continue that run, or choose another output_dir.")
    return None, None


@dataclass
class _Inputs:
    """Everything a run starts from, read and checked before anything is written."""
    ds: dict
    policy: RoutingPolicy
    ep_size: int
    resume_tag: str | None
    resume_meta: dict | None
    dense: DenseWeights | None  # model.init_from, read (a new run only)
    data: TrainingData
    micro: int
    accum: int
    epoch_steps: int


def _check_inputs(cfg: Config, ds_config_path: str | Path, resume: bool, info: DistInfo) -> _Inputs:
    """Every check of a start or resume, on every rank, before the run folder is touched."""
    spec = get_spec(cfg.model.size)  # unknown size: fail before anything else
    ds = load_ds_config(ds_config_path)
    policy = routing_policy(cfg.moe)
    policy.moe_blocks(spec.depth)  # moe.layers outside the encoder: before DeepSpeed starts
    check_ds_config(ds, policy.uses_moe, info.device.type)
    resume_tag, resume_meta = _check_output_dir(cfg, resume, info.world_size)
    ep_size = resolve_ep_size(cfg.moe.ep_size, cfg.moe.num_experts, info.world_size) if policy.uses_moe else 1
    if resume_meta is not None:
        check_resume_ep_size(cfg, resume_meta, resume_tag, ep_size)
    # read and checked here, so a bad model.init_from leaves nothing written; on resume the checkpoint wins
    dense = None if resume or not cfg.model.init_from else read_dense_mae(cfg.model.init_from, spec)
    data = prepare_training_data(cfg, info)  # may build the embedded set; writes nothing into the run folder
    micro, accum = micro_batch_size(ds), grad_accum_steps(ds)
    epoch_steps = steps_per_epoch(cfg, data, micro, accum, info.world_size)
    if epoch_steps < 1:
        raise ValueError(f"the data set has {data.num_samples} images, fewer than one global batch of "
                         f"{micro * accum * info.world_size}{'' if cfg.data.resampled else ' per rank share of shards'}"
                         f": lower train_micro_batch_size_per_gpu in the DeepSpeed config.")
    return _Inputs(ds, policy, ep_size, resume_tag, resume_meta, dense, data, micro, accum, epoch_steps)


def _build(cfg: Config, inp: _Inputs, info: DistInfo, total_steps: int) -> tuple[object, MaskedAutoencoderViT,
                                                                                    LoopState]:
    """This rank's model (upcycled, gate tables set), its DeepSpeed engine, and the position to start from."""
    ep_rank = info.rank % inp.ep_size
    model = build_model(cfg, inp.ep_size, ep_rank=ep_rank)
    if inp.dense is not None:  # before the cluster tables: upcycling leaves the gates to them
        how = upcycle_from_dense(model, inp.dense.state, cfg.moe.upcycle_noise, cfg.train.seed, ep_rank)
        log.info("init_from (%s layout): %s; %s", inp.dense.layout, inp.dense.description, how)
        inp.dense = None  # this rank's copy of the whole dense MAE
    elif cfg.model.init_from:
        log.info("model.init_from=%s not applied: resuming from checkpoint '%s' instead", cfg.model.init_from,
                 inp.resume_tag)
    rnd = inp.data.round
    if rnd is not None and inp.policy.needs_clusters:
        how = inp.policy.init_gates(model, rnd.centroids(), rnd.manifest.get("cluster_sizes"), cfg.cluster,
                                    cfg.train.seed)
        log.info("cluster tables start: %s", how)
    optimizer, scheduler = build_optimizer(
        model, cfg.train.lr, cfg.train.min_lr, cfg.train.weight_decay, tuple(cfg.train.betas),
        cfg.train.warmup_steps, total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=inp.ds)
    if inp.resume_tag is None:
        return engine, model, LoopState(0, 0, 0)
    engine.load_checkpoint(str(checkpoint_dir(cfg)), tag=inp.resume_tag)
    pos = inp.resume_meta["position"]
    log.info("resumed from '%s' at step %d (epoch %d, %d micro-batches into it)", inp.resume_tag, pos["step"],
             pos["epoch"], pos["micro_in_epoch"])
    return engine, model, LoopState(pos["step"], pos["epoch"], pos["micro_in_epoch"])


def pretrain(cfg: Config, ds_config_path: str | Path, resume: bool = False,
             changes: list[ConfigChange] = ()) -> PretrainResult:
    """Pre-train (or, with `resume`, continue) the run in cfg.output_dir. `changes` are a resume's config changes
    against the run's saved config.yaml (moce_ds.config.resume_config): logged, and the old config archived."""
    info = init_distributed()
    setup_logging(None, info.rank)  # console only until the run folder may be written
    run_dir = Path(cfg.output_dir)
    inp = _check_inputs(cfg, ds_config_path, resume, info)
    barrier()  # rank 0 must not write the run folder before every rank has checked it

    setup_logging(run_dir, info.rank)
    log.info("world size %d (%s), ep_size %d, routing %s, %d experts", info.world_size, info.backend, inp.ep_size,
             cfg.moe.routing, cfg.moe.num_experts)
    log.info("data: %s; cluster round %s", inp.data.description,
             None if inp.data.round is None else inp.data.round.round)
    total_steps = cfg.train.epochs * inp.epoch_steps
    engine, model, state = _build(cfg, inp, info, total_steps)
    if info.is_main:  # only now: a start or resume that failed above left the run's record as it was
        _write_run_record(run_dir, cfg, Path(ds_config_path), list(changes))
    setup = LoopSetup(cfg, info, engine, model, inp.data, inp.micro, inp.accum, inp.epoch_steps, total_steps,
                      compute_dtype(inp.ds), inp.ep_size)
    result = _run_loop(setup, state, run_dir)
    if info.is_main and cfg.metrics.report and result.checkpoint is not None:
        _write_report(run_dir)
    return result


def _run_loop(setup: LoopSetup, state: LoopState, run_dir: Path) -> PretrainResult:
    """The step loop with its sinks, signal handling and peer watchdog; every rank leaves it together."""
    cfg, info = setup.cfg, setup.info
    metrics = JsonlWriter(run_dir / "metrics.jsonl", keep_through_step=state.step) if info.is_main else None
    load_meter = ExpertLoadMeter(setup.model.moe_layers(), cfg.moe.num_experts)
    exporter = (MetricsExporter(cfg.metrics.port_base + info.local_rank, cfg.metrics.bind, info.rank)
                if cfg.metrics.enabled else None)
    stop = StopRequest().install()
    watchdog = PeerWatchdog(info.rank, info.world_size, cfg.train.peer_timeout_s).start()
    try:
        result = train_loop(setup, state, stop, load_meter, metrics, exporter)
    except RuntimeError as e:
        if isinstance(e, NonFiniteLossError):
            raise
        watchdog.explain(e)  # a collective failed: if a peer died, exit naming it; else re-raise
        raise
    finally:
        stop.uninstall()
        if metrics:
            metrics.close()
        if exporter:
            exporter.close()
    barrier()  # nobody leaves (and takes the rendezvous store away) while another rank still works
    watchdog.stop()
    return result


def _write_run_record(run_dir: Path, cfg: Config, ds_config_path: Path, changes: list[ConfigChange]) -> None:
    """config.yaml and ds_config.json describe the run from here on. When a resume changes either, the previous
    pair is kept as config.<n>.yaml / ds_config.<n>.json (n = 1, 2, ...) and each change is logged."""
    cfg_path, ds_path = run_dir / "config.yaml", run_dir / "ds_config.json"
    ds_text = ds_config_path.read_text()
    ds_changes = []
    if ds_path.is_file() and ds_path.read_text() != ds_text:
        old, new = flatten_keys(json.loads(ds_path.read_text())), flatten_keys(json.loads(ds_text))
        ds_changes = [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if (changes or ds_changes) and cfg_path.is_file():
        n = 1
        while (run_dir / f"config.{n}.yaml").exists() or (run_dir / f"ds_config.{n}.json").exists():
            n += 1
        cfg_path.replace(run_dir / f"config.{n}.yaml")
        if ds_path.is_file():
            ds_path.replace(run_dir / f"ds_config.{n}.json")
        log.info("resume changes the run's settings (the previous ones are kept as config.%d.yaml, "
                 "ds_config.%d.json):", n, n)
        for key, before, after in changes:
            log.info("  resume changes %s: %r -> %r", key, before, after)
        for key, before, after in ds_changes:
            log.info("  resume changes the DeepSpeed config's %s: %r -> %r", key, before, after)
    save_config(cfg, cfg_path)
    if not ds_path.is_file() or ds_path.read_text() != ds_text:
        atomic_write_text(ds_path, ds_text)


def _write_report(run_dir: Path) -> None:
    from moce_ds.report import build_report  # matplotlib: imported only when a report is due

    try:
        path = build_report(run_dir)
        log.info("run report: %s", path)
    except Exception as e:  # the run and its checkpoint are done; a plotting problem must not fail it
        log.warning("could not write the run report (%s: %s); retry with: python launchers/report.py %s",
                    type(e).__name__, e, run_dir)


