"""Device, dtype and CPU threads: "auto" means CUDA when present, else CPU; threads default to the cores this
process may use (shared between the processes of a launch).

Autocast dtype "auto" is bfloat16 on CUDA, and on CPUs with native bf16 (avx512_bf16 / amx_bf16), where it
trained a 4-layer GPT-2 2.7x faster than float32 on this project's 2-core machine; float32 elsewhere.
"""

from __future__ import annotations

import contextlib
import os

import torch

from mlpmem.errors import UsageError


def resolve_device(name: str = "auto") -> torch.device:
    """A torch device from "auto", "cpu", "cuda", "cuda:N" or "mps"; UsageError if unavailable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{name!r} is not a device (use auto, cpu, cuda, cuda:N or mps)", field="device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{name}: CUDA is not available on this machine (use cpu or auto)", field="device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{name}: MPS is not available on this machine (use cpu or auto)", field="device")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU advertises bf16 instructions (Linux /proc/cpuinfo; False where unknown) and torch's kernels
    may use them (not when torch is held to AVX2, e.g. by ATEN_CPU_CAPABILITY=avx2: bf16 would be emulated)."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return False
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: "auto" is bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    if name == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, name)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """torch.autocast for reduced precision, a no-op context for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), shared out between the ranks of one machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def set_threads(threads: int | None = None) -> int:
    """Use ``threads`` CPU threads (None: ``available_cores()``) in torch and FAISS; returns the number set."""
    import faiss

    n = threads or available_cores()
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n
