"""Prometheus exporter: one HTTP /metrics endpoint per rank, and a textfile writer for batch jobs.

Every rank serves its own series on ``port_base + local_rank`` (so ranks on one node never collide and a
scrape config lists ``host:port_base..port_base+ranks_per_node-1``). Per-expert series come from rank 0
only, after the all-reduce the trainer already does for metrics.jsonl: one reduced view, bounded labels
(``layer`` and ``expert``), never cluster or sample ids.

Each exporter owns a private ``CollectorRegistry`` (not the global default) so several can live in one
process, as they do in the unit tests.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server, write_to_textfile

__all__ = ["MetricsExporter", "write_clustering_textfile", "STEP_BUCKETS", "WAIT_BUCKETS"]

log = logging.getLogger("moce_ds")

# A mini CPU step is ~0.1-1 s, a ViT-L step on a GPU node ~0.3-3 s; the buckets span both.
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Waiting on the loader should be ~0; anything in the upper buckets is a data stall.
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


class MetricsExporter:
    """The trainer's series. ``port=None``: registry only, no HTTP server (tests read ``registry``)."""

    def __init__(self, port: int | None = None, bind: str = "127.0.0.1", rank: int = 0) -> None:
        self.registry = CollectorRegistry()
        self.rank = rank
        r = self.registry
        self.images = Counter("moce_images_processed", "Images this rank trained on (sum rate() over ranks for "
                              "global throughput)", registry=r)
        self.step_seconds = Histogram("moce_step_seconds", "Wall time of one optimizer step on this rank, data "
                                      "wait included", buckets=STEP_BUCKETS, registry=r)
        self.data_wait = Histogram("moce_data_wait_seconds", "Time blocked on the data loader per micro-batch",
                                   buckets=WAIT_BUCKETS, registry=r)
        self.loss = Gauge("moce_loss", "Training loss (recon + weighted aux), mean over ranks at the last log step",
                          registry=r)
        self.recon_loss = Gauge("moce_recon_loss", "Reconstruction loss, mean over ranks at the last log step",
                                registry=r)
        self.aux_loss = Gauge("moce_aux_loss", "MoE balance loss (unweighted sum over layers), mean over ranks",
                              registry=r)
        self.lr = Gauge("moce_learning_rate", "Learning rate at the last log step", registry=r)
        self.step = Gauge("moce_step", "Optimizer steps done", registry=r)
        self.epoch = Gauge("moce_epoch", "Epoch in progress", registry=r)
        self.skipped = Counter("moce_samples_skipped", "Samples the loader skipped on this rank, by reason",
                               ["reason"], registry=r)
        self.nonfinite = Counter("moce_nonfinite_losses", "Micro-steps skipped for a non-finite loss on any rank",
                                 registry=r)
        self.cluster_round = Gauge("moce_cluster_round", "Clustering round the gate reads cluster ids from "
                                   "(-1: none)", registry=r)
        self.cluster_round.set(-1)
        self.tokens_routed = Counter("moce_expert_tokens_routed", "Token routes requested per expert, all ranks "
                                     "(exported by rank 0)", ["layer", "expert"], registry=r)
        self.tokens_dropped = Counter("moce_expert_tokens_dropped", "Token routes dropped over capacity per "
                                      "expert, all ranks (exported by rank 0)", ["layer", "expert"], registry=r)
        self.images_routed = Counter("moce_expert_images_routed", "Images with at least one token kept at the "
                                     "expert, all ranks (exported by rank 0)", ["layer", "expert"], registry=r)
        self.load_cv = Gauge("moce_expert_load_cv", "Coefficient of variation (std/mean) of kept tokens over "
                             "experts in the last log interval; 0 is perfectly balanced", ["layer"], registry=r)
        self.dropped_share = Gauge("moce_dropped_share", "Share of routes dropped over capacity in the last log "
                                   "interval (cluster routing: whole images; token routing: tokens)", ["layer"],
                                   registry=r)
        self.route_purity = Gauge("moce_route_purity", "Share of the last log interval's first-choice routes that "
                                  "went to their cluster's preferred (noise-free top-1) expert", ["layer"], registry=r)
        self.cluster_expert_nmi = Gauge("moce_cluster_expert_nmi", "Mutual information of cluster and expert over "
                                        "the last log interval, normalised by the expert entropy (1: the cluster "
                                        "determines the expert)", ["layer"], registry=r)
        # Present only when DeepSpeed's wall_clock_breakdown is on: MOELayer then times its two all-to-alls.
        self.alltoall: Gauge | None = None
        self._server = None
        if port is not None:
            try:
                self._server, _ = start_http_server(port, addr=bind, registry=r)
                log.info("rank %d: Prometheus metrics on http://%s:%d/metrics", rank, bind, port)
            except OSError as e:  # a busy port must not cost a training run its metrics.jsonl or its checkpoints
                log.warning("rank %d: cannot serve Prometheus metrics on %s:%d (%s); training goes on without "
                            "them. Choose another metrics.port_base.", rank, bind, port, e)

    # ---- every rank
    def observe_data_wait(self, seconds: float) -> None:
        self.data_wait.observe(seconds)

    def add_skipped(self, counts: dict[str, int]) -> None:
        # Loader workers count skips, but the counts travel with each batch into this (the main) process,
        # so counting here loses nothing and needs no prometheus multiprocess mode (or its shared folder).
        for reason, n in counts.items():
            if n:
                self.skipped.labels(reason=reason).inc(n)

    def observe_step(self, seconds: float, images: int) -> None:
        self.step_seconds.observe(seconds)
        self.images.inc(images)

    def add_nonfinite(self) -> None:
        self.nonfinite.inc()

    def set_position(self, step: int, epoch: int, cluster_round: int | None) -> None:
        self.step.set(step)
        self.epoch.set(epoch)
        self.cluster_round.set(-1 if cluster_round is None else cluster_round)

    def set_step(self, step: int) -> None:
        self.step.set(step)

    def set_losses(self, loss: float, recon: float, aux: float, lr: float) -> None:
        self.loss.set(loss)
        self.recon_loss.set(recon)
        self.aux_loss.set(aux)
        self.lr.set(lr)

    def set_alltoall(self, layers: list[tuple[int, object]]) -> None:
        """DeepSpeed's MOELayer all-to-all timers (ms, cumulative since its last reset), when it keeps them."""
        timed = [(i, moe.deepspeed_moe) for i, moe in layers if getattr(moe.deepspeed_moe, "wall_clock_breakdown",
                                                                          False)]
        if not timed:
            return
        if self.alltoall is None:
            self.alltoall = Gauge("moce_expert_alltoall_seconds", "DeepSpeed MOELayer timer reading for the "
                                  "dispatch + combine all-to-alls (wall_clock_breakdown only)", ["layer"],
                                  registry=self.registry)
        for i, m in timed:
            self.alltoall.labels(layer=str(i)).set((m.time_falltoall + m.time_salltoall) / 1000.0)

    # ---- rank 0, after the reduction over ranks
    def add_expert_load(self, load: dict[str, dict[str, list[float]]]) -> None:
        """``load``: ExpertLoadMeter.reduce()'s {layer: {tokens_requested, tokens_kept, images: [per expert]}}."""
        for layer, stats in load.items():
            kept = stats["tokens_kept"]
            for e, (req, k, img) in enumerate(zip(stats["tokens_requested"], kept, stats["images"])):
                labels = {"layer": layer, "expert": str(e)}
                self.tokens_routed.labels(**labels).inc(req)
                self.tokens_dropped.labels(**labels).inc(max(0, req - k))
                self.images_routed.labels(**labels).inc(img)
            self.load_cv.labels(layer=layer).set(load_cv(kept))
            self.dropped_share.labels(layer=layer).set(stats["dropped_share"])
            if "route_purity" in stats:
                self.route_purity.labels(layer=layer).set(stats["route_purity"])
                self.cluster_expert_nmi.labels(layer=layer).set(stats["cluster_expert_nmi"])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def load_cv(values: list[float]) -> float:
    """std / mean over experts (population std); 0 when nothing was routed."""
    n = len(values)
    mean = sum(values) / n if n else 0.0
    if mean <= 0:
        return 0.0
    return (sum((v - mean) ** 2 for v in values) / n) ** 0.5 / mean


def write_clustering_textfile(path: Path, round_id: int, k: int, objective: float, sizes: list[int],
                              iterations: int, seconds: float, num_images: int) -> Path:
    """A batch job's HTTP server dies with it, so the clustering job writes its result as a Prometheus
    textfile (node_exporter's textfile collector, or any file-based scrape, picks it up). Written atomically."""
    r = CollectorRegistry()
    Gauge("moce_cluster_last_success_timestamp_seconds", "Unix time the last clustering round was written",
          registry=r).set(time.time())
    Gauge("moce_cluster_round", "Newest clustering round", registry=r).set(round_id)
    Gauge("moce_cluster_k", "Clusters in the newest round", registry=r).set(k)
    Gauge("moce_cluster_objective", "Final k-means objective of the newest round", registry=r).set(objective)
    Gauge("moce_cluster_iterations", "Lloyd iterations of the newest round", registry=r).set(iterations)
    Gauge("moce_cluster_duration_seconds", "Wall time of the clustering job", registry=r).set(seconds)
    Gauge("moce_cluster_images", "Images with a cluster id in the newest round", registry=r).set(num_images)
    # Sizes as a summary, not one series per cluster: cluster ids never become labels (k can be thousands).
    sz = sorted(sizes)
    Gauge("moce_cluster_size_min_images", "Smallest cluster", registry=r).set(sz[0] if sz else 0)
    Gauge("moce_cluster_size_max_images", "Largest cluster", registry=r).set(sz[-1] if sz else 0)
    Gauge("moce_cluster_size_cv", "Coefficient of variation of cluster sizes", registry=r).set(load_cv(sz))
    Gauge("moce_cluster_empty", "Clusters with no image", registry=r).set(sum(1 for n in sz if n == 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), r)  # writes a temp file and renames it
    os.chmod(path, 0o644)
    return path
