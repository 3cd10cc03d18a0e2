"""The fp32 master weights of a bf16/fp16 ZeRO-1/2 checkpoint, rebuilt from every rank's optimizer partition.

Under bf16 the module weights DeepSpeed saves (`mp_rank_00_model_states.pt`, the expert files) are the bf16 copies;
the fp32 masters the optimizer updates live only in each rank's `*zero_pp_rank_R_mp_rank_00_optim_states.pt`, as
flat partitions with a `param_slice_mappings` record (name -> start, numel inside the partition). DeepSpeed's own
`zero_to_fp32` does not fit our layout: it reads every `*_model_states.pt` as a model file (the expert files are
not) and concatenates each group's partitions over all ranks, while an expert group is partitioned only within
its expert-data-parallel group and each expert-parallel rank holds other experts under local ids.

Rebuilding: walk the ranks in order; every fragment of a name is appended to that name's pieces, so a non-expert
parameter split over ranks 0..W-1 comes out whole, and an expert parameter (local id renamed to its global id
ep_rank * local experts + local id, ep_rank = rank % ep_size as DeepSpeed groups them) comes out whole from the
ranks of its expert-data-parallel group. Every piece's total must equal the parameter's size.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

__all__ = ["fp32_master_weights", "optimizer_files"]

_OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt")
_EXPERT = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")


class _Record:
    """Stand-in for DeepSpeed's pickled helper objects (loss scaler, fragment address): their fields only, so the
    file loads under weights_only=True without importing DeepSpeed's engine."""

    def __setstate__(self, state: object) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


def _stage(value: int) -> int:  # ZeroStageEnum(2) -> 2
    return int(value)


_SAFE = [(_Record, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
         (_Record, "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"),
         (_Record, "deepspeed.utils.tensor_fragment.fragment_address"),
         (_stage, "deepspeed.runtime.zero.config.ZeroStageEnum")]


def optimizer_files(tag_dir: Path) -> list[Path]:
    """Every rank's ZeRO optimizer file of a tag folder, in rank order."""
    found = [(int(m.group(1)), p) for p in Path(tag_dir).iterdir() if (m := _OPTIM_FILE.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _load(path: Path) -> dict:
    with torch.serialization.safe_globals(_SAFE):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["optimizer_state_dict"]


def fp32_master_weights(tag_dir: Path, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """fp32 masters for the names of `reference` (the checkpoint's module + expert weights, global expert ids) that
    the optimizer holds; frozen parameters and buffers are not among them. None when the tag has no ZeRO-1/2
    optimizer files with slice mappings (fp32 runs need none: their module weights are the masters)."""
    files = optimizer_files(tag_dir)
    if not files:
        return None
    states = [_load(p) for p in files]
    if any("param_slice_mappings" not in s or "single_partition_of_fp32_groups" not in s for s in states):
        return None
    ep_size = _ep_size(states[0], reference)
    pieces: dict[str, list[torch.Tensor]] = {}
    for rank, state in enumerate(states):  # rank order: each name's fragments concatenate in partition order
        local = _local_experts(state)
        for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"]):
            for name, frag in mapping.items():
                pieces.setdefault(_global_name(name, rank % ep_size, local), []).append(
                    flat.narrow(0, frag.start, frag.numel))
    out = {}
    for name, parts in pieces.items():
        if name not in reference:
            raise ValueError(f"{tag_dir}: the optimizer state holds '{name}', which the checkpoint's module does not")
        ref = reference[name]
        full = torch.cat(parts) if len(parts) > 1 else parts[0]
        if full.numel() != ref.numel():
            raise ValueError(f"{tag_dir}: the fp32 master of '{name}' has {full.numel()} values over the ranks' "
                             f"partitions, the weight {ref.numel()}: a rank's optimizer file is missing or stale.")
        out[name] = full.reshape(ref.shape).clone()  # clone: not a view into a memory-mapped file
    return out


def _local_experts(state: dict) -> dict[str, int]:
    """Experts per MoE layer (keyed by the name prefix up to `deepspeed_experts.`) on the rank that wrote `state`."""
    ids: dict[str, set[int]] = {}
    for mapping in state["param_slice_mappings"]:
        for name in mapping:
            if m := _EXPERT.match(name):
                ids.setdefault(m.group(1), set()).add(int(m.group(2)))
    return {prefix: len(v) for prefix, v in ids.items()}


def _ep_size(state0: dict, reference: dict[str, torch.Tensor]) -> int:
    """Global experts per MoE layer (in the module's names) over one rank's local experts per layer; 1 without."""
    local = _local_experts(state0)
    if not local:
        return 1
    prefix, n_local = next(iter(local.items()))
    n_global = len({int(m.group(2)) for n in reference if (m := _EXPERT.match(n)) and m.group(1) == prefix})
    return max(1, n_global // n_local)


def _global_name(name: str, ep_rank: int, local: dict[str, int]) -> str:
    """'...deepspeed_experts.1.fc1.weight' on expert-parallel rank 1 with 2 local experts -> '...experts.3...'."""
    m = _EXPERT.match(name)
    if m is None:
        return name
    return f"{m.group(1)}{ep_rank * local[m.group(1)] + int(m.group(2))}{m.group(3)}"
