import json

import numpy as np

from moce_ds.config import load_config
from moce_ds.customize.report import write_report
from moce_ds.customize.selection import gate_probabilities, select_experts
from moce_ds.model import MaskedAutoencoderViT, get_spec


def test_report_lists_every_skipped_image_in_json_and_the_first_twenty_in_markdown(tmp_path):
    model = MaskedAutoencoderViT(get_spec("mini"), load_config([], []).moe)
    clusters = next(iter(gate_probabilities(model).values())).shape[0]
    sel = select_experts(model, np.full(clusters, 1.0 / clusters))
    skipped = [f"task/a/{i:02d}.png" for i in range(25)]
    paths = write_report(tmp_path, "task", sel, {"num_images": 10}, skipped)
    record = json.loads(paths["json"].read_text())
    assert record["skipped_images"] == skipped and record["num_skipped_images"] == 25
    md = paths["markdown"].read_text()
    assert "skipped images (do not decode): 25: `task/a/00.png`" in md
    assert "`task/a/19.png` and 5 more" in md and "task/a/20.png" not in md
