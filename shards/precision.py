"""Which autocast dtype to run in, and why (shared by the trainer, the teachers and the benchmarks).

bfloat16 matmuls are fast only on hardware with bf16 matrix units: NVIDIA GPUs from Ampere on, and x86 CPUs
with AMX or AVX512-BF16 (Sapphire Rapids / Zen 4 and later), where a bf16 matmul runs about 6x faster than
float32. Elsewhere (older CPUs, Apple silicon through torch's CPU backend) CPU autocast emulates bf16 and is
slower than float32, so "auto" keeps float32 there. Every caller logs the reason with the dtype.
"""

from __future__ import annotations

import functools
import platform

import torch

#: /proc/cpuinfo flags of CPUs that execute bf16 matrix products natively.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def bf16_feature(flags: list[str]) -> str | None:
    """The first bf16 matrix feature among CPU flags (AMX before AVX512-BF16), or None."""
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)


@functools.cache
def cpu_bf16_units() -> str | None:
    """This CPU's bf16 matrix feature (e.g. "amx_bf16"), or None when it has none (or cannot tell)."""
    if platform.system() != "Linux":
        return None
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return bf16_feature(flags)


def autocast_dtype(device: torch.device | str, requested: str = "auto") -> tuple[torch.dtype, str]:
    """(dtype, reason) for autocast on `device`; requested is "auto", "float32" or "bfloat16".

    "auto" picks bfloat16 on CUDA devices that support it and on CPUs with bf16 matrix units, float32
    elsewhere; an explicit choice is honoured (bfloat16 where the device cannot run it is an error).
    """
    device = torch.device(device)
    if requested == "float32":
        return torch.float32, "float32 requested"
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device)
        if ok:
            return torch.bfloat16, f"{name} supports bf16"
        if requested == "bfloat16":
            raise ValueError(f"bfloat16 requested but {name} does not support it; use float32")
        return torch.float32, f"{name} has no bf16 support"
    if device.type != "cpu":
        return (torch.bfloat16, "bfloat16 requested") if requested == "bfloat16" else (torch.float32, device.type)
    units = cpu_bf16_units()
    if requested == "bfloat16":
        return torch.bfloat16, "bfloat16 requested" + ("" if units else " (this CPU emulates it: slower than float32)")
    if units:
        return torch.bfloat16, f"CPU has bf16 matrix units ({units})"
    return torch.float32, "CPU has no bf16 matrix units (AMX / AVX512-BF16): bf16 would be slower"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
