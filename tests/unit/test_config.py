import re

import pytest
import yaml

from moce_ds.config import LOCKED_ON_RESUME, ConfigError, diff_configs, load_config, resume_config, save_config


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("moe:\n  num_experts: 8\n  num_clusters: 32\ntrain:\n  epochs: 3\n")
    cfg = load_config([exp], ["train.epochs=5", "data.path=", "moe.layers=[1,3]", "output_dir=runs/x"])
    assert cfg.moe.num_experts == 8 and cfg.moe.num_clusters == 32  # from the YAML
    assert cfg.train.epochs == 5  # the override wins
    assert cfg.moe.layers == [1, 3] and cfg.data.path == "" and cfg.output_dir == "runs/x"
    assert cfg.model.size == "mini"  # untouched default


@pytest.mark.parametrize("key", ["output_dir", "train.epochs", "train.max_steps", "data.path", "model.size",
                                 "moe.routing", "moe.num_experts", "moe.ep_size", "moe.top_k", "moe.num_clusters"])
def test_required_keys_exist(key):
    value = {"output_dir": "r", "data.path": "/d", "model.size": "mini", "moe.routing": "token"}.get(key, 2)
    cfg = load_config([], [f"{key}={value}"])
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == value


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'moe.num_expert'.*Did you mean 'num_experts'"):
        load_config([], ["moe.num_expert=4"])
    with pytest.raises(ConfigError, match="unknown config key 'foo'"):
        load_config([], ["foo=1"])


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("train:\n  min_lr: 1e-6\n")
    cfg = load_config([exp], ["train.lr=1e-3"])  # YAML 1.1 alone would read both as strings
    assert cfg.train.lr == 1e-3 and cfg.train.min_lr == 1e-6
    with pytest.raises(ConfigError, match="'train.lr' must be of type float, got 'fast'"):
        load_config([], ["train.lr=fast"])


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="'train.epochs' must be of type int, got 'ten'"):
        load_config([], ["train.epochs=ten"])
    with pytest.raises(ConfigError, match="'moe.drop_tokens' must be of type bool"):
        load_config([], ["moe.drop_tokens=3"])


@pytest.mark.parametrize("override,message", [
    ("moe.routing=topk", "moe.routing='topk' is not one of dense|token|cluster"),
    ("moe.ep_size=3", "not divisible by moe.ep_size=3"),
    ("moe.top_k=5", "moe.top_k=5 must be between 1"),
    ("model.mask_ratio=1.0", "model.mask_ratio=1.0"),
    ("model.mask_ratio=0", "model.mask_ratio=0.0 must be in (0, 1)"),
    ("train.lr=.nan", "train.lr=nan must be > 0"),
    ("train.lr=-1", "train.lr=-1.0 must be > 0"),
    ("train.min_lr=0.1", "train.min_lr=0.1 must be in [0, train.lr"),
    ("train.weight_decay=-0.1", "train.weight_decay=-0.1"),
    ("train.warmup_steps=-5", "train.warmup_steps=-5"),
    ("train.betas=[0.9,1.5]", "train.betas=[0.9, 1.5] must be two values in [0, 1)"),
    ("train.log_every=0", "train.log_every and train.save_every_epochs must be >= 1"),
])
def test_invalid_values(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config([], [override])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([], ["moe.num_experts=8", "train.betas=[0.9,0.99]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config([tmp_path / "config.yaml"])
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["moe"]["num_experts"] == 8


def _saved_run(tmp_path, *overrides):
    run = tmp_path / "run"
    cfg = load_config([], [f"output_dir={run}", "data.path=/shards/a", "train.epochs=3", *overrides])
    save_config(cfg, run / "config.yaml")
    return run, cfg


def test_resume_starts_from_the_saved_config(tmp_path):
    run, saved = _saved_run(tmp_path, "moe.num_experts=8")
    cfg, changes = resume_config([], [f"output_dir={run}"])
    assert cfg == saved and changes == []  # data.path and the experts come back without being repeated
    cfg, changes = resume_config([], [f"output_dir={run}", "train.epochs=5", "train.lr=1e-3"])
    assert cfg.data.path == "/shards/a" and cfg.train.epochs == 5
    assert changes == [("train.epochs", 3, 5), ("train.lr", 1.5e-3, 1e-3)]
    exp = tmp_path / "more.yaml"
    exp.write_text("train:\n  epochs: 7\n")
    cfg, changes = resume_config([exp], [f"output_dir={run}"])  # a YAML file also layers on top of the saved one
    assert changes == [("train.epochs", 3, 7)]


@pytest.mark.parametrize("override", ["data.path=/shards/b", "moe.num_experts=8", "moe.routing=token",
                                      "moe.layers=[1]", "model.size=tiny"])
def test_resume_refuses_changing_data_shape_or_routing(tmp_path, override):
    run, _ = _saved_run(tmp_path)
    key = override.split("=")[0]
    assert key in LOCKED_ON_RESUME
    with pytest.raises(ConfigError, match=rf"--resume would change {key} from .* --allow-changes"):
        resume_config([], [f"output_dir={run}", override])
    cfg, changes = resume_config([], [f"output_dir={run}", override], allow_changes=True)
    assert [c[0] for c in changes] == [key]


def test_resume_without_a_saved_config_uses_the_command_line(tmp_path):
    cfg, changes = resume_config([], [f"output_dir={tmp_path / 'none'}", "train.epochs=2"])
    assert cfg.train.epochs == 2 and changes == []


def test_resume_names_an_unreadable_saved_config(tmp_path):
    run, _ = _saved_run(tmp_path)
    (run / "config.yaml").write_text("moe:\n  num_expertz: 3\n")
    with pytest.raises(ConfigError, match=r"config.yaml cannot be read back .*unknown config key 'moe.num_expertz'"):
        resume_config([], [f"output_dir={run}"])


def test_diff_configs_lists_every_changed_key():
    a = load_config([], [])
    b = load_config([], ["moe.layers=[1,3]", "train.seed=4"])
    assert diff_configs(a, b) == [("moe.layers", None, [1, 3]), ("train.seed", 0, 4)]
    assert diff_configs(a, a) == []
