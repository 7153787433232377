"""The device, the compute dtype, and the averages over data-parallel processes (one per GPU under torchrun).

Nothing here knows about Ouroboros: train.py asks which device and dtype to use, and the few collectives its loop
needs (a mean and a sum over processes, the gradients' average) live here, so that a reader of the loop sees one
named call where a distributed detail is. The checks that every process agrees are guard.py's.
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
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # "cuda" without an index: see below
    else:
        try:
            device = torch.device(name)
        except RuntimeError:  # what torch.device raises for a string it cannot parse, such as "gpu"
            raise RunError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RunError(f"--device {name}: no CUDA device is available here; use --device cpu")
        # mps, xpu and the rest: native_bf16 knows only these two, and would probe the CPU for any other
        if device.type not in ("cpu", "cuda"):
            raise RunError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        # fp32 matmuls on TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation): several times faster, and
        # the rounding stays far below the differences a table reports. bf16 runs are unaffected.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if device.index is None:
            # torchrun sets LOCAL_RANK, the process's index on this machine; a plain run is process 0
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
        if device.index >= torch.cuda.device_count():
            raise RunError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(device)  # current: NCCL, and any tensor made on "cuda" without an index, use this GPU
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the device multiplies bf16 in hardware: a CUDA GPU that supports it, a CPU with AVX512-BF16 or AMX.
    Elsewhere PyTorch's CPU bf16 matmul falls back to a reference kernel about 100x slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Private probes of torch.cpu, which a build may lack: a missing probe counts as no.
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_precision(name: str, device: torch.device, allow_slow: bool = False) -> str:
    """--precision auto -> bf16 where the hardware multiplies bf16 natively (an AVX512-BF16 CPU runs bf16 matmuls
    at about 3x its fp32 rate), else fp32. An explicit bf16 where it would crawl is refused, unless allowed."""
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and not native_bf16(device) and not allow_slow:  # fp32 is never refused
        raise RunError(f"--precision bf16: this {device.type} has no native bf16 (no AVX512-BF16 or AMX), where a "
                       "bf16 matmul is about 100x slower than fp32; use --precision fp32 (or auto), or add "
                       "--allow-slow-bf16 to run it anyway")
    return name


def autocast(device: torch.device, precision: str):
    # bf16: the ops on autocast's lists (matmuls, linear layers, attention) run in bf16, while the trainable
    # parameters themselves stay fp32 and are cast where they are used.
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()  # fp32: no autocast at all (on CUDA, fp32 matmuls on TF32, pick_device)


# The frozen base is stored in the compute dtype on every device: fp32 under fp32; bf16 under bf16 autocast,
# which would otherwise re-cast every frozen fp32 weight at every matmul.
BASE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Data-parallel processes: the process group, means and sums over processes, the gradients' average.

def init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun; a plain python run is one process
    if world == 1:  # no process group: all_mean and all_sum then do nothing
        return 0, 1
    if not dist.is_initialized():  # a second init_process_group in one process raises
        # NCCL between GPUs, gloo between CPU processes; the rendezvous (MASTER_ADDR, RANK, ...) is read from the
        # environment torchrun set up.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


# For code that the loop does not hand (rank, world) to, such as evaluate.score.
def rank_world() -> tuple[int, int]:
    """(this process's rank, the number of processes), in the order init_distributed returns them."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)  # in place: x becomes the sum over all processes (all_reduce's default op), on each
        x /= world
    return x  # the same tensor, now holding the mean


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)  # in place, like all_mean; every process must call it, even one with nothing to add
    return x


def clip_gradients(params: dict, clip: float, world: int) -> float:
    """Averages the gradients over the processes, clips their norm; returns the norm before clipping."""
    # No DistributedDataParallel: each gradient is averaged by hand, once per optimizer step, after the last
    # micro-batch's backward. Every process scores batch_size x grad_accum windows, so the mean of the processes'
    # means is the mean over all the step's windows.
    for p in params.values():
        all_mean(p.grad, world)
    # Every process now holds the same gradients, so each computes the same norm and takes the same update.
    # clip_grad_norm_: the norm of all the gradients as one vector, scaled down to `clip` when above it; a
    # non-finite norm comes back as it is, and train.py then skips the update.
    return torch.nn.utils.clip_grad_norm_(list(params.values()), clip).item()
