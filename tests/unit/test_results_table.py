"""benchmarks/results_table.py rewrites only its marked block, from the newest run of each results file."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("results_table", ROOT / "benchmarks" / "results_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _layer_row(stamp: str, ratio: float) -> dict:
    return {"bench": "moe_layer", "time": stamp, "sweep": "width", "width": 384, "experts": 8, "images": 64,
            "tokens_per_image": 50, "threads": 1, "rounds": 7, "dense_s": 0.3, "moce_s": 0.3 * ratio,
            "moce_vs_dense": ratio, "moce_dropless_vs_dense": 1.02, "moce_dropped_share": 0.05,
            "token_vs_dense": 1.4, "cluster_gate_share": 0.004, "cluster_gate_s": 0.0012, "token_gate_share": 0.01}


def test_rewrites_the_block_from_the_newest_run_and_keeps_the_prose(tmp_path):
    mod = _module()
    results = tmp_path / "results"
    results.mkdir()
    rows = [_layer_row("2026-11-28 10:00", 1.50), _layer_row("2026-11-28 12:00", 0.97)]
    (results / "moe_layer.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\nprose before\n{mod.BEGIN}\nstale table\n{mod.END}\nprose after\n")
    mod.rewrite(readme, results)
    text = readme.read_text()
    assert text.startswith("# Benchmarks\nprose before\n") and text.endswith("prose after\n")
    assert "stale table" not in text
    assert "0.97x" in text and "1.50x" not in text  # only the newest run
    assert "No results yet: run `python benchmarks/throughput.py`" in text  # a missing benchmark says how
    mod.rewrite(readme, results)
    assert readme.read_text() == text  # idempotent


def test_a_readme_without_markers_is_a_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no '<!-- results:begin -->'"):
        _module().rewrite(readme, tmp_path)
