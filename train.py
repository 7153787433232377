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
import gzip
import hashlib
import json
import math
import os
import re
import signal
import sys
import sysconfig
import time
import zlib
from pathlib import Path
from typing import NamedTuple

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


def number(text: str) -> float:
    """A float flag: nan and inf are refused here, so no run starts with them."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: "--step 40" must not silently mean --steps.
    p = Parser(description="Train Ouroboros (a looped Qwen2 layer with input-conditioned LoRA) on a Qwen2 checkpoint. "
                           "Without --model: the offline CPU demo, whose defaults are sized for a 2-core CPU "
                           "(--steps 80 --seq-len 256 --batch-size 16 --grad-accum 1 --depth 4 ...).",
               allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", help="Qwen2/Qwen2.5 checkpoint directory (Hugging Face layout). Omit for the offline CPU demo.")
    a("--data", help="training text: a file (documents separated by blank lines), a directory of text files "
                     "(hidden ones skipped), or a .jsonl with a 'text' field (and optionally an 'id'); .gz files "
                     "are read through gzip. The demo defaults to the Python standard library's source.")
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
    a("--alpha", type=number, default=16.0, help="LoRA alpha; the delta is scaled by alpha / r")
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
    a("--lr", type=number, default=3e-4, help="peak learning rate")
    a("--min-lr-ratio", type=number, default=0.1, help="final learning rate as a fraction of --lr")
    a("--warmup", type=int, default=50, help="linear warmup, in optimizer steps")
    a("--weight-decay", type=number, default=0.01,
      help="AdamW weight decay (the paper's 0.01), on the weight matrices of the Controller and the gate only: "
           "never on norms, step embeddings, the static c or biases")
    a("--clip", type=number, default=1.0, help="gradient norm clip")
    a("--seed", type=int, default=0, help="seed for data order, depth draws and initialisation")
    a("--dev-fraction", type=number, default=0.01,
      help="share of documents in the dev split, read by --eval-every (and by any tuning)")
    a("--test-fraction", type=number, default=0.01,
      help="share of documents in the test split, read only by the final comparison table")
    a("--eval-windows", type=int, default=256,
      help="windows scored per evaluation, spread evenly over the whole split (0: every window)")
    a("--eval-every", type=int, default=200, help="dev-split evaluation every N steps (0: never)")
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
    a("--temperature", type=number, default=0.8, help="with --sample; 0 is greedy")
    a("--top-k", type=int, default=50, help="with --sample")
    return p


# ----------------------------------------------------------------------------------------------------------
# Data: documents -> one token stream with end-of-text between documents -> windows of seq_len + 1 tokens.
# Documents are split three ways by a hash of their content: train; dev, read by --eval-every and any tuning;
# test, read only by the final comparison table.

SPLITS = ("train", "dev", "test")


class Doc(NamedTuple):
    name: str  # where it came from, for messages
    text: str
    id: str | None = None  # a .jsonl record's "id": the split follows it instead of the text


def stdlib_documents() -> list[Doc]:
    """The demo corpus: the running interpreter's standard library source, present on every machine.
    Its test suites are left out (they are mostly generated data and would dominate)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
    return [Doc(str(f.relative_to(root)), f.read_text(errors="replace")) for f in files]


def read_text(file: Path) -> str:
    """A file's text, through gzip for .gz; anything that is not UTF-8 text (a binary file) is refused."""
    try:
        raw = gzip.open(file).read() if file.suffix == ".gz" else file.read_bytes()
        if b"\0" in raw:
            raise UnicodeError
        return raw.decode("utf-8")
    except (UnicodeError, gzip.BadGzipFile, EOFError, zlib.error):
        raise RunError(f"{file}: not a UTF-8 text file (binary data?); pass text, a .jsonl, or a .gz of either") from None


def jsonl_documents(path: Path, text: str) -> list[Doc]:
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            what = "not a JSON object" if not isinstance(record, dict) else \
                "no 'text' field" if "text" not in record else f"'text' is {json.dumps(record['text'])}, not a string"
            raise RunError(f"{path}:{n}: {what}; each line must be a JSON object with a string 'text' field")
        docs.append(Doc(f"{path.name}:{n}", record["text"], None if record.get("id") is None else str(record["id"])))
    return docs


def read_documents(path) -> list[Doc]:
    """Documents from a text file (split at blank lines), a directory (one file each), or a .jsonl.
    None means the demo corpus."""
    if path is None:
        return stdlib_documents()
    if not str(path).strip():
        raise RunError("--data is empty (an unset shell variable?); pass a text file, a directory or a .jsonl")
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        docs = []
        for f in files:
            name = str(f.relative_to(path))
            docs += jsonl_documents(f, read_text(f)) if f.name.endswith((".jsonl", ".jsonl.gz")) \
                else [Doc(name, read_text(f))]
    elif path.is_file() and path.name.endswith((".jsonl", ".jsonl.gz")):
        docs = jsonl_documents(path, read_text(path))
    elif path.is_file():
        docs = [Doc(f"{path.name}, paragraph {n}", t) for n, t in enumerate(read_text(path).split("\n\n"))]
    else:
        raise RunError(f"{path}: no such file or directory; pass --data a text file, a directory or a .jsonl")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise RunError(f"{path}: holds no text; pass --data with some documents")
    return docs


def split_of(doc: Doc, dev_fraction: float, test_fraction: float) -> str:
    """A document's split, from a hash of its content (or its id): the same wherever the document sits in the
    corpus, and copies of one document always land together."""
    key = doc.text if doc.id is None else f"id:{doc.id}"
    u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if u < test_fraction else "dev" if u < test_fraction + dev_fraction else "train"


def split_documents(docs: list[Doc], dev_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    parts = {s: [] for s in SPLITS}
    for d in docs:
        parts[split_of(d, dev_fraction, test_fraction)].append(d.text)
    if not all(parts.values()):
        counts = ", ".join(f"{len(v)} {k}" for k, v in parts.items())
        raise RunError(f"the {len(docs)} documents split into {counts}; every split needs one, so use more documents "
                       "or larger --dev-fraction / --test-fraction")
    return parts


def corpus_digest(docs: list[Doc]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(f"{d.id}|{len(d.text)}|".encode())
        h.update(d.text.encode())
    return h.hexdigest()


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


def load_tokens(docs, args, tokenizer, cache_dir: Path, key: str, check=None) -> dict[str, np.ndarray]:
    """Tokenised train, dev and test streams, cached in cache_dir under a key of everything they depend on.
    check(streams) may refuse them before anything is cached, so unusable data leaves no file behind."""
    key = f"{key}|{args.dev_fraction}|{args.test_fraction}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    files = {s: cache_dir / f"tokens-{digest}-{s}.npy" for s in SPLITS}
    if all(f.is_file() for f in files.values()):
        return {s: np.load(f) for s, f in files.items()}
    parts = split_documents(docs, args.dev_fraction, args.test_fraction)
    eos = eos_token_id(tokenizer)
    streams = {s: tokenize(parts[s], tokenizer, eos, f"{s} split") for s in SPLITS}
    if check is not None:
        check(streams)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for s, f in files.items():
        tmp = f.with_suffix(".tmp.npy")
        np.save(tmp, streams[s])
        os.replace(tmp, f)
    return streams


class Windows:
    """Consecutive windows of seq_len + 1 tokens; sample k of the training order is window perm_e[k mod n]
    with a fresh seeded permutation each epoch e, so the data position is just a sample count."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, eos_id: int | None = None):
        self.tokens, self.seq_len, self.seed, self.eos_id = tokens, seq_len, seed, eos_id
        self.n = (len(tokens) - 1) // seq_len
        self._perm = (None, None)

    def window(self, i: int) -> np.ndarray:
        return self.tokens[i * self.seq_len: i * self.seq_len + self.seq_len + 1]

    def rows(self, indices) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.window(j).astype(np.int64) for j in indices]))  # (len, seq_len + 1)

    def batch(self, start: int, size: int) -> torch.Tensor:
        indices = []
        for k in range(start, start + size):
            epoch, j = divmod(k, self.n)
            if self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
            indices.append(self._perm[1][j])
        return self.rows(indices)

    def spread(self, k: int) -> list[int]:
        """k windows spaced evenly from the first to the last (every window when k is 0 or >= n), so an
        evaluation covers the whole split, not its first documents."""
        if k <= 0 or k >= self.n:
            return list(range(self.n))
        return sorted(set(np.linspace(0, self.n - 1, k).round().astype(int).tolist()))

    def documents_in(self, indices) -> int:
        """How many documents the given windows score a token of (each document ends with end-of-text)."""
        doc = np.concatenate(([0], np.cumsum(self.tokens == self.eos_id)))  # token i is in document doc[i]
        seen = set()
        for j in indices:  # window j's targets are tokens j*T + 1 .. j*T + T
            seen.update(range(int(doc[j * self.seq_len + 1]), int(doc[j * self.seq_len + self.seq_len]) + 1))
        return len(seen)


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
    # The optimizer state is stored by parameter name (the optimizer itself numbers them by position).
    names = optimizer_order(params, optimizer)
    scalars = []
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            key = f"opt.{k}.{names[i]}"
            tensors[key] = v.detach().cpu().contiguous().reshape(-1) if v.dim() == 0 else v.detach().cpu().contiguous()
            scalars += [key] if v.dim() == 0 else []
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tmp = out / (CHECKPOINT + ".tmp")  # a stale one left by a killed run is simply written over
    try:
        save_file(tensors, str(tmp), metadata={"state": json.dumps(dict(state, scalar_keys=scalars))})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out / CHECKPOINT)
    except (OSError, SafetensorError) as e:  # a full disk, say (safetensors reports I/O errors as SafetensorError)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise RunError(f"{out / CHECKPOINT}: writing the checkpoint of step {state['step']} failed ({e}); the "
                       "last complete checkpoint is kept; fix the cause (a full disk?), then --resume") from None


def optimizer_order(params: dict, optimizer) -> list[str]:
    name_of = {id(p): n for n, p in params.items()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def read_checkpoint(out: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of the run's checkpoint, read once; restore() puts them back."""
    file = out / CHECKPOINT
    if not file.is_file():
        raise RunError(f"{file}: no checkpoint to resume from; start a new run without --resume")
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = json.loads(f.metadata()["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise RunError(f"{file}: unreadable checkpoint ({e}); restore it or start again with --overwrite") from None
    return meta, tensors


def restore(checkpoint: tuple[dict, dict], out: Path, params: dict, optimizer=None) -> dict:
    """Copies a checkpoint into the parameters (and the optimizer and RNG states); returns its metadata."""
    meta, tensors = checkpoint
    for n, p in params.items():
        if f"param.{n}" not in tensors or tensors[f"param.{n}"].shape != p.shape:
            raise RunError(f"{out / CHECKPOINT}: no parameter {n} of shape {list(p.shape)}; the checkpoint is not "
                           "this run's, restore it or start again with --overwrite")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    if optimizer is not None:
        index = {n: i for i, n in enumerate(optimizer_order(params, optimizer))}
        state = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, k, name = key.split(".", 2)
                if name not in index:
                    raise RunError(f"{out / CHECKPOINT}: optimizer state for {name}, which this run does not "
                                   "train; the checkpoint is not this run's, start again with --overwrite")
                state.setdefault(index[name], {})[k] = v.reshape(()) if key in meta["scalar_keys"] else v
        if state and len(state) != len(index):
            missing = sorted(set(index) - {n for n, i in index.items() if i in state})
            raise RunError(f"{out / CHECKPOINT}: no optimizer state for {missing[0]}; the checkpoint is not "
                           "this run's, start again with --overwrite")
        # The groups (and so which tensors are decayed) are this run's; only the per-tensor state is loaded.
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
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
def evaluate(forward, split: Windows, args, device, what: str | None = None) -> float:
    """Mean next-token loss over --eval-windows windows spread over the whole split (the same tokens for every
    model). With `what`, a progress line on stderr."""
    indices = split.spread(args.eval_windows)
    total = 0.0
    for start in range(0, len(indices), args.batch_size):
        chunk = indices[start:start + args.batch_size]
        x, y = inputs_and_targets(split.rows(chunk).to(device))
        with autocast(device, args.precision):
            total += next_token_loss(forward(x), y).item() * len(chunk)
        if what:
            print(f"\revaluating {what}: {start + len(chunk)}/{len(indices)} windows", end="", file=sys.stderr,
                  flush=True)
    if what:
        print(file=sys.stderr)
    return total / len(indices)


def build_optimizer(model: torch.nn.Module, params: dict, args, device) -> torch.optim.AdamW:
    """AdamW over `params`. Weight decay pulls towards 0, so it goes only on the weight matrices of linear
    layers (the Controller's and the gate's; every matrix of a model pretrained from scratch). Never on norms
    (a norm row no step reaches would shrink), step embeddings, the static c or biases."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    decay = [p for p in params.values() if id(p) in linear]
    rest = [p for p in params.values() if id(p) not in linear]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


class Interrupted(Exception):
    pass


def train(forward, model: torch.nn.Module, data: Windows, dev: Windows | None, args, out: Path, device,
          resume_from: tuple | None = None, looped: bool = True, world: int = 1, rank: int = 0) -> dict:
    """Optimizes the trainable parameters of `model` (fp32) so that forward(inputs, depth) predicts the next
    token; `dev` is the split --eval-every reads. `looped` is False for the demo's pretraining, where there is no
    depth. `resume_from`: a checkpoint read by read_checkpoint. Returns the training state."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, params, args, device)
    state = dict(step=0, bad_steps=0, world=world)
    if resume_from is not None:
        state = restore(resume_from, out, params, optimizer)
        if rank == 0:
            # Drop log lines written after the checkpoint: the resumed run writes them again, identically. The
            # file is replaced atomically, so a kill during the rewrite loses no line.
            file = out / "metrics.jsonl"
            lines = file.read_text().splitlines() if file.exists() else []
            keep = [l for l in lines if logged_step(l) <= state["step"]]
            (out / "metrics.jsonl.tmp").write_text("".join(l + "\n" for l in keep))
            os.replace(out / "metrics.jsonl.tmp", file)
            print(f"resuming at step {state['step']}")
    state.pop("scalar_keys", None)
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

    saved = dict(step=state["step"] if resume_from is not None else None)

    def save() -> None:
        # Every process gets here at the same steps. The parameters are checked to be identical everywhere
        # before they are written; only rank 0 writes, and a failed write stops every process. A step already
        # on disk is not written again.
        if saved["step"] == state["step"]:
            return
        agree(world, params=params)
        error = None
        if rank == 0:
            try:
                save_checkpoint(out, params, optimizer, state)
            except RunError as e:
                error = e
        agree(world, error)
        saved["step"] = state["step"]

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
                dev_loss = evaluate(lambda x: forward(x, max(args.eval_depths)), dev, args, device)
                record.update(dev_loss=dev_loss)
                if rank == 0:
                    print(f"step {step}: dev loss {dev_loss:.4f} (ppl {math.exp(dev_loss):.1f})", flush=True)
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
    """Values that pass argparse's type check but would fail mid-run (a division by zero, an optimizer error)
    or silently do something else than asked."""
    if args.data is not None and not args.data.strip():
        raise RunError("--data is empty (an unset shell variable?); pass a text file, a directory or a .jsonl")
    checks = [(f, getattr(args, f) >= 1, ">= 1") for f in ("seq_len", "batch_size", "grad_accum", "steps",
                                                           "log_every", "save_every", "max_new_tokens", "top_k")]
    checks += [(f, getattr(args, f) >= 0, ">= 0") for f in ("warmup", "eval_every", "eval_windows", "weight_decay",
                                                            "temperature")]
    checks += [("stop_after", args.stop_after is None or args.stop_after >= 1, ">= 1"), ("lr", args.lr > 0, "> 0"),
               ("alpha", args.alpha > 0, "> 0"), ("clip", args.clip > 0, "> 0"),
               ("min_lr_ratio", 0 <= args.min_lr_ratio <= 1, "in 0..1"),
               ("dev_fraction", 0 < args.dev_fraction < 1, "strictly between 0 and 1"),
               ("test_fraction", 0 < args.test_fraction < 1 - args.dev_fraction,
                "above 0 and below 1 - --dev-fraction (the rest is for training)")]
    for name, ok, rule in checks:
        if not ok:
            raise RunError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid; pass a value {rule}")
    if args.warmup > args.steps:
        raise RunError(f"--warmup {args.warmup} is longer than the run (--steps {args.steps}), so the learning rate "
                       f"would never reach its peak; pass a --warmup of at most {args.steps}")


def check_out_dir(args) -> Path:
    """Refuses to touch an existing run unless told to; changes nothing itself."""
    if not args.out:
        using = "--sample and --eval-only read the run in --out" if args.sample or args.eval_only else \
            "with --model, --out is the directory the run writes"
        raise RunError(f"--out is required: {using}; pass the run's directory")
    out = Path(args.out)
    if args.model and (out.resolve() == Path(args.model).resolve() or Path(args.model).resolve() in out.resolve().parents):
        raise RunError(f"--out {out} is inside the checkpoint directory --model {args.model}; a run must not write "
                       "there, pass another --out")
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


def check_resume(out: Path, args, params: dict) -> tuple[dict, dict]:
    """Checks that --resume continues the same run; returns its checkpoint, read (once) and checked now, so a
    damaged one stops the run before anything is written."""
    saved = read_run_config(out)
    now = run_record(args)
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE and saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise RunError(f"--resume with a different configuration ({detail}); use the run's original flags")
    checkpoint = read_checkpoint(out)
    trained_by = restore(checkpoint, out, params).get("world", 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if trained_by != world:  # the global batch, so the result, depends on the number of processes
        launch = "python train.py" if trained_by == 1 else f"torchrun --nproc-per-node {trained_by} train.py"
        raise RunError(f"the run was trained by {trained_by} process(es), this is {world}; resume it as it was "
                       f"started: {launch} ... --resume")
    return checkpoint


def tokens_for(args, tokenizer, vocab_size: int, cache_dir: Path) -> dict[str, Windows]:
    docs = read_documents(args.data)
    tok_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    eos = eos_token_id(tokenizer)
    streams = load_tokens(docs, args, tokenizer, cache_dir, f"{corpus_digest(docs)}|{tok_hash}",
                          check=lambda s: windows_for(s, args, vocab_size, eos))
    return windows_for(streams, args, vocab_size, eos)  # a cached stream may not fit this run's --seq-len


def windows_for(streams: dict[str, np.ndarray], args, vocab_size: int, eos_id: int) -> dict[str, Windows]:
    for split, ids in streams.items():
        if len(ids) < args.seq_len + 1:
            raise RunError(f"the {split} split has {len(ids)} tokens, fewer than one window of --seq-len "
                           f"{args.seq_len} + 1; add data or lower --seq-len")
        if int(ids.max()) >= vocab_size:
            raise RunError(f"token id {int(ids.max())} in the {split} data is beyond the model's vocabulary "
                           f"({vocab_size}); tokenise with the checkpoint's own tokenizer")
    return {s: Windows(ids, args.seq_len, args.seed, eos_id) for s, ids in streams.items()}


def count(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def comparison_table(rows: list[dict], test: Windows, args) -> str:
    """rows: name, kept (base parameters), trainable, loss. The first two must be the full model and the cut
    baseline; gap recovered = (cut - loss) / (cut - full). Every row is scored on the same test windows."""
    full, cut = rows[0]["loss"], rows[1]["loss"]
    scored = test.spread(args.eval_windows)
    documents = int((test.tokens == test.eos_id).sum())
    lines = [f"test split: {len(scored):,} of its {test.n:,} windows of {args.seq_len} tokens, spread over all of it: "
             f"{len(scored) * args.seq_len:,} tokens scored, from {test.documents_in(scored):,} of its "
             f"{documents:,} documents",
             f"{'model':<34} {'params kept':>12} {'trainable':>11} {'test loss':>10} {'ppl':>9} {'gap recovered':>14}"]
    for r in rows:
        r["gap_recovered"] = (cut - r["loss"]) / (cut - full) if cut != full else float("nan")
        lines.append(f"{r['name']:<34} {r['kept']:>12,} {r['trainable']:>11,} {r['loss']:>10.4f} "
                     f"{math.exp(min(r['loss'], 50)):>9.2f} {100 * r['gap_recovered']:>13.1f}%")
    lines.append("gap recovered = (cut - loss) / (cut - full): the share of the loss the cut costs that a model wins "
                 "back (100%: the full model, 0%: the cut baseline).")
    if any(r["name"].startswith(CONTROL) for r in rows):
        lines.append(f"'{CONTROL}' is the control: the same gate and per-step norms, no LoRA modulation.")
    if any(r["loss"] > cut for r in rows[2:]):
        lines.append("A negative share is a loss above the cut baseline: at initialisation the looped arms start "
                     "above it (each step keeps 88% of a state the step norm has rescaled), so a short run can end there.")
    return "\n".join(lines)


def base_dtype(precision: str) -> torch.dtype:
    # The frozen base is stored in the compute dtype on every device: fp32 under fp32; bf16 under bf16 autocast,
    # which would otherwise re-cast every frozen fp32 weight at every matmul.
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def reference_rows(model_path, model: Ouroboros, test: Windows, args, device) -> list[dict]:
    """Full model and cut baseline on the same test windows as every trained arm."""
    full = load_model(model_path, base_dtype(args.precision), device)
    name = f"full model ({len(full.layer_ids)} layers)"
    rows = [dict(name=name, kept=count(full.parameters()), trainable=0, loss=evaluate(full, test, args, device, name))]
    del full
    name = f"cut baseline ({len(model.base.layer_ids)} layers)"
    rows.append(dict(name=name, kept=count(model.base.parameters()), trainable=0,
                     loss=evaluate(model.base, test, args, device, name)))
    return rows


def arm_rows(model: Ouroboros, name: str, test: Windows, args, device) -> list[dict]:
    model.eval()
    return [dict(name=f"{name}, depth {d}", kept=count(model.base.parameters()),
                 trainable=count(model.trainable_parameters().values()),
                 loss=evaluate(lambda x: model(x, d), test, args, device, f"{name}, depth {d}"))
            for d in args.eval_depths]


CONTROL = "gate + norm only"


def arm_name(args) -> str:
    name = {"dynamic": "Ouroboros", "static": "static per-step LoRA", "none": CONTROL}[args.controller]
    ablations = [f for f, on in (("no gate", args.no_gate), ("no step norm", args.no_step_norm),
                                 ("mean pool", args.pool == "mean")) if on]
    return name + (f" ({', '.join(ablations)})" if ablations else "")


def prepare_arm(args, device):
    """Validates the run and loads the model. Nothing is written."""
    qcfg = load_config(args.model)
    cfg = ouroboros_config(args, qcfg.num_hidden_layers)
    torch.manual_seed(args.seed)
    model = load_ouroboros(args.model, cfg, base_dtype(args.precision), device)
    return qcfg, model


def train_arm(args, model: Ouroboros, splits: dict[str, Windows], out: Path, device, checkpoint=None,
              world=1, rank=0) -> None:
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if checkpoint is None:
            for f in (CHECKPOINT, "metrics.jsonl", "results.json"):
                (out / f).unlink(missing_ok=True)
            (out / "config.json.tmp").write_text(json.dumps(run_record(args), indent=2))
            os.replace(out / "config.json.tmp", out / "config.json")  # whole or absent, whenever the run is killed
        print(f"{arm_name(args)}: {count(model.trainable_parameters().values()):,} trainable parameters, layers "
              f"{model.prelude} + [{model.recurrent}] x depth + {model.coda}; {splits['train'].n:,} training windows "
              f"of {args.seq_len} tokens")
    model.train()
    train(lambda x, depth: model(x, depth), model, splits["train"], splits["dev"], args, out, device, checkpoint,
          True, world, rank)


def run(args) -> int:
    check_flags(args)
    device = pick_device(args.device)
    args.precision = resolve_precision(args.precision, device)
    out = check_out_dir(args)
    if args.sample or args.eval_only:
        return use_finished_run(args, out, device)
    if args.data is None:
        raise RunError("--data is required with --model; pass a text file, a directory or a .jsonl")
    qcfg, model = prepare_arm(args, device)
    checkpoint = check_resume(out, args, model.trainable_parameters()) if args.resume else None
    tokenizer = load_tokenizer(args.model)
    # Every process has checked its input above, before any process writes.
    rank, world = init_distributed(device)
    try:
        # Rank 0 tokenises, checks and caches the data first (nothing is written unless the data is usable);
        # the others then read its cache.
        error = None
        if rank == 0:
            try:
                splits = tokens_for(args, tokenizer, qcfg.vocab_size, out)
            except RunError as e:
                error = e
        agree(world, error)
        if rank > 0:
            splits = tokens_for(args, tokenizer, qcfg.vocab_size, out)
        train_arm(args, model, splits, out, device, checkpoint, world, rank)
        if rank == 0:
            rows = reference_rows(args.model, model, splits["test"], args, device)
            finish(out, rows + arm_rows(model, arm_name(args), splits["test"], args, device), splits["test"], args)
    except OSError as e:  # the file system's (a full disk, no permission): the user's to fix, so one line
        raise RunError(f"{e}; fix that, then start again or --resume from the last checkpoint") from None
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


def finish(out: Path, rows: list[dict], test: Windows, args) -> None:
    table = comparison_table(rows, test, args)
    print(f"\nnext-token loss on the test split, {out}:\n{table}")
    scored = test.spread(args.eval_windows)
    for r in rows:
        r.update(split="test", windows=len(scored), tokens=len(scored) * args.seq_len,
                 documents=test.documents_in(scored))
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, out / "results.json")


def use_finished_run(args, out: Path, device) -> int:
    """--sample and --eval-only: rebuild the run from its config.json and checkpoint."""
    if not (out / "config.json").is_file() or not (out / CHECKPOINT).is_file():
        raise RunError(f"{out}: no finished run here (config.json and {CHECKPOINT} are needed)")
    # Flags added since the run was made take their defaults.
    saved = argparse.Namespace(**{**vars(build_parser().parse_args([])), **read_run_config(out)})
    saved.device, saved.precision = args.device, args.precision
    qcfg, model = prepare_arm(saved, device)
    restore(read_checkpoint(out), out, model.trainable_parameters())
    if args.sample:
        tokenizer = load_tokenizer(saved.model)
        ids = torch.tensor([tokenizer.encode(args.sample).ids], device=device)
        if ids.numel() == 0:
            raise RunError("--sample needs a non-empty prompt")
        gen = torch.Generator(device=device).manual_seed(saved.seed)
        with autocast(device, saved.precision):
            outp = model.eval().generate(ids, max(saved.eval_depths), args.max_new_tokens, args.temperature,
                                         args.top_k, gen)
        print(tokenizer.decode(outp[0].tolist()))
        return 0
    splits = tokens_for(saved, load_tokenizer(saved.model), qcfg.vocab_size, out)
    rows = reference_rows(saved.model, model, splits["test"], saved, device)
    finish(out, rows + arm_rows(model, arm_name(saved), splits["test"], saved, device), splits["test"], saved)
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
                dev_fraction=0.05, test_fraction=0.1, eval_windows=128, eval_every=0, log_every=25, save_every=50)


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
    # A --pretrain-steps shorter than the recipe's warmup (the tests' few steps) warms up over all of them.
    pargs = argparse.Namespace(**{**vars(args), **DEMO_PRETRAIN, "steps": args.pretrain_steps, "eval_every": 0,
                                  "stop_after": None,
                                  "warmup": min(DEMO_PRETRAIN["warmup"], args.pretrain_steps)})
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
    checkpoint = read_checkpoint(run_dir) if (run_dir / CHECKPOINT).is_file() else None
    train(lambda x, depth: model(x), model, data, None, pargs, run_dir, device, checkpoint, looped=False)
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
    key = hashlib.sha256(f"{corpus_digest(docs)}|{args.dev_fraction}|{args.test_fraction}|{DEMO_VOCAB}".encode()).hexdigest()[:12]
    tok_file = cache / f"tokenizer-{key}.json"
    if tok_file.is_file():
        tokenizer = load_tokenizer_file(tok_file)
    else:
        print(f"training a {DEMO_VOCAB}-token byte-level BPE on the training split of {len(docs)} documents")
        tokenizer = train_bpe(split_documents(docs, args.dev_fraction, args.test_fraction)["train"])
        tokenizer.save(str(tok_file.with_suffix(".tmp")))
        os.replace(tok_file.with_suffix(".tmp"), tok_file)
    streams = load_tokens(docs, args, tokenizer, cache, f"{key}|tokens")
    splits = windows_for(streams, args, tokenizer.get_vocab_size(), eos_token_id(tokenizer))
    # The base depends on the data, the recipe and the precision: any change pretrains (and caches) another.
    recipe = f"{DEMO_BASE}|{DEMO_PRETRAIN}|{args.pretrain_steps}|{args.precision}"
    base_dir = cache / f"base-{key}-{hashlib.sha256(recipe.encode()).hexdigest()[:8]}"
    base = pretrain_base(args, tokenizer, streams["train"], base_dir, device)
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
        checkpoint = check_resume(arm_out, arm, model.trainable_parameters()) if arm.resume else None
        if rows is None:
            rows = reference_rows(arm.model, model, splits["test"], arm, device)
        train_arm(arm, model, splits, arm_out, device, checkpoint)
        rows += arm_rows(model, arm_name(arm), splits["test"], arm, device)
    finish(out, rows, splits["test"], args)
    print(f"demo finished in {fmt_time(time.time() - t0)}")
    return 0


def load_tokenizer_file(file: Path):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(file))


def flag_names(message: str) -> str:
    """ConfigError speaks of OuroborosConfig's fields; on the command line they are flags (rank -> --rank)."""
    fields = r"\b(n_prelude|recurrent_layer|n_coda|max_steps|rank|alpha|pool)\b"
    return re.sub(fields, lambda m: "--" + m.group(1).replace("_", "-"), message).replace("--pool='mean'", "--pool mean")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.model is None and not (args.sample or args.eval_only):
            parser.set_defaults(**DEMO_ARM)
            return demo(parser.parse_args(argv))
        return run(args)
    except ConfigError as e:
        print(f"error: {flag_names(str(e))}", file=sys.stderr)
        return 2
    except (RunError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the demo's file system errors (run() words its own)
        print(f"error: {e}; fix that, then run again (--resume continues)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
