"""launchers/pretrain.py on a disk that is full once the first checkpoint is saved (shutil.disk_usage reports
0 bytes free): `pretrain_disk_full.py <launcher args...>`."""

import collections
import importlib.util
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

Usage = collections.namedtuple("Usage", "total used free")
shutil.disk_usage = lambda path: Usage(2**30, 2**30, 0)

spec = importlib.util.spec_from_file_location("pretrain_launcher", ROOT / "launchers" / "pretrain.py")
launcher = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launcher)
sys.exit(launcher.main([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
