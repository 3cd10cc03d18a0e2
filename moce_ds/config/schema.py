"""Typed configuration: one dataclass per section, defaults here and nowhere else.

The DeepSpeed JSON owns engine settings (micro-batch, gradient accumulation, precision, ZeRO, clipping);
these dataclasses own the science. No setting lives in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ModelConfig", "MoEConfig", "DataConfig", "TrainConfig", "ClusterConfig", "MetricsConfig", "Config",
           "ROUTINGS", "INIT_TABLES", "REFRESH_FEATURES"]

ROUTINGS = ("dense", "token", "cluster")
INIT_TABLES = ("random", "centroids", "lpt")
REFRESH_FEATURES = ("encoder", "pixel")


@dataclass
class ModelConfig:
    size: str = "mini"  # a name from moce_ds.model.registry.MODEL_SIZES
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    # A dense MAE to start from (sparse upcycling): one of our dense runs (run, checkpoints or tag folder), the
    # official MAE .pth or a timm ViT .pth/.safetensors; every expert starts as its block's dense MLP. Empty: random.
    init_from: str = ""


@dataclass
class MoEConfig:
    routing: str = "cluster"  # dense | token | cluster
    num_experts: int = 4
    ep_size: int = 0  # 0: the largest divisor of num_experts that divides the world size
    top_k: int = 1
    num_clusters: int = 16
    layers: list[int] | None = None  # encoder blocks whose MLP is a MoE; None: every other (1, 3, 5, ...)
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True  # False: dropless (capacity grows to the busiest expert)
    aux_loss_weight: float = 0.01
    gate_noise_std: float = 1.0  # std of the Gaussian noise added to an image's gate logits in training; 0: off
    gate_trainable: bool = True  # cluster routing: False freezes the gates at their start (e.g. an LPT packing)
    use_rts: bool = False  # token routing only: DeepSpeed's random token selection
    # model.init_from only: Gaussian noise on each expert copy's weights, std = this x the dense weight's std
    # (seeded per layer and global expert id); 0: exact copies (the upcycled model starts equal to the dense one)
    upcycle_noise: float = 0.0


@dataclass
class DataConfig:
    path: str = ""  # shard pattern / directory; empty: the embedded default data set
    cache_dir: str = ""  # where the embedded set is built; empty: ~/.cache/moce_ds
    num_workers: int = 2
    shuffle_buffer: int = 1000
    strict: bool = False  # True: the first bad sample is an error instead of a skip
    resampled: bool = True  # False: each shard read once per epoch (split by rank and worker; needs a manifest)
    cluster_seed: int = 0


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: int = 0  # 0: no limit beyond epochs
    lr: float = 1.5e-3  # peak learning rate (absolute, not scaled by batch size)
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 40
    seed: int = 0
    log_every: int = 10
    save_every_epochs: int = 1
    save_every_steps: int = 0  # also checkpoint every this many steps inside an epoch (0: epoch ends only)
    keep_checkpoints: int = 2
    max_nonfinite_in_row: int = 5  # non-finite losses are skipped; this many in a row stop the run
    peer_timeout_s: float = 120.0  # a rank silent this long counts as dead: every rank exits (0: off)


@dataclass
class ClusterConfig:
    """In-training centroid refresh and the gate table's start (the offline job takes its own CLI flags)."""

    refresh_every: int = 0  # epochs between refreshes (new round from the current encoder); 0: off
    features: str = "encoder"  # refresh features: encoder (mean of unmasked patch tokens, unit norm) | pixel
    max_images: int = 0  # refresh featurises at most this many images (spread over ranks); 0: all
    iters: int = 20  # Lloyd iterations at most
    tol: float = 1e-4  # stop when the objective's relative change is below this
    seed: int = 0  # k-means++ seed (the refresh adds the epoch)
    spherical: bool = True  # cosine k-means (features are unit norm)
    init_table: str = "centroids"  # gate cluster table at step 0: random | centroids (if width fits) | lpt
    lpt_margin: float = 4.0  # init_table=lpt: logit of the packed expert above the others


@dataclass
class MetricsConfig:
    """Live metrics and the end-of-run report (metrics.jsonl and the logs are always written)."""

    enabled: bool = True  # a Prometheus /metrics endpoint on every rank
    port_base: int = 9500  # rank r listens on port_base + local rank (clear of the common exporters' 9100-9400)
    bind: str = "127.0.0.1"  # loopback: scrape through the node; 0.0.0.0 to let a remote Prometheus in
    report: bool = True  # rank 0 writes <output_dir>/report/report.md when pre-training ends


@dataclass
class Config:
    output_dir: str = "runs/moce"
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
