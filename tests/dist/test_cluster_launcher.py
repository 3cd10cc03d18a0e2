"""launchers/cluster.py as a user runs it (a real process): quiet output, one consistent image count (issue 15)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.test_cluster_launcher import _shards

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


def test_output_has_no_faiss_loader_lines_and_one_image_count(tmp_path):
    data, out = _shards(tmp_path / "shards"), tmp_path / "clusters"
    proc = subprocess.run([sys.executable, str(ROOT / "launchers" / "cluster.py"), "--data", str(data), "--k", "4",
                           "--out", str(out), "--comm", "local", "--threads", "1", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "faiss.loader" not in text and "Could not load library" not in text and "Loading faiss" not in text
    # every image count printed is the manifest's 40, or the 37 that decoded stated as "37 of the 40"
    counts = re.findall(r"(\d+)(?: of the (\d+))? images", text)
    assert counts and all(c == ("40", "") or c == ("37", "40") for c in counts), counts
    assert ("37", "40") in counts
    assert proc.stdout.strip().splitlines()[-1] == f"done: round 0 (k=4) at {out / 'round_0000'}"
