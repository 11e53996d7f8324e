"""GPUs chosen when a pipeline run starts, not when it is compiled.

The compiled pipelines take the GPU count of each step (``train_gpus``, ``tune_gpus``, ``evaluate_gpus``; the batch
pipeline's ``gpus``), the Kubernetes resource name of the accelerator (``accelerator_type``, e.g. ``nvidia.com/gpu``)
and the train pods' node selector as run parameters. These helpers turn those values into what the steps do:

- :func:`resolve_device_budget`: ``device_budget: auto`` plans for the CPU when the run asks no GPU, else for
  ``gpu:<GiB>`` of the requested GPU (``gpu_memory_gib``, else the memory of the GPU model its node selector names,
  else nnU-Net's 8 GiB reference).
- :func:`train_launch`: one training process per GPU (torchrun with NCCL; one GPU: no DDP), or the CPU
  (``nproc_per_node`` processes on gloo).
- :func:`step_device`: ``cuda`` for an evaluation / batch-inference step given GPUs, else ``cpu``.

Only the standard library at import: the budget step runs in its own small task.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from medseg.errors import MedsegError

#: Memory (GiB) of GPU models, by the token that names them in node labels: GKE's
#: ``cloud.google.com/gke-accelerator`` values (``nvidia-tesla-t4``, ``nvidia-l4``, ``nvidia-a100-80gb``) and NVIDIA GPU
#: feature discovery's ``nvidia.com/gpu.product`` (``NVIDIA-A100-SXM4-40GB``, ``Tesla-T4``). A size token (``80gb``)
#: in the label wins over the model's default size.
GPU_MEMORY_GIB: dict[str, float] = {
    "t4": 16, "p4": 8, "p100": 16, "v100": 16, "a10": 24, "a10g": 24, "l4": 24, "a30": 24, "a40": 48, "l40": 48, "l40s": 48,
    "a100": 40, "h100": 80, "h200": 141, "b200": 180,
}
_SIZE_TOKEN = re.compile(r"^(\d+)gb$")
#: GiB planned for when neither ``gpu_memory_gib`` nor the node selector tells the GPU: nnU-Net's default plan target
#: (its reference 3d_fullres plan fits in about 8 GB), which fits every current datacenter GPU.
DEFAULT_GPU_MEMORY_GIB = 8.0


def _non_negative(name: str, value: int) -> int:
    count = int(value)
    if count < 0:
        raise MedsegError(f"{name} must be >= 0, got {value}")
    return count


def gpu_memory_from_labels(node_selector: Mapping[str, str] | None) -> float | None:
    """The memory of the GPU model a node selector asks for (its label values, see :data:`GPU_MEMORY_GIB`), or None
    when no value names a known model."""
    for value in (node_selector or {}).values():
        tokens = [t for t in re.split(r"[^a-z0-9]+", str(value).lower()) if t]
        sizes = [float(m.group(1)) for t in tokens if (m := _SIZE_TOKEN.match(t))]
        models = [GPU_MEMORY_GIB[t] for t in tokens if t in GPU_MEMORY_GIB]
        if models:
            return sizes[0] if sizes else float(models[0])
    return None


def resolve_device_budget(device_budget: str, gpus: int, gpu_memory_gib: float = 0.0, node_selector: Mapping[str, str] | None = None) -> str:
    """The planner's budget for a run that trains on ``gpus`` GPUs per pod.

    Args:
        device_budget: ``auto`` (follow the requested GPUs), or an explicit ``cpu`` / ``gpu:<GiB>`` returned as is.
        gpus: GPUs per train pod the run asks for (0: CPU).
        gpu_memory_gib: Memory of one GPU; 0 = the model named in ``node_selector``, else :data:`DEFAULT_GPU_MEMORY_GIB`.
        node_selector: The train pods' node selector (e.g. ``{cloud.google.com/gke-accelerator: nvidia-l4}``).

    Raises:
        MedsegError: a negative GPU count or memory.
    """
    gpus = _non_negative("gpus", gpus)
    if device_budget != "auto":
        return device_budget
    if gpus == 0:
        return "cpu"
    if float(gpu_memory_gib or 0) < 0:
        raise MedsegError(f"gpu_memory_gib must be >= 0 (0: from the node selector), got {gpu_memory_gib}")
    gib = float(gpu_memory_gib or 0) or gpu_memory_from_labels(node_selector) or DEFAULT_GPU_MEMORY_GIB
    return f"gpu:{gib:g}"


@dataclass(frozen=True)
class TrainLaunch:
    """How the train step runs: ``nproc_per_node`` processes (1: no DDP) on ``device`` (``cuda``: NCCL, ``cpu``: gloo)."""

    nproc_per_node: int
    device: str


def visible_gpus() -> int:
    """CUDA devices this process can use (0 without a driver or a CUDA build of torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_visible(gpus: int, what: str) -> None:
    seen = visible_gpus()
    if seen < gpus:
        raise MedsegError(f"{what} asks for {gpus} GPU(s) but {seen} are visible in this container: the pod's accelerator type or "
                          "limit does not give it the GPUs (check accelerator_type and the node's device plugin)")


def train_launch(gpus: int, nproc_per_node: int = 1, check: bool = True) -> TrainLaunch:
    """One process per requested GPU on CUDA; without GPUs, ``nproc_per_node`` CPU processes.

    Args:
        gpus: GPUs given to the train pod (the run's ``train_gpus``).
        nproc_per_node: CPU processes when ``gpus`` is 0 (DDP on gloo sharing the cores; 1 = plain training).
        check: Fail when fewer GPUs are visible than asked for, rather than training on the CPU unnoticed.
    """
    gpus, nproc = _non_negative("gpus", gpus), int(nproc_per_node)
    if nproc < 1:
        raise MedsegError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if gpus == 0:
        # explicit cpu: a CUDA base image can expose a node's GPUs to a pod that asked none (NVIDIA_VISIBLE_DEVICES=all)
        return TrainLaunch(nproc, "cpu")
    if check:
        _check_visible(gpus, "the train step")
    return TrainLaunch(gpus, "cuda")


def step_device(gpus: int, check: bool = True) -> str:
    """``cuda`` for a step given GPUs (evaluation, batch inference: one process on the first GPU), else ``cpu``."""
    gpus = _non_negative("gpus", gpus)
    if gpus == 0:
        return "cpu"
    if check:
        _check_visible(gpus, "this step")
    return "cuda"
