"""What keeps a training run safe, kept out of train.py's way: the run directory (its record, checks before
anything is written, atomic checkpoints, the metrics log), Ctrl-C and SIGTERM, the device, and agreement
between data-parallel processes.

A run directory holds config.json (every flag, resolved), metrics.jsonl (a line per optimizer step),
checkpoint.safetensors (trainables, optimizer and RNG state, step) and results.json (the comparison table).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from data import check_data_path
from load_qwen import atomic_write, fingerprint

CHECKPOINT = "checkpoint.safetensors"
# Flags that may differ on --resume: they change nothing that is trained, at most the rounding (device,
# precision); "out": a run directory may be moved; "token_cache": the cache is keyed by content.
RESUME_FREE = {"resume", "overwrite", "out", "log_every", "save_every", "eval_every", "device", "precision",
               "stop_after", "sample", "eval_only", "max_new_tokens", "temperature", "top_k", "token_cache",
               "score_depths", "eval_pool", "compare", "compile", "allow_slow_bf16"}


class RunError(Exception):
    """A user error found while preparing or running: bad flags, a bad out directory, a bad resume."""


class Interrupted(Exception):
    pass


# ----------------------------------------------------------------------------------------------------------
# The run directory.

class Parser(argparse.ArgumentParser):
    """Flags with no abbreviations ("--step 40" must not silently mean --steps), and errors in one line."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):  # one line, not argparse's usage block
        raise RunError(f"{message}; see python train.py --help")


def number(text: str) -> float:
    """A float flag: nan and inf are refused here, so no run starts with them."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def check_out_dir(args) -> Path:
    """Refuses to touch an existing run unless told to; changes nothing itself."""
    if not args.out:
        using = "--sample and --eval-only read the run in --out" if args.sample is not None or args.eval_only else \
            "with --model, --out is the directory the run writes"
        raise RunError(f"--out is required: {using}; pass the run's directory")
    out = Path(args.out)
    model = Path(args.model).resolve() if args.model else None
    if model is not None and (out.resolve() == model or model in out.resolve().parents):
        raise RunError(f"--out {out} is inside the checkpoint directory --model {args.model}; a run must not write "
                       "there, pass another --out")
    exists = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; pass a directory")
    has_run = (out / CHECKPOINT).is_file() and (out / "config.json").is_file()
    reads = args.sample is not None or args.eval_only  # those two only read the run
    if reads and not has_run:
        raise RunError(f"{out}: no finished run here (config.json and {CHECKPOINT} are needed)")
    if args.resume and not has_run:
        # e.g. a run killed before its first checkpoint: its leftovers need --overwrite to start again
        again = "with --overwrite instead of --resume" if exists else "without --resume"
        raise RunError(f"{out}: no checkpoint to resume from; start the run again {again}")
    if not args.resume and exists and not (args.overwrite or reads):
        raise RunError(f"{out} already holds files; pass --resume to continue that run or --overwrite to replace it")
    return out


def check_writable(path, flag: str) -> None:
    """Refuses, before any work, a directory that cannot be made or written: its nearest existing ancestor is
    probed with a temporary file that disappears at once, so the check itself leaves nothing behind."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"{flag} {path}: {probe} is a file, so no directory can be made there; pass another {flag}")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise RunError(f"{flag} {path}: cannot write in {probe} ({e.strerror}); pass a directory you can write to") from None


def check_flags(args) -> None:
    """Values that pass argparse's type check but would fail mid-run (a division by zero, an optimizer error)
    or silently do something other than asked."""
    checks = [(f, getattr(args, f) >= 1, ">= 1") for f in ("seq_len", "batch_size", "grad_accum", "lora_rank",
                                                           "log_every", "save_every", "max_new_tokens", "top_k",
                                                           "pretrain_steps")]
    checks += [(f, getattr(args, f) >= 0, ">= 0") for f in ("steps", "warmup", "eval_every", "eval_windows", "eval_per_document",
                                                            "weight_decay", "temperature")]
    checks += [("stop_after", args.stop_after is None or args.stop_after >= 1, ">= 1"), ("lr", args.lr > 0, "> 0"),
               ("lora_lr", args.lora_lr is None or args.lora_lr > 0, "> 0"),
               ("alpha", args.alpha > 0, "> 0"), ("lora_alpha", args.lora_alpha > 0, "> 0"), ("clip", args.clip > 0, "> 0"),
               ("min_lr_ratio", 0 <= args.min_lr_ratio <= 1, "in 0..1"),
               ("dev_fraction", 0 < args.dev_fraction < 1, "strictly between 0 and 1"),
               ("test_fraction", 0 < args.test_fraction < 1 - args.dev_fraction,
                "above 0 and below 1 - --dev-fraction (the rest is for training)")]
    for name, ok, rule in checks:
        if not ok:
            raise RunError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid; pass a value {rule}")
    if args.warmup > args.steps > 0:  # (--steps 0 trains nothing: it prints the reference rows)
        raise RunError(f"--warmup {args.warmup} is longer than the run (--steps {args.steps}), so the learning rate "
                       f"would never reach its peak; pass a --warmup of at most {args.steps}")
    if args.eval_pool and not args.eval_only:
        raise RunError("--eval-pool scores a finished run: use it with --eval-only --out RUN")
    check_data_path(args.data)  # here too, so that it is told before an existing --out


def run_record(args) -> dict:
    """config.json: every flag, and a fingerprint of the base checkpoint, so that a resume or a later
    --eval-only against a directory that now holds another model is refused."""
    return {k: v for k, v in vars(args).items() if k != "eval_depths"} | {"model_fingerprint": fingerprint(args.model)}


def start_run(out: Path, args) -> None:
    """A new run: the directory's previous run files removed, then config.json, written whole."""
    out.mkdir(parents=True, exist_ok=True)
    for f in [CHECKPOINT, "metrics.jsonl", "stats.json", *out.glob("results*.json"), *out.glob("documents*.json")]:
        (out / f).unlink(missing_ok=True)
    atomic_write(out / "config.json", lambda f: f.write_text(json.dumps(run_record(args), indent=2)))


def read_run_config(out: Path) -> dict:
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise RunError(f"{out / 'config.json'}: unreadable ({e}); restore it or start again with --overwrite") from None
    if not isinstance(saved, dict):
        raise RunError(f"{out / 'config.json'}: not a run configuration; restore it or start again with --overwrite")
    if "max_steps" in saved:  # runs from before --max-steps was renamed --max-depth
        saved["max_depth"] = saved.pop("max_steps")
    return saved


def check_same_model(out: Path, saved: dict, model_dir) -> None:
    if "model_fingerprint" not in saved:
        raise RunError(f"{out} was made by an older train.py (its config.json has no model fingerprint, and its "
                       "split differs); train it again")
    if saved["model_fingerprint"] != fingerprint(model_dir):
        raise RunError(f"the checkpoint in {model_dir} is not the one {out} was trained on (its config.json or "
                       "weights changed); point --model at the original checkpoint, or start again with --overwrite")


def check_resume(out: Path, args, params: dict) -> tuple[dict, dict]:
    """Checks that --resume continues the same run; returns its checkpoint, read (once) and checked now, so a
    damaged one stops the run before anything is written."""
    saved, now = read_run_config(out), run_record(args)
    check_same_model(out, saved, args.model)
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


def log_line(out: Path | None, record: dict, rank: int = 0) -> None:
    if rank == 0 and out is not None:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def logged_step(line: str) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:  # the last line, cut short by a kill
        return math.inf


def rewrite_log(out: Path, step: int) -> None:
    """On resume: drop the log lines written after the checkpoint (the resumed run writes them again,
    identically). The file is replaced atomically, so a kill during the rewrite loses no line."""
    file = out / "metrics.jsonl"
    lines = file.read_text().splitlines() if file.exists() else []
    keep = [line for line in lines if logged_step(line) <= step]
    atomic_write(file, lambda f: f.write_text("".join(line + "\n" for line in keep)))


def comparison_table(rows: list[dict]) -> str:
    """rows: name, kept (base parameters), trainable, loss and what was scored. The first two are the full
    model and the cut baseline, or (--no-reference-rows) no row has a gap recovered; gap recovered =
    (cut - loss) / (cut - full)."""
    s, gaps = rows[0], "gap_recovered" in rows[0]
    lines = [f"{s['split']} split: {s['windows']:,} of its {s['split_windows']:,} windows of {s['tokens'] // s['windows']} "
             f"tokens, spread over all of it: {s['tokens']:,} tokens scored, from {s['documents']:,} of its "
             f"{s['split_documents']:,} documents",
             f"{'model':<34} {'params kept':>12} {'trainable':>11} {s['split'] + ' loss':>10} {'ppl':>9}"
             + (f" {'gap recovered':>14}" if gaps else "")]
    for r in rows:
        lines.append(f"{r['name']:<34} {r['kept']:>12,} {r['trainable']:>11,} {r['loss']:>10.4f} "
                     f"{math.exp(min(r['loss'], 50)):>9.2f}" + (f" {100 * r['gap_recovered']:>13.1f}%" if gaps else ""))
    if not gaps:
        return "\n".join(lines + ["(the full model and the cut baseline are scored apart: --no-reference-rows)"])
    cut = rows[1]["loss"]
    lines.append("gap recovered = (cut - loss) / (cut - full): the share of the loss the cut costs that a model wins "
                 "back (100%: the full model, 0%: the cut baseline).")
    for r in rows:
        if r.get("control"):
            lines.append(f"'{r['name']}' is the control: the same gate and per-step norms, no LoRA modulation.")
    if any(r["loss"] > cut for r in rows[2:]):
        lines.append("A negative share is a loss above the cut baseline: at initialisation the looped arms start "
                     "above it (each step keeps 88% of a state the step norm has rescaled), so a short run can end there.")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict], scored: dict, name: str = "results.json") -> None:
    """The comparison table: printed, and written to results.json with what was scored (`scored`: the split's
    windows and documents, and how many of them and how many tokens every row was scored on)."""
    scored = {"split": "test"} | scored
    references = rows[0]["name"].startswith("full model")  # else --no-reference-rows: the arm's rows alone
    for r in rows:
        r.update(scored)
        if references:
            full, cut = rows[0]["loss"], rows[1]["loss"]
            r["gap_recovered"] = (cut - r["loss"]) / (cut - full) if cut != full else float("nan")
    print(f"\nnext-token loss on the {scored['split']} split" + (f", {out}:" if out else ":") + f"\n{comparison_table(rows)}")
    if out is None:
        return
    # Each row's loss per test document (null: not scored), for statistics paired by document, in a file of its own.
    documents = {r["name"]: r.pop("per_document") for r in rows if "per_document" in r}
    if documents:
        atomic_write(out / name.replace("results", "documents"), lambda f: f.write_text(json.dumps(documents)))
    atomic_write(out / name, lambda f: f.write_text(json.dumps(rows, indent=2)))


def compare(runs: list[Path], out: Path | None = None) -> list[dict]:
    """One table of several finished runs: the full and cut rows once, then every run's own rows. The runs must
    have scored the same test windows (the same data, split, tokenizer and --eval-windows)."""
    tables = []
    for run in runs:
        try:
            tables.append(json.loads((Path(run) / "results.json").read_text()))
        except (OSError, ValueError) as e:
            raise RunError(f"{run}: no readable results.json ({e}); finish the run (or --eval-only) first") from None
    scored = ("windows", "tokens", "documents", "split_windows", "split_documents")
    for run, table in zip(runs[1:], tables[1:]):
        if table[:2] != tables[0][:2] or any(table[0].get(k) != tables[0][0].get(k) for k in scored):
            raise RunError(f"{run} and {runs[0]} were not scored on the same test windows (or with the same base); "
                           "compare runs of one checkpoint, one data set and one --eval-windows")
    rows = tables[0][:2] + [r for table in tables for r in table[2:]]
    if out is None:
        print(comparison_table(rows))
        return rows
    if (out / "config.json").is_file():
        raise RunError(f"--out {out} holds a run, whose results.json this would replace; pass another directory")
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, rows, {k: rows[0][k] for k in scored})
    return rows


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file holding the trainable parameters, the optimizer state (by parameter name)
# and the RNG states, with the step and data position as JSON metadata; written atomically.

def optimizer_order(params: dict, optimizer) -> list[str]:
    name_of = {id(p): n for n, p in params.items()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def save_checkpoint(out: Path, params: dict, optimizer, state: dict) -> None:
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    names, scalars = optimizer_order(params, optimizer), []  # the optimizer numbers its tensors by position
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():
            key = f"opt.{k}.{names[i]}"
            tensors[key] = v.detach().cpu().contiguous().reshape(-1) if v.dim() == 0 else v.detach().cpu().contiguous()
            scalars += [key] if v.dim() == 0 else []
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {"state": json.dumps(dict(state, scalar_keys=scalars))}
    try:
        atomic_write(out / CHECKPOINT, lambda f: save_file(tensors, str(f), metadata=meta))
    except (OSError, SafetensorError) as e:  # a full disk, say (safetensors reports I/O errors as SafetensorError)
        raise RunError(f"{out / CHECKPOINT}: writing the checkpoint of step {state['step']} failed ({e}); the "
                       "last complete checkpoint is kept; fix the cause (a full disk?), then --resume") from None


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
    not_this_run = "the checkpoint is not this run's; restore it or start again with --overwrite"
    for n, p in params.items():
        if f"param.{n}" not in tensors or tensors[f"param.{n}"].shape != p.shape:
            raise RunError(f"{out / CHECKPOINT}: no parameter {n} of shape {list(p.shape)}; {not_this_run}")
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
                                   f"train; {not_this_run}")
                state.setdefault(index[name], {})[k] = v.reshape(()) if key in meta["scalar_keys"] else v
        if state and len(state) != len(index):
            raise RunError(f"{out / CHECKPOINT}: the optimizer state covers {len(state)} of the {len(index)} "
                           f"trained tensors; {not_this_run}")
        # The groups (and so which tensors are decayed) are this run's; only the per-tensor state is loaded.
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    meta = dict(meta)
    meta.pop("scalar_keys")
    return meta


def clip_gradients(params: dict, clip: float, world: int) -> float:
    """Averages the gradients over the processes, clips their norm; returns the norm before clipping."""
    for p in params.values():
        all_mean(p.grad, world)
    return torch.nn.utils.clip_grad_norm_(list(params.values()), clip).item()


def skip_update(optimizer, state: dict, loss: float, grad_norm: float, out: Path, rank: int) -> None:
    """A non-finite loss, or a finite one with non-finite gradients (an overflow in backward), skips the update;
    every process skips it alike, since loss and gradients are averaged first. Three in a row stop the run."""
    optimizer.zero_grad(set_to_none=True)
    step, state["bad_steps"] = state["step"], state["bad_steps"] + 1
    if rank == 0:
        print(f"step {step}: loss {loss}, gradient norm {grad_norm}: update skipped ({state['bad_steps']} in a row)",
              file=sys.stderr)
    log_line(out, {"step": step + 1, "skipped": True, "loss": str(loss), "grad_norm": str(grad_norm)}, rank)
    if state["bad_steps"] >= 3:
        raise RunError(f"the loss or gradients were not finite for 3 steps in a row (the last at step {step}); the "
                       f"last good checkpoint is kept in {out}; start again with a lower --lr (and --overwrite)")
    state["step"] += 1


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def flag_names(message: str) -> str:
    """ConfigError speaks of OuroborosConfig's fields; on the command line they are flags (rank -> --rank)."""
    fields = r"\b(n_prelude|recurrent_layer|n_coda|max_depth|rank|alpha|pool|lora_rank|lora_layers|controller_input)\b"
    return re.sub(fields, lambda m: "--" + m.group(1).replace("_", "-"), message).replace("--pool='mean'", "--pool mean")


def resume(checkpoint: tuple[dict, dict], out: Path, params: dict, optimizer, rank: int) -> dict:
    """The training state of a checkpoint, put back into the parameters and the optimizer; the log lines
    written after it are dropped (the resumed run writes them again, identically)."""
    state = restore(checkpoint, out, params, optimizer)
    if rank == 0:
        rewrite_log(out, state["step"])
        print(f"resuming at step {state['step']}")
    return state


def print_counter(what: str, done: int, total: int, unit: str) -> None:
    # one line, rewritten in place on stderr, ended when done reaches total
    print(f"\r{what}: {done}/{total} {unit}", end="\n" if done == total else "", file=sys.stderr, flush=True)


def print_progress(record: dict, steps: int, done: int, tokens: int, t0: float) -> None:
    """A progress line: the step's loss, lr and depth, the speed over the `done` steps (and `tokens`) of this
    invocation, and the time to the end at that speed."""
    elapsed = time.time() - t0
    eta = elapsed / max(done, 1) * (steps - record["step"])
    print(f"step {record['step']}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
          + (f"depth {record['depth']} | " if "depth" in record else "")
          + f"{tokens / max(elapsed, 1e-9):,.0f} tok/s | elapsed {fmt_time(elapsed)} | eta {fmt_time(eta)}", flush=True)


class Saver:
    """save(state) at the same steps on every process: the parameters are checked to be identical everywhere
    before they are written; only rank 0 writes; a failed write stops every process; a step already on disk
    is not written again."""

    def __init__(self, out: Path, params: dict, optimizer, world: int, rank: int, saved_step: int | None):
        self.out, self.params, self.optimizer, self.world, self.rank = out, params, optimizer, world, rank
        self.saved_step = saved_step

    def __call__(self, state: dict, interrupted: bool = False) -> None:
        if self.saved_step != state["step"]:
            check_identical(self.world, self.params)
            error = None
            if self.rank == 0:
                try:
                    save_checkpoint(self.out, self.params, self.optimizer, state)
                except RunError as e:
                    error = e
            raise_everywhere(self.world, error)
            self.saved_step = state["step"]
        if interrupted and self.rank == 0:
            print(f"\ninterrupted: checkpoint at step {state['step']} saved in {self.out}; continue with --resume",
                  file=sys.stderr)


# ----------------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM.

class StopSignals:
    """Ctrl-C and SIGTERM stop the run at once, except while held: from the end of a step's backward to the end
    of its bookkeeping they wait for the next step (landing between the update and the step count, the log line
    or the checkpoint, they would save parameters a step ahead of the counter, or drop a log line). Under
    torchrun they are always held until the end of the step, where the processes agree to stop together: one
    stopping alone would leave the others waiting for it in a collective."""

    def __init__(self, world: int, device: torch.device):
        self.world, self.device, self.held, self.pending = world, device, False, False

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def on_signal(self, signum, frame):
        if not self.held:
            raise Interrupted()
        self.pending = True

    def hold(self, on: bool) -> None:
        self.held = on

    def check(self) -> None:
        """Raises Interrupted if a signal is pending on any process."""
        if self.world > 1:
            flag = torch.tensor([float(self.pending)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.pending = flag.item() > 0
        if self.pending:
            raise Interrupted()


# ----------------------------------------------------------------------------------------------------------
# The device, and data-parallel processes (one per GPU under torchrun; gradients averaged).

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


# torch's FLOP counter knows the GPU attention kernels; count the CPU one the same way (unmasked, as torch does).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def count_flops(fn) -> int:
    """Matmul and attention FLOPs that one call of fn executes, forward and backward."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def all_sum(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
    return x


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


def raise_everywhere(world: int, error: Exception | None) -> None:
    """Called by every process at the same point: an error that any process met is raised on all of them as a
    RunError, since one process stopping alone would leave the others waiting for it in their next collective."""
    if world == 1:
        if error is not None:
            raise error
        return
    gathered = [None] * world
    dist.all_gather_object(gathered, None if error is None else str(error))
    errors = [e for e in gathered if e is not None]
    if errors:
        raise RunError(errors[0])


def check_identical(world: int, tensors: dict, what: str = "trainable parameters", extra: str = "") -> None:
    """Called by every process at the same point: the tensors (and `extra`, a string such as a checkpoint's
    fingerprint) must be bit-identical on every process, compared by one hash each."""
    if world == 1:
        return
    h = hashlib.sha256(extra.encode())
    for t in tensors.values():
        h.update(t.detach().cpu().flatten().view(torch.uint8).numpy())
    gathered = [None] * world
    dist.all_gather_object(gathered, h.hexdigest())
    if len(set(gathered)) > 1:
        raise RunError(f"the {what} differ between the processes, which should never happen in data-parallel "
                       "training; check that every process reads the same checkpoint and flags")


def all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x
