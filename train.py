"""Train and evaluate Ouroboros on a Qwen2 checkpoint.

    python train.py --model DIR --data PATH --out DIR [flags]     train one variant, print the comparison table
    python train.py                                               the whole method offline on CPU (the demo)
    python train.py --out DIR --sample "prompt"                   generate with a trained run
    torchrun --nproc-per-node N train.py ...                      data-parallel

Read top to bottom: flags, data, the label shift, the learning-rate schedule, checkpoints, the one training
loop every variant (and the demo's pretraining) goes through, evaluation, and main().
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from controller import ConfigError, Ouroboros, OuroborosConfig, paper_split
from load_qwen import CheckpointError, load_config, load_model, load_ouroboros, load_tokenizer


class RunError(Exception):
    """A user error found while preparing or running: bad data, a bad out directory, a bad resume."""


# Flags that may differ on --resume: they change nothing that is trained, at most the rounding (device,
# precision); "out": a run directory may be moved.
RESUME_FREE = {"resume", "overwrite", "out", "log_every", "save_every", "eval_every", "device", "precision",
               "stop_after", "sample", "eval_only", "max_new_tokens", "temperature", "top_k"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise RunError(f"{message}; see python train.py --help")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Train Ouroboros (a looped Qwen2 layer with input-conditioned LoRA) on a Qwen2 checkpoint.")
    a = p.add_argument
    a("--model", help="Qwen2/Qwen2.5 checkpoint directory (Hugging Face layout). Omit for the offline CPU demo.")
    a("--data", help="training text: a file (documents separated by blank lines), a directory of text files, "
                     "or a .jsonl with a 'text' field. The demo defaults to the Python standard library's source.")
    a("--out", help="run directory: config, checkpoint, metrics.jsonl, results.json")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--overwrite", action="store_true", help="replace an existing run in --out")
    # the variant
    a("--controller", default="dynamic", choices=["dynamic", "static", "none"],
      help="dynamic: the Ouroboros Controller; static: learned c per step, ignores input; none: no LoRA")
    a("--no-gate", action="store_true", help="ablation: h = h_new each step instead of the gated mix")
    a("--no-step-norm", action="store_true", help="ablation: no per-step RMSNorm")
    a("--pool", default="causal", choices=["causal", "mean"],
      help="Controller input: causal running mean (default) or the paper's whole-sequence mean, which leaks "
           "future tokens into the weights at each position")
    a("--rank", type=int, default=32, help="LoRA rank r")
    a("--alpha", type=float, default=16.0, help="LoRA alpha; the delta is scaled by alpha / r")
    a("--depth", type=int, default=8, help="recurrent steps per forward")
    a("--depths", help="comma list, e.g. 4,8,16: depth drawn per optimizer step from a seeded generator "
                       "(overrides --depth; evaluation runs at each)")
    a("--max-steps", type=int, default=64, help="the Controller's step embedding size and the number of step norms")
    a("--n-prelude", type=int, help="frozen layers before the loop (default round(8L/36), 8 on Qwen2.5-3B)")
    a("--recurrent-layer", type=int, help="the looped layer (default L // 2, 18 on Qwen2.5-3B)")
    a("--n-coda", type=int, help="frozen layers after the loop (default round(8L/36))")
    a("--checkpoint-steps", action="store_true", help="recompute each recurrent step in backward (less memory)")
    # optimisation; the defaults are the paper's GPU setup
    a("--steps", type=int, default=1000, help="optimizer steps")
    a("--seq-len", type=int, default=2048, help="tokens per window")
    a("--batch-size", type=int, default=2, help="windows per micro-batch (per process)")
    a("--grad-accum", type=int, default=16, help="micro-batches per optimizer step")
    a("--lr", type=float, default=3e-4, help="peak learning rate")
    a("--min-lr-ratio", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    a("--warmup", type=int, default=50, help="linear warmup, in optimizer steps")
    a("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    a("--clip", type=float, default=1.0, help="gradient norm clip")
    a("--seed", type=int, default=0, help="seed for data order, depth draws and initialisation")
    a("--val-fraction", type=float, default=0.01, help="share of documents held out for evaluation")
    a("--eval-windows", type=int, default=64, help="held-out windows used for every evaluation (the first N)")
    a("--eval-every", type=int, default=200, help="held-out evaluation every N steps (0: only at the end)")
    a("--log-every", type=int, default=10, help="progress line every N steps")
    a("--save-every", type=int, default=100, help="checkpoint every N steps (also at the end and on Ctrl-C)")
    a("--stop-after", type=int, help="stop with a checkpoint after N steps in this invocation (for time-sliced jobs)")
    a("--pretrain-steps", type=int, default=720, help="demo only: optimizer steps pretraining its base model")
    a("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    a("--precision", default="auto", choices=["auto", "bf16", "fp32"],
      help="matmul precision: bf16 autocast or fp32; trainable weights stay fp32 either way. auto: bf16 on CUDA "
           "and on CPUs with native bf16 (AVX512-BF16 or AMX), fp32 on other CPUs, where bf16 is slow")
    # using a finished run
    a("--eval-only", action="store_true", help="recompute the comparison table of the run in --out")
    a("--sample", metavar="PROMPT", help="generate text from PROMPT with the trained run in --out")
    a("--max-new-tokens", type=int, default=100, help="with --sample")
    a("--temperature", type=float, default=0.8, help="with --sample; 0 is greedy")
    a("--top-k", type=int, default=50, help="with --sample")
    return p


# ----------------------------------------------------------------------------------------------------------
# Data: documents -> one token stream with end-of-text between documents -> windows of seq_len + 1 tokens.

def stdlib_documents() -> list[tuple[str, str]]:
    """The demo corpus: the running interpreter's standard library source, present on every machine.
    Its test suites are left out (they are mostly generated data and would dominate)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
    return [(str(f.relative_to(root)), f.read_text(errors="replace")) for f in files]


def read_documents(path) -> list[tuple[str, str]]:
    """(name, text) pairs from a text file (split at blank lines), a directory (one file each), or a .jsonl.
    None means the demo corpus."""
    if path is None:
        return stdlib_documents()
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
        docs = [(str(f.relative_to(path)), f.read_text(errors="replace")) for f in files]
    elif path.suffix == ".jsonl" and path.is_file():
        docs = []
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    docs.append((f"line {n}", str(json.loads(line)["text"])))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise RunError(f"{path}:{n}: not a JSON object with a 'text' field; fix or remove the line") from None
    elif path.is_file():
        text = path.read_text(errors="replace")
        docs = [(f"paragraph {n}", t) for n, t in enumerate(text.split("\n\n")) if t.strip()]
    else:
        raise RunError(f"{path}: no such file or directory; pass --data a text file, a directory or a .jsonl")
    docs = [(n, t) for n, t in docs if t.strip()]
    if not docs:
        raise RunError(f"{path}: holds no text; pass --data with some documents")
    return docs


def split_documents(docs, val_fraction: float):
    """Deterministic train / held-out split by document: a document is held out when the hash of its name
    falls below val_fraction, so the split does not depend on order, seed or machine."""
    def held_out(name):
        return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8 < val_fraction
    train = [t for n, t in docs if not held_out(n)]
    val = [t for n, t in docs if held_out(n)]
    if not train or not val:
        raise RunError(f"the {len(docs)} documents give {len(train)} for training and {len(val)} held out; "
                       "use more documents or another --val-fraction")
    return train, val


def tokenize(texts: list[str], tokenizer, eos_id: int, what: str) -> np.ndarray:
    ids, chunk, t0 = [], 256, time.time()
    for i in range(0, len(texts), chunk):
        for enc in tokenizer.encode_batch(texts[i:i + chunk]):
            ids.extend(enc.ids)
            ids.append(eos_id)
        print(f"\rtokenising {what}: {min(i + chunk, len(texts))}/{len(texts)} documents, {len(ids):,} tokens, "
              f"{time.time() - t0:.0f}s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return np.asarray(ids, dtype=np.uint32)


def eos_token_id(tokenizer) -> int:
    for tok in ("<|endoftext|>", "</s>", "<eos>"):
        if (i := tokenizer.token_to_id(tok)) is not None:
            return i
    raise RunError("the tokenizer has no end-of-text token (<|endoftext|>); use the checkpoint's own tokenizer.json")


def load_tokens(docs, val_fraction, tokenizer, cache_dir: Path, key: str, check=None) -> tuple[np.ndarray, np.ndarray]:
    """Tokenised train and held-out streams, cached in cache_dir under a key of everything they depend on.
    check(train, val) may refuse them before anything is cached, so unusable data leaves no file behind."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    files = [cache_dir / f"tokens-{digest}-{part}.npy" for part in ("train", "val")]
    if all(f.is_file() for f in files):
        return tuple(np.load(f) for f in files)
    train, val = split_documents(docs, val_fraction)
    eos = eos_token_id(tokenizer)
    out = (tokenize(train, tokenizer, eos, "training split"), tokenize(val, tokenizer, eos, "held-out split"))
    if check is not None:
        check(*out)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for f, arr in zip(files, out):
        tmp = f.with_suffix(".tmp.npy")
        np.save(tmp, arr)
        os.replace(tmp, f)
    return out


class Windows:
    """Consecutive windows of seq_len + 1 tokens; sample k of the training order is window perm_e[k mod n]
    with a fresh seeded permutation each epoch e, so the data position is just a sample count."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n = (len(tokens) - 1) // seq_len
        self._perm = (None, None)

    def window(self, i: int) -> np.ndarray:
        return self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1]

    def batch(self, start: int, size: int, shuffle: bool = True) -> torch.Tensor:
        rows = []
        for k in range(start, start + size):
            epoch, j = divmod(k, self.n)
            if shuffle:
                if self._perm[0] != epoch:
                    self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
                j = self._perm[1][j]
            rows.append(self.window(j).astype(np.int64))
        return torch.from_numpy(np.stack(rows))  # (size, seq_len + 1)


# ----------------------------------------------------------------------------------------------------------
# The label shift, defined once: a window of T + 1 tokens gives inputs t_0..t_{T-1} and targets t_1..t_T, so
# the logit at position i is scored against the token at i + 1.

def inputs_and_targets(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return windows[:, :-1], windows[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits (B, T, V) at the input positions, targets (B, T) already shifted: mean cross-entropy in nats
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def get_lr(step: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to lr * min_lr_ratio at the last step. Counted in optimizer steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)  # the last step is steps - 1
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def depth_at(step: int, args) -> int:
    # Drawn in the training loop from a generator seeded by (seed, step): reproducible, resume-exact.
    if not args.depths:
        return args.depth
    depths = parse_depths(args.depths)
    return depths[np.random.default_rng([args.seed, 1, step]).integers(len(depths))]


def parse_depths(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise RunError(f"--depths {text!r} is not a comma list of integers, e.g. 4,8,16") from None


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file holding the trainable parameters, the optimizer state and the RNG
# states, with the step, data position and configuration as JSON metadata. Written to a temporary file,
# flushed, then renamed over the old one, so a crash at any moment leaves the last complete checkpoint.

CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(out: Path, params: dict, optimizer, state: dict) -> None:
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    opt = optimizer.state_dict()
    for i, s in opt["state"].items():
        for k, v in s.items():
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous().reshape(-1) if v.dim() == 0 else v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = dict(state, param_groups=opt["param_groups"], scalar_keys=[f"opt.{i}.{k}" for i, s in opt["state"].items()
                                                                      for k, v in s.items() if v.dim() == 0])
    tmp = out / (CHECKPOINT + ".tmp")  # a stale one left by a killed run is simply written over
    try:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out / CHECKPOINT)
    except (OSError, SafetensorError) as e:  # a full disk, say (safetensors reports I/O errors as SafetensorError)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise RunError(f"{out / CHECKPOINT}: writing the checkpoint of step {state['step']} failed ({e}); the "
                       "last complete checkpoint is kept; fix the cause (a full disk?), then --resume") from None


def load_checkpoint(out: Path, params: dict | None = None, optimizer=None) -> dict:
    file = out / CHECKPOINT
    if not file.is_file():
        raise RunError(f"{file}: no checkpoint to resume from; start a new run without --resume")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise RunError(f"{file}: unreadable checkpoint ({e}); restore it or start again with --overwrite") from None
    if params is not None:
        for n, p in params.items():
            if f"param.{n}" not in tensors or tensors[f"param.{n}"].shape != p.shape:
                raise RunError(f"{file}: no parameter {n} of shape {list(p.shape)}; the checkpoint is not this "
                               "run's, restore it or start again with --overwrite")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"param.{n}"])
    if optimizer is not None:
        scalars = set(meta["scalar_keys"])
        state = {}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v.reshape(()) if k in scalars else v
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta


# ----------------------------------------------------------------------------------------------------------
# Distributed: one process per GPU under torchrun; gradients of the trainable parameters are averaged.

def init_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's object collectives (agree) run on the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def agree(world: int, error: RunError | None = None, params: dict | None = None) -> None:
    """Called by every process at the same point. A RunError that any process met is raised on all of them: one
    process stopping alone would leave the others waiting for it in their next collective. With `params`,
    also checks that the trainable parameters are bit-identical everywhere, as the averaged gradients keep them."""
    if world == 1:
        if error is not None:
            raise error
        return
    digest = None
    if params is not None:
        h = hashlib.sha256()
        for p in params.values():
            h.update(p.detach().cpu().flatten().view(torch.uint8).numpy())
        digest = h.hexdigest()
    gathered = [None] * world
    dist.all_gather_object(gathered, (None if error is None else str(error), digest))
    errors = [e for e, _ in gathered if e is not None]
    if errors:
        raise RunError(errors[0])
    if len({d for _, d in gathered}) > 1:
        raise RunError("the trainable parameters differ between the processes, which should never happen in "
                       "data-parallel training; the last checkpoint is kept; please report this")


def all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


def pick_device(name: str | None) -> torch.device:
    if name is None:
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RunError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise RunError(f"--device {name}: only cpu and cuda are supported")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per process
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise RunError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """--precision auto -> bf16 where the hardware multiplies bf16 natively (an AVX512-BF16 CPU runs bf16 matmuls
    at about 3x its fp32 rate), else fp32 (bf16 emulated on an older CPU is several times slower than fp32)."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16"
    native = (getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return "bf16" if any(native) else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# The training loop, shared by every Ouroboros variant and by the demo's pretraining of its base model.

def log_line(out: Path | None, record: dict, rank: int = 0) -> None:
    if rank == 0 and out is not None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def logged_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # the last line, cut short by a kill
        return math.inf


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@torch.no_grad()
def evaluate(forward, val: Windows, args, device) -> float:
    """Mean next-token loss over the first --eval-windows held-out windows (the same tokens for every model)."""
    n = min(args.eval_windows, val.n)
    total = 0.0
    for start in range(0, n, args.batch_size):
        x, y = inputs_and_targets(val.batch(start, min(args.batch_size, n - start), shuffle=False).to(device))
        with autocast(device, args.precision):
            total += next_token_loss(forward(x), y).item() * x.shape[0]
    return total / n


class Interrupted(Exception):
    pass


def train(forward, params: dict, data: Windows, val: Windows, args, out: Path, device, resume: bool,
          looped: bool = True, world: int = 1, rank: int = 0) -> dict:
    """Optimizes `params` (fp32) so that forward(inputs, depth) predicts the next token. `looped` is False
    for the demo's pretraining, where there is no depth. Returns the training state."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    state = dict(step=0, bad_steps=0, world=world)
    if resume:
        state = load_checkpoint(out, params, optimizer)
        if rank == 0:
            # Drop log lines written after the checkpoint: the resumed run writes them again, identically. The
            # file is replaced atomically, so a kill during the rewrite loses no line.
            file = out / "metrics.jsonl"
            lines = file.read_text().splitlines() if file.exists() else []
            keep = [l for l in lines if logged_step(l) <= state["step"]]
            (out / "metrics.jsonl.tmp").write_text("".join(l + "\n" for l in keep))
            os.replace(out / "metrics.jsonl.tmp", file)
            print(f"resuming at step {state['step']}")
    per_step = args.batch_size * args.grad_accum * world  # windows per optimizer step, all processes
    tokens_per_step = per_step * args.seq_len
    start_step, t0 = state["step"], time.time()

    # Ctrl-C and SIGTERM stop the run at once, except from the end of a step's backward to the end of its
    # bookkeeping, where they wait for the next step: landing between the update and the step count, the log
    # line or the checkpoint, they would save parameters a step ahead of the counter, or drop a log line.
    # Under torchrun a signal always waits for the end of the step, where the processes agree to stop together:
    # one stopping alone would leave the others waiting for it in a collective.
    held = dict(on=False, pending=False)

    def on_signal(signum, frame):
        if not held["on"]:
            raise Interrupted()
        held["pending"] = True

    def stop_requested() -> bool:
        if world > 1:
            flag = torch.tensor([float(held["pending"])], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            held["pending"] = flag.item() > 0
        return held["pending"]

    def save() -> None:
        # Every process gets here at the same steps. The parameters are checked to be identical everywhere
        # before they are written; only rank 0 writes, and a failed write stops every process.
        agree(world, params=params)
        error = None
        if rank == 0:
            try:
                save_checkpoint(out, params, optimizer, state)
            except RunError as e:
                error = e
        agree(world, error)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while state["step"] < args.steps:
            held["on"] = world > 1
            if stop_requested():
                raise Interrupted()
            step = state["step"]
            if args.stop_after is not None and step - start_step >= args.stop_after:
                break
            lr = get_lr(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            depth = depth_at(step, args) if looped else None
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.grad_accum):
                first = step * per_step + (micro * world + rank) * args.batch_size
                x, y = inputs_and_targets(data.batch(first, args.batch_size).to(device, non_blocking=True))
                with autocast(device, args.precision):
                    loss = next_token_loss(forward(x, depth), y)
                (loss / args.grad_accum).backward()
                loss_sum += loss.detach()
            loss = all_mean(loss_sum / args.grad_accum, world).item()
            held["on"] = True
            grad_norm = math.nan
            if math.isfinite(loss):
                for p in params.values():
                    all_mean(p.grad, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), args.clip).item()
            # A non-finite loss, or a finite one with non-finite gradients (an overflow in backward), skips the
            # update; every process skips it alike, since loss and gradients are averaged first.
            if not math.isfinite(grad_norm):
                optimizer.zero_grad(set_to_none=True)
                state["bad_steps"] += 1
                if rank == 0:
                    print(f"step {step}: loss {loss}, gradient norm {grad_norm}: update skipped "
                          f"({state['bad_steps']} in a row)", file=sys.stderr)
                log_line(out, {"step": step + 1, "skipped": True, "loss": str(loss), "grad_norm": str(grad_norm)}, rank)
                if state["bad_steps"] >= 3:
                    raise RunError(f"the loss or gradients were not finite for 3 steps in a row (the last at step "
                                   f"{step}); the last good checkpoint is kept in {out}; start again with a lower "
                                   "--lr (and --overwrite)")
                state["step"] += 1
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["bad_steps"] = 0
            state["step"] += 1
            state["samples"] = state["step"] * per_step
            step = state["step"]
            record = {"step": step, "loss": loss, "lr": lr} | ({"depth": depth} if looped else {})
            if step % args.log_every == 0 or step == args.steps:
                elapsed = time.time() - t0
                speed = (step - start_step) * tokens_per_step / max(elapsed, 1e-9)
                eta = (args.steps - step) * elapsed / max(step - start_step, 1)
                if rank == 0:
                    print(f"step {step}/{args.steps} | loss {loss:.4f} | lr {lr:.2e} | "
                          + (f"depth {depth} | " if looped else "") + f"{speed:,.0f} tok/s | elapsed {fmt_time(elapsed)} | eta {fmt_time(eta)}", flush=True)
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                val_loss = evaluate(lambda x: forward(x, args.eval_depths[-1]), val, args, device)
                record.update(val_loss=val_loss)
                if rank == 0:
                    print(f"step {step}: held-out loss {val_loss:.4f} (ppl {math.exp(val_loss):.1f})", flush=True)
            log_line(out, record, rank)
            if step % args.save_every == 0 or step == args.steps:
                save()
        if stop_requested():  # arrived during the last step's bookkeeping
            raise Interrupted()
    except (KeyboardInterrupt, Interrupted):
        held["on"] = True  # a second Ctrl-C waits for this checkpoint
        save()
        if rank == 0:
            print(f"\ninterrupted: checkpoint at step {state['step']} saved in {out}; continue with --resume",
                  file=sys.stderr)
        raise KeyboardInterrupt from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    save()
    return state


# ----------------------------------------------------------------------------------------------------------
# One Ouroboros run: check everything, then train, then the comparison table on the same held-out tokens.

def ouroboros_config(args, n_layers: int) -> OuroborosConfig:
    p, r, c = paper_split(n_layers)
    args.n_prelude = p if args.n_prelude is None else args.n_prelude
    args.recurrent_layer = r if args.recurrent_layer is None else args.recurrent_layer
    args.n_coda = c if args.n_coda is None else args.n_coda
    cfg = OuroborosConfig(n_prelude=args.n_prelude, recurrent_layer=args.recurrent_layer, n_coda=args.n_coda,
                          rank=args.rank, alpha=args.alpha, max_steps=args.max_steps, controller=args.controller,
                          gate=not args.no_gate, step_norm=not args.no_step_norm, pool=args.pool,
                          checkpoint_steps=args.checkpoint_steps)
    cfg.split(n_layers)
    args.eval_depths = parse_depths(args.depths) if args.depths else [args.depth]
    for d in args.eval_depths:
        if not 1 <= d <= args.max_steps:
            raise ConfigError(f"depth {d} is outside 1..{args.max_steps} (--max-steps); choose a depth in that range")
    return cfg


def check_flags(args) -> None:
    """Values that pass argparse's type check but would fail mid-run (a division by zero, an optimizer error)."""
    checks = [(f, getattr(args, f) >= 1, ">= 1") for f in ("seq_len", "batch_size", "grad_accum", "steps",
                                                           "log_every", "save_every", "eval_windows")]
    checks += [(f, getattr(args, f) >= 0, ">= 0") for f in ("warmup", "eval_every", "weight_decay")]
    checks += [("stop_after", args.stop_after is None or args.stop_after >= 1, ">= 1"), ("lr", args.lr > 0, "> 0"),
               ("min_lr_ratio", 0 <= args.min_lr_ratio <= 1, "in 0..1"), ("clip", args.clip > 0, "> 0"),
               ("val_fraction", 0 < args.val_fraction < 1, "strictly between 0 and 1")]
    for name, ok, rule in checks:
        if not ok:  # also catches nan, for which every comparison is False
            raise RunError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid; pass a value {rule}")


def check_out_dir(args) -> Path:
    """Refuses to touch an existing run unless told to; changes nothing itself."""
    if not args.out:
        raise RunError("--out is required with --model; pass a directory for the run")
    out = Path(args.out)
    exists = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; pass a directory")
    if args.resume:
        if not (out / CHECKPOINT).is_file() or not (out / "config.json").is_file():
            # e.g. a run killed before its first checkpoint: its leftovers need --overwrite to start again
            again = "with --overwrite instead of --resume" if exists else "without --resume"
            raise RunError(f"{out}: no checkpoint to resume from; start the run again {again}")
    elif exists and not (args.overwrite or args.sample or args.eval_only):  # those two only read the run
        raise RunError(f"{out} already holds files; pass --resume to continue that run or --overwrite to replace it")
    return out


def run_record(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("eval_depths",)}


def read_run_config(out: Path) -> dict:
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise RunError(f"{out / 'config.json'}: unreadable ({e}); restore it or start again with --overwrite") from None
    if not isinstance(saved, dict):
        raise RunError(f"{out / 'config.json'}: not a run configuration; restore it or start again with --overwrite")
    return saved


def check_resume(out: Path, args, params: dict) -> None:
    saved = read_run_config(out)
    now = run_record(args)
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE and saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise RunError(f"--resume with a different configuration ({detail}); use the run's original flags")
    # Read the checkpoint into the fresh model now, so a damaged one stops the run before anything is written.
    trained_by = load_checkpoint(out, params).get("world", 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if trained_by != world:  # the global batch, so the result, depends on the number of processes
        launch = "python train.py" if trained_by == 1 else f"torchrun --nproc-per-node {trained_by} train.py"
        raise RunError(f"the run was trained by {trained_by} process(es), this is {world}; resume it as it was "
                       f"started: {launch} ... --resume")


def tokens_for(args, tokenizer, vocab_size: int, cache_dir: Path) -> tuple[Windows, Windows]:
    docs = read_documents(args.data)
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    names = hashlib.sha256("\n".join(n + str(len(t)) for n, t in docs).encode()).hexdigest()
    train_ids, val_ids = load_tokens(docs, args.val_fraction, tokenizer, cache_dir,
                                     f"{names}|{tok_hash}|{args.val_fraction}",
                                     check=lambda t, v: windows_for(t, v, args, vocab_size))
    return windows_for(train_ids, val_ids, args, vocab_size)  # a cached stream may not fit this run's --seq-len


def windows_for(train_ids, val_ids, args, vocab_size: int) -> tuple[Windows, Windows]:
    for what, ids in (("training", train_ids), ("held-out", val_ids)):
        if len(ids) < args.seq_len + 1:
            raise RunError(f"the {what} split has {len(ids)} tokens, fewer than one window of --seq-len "
                           f"{args.seq_len} + 1; add data or lower --seq-len")
        if int(ids.max()) >= vocab_size:
            raise RunError(f"token id {int(ids.max())} in the {what} data is beyond the model's vocabulary "
                           f"({vocab_size}); tokenise with the checkpoint's own tokenizer")
    return Windows(train_ids, args.seq_len, args.seed), Windows(val_ids, args.seq_len, args.seed)


def count(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def comparison_table(rows: list[dict]) -> str:
    """rows: name, kept (base parameters), trainable, loss. The first two must be the full model and the cut
    baseline; gap recovered = (cut - loss) / (cut - full)."""
    full, cut = rows[0]["loss"], rows[1]["loss"]
    lines = [f"{'model':<34} {'params kept':>12} {'trainable':>11} {'held-out loss':>14} {'ppl':>9} {'gap recovered':>14}"]
    for r in rows:
        r["gap_recovered"] = (cut - r["loss"]) / (cut - full) if cut != full else float("nan")
        lines.append(f"{r['name']:<34} {r['kept']:>12,} {r['trainable']:>11,} {r['loss']:>14.4f} "
                     f"{math.exp(min(r['loss'], 50)):>9.2f} {100 * r['gap_recovered']:>13.1f}%")
    return "\n".join(lines)


def reference_rows(model_path, model: Ouroboros, val: Windows, args, device) -> list[dict]:
    """Full model and cut baseline on the same held-out windows as every trained arm."""
    full = load_model(model_path, None if device.type == "cuda" else torch.float32, device)
    rows = [dict(name=f"full model ({len(full.layer_ids)} layers)", kept=count(full.parameters()), trainable=0,
                 loss=evaluate(full, val, args, device))]
    del full
    rows.append(dict(name=f"cut baseline ({len(model.base.layer_ids)} layers)", kept=count(model.base.parameters()),
                     trainable=0, loss=evaluate(model.base, val, args, device)))
    return rows


def arm_rows(model: Ouroboros, name: str, val: Windows, args, device) -> list[dict]:
    model.eval()
    return [dict(name=f"{name}, depth {d}", kept=count(model.base.parameters()),
                 trainable=count(model.trainable_parameters().values()),
                 loss=evaluate(lambda x: model(x, d), val, args, device))
            for d in args.eval_depths]


def arm_name(args) -> str:
    name = {"dynamic": "Ouroboros", "static": "static per-step LoRA", "none": "gate + norm only"}[args.controller]
    ablations = [f for f, on in (("no gate", args.no_gate), ("no step norm", args.no_step_norm),
                                 ("mean pool", args.pool == "mean")) if on]
    return name + (f" ({', '.join(ablations)})" if ablations else "")


def prepare_arm(args, device):
    """Validates the run and loads the model. Nothing is written."""
    qcfg = load_config(args.model)
    cfg = ouroboros_config(args, qcfg.num_hidden_layers)
    dtype = None if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    model = load_ouroboros(args.model, cfg, dtype, device)
    return qcfg, model


def train_arm(args, model: Ouroboros, data: Windows, val: Windows, out: Path, device, world=1, rank=0) -> None:
    params = model.trainable_parameters()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not args.resume:
            for f in (CHECKPOINT, "metrics.jsonl", "results.json"):
                (out / f).unlink(missing_ok=True)
            (out / "config.json.tmp").write_text(json.dumps(run_record(args), indent=2))
            os.replace(out / "config.json.tmp", out / "config.json")  # whole or absent, whenever the run is killed
        print(f"{arm_name(args)}: {count(params.values()):,} trainable parameters, layers {model.prelude} + "
              f"[{model.recurrent}] x depth + {model.coda}; {data.n:,} training windows of {args.seq_len} tokens")
    model.train()
    train(lambda x, depth: model(x, depth), params, data, val, args, out, device, args.resume, True, world, rank)


def run(args) -> int:
    device = pick_device(args.device)
    args.precision = resolve_precision(args.precision, device)
    out = check_out_dir(args)
    if args.sample or args.eval_only:
        return use_finished_run(args, out, device)
    if args.data is None:
        raise RunError("--data is required with --model; pass a text file, a directory or a .jsonl")
    check_flags(args)
    qcfg, model = prepare_arm(args, device)
    if args.resume:
        check_resume(out, args, model.trainable_parameters())
    tokenizer = load_tokenizer(args.model)
    # Every process has checked its input above, before any process writes.
    rank, world = init_distributed(device)
    try:
        # Rank 0 tokenises, checks and caches the data first (nothing is written unless the data is usable);
        # the others then read its cache.
        error = None
        if rank == 0:
            try:
                data, val = tokens_for(args, tokenizer, qcfg.vocab_size, out)
            except RunError as e:
                error = e
        agree(world, error)
        if rank > 0:
            data, val = tokens_for(args, tokenizer, qcfg.vocab_size, out)
        train_arm(args, model, data, val, out, device, world, rank)
        if rank == 0:
            rows = reference_rows(args.model, model, val, args, device) + arm_rows(model, arm_name(args), val, args, device)
            finish(out, rows)
    except OSError as e:  # the file system's (a full disk, no permission): the user's to fix, so one line
        raise RunError(f"{e}; fix that, then start again or --resume from the last checkpoint") from None
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


def finish(out: Path, rows: list[dict]) -> None:
    table = comparison_table(rows)
    print(f"\nheld-out next-token loss, {out}:\n{table}")
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, out / "results.json")


def use_finished_run(args, out: Path, device) -> int:
    """--sample and --eval-only: rebuild the run from its config.json and checkpoint."""
    if not (out / "config.json").is_file() or not (out / CHECKPOINT).is_file():
        raise RunError(f"{out}: no finished run here (config.json and {CHECKPOINT} are needed)")
    saved = argparse.Namespace(**read_run_config(out))
    saved.device, saved.precision = args.device, args.precision
    qcfg, model = prepare_arm(saved, device)
    load_checkpoint(out, model.trainable_parameters())
    if args.sample:
        tokenizer = load_tokenizer(saved.model)
        ids = torch.tensor([tokenizer.encode(args.sample).ids], device=device)
        if ids.numel() == 0:
            raise RunError("--sample needs a non-empty prompt")
        gen = torch.Generator(device=device).manual_seed(saved.seed)
        with autocast(device, saved.precision):
            outp = model.eval().generate(ids, saved.eval_depths[-1], args.max_new_tokens, args.temperature,
                                         args.top_k, gen)
        print(tokenizer.decode(outp[0].tolist()))
        return 0
    data, val = tokens_for(saved, load_tokenizer(saved.model), qcfg.vocab_size, out)
    rows = reference_rows(saved.model, model, val, saved, device) + arm_rows(model, arm_name(saved), val, saved, device)
    finish(out, rows)
    return 0


# ----------------------------------------------------------------------------------------------------------
# The demo (`python train.py`): no checkpoint and no GPU needed. A small Qwen2 is pretrained from scratch on
# the standard library's source, then the method is applied to it like to any downloaded checkpoint.

DEMO_BASE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32")
DEMO_VOCAB = 4096
# The base's recipe is fixed (only --pretrain-steps and --precision change it, and each base is cached under
# its own key): --seed, --lr, --batch-size etc. vary only the Ouroboros arms trained on it.
DEMO_PRETRAIN = dict(seq_len=256, batch_size=4, grad_accum=1, lr=2e-3, warmup=20, min_lr_ratio=0.1,
                     weight_decay=0.1, clip=1.0, seed=0)
# Flag defaults for the demo's arms, sized for a 2-core CPU; every flag can still override them.
DEMO_ARM = dict(seq_len=256, batch_size=16, grad_accum=1, steps=80, warmup=5, lr=3e-4, depth=4,
                val_fraction=0.1, eval_windows=64, eval_every=0, log_every=25, save_every=50)


def demo_cache() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "ouroboros"


def train_bpe(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def pretrain_base(args, tokenizer, train_ids: np.ndarray, base_dir: Path, device) -> Path:
    """Pretrains the demo's base Qwen2 (all weights trainable, same loop) and saves it in HF layout."""
    from load_qwen import save_model
    from model import Qwen2, Qwen2Config
    model_dir = base_dir / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    pargs = argparse.Namespace(**{**vars(args), **DEMO_PRETRAIN, "steps": args.pretrain_steps, "eval_every": 0,
                                  "stop_after": None})
    if len(train_ids) <= pargs.seq_len:
        raise RunError(f"the training split has {len(train_ids)} tokens, too few to pretrain the demo base on "
                       f"windows of {pargs.seq_len}; pass --data with more text")
    cfg = Qwen2Config(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=pargs.seq_len, **DEMO_BASE)
    data = Windows(train_ids, pargs.seq_len, pargs.seed)
    torch.manual_seed(pargs.seed)
    model = Qwen2(cfg).to(device).train()
    run_dir = base_dir / "pretrain"
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"pretraining the demo base: Qwen2 with {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"{count(model.parameters()):,} parameters, {pargs.steps} steps (cached for later runs)")
    train(lambda x, depth: model(x), dict(model.named_parameters()), data, None, pargs, run_dir, device,
          (run_dir / CHECKPOINT).is_file(), looped=False)
    tmp = base_dir / "model.tmp"
    save_model(model.eval(), tmp, tokenizer)
    os.replace(tmp, model_dir)
    return model_dir


def demo(args) -> int:
    check_flags(args)
    if args.pretrain_steps < 1:
        raise RunError(f"--pretrain-steps {args.pretrain_steps} is invalid; pass a value >= 1")
    device = pick_device(args.device)
    args.precision = resolve_precision(args.precision, device)
    t0 = time.time()
    out = Path(args.out) if args.out else next(Path("runs") / f"demo-{i}" for i in range(1, 10**6)
                                               if not (Path("runs") / f"demo-{i}").exists())
    args.out = str(out)
    if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise RunError(f"{out} already holds files; pass --resume to continue that run or --overwrite to replace it")
    cache = demo_cache()
    cache.mkdir(parents=True, exist_ok=True)
    docs = read_documents(args.data)
    key = hashlib.sha256(f"{[(n, len(t)) for n, t in docs]}|{args.val_fraction}|{DEMO_VOCAB}".encode()).hexdigest()[:12]
    tok_file = cache / f"tokenizer-{key}.json"
    if tok_file.is_file():
        tokenizer = load_tokenizer_file(tok_file)
    else:
        print(f"training a {DEMO_VOCAB}-token byte-level BPE on the training split of {len(docs)} documents")
        tokenizer = train_bpe(split_documents(docs, args.val_fraction)[0])
        tokenizer.save(str(tok_file.with_suffix(".tmp")))
        os.replace(tok_file.with_suffix(".tmp"), tok_file)
    train_ids, val_ids = load_tokens(docs, args.val_fraction, tokenizer, cache, f"{key}|tokens")
    data, val = windows_for(train_ids, val_ids, args, tokenizer.get_vocab_size())
    # The base depends on the data, the recipe and the precision: any change pretrains (and caches) another.
    recipe = f"{DEMO_BASE}|{DEMO_PRETRAIN}|{args.pretrain_steps}|{args.precision}"
    base_dir = cache / f"base-{key}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    base = pretrain_base(args, tokenizer, train_ids, base_dir, device)
    print(f"base model ready in {base} ({fmt_time(time.time() - t0)} so far)")
    rows = None
    for controller in ("none", "dynamic"):
        arm_dir = out / controller
        # With --resume, an arm that never reached its first checkpoint starts again.
        arm = argparse.Namespace(**{**vars(args), "model": str(base), "controller": controller, "out": str(arm_dir),
                                    "resume": args.resume and (arm_dir / CHECKPOINT).is_file(),
                                    "overwrite": args.resume or args.overwrite})
        arm_out = check_out_dir(arm)
        qcfg, model = prepare_arm(arm, device)
        if rows is None:
            rows = reference_rows(arm.model, model, val, arm, device)
        train_arm(arm, model, data, val, arm_out, device)
        rows += arm_rows(model, arm_name(arm), val, arm, device)
    finish(out, rows)
    print(f"demo finished in {fmt_time(time.time() - t0)}")
    return 0


def load_tokenizer_file(file: Path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(file))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.model is None and not (args.sample or args.eval_only):
            parser.set_defaults(**DEMO_ARM)
            return demo(parser.parse_args(argv))
        return run(args)
    except (RunError, ConfigError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the demo's file system errors (run() words its own)
        print(f"error: {e}; fix that, then run again (--resume continues)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
