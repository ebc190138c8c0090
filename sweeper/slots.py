"""GPU slots: N visible GPUs and k GPUs per trial -> N // k disjoint device sets, one sweep worker each.

Each worker owns one slot for its lifetime (its CUDA_VISIBLE_DEVICES) and runs its trials one at a time, so
a slot freed by a finished trial takes the next trial at once (the worker asks the study for it) and two
concurrent trials never share a GPU.
"""

from __future__ import annotations

import os

from critic.config import SpecError

DEVICE_IDS_ENV = "SWEEP_DEVICE_IDS"  # e.g. "0,1,2,3": overrides discovery (tests use fake ids on a CPU machine)
# What a loaded GPU driver exposes, in containers too: the NVIDIA kernel module's procfs folder and control device
# (CUDA opens it), WSL2's GPU device (CUDA under Windows), ROCm's kernel interface. None of them: no GPU that
# torch.cuda could see.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def visible_device_ids() -> list[str]:
    """The GPU ids this process may hand out, as CUDA_VISIBLE_DEVICES names them ([] on a CPU machine)."""
    given = os.environ.get(DEVICE_IDS_ENV)
    if given is not None:
        return _split(given)
    if not any(os.path.exists(path) for path in GPU_DRIVER_PATHS):
        return []  # no GPU driver loaded: torch would find none; the parent that launches workers never loads it
    import torch
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    visible = _split(os.environ.get("CUDA_VISIBLE_DEVICES", ""))  # a scheduler may have restricted us
    return visible[:count] if visible else [str(i) for i in range(count)]


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def gpu_slots(device_ids: list[str], gpus_per_trial: int) -> list[list[str]]:
    """Consecutive, disjoint groups of `gpus_per_trial` ids (neighbours share the fastest links); the rest idle."""
    if gpus_per_trial < 1:
        raise ValueError(f"gpus_per_trial must be >= 1, got {gpus_per_trial}")
    return [device_ids[start:start + gpus_per_trial]
            for start in range(0, len(device_ids) - gpus_per_trial + 1, gpus_per_trial)]


def plan_slots(n_workers: int, device_ids: list[str], gpus_per_trial: int) -> tuple[list[list[str]], str | None]:
    """The slots for `n_workers` workers, and a one-line notice when fewer fit than were asked for.

    No GPUs: no slots (workers run on the CPU, as before). GPUs, but fewer than one trial needs: an error.
    """
    if not device_ids:
        return [], None
    slots = gpu_slots(device_ids, gpus_per_trial)
    if not slots:
        raise SpecError(f"sweep.gpus_per_trial is {gpus_per_trial} but only {len(device_ids)} GPUs are visible "
                         f"({','.join(device_ids)}); lower sweep.gpus_per_trial")
    if n_workers > len(slots):
        return slots, (f"[sweep] --workers {n_workers} asks for more trials at a time than fit: {len(device_ids)} "
                       f"GPUs / {gpus_per_trial} per trial = {len(slots)} slots; running {len(slots)} workers")
    return slots[:n_workers], None
