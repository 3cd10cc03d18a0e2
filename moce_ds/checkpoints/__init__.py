"""Reading what pre-training wrote: checkpoint completion records and whole runs (any ep_size) in one process.

This package sits below customisation, clustering, evaluation and the report, and above model/config/data:
it never imports DeepSpeed's engine or the trainer.
"""

from moce_ds.checkpoints.records import complete_tags, latest_tag, read_meta, verify_tag
from moce_ds.checkpoints.run_reader import Pretrained, load_pretrained, resolve_checkpoint

__all__ = ["complete_tags", "latest_tag", "read_meta", "verify_tag", "Pretrained", "load_pretrained",
           "resolve_checkpoint"]
