"""The device, the compute dtype, and agreement between data-parallel processes (one per GPU under torchrun).

Nothing here knows about Ouroboros: train.py asks which device and dtype to use, and the few collectives its loop
needs (a mean over processes, a check that every process holds the same tensors) live here, so that a reader of
the loop sees one named call where a distributed detail is.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from runs import RunError


def pick_device(name: str | None) -> torch.device:
    """The device, made current (CUDA) before anything is built on it."""
    if name is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise RunError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RunError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.type not in ("cpu", "cuda"):
            raise RunError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        # fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation): several times faster, and
        # the rounding stays far below the differences a table reports. bf16 runs are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
        if device.index >= torch.cuda.device_count():
            raise RunError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(device)
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX.
    Elsewhere PyTorch's CPU bf16 matmul falls back to a reference kernel about 100x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(name: str, device: torch.device, allow_slow: bool = False) -> str:
    """--precision auto -> bf16 where the hardware multiplies bf16 natively (an AVX512-BF16 CPU runs bf16 matmuls
    at about 3x its fp32 rate), else fp32. An explicit bf16 where it would crawl is refused, unless allowed."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and not native_bf16(device) and not allow_slow:
        raise RunError(f"--precision bf16: this {device.type} has no native bf16 (no AVX512-BF16 or AMX), where a "
                       "bf16 matmul is about 100x slower than fp32; use --precision fp32 (or auto), or add "
                       "--allow-slow-bf16 to run it anyway")
    return name


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# The frozen base is stored in the compute dtype on every device: fp32 under fp32; bf16 under bf16 autocast,
# which would otherwise re-cast every frozen fp32 weight at every matmul.
BASE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Data-parallel processes: gradients averaged, errors and checks agreed on by all.

def init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes), in the order init_distributed returns them."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


def clip_gradients(params: dict, clip: float, world: int) -> float:
    """Averages the gradients over the processes, clips their norm; returns the norm before clipping."""
    for p in params.values():
        all_mean(p.grad, world)
    return torch.nn.utils.clip_grad_norm_(list(params.values()), clip).item()
