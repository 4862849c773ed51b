"""Where and in what precision the SAE computes: one `RuntimeConfig` (nested in the training,
evaluation and analysis configs, so `--device` and `--precision` are defined once) resolved
against the machine into a `Runtime`.

Precision is about the matmuls only: weights, gradients and Adam state stay float32 (master
weights), and `bf16` runs the encoder's matmuls under autocast (the grouped GEMM's fast path
on Hopper is bf16); `tf32` lets float32 matmuls use TensorFloat-32 on Ampere and newer.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .errors import ConfigError

PRECISIONS = ("fp32", "tf32", "bf16")


@dataclass
class DeviceConfig:
    """Where a model or an SAE runs."""

    device: str | None = None
    """cpu, cuda, cuda:N (default: cuda when available)."""


@dataclass
class RuntimeConfig(DeviceConfig):
    """The device and matmul precision of the SAE."""

    precision: str | None = None
    """fp32, tf32 or bf16 for the SAE's matmuls; weights and Adam state stay fp32 (default: bf16 on a CUDA GPU that has it, else fp32)."""


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def autocast(self, cache: bool = True):
        """The context the SAE's forward pass runs in (`cache=False` for a step recorded as a
        CUDA graph: autocast's cache of cast weights must not outlive the recording)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache)
        return contextlib.nullcontext()


def available_precisions(device: torch.device) -> list[str]:
    if device.type == "cuda":
        out = ["fp32"]
        if torch.cuda.get_device_capability(device)[0] >= 8:
            out.append("tf32")
        if torch.cuda.is_bf16_supported():
            out.append("bf16")
        return out
    return ["fp32", "bf16"]  # CPU autocast computes bf16 matmuls (slowly where there is no AMX)


def default_precision(device: torch.device) -> str:
    """bf16 on a CUDA GPU that has it, else fp32: on an H200 bf16 was the fastest precision and
    its final FVU stayed within 1 % of fp32's (README, table 7); on a CPU without bf16 units
    bf16 is slower."""
    return "bf16" if "bf16" in available_precisions(device) and device.type == "cuda" else "fp32"


def resolve_device(name: str | None) -> torch.device:
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ConfigError(f"Unknown device '{name}'; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but this machine has no CUDA GPU.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"Device '{name}' is not supported; use cpu, cuda or cuda:N.")
    return device


def resolve(cfg: RuntimeConfig) -> Runtime:
    """The device and precision to use; ConfigError (one sentence) for what this machine lacks."""
    device = resolve_device(cfg.device)
    precision = cfg.precision or default_precision(device)
    if precision not in PRECISIONS:
        raise ConfigError(f"Unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}.")
    have = available_precisions(device)
    if precision not in have:
        where = "this CPU" if device.type == "cpu" else torch.cuda.get_device_name(device)
        raise ConfigError(
            f"--precision {precision} is not available on {where}; available: {', '.join(have)}."
        )
    if device.type == "cuda":
        # process-wide, as torch has it; tf32 only where asked for
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return Runtime(device, precision)


MALLOC_ENV = "MOESAE_SYSTEM_MALLOC"
"""Set to 1 to leave glibc's allocator as it is (see `keep_freed_memory`)."""


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc maps each large block (above an adaptive 128 KB–32 MB) afresh and returns
    it when freed, and trims the heap whenever its free top passes a threshold; the next tensor
    of that size is then faulted in again, one 4 KB page at a time. A training step allocates
    and frees tens of tensors of 10–80 MB, so on a CPU the page faults cost more than the
    arithmetic: on the 2-core benchmark machine a fresh 10 MB tensor takes ~4 ms to fault in,
    a pass over one already mapped ~1 ms. With large blocks taken from the heap and the heap
    never trimmed, dense TopK trained 25 % faster there (its [B, M] candidates, 75 MB, are
    always mapped afresh by default) and the MoE SAEs ~4 % (benchmarks/bench_train.py, and
    `--system-malloc` for glibc's defaults; README table 1). The cost: the process keeps its
    peak memory until it exits, as PyTorch's CUDA caching allocator does on a GPU.

    Applied by the `moesae` command and the benchmarks; a no-op (False) where the C library
    is not glibc or MOESAE_SYSTEM_MALLOC=1. `release_freed_memory` hands it back (before the
    command waits on the explorer's server).
    """
    import os

    libc = _glibc()
    if libc is None or os.environ.get(MALLOC_ENV) == "1":
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # older glibc takes an mmap threshold of at most HEAP_MAX_SIZE / 2 (32 MB on 64-bit): then that
    mapped = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    kept = libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(mapped) and bool(kept)


def allocator_label(kept: bool) -> str:
    """How a benchmark's JSON names the allocator it ran with (`kept`: keep_freed_memory's)."""
    return "glibc, freed memory kept" if kept else "system default"


def release_freed_memory() -> None:
    """Return the freed memory `keep_freed_memory` kept to the kernel (glibc's malloc_trim)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    """The C library through ctypes when it is glibc (other C libraries differ in what mallopt
    takes, if they have it), else None. The process's own symbols: no library search."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # TypeError: Windows has no dlopen(NULL)
        return None
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc
