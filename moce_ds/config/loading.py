"""Layered config: dataclass defaults < experiment YAML files (in order) < dotted `key=value` overrides.

Unknown keys and wrong types are errors that name the key and the fix; the resolved config is dumped
into the run folder so a run can always be reproduced from its own folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from moce_ds.atomic_files import atomic_write_text
from moce_ds.config.schema import INIT_TABLES, REFRESH_FEATURES, ROUTINGS, Config

__all__ = ["ConfigError", "load_config", "config_to_dict", "save_config", "parse_overrides", "diff_configs",
           "resume_config", "flatten_keys", "LOCKED_ON_RESUME", "ConfigChange"]

# What a resume may not change without --allow-changes: the data, the model's shape and the routing. Changing one
# silently would continue a checkpoint on other images or through other experts than the run it claims to be.
LOCKED_ON_RESUME = ("data.path", "data.cache_dir", "data.resampled", "data.cluster_seed", "model.size",
                    "moe.routing", "moe.num_experts", "moe.num_clusters", "moe.layers", "moe.top_k")

ConfigChange = tuple[str, Any, Any]  # (dotted key, before, after)


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown_key(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}.")


_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}' has an invalid value {value!r}.")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}. Example: {key}=[1,3,5].")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; everyone means the number
    elif tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
    raise ConfigError(
        f"config key '{key}' must be of type {getattr(tp, '__name__', tp)}, got {value!r} "
        f"({type(value).__name__}). Fix the value in the YAML file or the '{key}=...' override."
    )


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in types_:
            raise _unknown_key(full, list(types_))
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section; give it as a mapping, e.g. {full}.<key>=...")
            kwargs[key] = _build(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['moe.num_experts=8', 'data.path='] -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (for example train.epochs=5).")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key; write section.key=value.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': the value is not valid YAML ({e.problem}).") from e
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'.")
        node[parts[-1]] = value
    return tree


def _validate(cfg: Config) -> None:
    m = cfg.moe
    if m.routing not in ROUTINGS:
        raise ConfigError(f"moe.routing='{m.routing}' is not one of {'|'.join(ROUTINGS)}.")
    if m.num_experts < 1:
        raise ConfigError(f"moe.num_experts={m.num_experts} must be >= 1.")
    if m.ep_size < 0:
        raise ConfigError(f"moe.ep_size={m.ep_size} must be >= 1, or 0 to choose it from the world size.")
    if m.ep_size and m.num_experts % m.ep_size:
        raise ConfigError(
            f"moe.num_experts={m.num_experts} is not divisible by moe.ep_size={m.ep_size}: "
            f"set moe.ep_size to a divisor of {m.num_experts} (or 0 for automatic)."
        )
    if not 1 <= m.top_k <= m.num_experts:
        raise ConfigError(f"moe.top_k={m.top_k} must be between 1 and moe.num_experts={m.num_experts}.")
    if m.top_k > 2 and m.routing == "token":
        raise ConfigError("moe.top_k > 2 is not supported by DeepSpeed's token gate; use moe.top_k=1 or 2.")
    if m.num_clusters < 1:
        raise ConfigError(f"moe.num_clusters={m.num_clusters} must be >= 1.")
    if m.capacity_factor <= 0 or m.eval_capacity_factor <= 0:
        raise ConfigError("moe.capacity_factor and moe.eval_capacity_factor must be > 0.")
    if m.aux_loss_weight < 0 or m.gate_noise_std < 0:
        raise ConfigError("moe.aux_loss_weight and moe.gate_noise_std must be >= 0.")
    if not m.gate_trainable and m.routing != "cluster":
        raise ConfigError(f"moe.gate_trainable=false freezes the cluster gates; moe.routing={m.routing} has none: "
                          f"drop it or use moe.routing=cluster.")
    if m.upcycle_noise < 0:
        raise ConfigError(f"moe.upcycle_noise={m.upcycle_noise} must be >= 0 (0: experts start as exact copies).")
    if m.upcycle_noise and not cfg.model.init_from:
        raise ConfigError("moe.upcycle_noise > 0 perturbs experts copied from a dense MAE: set model.init_from=<dense "
                          "MAE> too, or moe.upcycle_noise=0.")
    if not 0.0 < cfg.model.mask_ratio < 1.0:  # 0 masks nothing: the loss over masked patches is 0/0
        raise ConfigError(f"model.mask_ratio={cfg.model.mask_ratio} must be in (0, 1), e.g. 0.75 (MAE's default).")
    t = cfg.train
    if t.epochs < 1 or t.max_steps < 0:
        raise ConfigError("train.epochs must be >= 1 and train.max_steps >= 0 (0: no step limit).")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas={t.betas} must be two values in [0, 1), e.g. [0.9, 0.95].")
    if not t.lr > 0:  # also refuses nan
        raise ConfigError(f"train.lr={t.lr} must be > 0 (the peak learning rate, e.g. 1.5e-3).")
    if not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} must be in [0, train.lr={t.lr}] (the cosine schedule's floor).")
    if t.weight_decay < 0 or t.warmup_steps < 0:
        raise ConfigError(f"train.weight_decay={t.weight_decay} and train.warmup_steps={t.warmup_steps} must be >= 0.")
    if t.log_every < 1 or t.save_every_epochs < 1 or t.save_every_steps < 0 or t.keep_checkpoints < 0:
        raise ConfigError("train.log_every and train.save_every_epochs must be >= 1, train.save_every_steps >= 0 "
                          "(0: epoch ends only) and train.keep_checkpoints >= 0 (0: keep all).")
    c = cfg.cluster
    if c.refresh_every < 0 or c.max_images < 0:
        raise ConfigError("cluster.refresh_every and cluster.max_images must be >= 0 (0: off / all images).")
    if c.features not in REFRESH_FEATURES:
        raise ConfigError(f"cluster.features='{c.features}' is not one of {'|'.join(REFRESH_FEATURES)}.")
    if c.iters < 1 or c.tol < 0:
        raise ConfigError("cluster.iters must be >= 1 and cluster.tol >= 0.")
    if c.init_table not in INIT_TABLES:
        raise ConfigError(f"cluster.init_table='{c.init_table}' is not one of {'|'.join(INIT_TABLES)}.")
    if c.lpt_margin <= 0:
        raise ConfigError(f"cluster.lpt_margin={c.lpt_margin} must be > 0.")
    if c.refresh_every and m.routing != "cluster":
        raise ConfigError("cluster.refresh_every > 0 needs moe.routing=cluster (only the cluster gate uses rounds).")
    if not 1 <= cfg.metrics.port_base <= 65535:
        raise ConfigError(f"metrics.port_base={cfg.metrics.port_base} must be a TCP port (1-65535); rank r uses "
                          f"port_base + local rank.")
    if not cfg.metrics.bind:
        raise ConfigError("metrics.bind is empty; use 127.0.0.1 (loopback) or 0.0.0.0 (all interfaces).")
    if not cfg.output_dir:
        raise ConfigError("output_dir is empty; set output_dir=runs/<name>.")


def _layers(yaml_files: list[str | Path], overrides: list[str]) -> dict[str, Any]:
    """Each YAML file in order < overrides, as one nested dict (no defaults, not yet checked)."""
    merged: dict[str, Any] = {}
    for path in yaml_files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; pass an existing YAML file with --config.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, moe:, ...).")
        merged = _merge(merged, data)
    return _merge(merged, parse_overrides(list(overrides)))


def _checked(tree: dict[str, Any]) -> Config:
    cfg = _build(Config, tree, "")
    _validate(cfg)
    return cfg


def load_config(yaml_files: list[str | Path] = (), overrides: list[str] = ()) -> Config:
    """Defaults < each YAML file in order < overrides. Raises ConfigError on any problem."""
    return _checked(_layers(list(yaml_files), list(overrides)))


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (a config or DeepSpeed JSON as dotted keys, for diffs)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def diff_configs(before: Config, after: Config) -> list[ConfigChange]:
    """Every dotted key whose value differs, in schema order: [('train.epochs', 10, 20), ...]."""
    a, b = flatten_keys(config_to_dict(before)), flatten_keys(config_to_dict(after))
    return [(k, a[k], b[k]) for k in a if a[k] != b[k]]


def resume_config(yaml_files: list[str | Path] = (), overrides: list[str] = (),
                  allow_changes: bool = False) -> tuple[Config, list[ConfigChange]]:
    """The config a `--resume` continues with: the run's saved config.yaml < YAML files < overrides.

    The run folder is the output_dir the YAML files and overrides name (or the default). A run folder without a
    config.yaml resumes from the command line alone (no changes to report). Changes to LOCKED_ON_RESUME keys are
    refused unless `allow_changes`. Returns the config and the changes against the saved one.
    """
    tree = _layers(list(yaml_files), list(overrides))
    run_dir = Path(tree.get("output_dir") or Config().output_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return _checked(tree), []
    try:
        saved_tree = yaml.safe_load(saved_path.read_text()) or {}
        saved = _checked(saved_tree)
    except (yaml.YAMLError, ConfigError) as e:
        raise ConfigError(f"the run's {saved_path} cannot be read back ({e}): restore it, or resume with the full "
                          f"command line in a new output_dir.") from e
    cfg = _checked(_merge(saved_tree, dict(tree, output_dir=str(run_dir))))
    changes = [c for c in diff_configs(saved, cfg) if c[0] != "output_dir"]  # a moved run folder is no change
    locked = [c for c in changes if c[0] in LOCKED_ON_RESUME]
    if locked and not allow_changes:
        what = "; ".join(f"{k} from {a!r} to {b!r}" for k, a, b in locked)
        raise ConfigError(f"--resume would change {what} (the run in {run_dir} was made with the former): drop the "
                          f"override or --config file that sets it, or pass --allow-changes to continue the "
                          f"checkpoint under the new setting.")
    return cfg, changes


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (a crash never leaves half a file)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
