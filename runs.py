"""A run on disk: its directory checked before anything is written, its record (config.json), its log
(metrics.jsonl), its checkpoints written atomically, and the checks that let --resume, --sample and --eval-only
continue exactly the run that is there. What happens around each step (Ctrl-C, saving, skipped updates,
agreement between processes) is guard.py's.

A run directory holds config.json (every flag, resolved), metrics.jsonl (a line per optimizer step),
checkpoint.safetensors (trainables, optimizer and RNG state, step) and results.json (the comparison table).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from load_qwen import atomic_write, fingerprint

CHECKPOINT = "checkpoint.safetensors"
# Flags that may differ on --resume: they change nothing that is trained, at most the rounding (device,
# precision); "out": a run directory may be moved; "token_cache": the cache is keyed by content.
RESUME_FREE = {"resume", "overwrite", "out", "log_every", "save_every", "eval_every", "device", "precision",
               "stop_after", "sample", "eval_only", "max_new_tokens", "temperature", "top_k", "token_cache",
               "score_depths", "eval_pool", "compare", "compile", "allow_slow_bf16"}


class RunError(Exception):
    """A user error found while preparing or running: bad flags, a bad out directory, a bad resume."""


# ----------------------------------------------------------------------------------------------------------
# The run directory.


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


def finished_run(out: Path) -> dict:
    """The config.json of a finished run (--sample, --eval-only), checked against the checkpoint it names."""
    saved = read_run_config(out)
    check_same_model(out, saved, saved.get("model"))
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


def resume(checkpoint: tuple[dict, dict], out: Path, params: dict, optimizer, rank: int) -> dict:
    """The training state of a checkpoint, put back into the parameters and the optimizer; the log lines
    written after it are dropped (the resumed run writes them again, identically)."""
    state = restore(checkpoint, out, params, optimizer)
    if rank == 0:
        rewrite_log(out, state["step"])
        print(f"resuming at step {state['step']}")
    return state
