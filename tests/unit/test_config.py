import pytest
import yaml

from moce_ds.config import ConfigError, load_config, save_config


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
])
def test_invalid_values(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("|", r"\|")):
        load_config([], [override])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config([], ["moe.num_experts=8", "train.betas=[0.9,0.99]"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config([tmp_path / "config.yaml"])
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["moe"]["num_experts"] == 8
