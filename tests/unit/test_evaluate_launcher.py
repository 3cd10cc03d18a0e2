"""launchers/evaluate.py in process: --device and --batch-size reach feature extraction and the fine-tune; a task
of one class stops with one line before any feature is extracted (issues 14, 17)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import moce_ds.evaluation.run as run
from tests.script_module import load_script


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Random weights of timm's tiny test_vit (160 px, width 64): a real encoder in a second."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "test_vit.pth"
    torch.save(timm.create_model("test_vit", num_classes=0).state_dict(), path)
    return path


def _task(root: Path, per_class: dict[str, int]) -> Path:
    """An ImageFolder tree: <root>/<class>/<i>.png, 24 px images (resized to the encoder's size on load)."""
    rng = np.random.default_rng(0)
    for c, n in per_class.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def launcher():
    return load_script("launchers/evaluate.py", "evaluate_launcher")


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, dict]]:
    """What evaluate() passed to the real extract_features and finetune."""
    seen: list[tuple[str, dict]] = []
    for name in ("extract_features", "finetune"):
        real = getattr(run, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen.append((_name, kw))
            return _real(*a, **kw)

        monkeypatch.setattr(run, name, spy)
    return seen


def test_device_and_batch_size_reach_features_and_finetune(tmp_path, launcher, checkpoint, calls, capsys):
    task = _task(tmp_path / "pets", {"cat": 4, "dog": 4})
    out = tmp_path / "acc.json"
    rc = launcher.main(["--model", "test_vit", "--checkpoint", str(checkpoint), "--task", str(task), "--finetune",
                        "--finetune-epochs", "1", "--device", "cpu", "--batch-size", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert [n for n, _ in calls] == ["extract_features", "extract_features", "finetune"]
    assert all(kw["device"] == "cpu" and kw["batch_size"] == 3 for _, kw in calls), calls
    res = json.loads(out.read_text())
    assert res["num_train"] == 4 and res["num_test"] == 4
    assert all(0.0 <= res[k] <= 1.0 for k in ("linear_probe_top1", "knn_top1", "finetune_top1"))


def test_default_batch_sizes_are_each_functions_own(tmp_path, launcher, checkpoint, calls, capsys):
    task = _task(tmp_path / "pets", {"cat": 2, "dog": 2})
    assert launcher.main(["--model", "test_vit", "--checkpoint", str(checkpoint), "--task", str(task)]) == 0
    assert calls and all(kw == {"device": "cpu"} for _, kw in calls), calls
    capsys.readouterr()


@pytest.mark.parametrize("per_class", [{"cat": 6}, {"cat": 6, "dog": 1}])  # the lone dog goes to the test half
def test_a_task_of_one_class_stops_with_one_line(tmp_path, launcher, checkpoint, calls, capsys, per_class):
    task = _task(tmp_path / "cats", per_class)
    rc = launcher.main(["--model", "test_vit", "--checkpoint", str(checkpoint), "--task", str(task)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: task cats has only one class ('cat') among its 3 training images: a probe "
                             "needs at least two")
    assert calls == []  # refused before any feature was extracted


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path, launcher, checkpoint, capsys):
    task = _task(tmp_path / "pets", {"cat": 2, "dog": 2})
    rc = launcher.main(["--model", "test_vit", "--checkpoint", str(checkpoint), "--task", str(task),
                        "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: device 'cuda' asked for, but torch sees no CUDA device: pass --device cpu "
                               "or auto"]


def test_bad_batch_size_and_device_are_refused_by_the_parser(launcher, capsys):
    for args in (["--batch-size", "0"], ["--device", "gpu"]):
        with pytest.raises(SystemExit) as e:
            launcher.main(["--model", "x", "--task", "digits", *args])
        assert e.value.code == 2
    capsys.readouterr()
