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

CHECKPOINT = "checkpoint.safetensors"  # one file per run, replaced whole at each save: the latest complete one
# Flags that may differ on --resume, because none changes what is trained; every other flag must equal the one in
# config.json, or --resume is refused (check_resume). By kind:
# - how this invocation starts: resume, overwrite; out, since a run directory may be moved;
# - when it reports, saves and stops: log_every, save_every, stop_after, eval_every (the dev loss is only measured);
# - where the arithmetic runs: device, precision, compile, allow_slow_bf16: at most the rounding changes;
# - what a finished run is used for: sample, eval_only, max_new_tokens, temperature, top_k, score_depths
#   (--eval-depths), eval_pool, compare;
# - token_cache: where the tokens are cached; the cache is keyed by content, so any cache gives the same tokens.
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
    # A run writes config.json and checkpoint.safetensors: in --model they would replace the base's own config.json
    # and sit among its weight files, so neither the checkpoint directory nor any folder below it is accepted.
    model = Path(args.model).resolve() if args.model else None
    if model is not None and (out.resolve() == model or model in out.resolve().parents):
        raise RunError(f"--out {out} is inside the checkpoint directory --model {args.model}; a run must not write "
                       "there, pass another --out")
    exists = out.is_dir() and any(out.iterdir())  # an empty directory holds no run, so it is free to use
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file; pass a directory")
    # config.json is written before the first step, the checkpoint at the first save: together, a run to continue
    has_run = (out / CHECKPOINT).is_file() and (out / "config.json").is_file()
    reads = args.sample is not None or args.eval_only  # those two only read the run
    if reads and not has_run:
        raise RunError(f"{out}: no finished run here (config.json and {CHECKPOINT} are needed)")
    if args.resume and not has_run:
        # e.g. a run killed before its first checkpoint: its leftovers need --overwrite to start again
        again = "with --overwrite instead of --resume" if exists else "without --resume"
        raise RunError(f"{out}: no checkpoint to resume from; start the run again {again}")
    # A new run starts by deleting the previous run's files (start_run): that needs the user's --overwrite.
    if not args.resume and exists and not (args.overwrite or reads):
        raise RunError(f"{out} already holds files; pass --resume to continue that run or --overwrite to replace it")
    return out


def check_writable(path, flag: str) -> None:
    """Refuses, before any work, a directory that cannot be made or written: its nearest existing ancestor is
    probed with a temporary file that disappears at once, so the check itself leaves nothing behind."""
    path = Path(path).absolute()
    # The directory is made later, parents and all, so the nearest ancestor that exists is what must accept a file.
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise RunError(f"{flag} {path}: {probe} is a file, so no directory can be made there; pass another {flag}")
    try:
        with tempfile.TemporaryFile(dir=probe):  # on POSIX it loses its name at once: not even a kill leaves it
            pass
    except OSError as e:  # e.strerror alone ("Permission denied"): str(e) would add the errno and a temporary path
        raise RunError(f"{flag} {path}: cannot write in {probe} ({e.strerror}); pass a directory you can write to") from None


def run_record(args) -> dict:
    """config.json: every flag, and a fingerprint of the base checkpoint, so that a resume or a later
    --eval-only against a directory that now holds another model is refused."""
    # eval_depths is not a flag: ouroboros_config derives it from --eval-depths or --depths, which are recorded.
    return {k: v for k, v in vars(args).items() if k != "eval_depths"} | {"model_fingerprint": fingerprint(args.model)}


def start_run(out: Path, args) -> None:
    """A new run: the directory's previous run files removed, then config.json, written whole."""
    out.mkdir(parents=True, exist_ok=True)
    # A stale checkpoint or log must not be taken for this run's: --resume could continue the old run's parameters
    # under the new flags, and the new log lines would follow the old ones. The old tables go too: a new run stopped
    # early (--stop-after, Ctrl-C) must not look finished.
    old = [CHECKPOINT, "metrics.jsonl", "stats.json", *(f.name for f in out.glob("results*.json")),
           *(f.name for f in out.glob("documents*.json"))]
    for name in old:  # names: glob's paths already start with `out`, relative or not
        (out / name).unlink(missing_ok=True)
    # atomically: a kill here leaves no half-written config.json for a later --resume to misread
    atomic_write(out / "config.json", lambda f: f.write_text(json.dumps(run_record(args), indent=2)))


def read_run_config(out: Path) -> dict:
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise RunError(f"{out / 'config.json'}: unreadable ({e}); restore it or start again with --overwrite") from None
    if not isinstance(saved, dict):  # valid JSON, but not an object (a list, a number): it cannot hold the flags
        raise RunError(f"{out / 'config.json'}: not a run configuration; restore it or start again with --overwrite")
    if "max_steps" in saved:  # runs from before --max-steps was renamed --max-depth
        saved["max_depth"] = saved.pop("max_steps")
    return saved


def finished_run(out: Path) -> dict:
    """The config.json of a finished run (--sample, --eval-only), checked against the checkpoint it names."""
    saved = read_run_config(out)
    # the base named in config.json: --sample and --eval-only rebuild the model from it, not from --model
    check_same_model(out, saved, saved.get("model"))
    return saved


def check_same_model(out: Path, saved: dict, model_dir) -> None:
    # The fingerprint reads only config.json and the safetensors headers, so this is cheap even for a large base.
    if "model_fingerprint" not in saved:
        raise RunError(f"{out} was made by an older train.py (its config.json has no model fingerprint, and its "
                       "split differs); train it again")
    if saved["model_fingerprint"] != fingerprint(model_dir):
        raise RunError(f"the checkpoint in {model_dir} is not the one {out} was trained on (its config.json or "
                       "weights changed); point --model at the original checkpoint, or start again with --overwrite")


def check_resume(out: Path, args, params: dict) -> tuple[dict, dict]:
    """Checks that --resume continues the same run; returns its checkpoint, read (once) and checked now, so a
    damaged one stops the run before anything is written."""
    saved, now = read_run_config(out), run_record(args)  # the flags as recorded, and as this invocation resolved them
    check_same_model(out, saved, args.model)
    # A flag on one side only (added to train.py since the run started) differs unless its value there is None.
    diff = sorted(k for k in set(saved) | set(now) if k not in RESUME_FREE and saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"--{k.replace('_', '-')}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise RunError(f"--resume with a different configuration ({detail}); use the run's original flags")
    # Read once: these same tensors go back in again, with the optimizer, when TrainingRun calls resume().
    checkpoint = read_checkpoint(out)
    # restore() without an optimizer checks every trainable's name and shape, copies the values in, and returns the
    # metadata; "world" is the number of processes that trained the run (absent: taken as one).
    trained_by = restore(checkpoint, out, params).get("world", 1)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun; the process group is not started yet
    if trained_by != world:  # the global batch, so the result, depends on the number of processes
        launch = "python train.py" if trained_by == 1 else f"torchrun --nproc-per-node {trained_by} train.py"
        raise RunError(f"the run was trained by {trained_by} process(es), this is {world}; resume it as it was "
                       f"started: {launch} ... --resume")
    return checkpoint


def log_line(out: Path | None, record: dict, rank: int = 0) -> None:
    if rank == 0 and out is not None:  # every process holds the same record (the loss is averaged over them all)
        # Appended, not rewritten: a kill cuts at most the line being written, which rewrite_log drops on resume.
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
    # The lines up to the checkpoint's step stay; the steps after it are trained again, and would be logged twice.
    keep = [line for line in lines if logged_step(line) <= step]
    atomic_write(file, lambda f: f.write_text("".join(line + "\n" for line in keep)))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: one safetensors file holding the trainable parameters, the optimizer state (by parameter name)
# and the RNG states, with the step and data position as JSON metadata; written atomically.

def optimizer_order(params: dict, optimizer) -> list[str]:
    # The optimizer's state_dict() numbers its tensors 0, 1, ... through its param groups in order: this is that
    # numbering, as parameter names.
    name_of = {id(p): n for n, p in params.items()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def save_checkpoint(out: Path, params: dict, optimizer, state: dict) -> None:
    # Contiguous, since safetensors refuses to write any other tensor; read back, they land on the CPU, and
    # restore() copies each onto its parameter's device (--device may change on --resume).
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    # The optimizer numbers its tensors by position, which depends on how build_optimizer grouped them. Stored by
    # parameter name instead, each state finds its own parameter on restore, and state for a parameter this run
    # does not train (a checkpoint of another model) is refused rather than loaded into the wrong tensor.
    names, scalars = optimizer_order(params, optimizer), []
    for i, s in optimizer.state_dict()["state"].items():
        for k, v in s.items():  # AdamW's: step (a 0-dim tensor), exp_avg and exp_avg_sq (the parameter's shape)
            key = f"opt.{k}.{names[i]}"
            # A 0-dim tensor is stored with shape (1,) and its key listed in scalar_keys: the file alone could not
            # tell it from a true 1-element tensor, and restore() gives the optimizer back the shape () it saved.
            tensors[key] = v.detach().cpu().contiguous().reshape(-1) if v.dim() == 0 else v.detach().cpu().contiguous()
            scalars += [key] if v.dim() == 0 else []
    # The RNG states: what torch's default generators draw after a resume is what the uninterrupted run would draw.
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()  # the current CUDA device's generator
    # safetensors metadata maps strings to strings: the training state goes in as one JSON string.
    meta = {"state": json.dumps(dict(state, scalar_keys=scalars))}
    try:  # temporary file, fsync, rename: a kill or a failure mid-write leaves the previous checkpoint whole
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
            # All of it into memory: the file holds the trainables, their optimizer state and the RNG, never the base.
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    # KeyError: no "state" in the metadata; TypeError: no metadata at all (None); ValueError: bad JSON
    except (SafetensorError, OSError, KeyError, TypeError, ValueError) as e:
        raise RunError(f"{file}: unreadable checkpoint ({e}); restore it or start again with --overwrite") from None
    return meta, tensors


def restore(checkpoint: tuple[dict, dict], out: Path, params: dict, optimizer=None) -> dict:
    """Copies a checkpoint into the parameters (and the optimizer and RNG states); returns its metadata."""
    meta, tensors = checkpoint
    not_this_run = "the checkpoint is not this run's; restore it or start again with --overwrite"
    # Every name and shape is checked before anything is copied, so a wrong checkpoint leaves the parameters alone.
    for n, p in params.items():
        if f"param.{n}" not in tensors or tensors[f"param.{n}"].shape != p.shape:
            raise RunError(f"{out / CHECKPOINT}: no parameter {n} of shape {list(p.shape)}; {not_this_run}")
    with torch.no_grad():  # autograd forbids in-place writes into leaf tensors that require grad
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])  # onto the parameter's own device and dtype
    if optimizer is not None:
        index = {n: i for i, n in enumerate(optimizer_order(params, optimizer))}  # name -> this run's number
        state = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, k, name = key.split(".", 2)  # opt.<state key>.<parameter name>, which may hold dots itself
                if name not in index:
                    raise RunError(f"{out / CHECKPOINT}: optimizer state for {name}, which this run does not "
                                   f"train; {not_this_run}")
                state.setdefault(index[name], {})[k] = v.reshape(()) if key in meta["scalar_keys"] else v
        # No state at all: saved before the first update (AdamW makes its state at its first step), e.g. on Ctrl-C.
        if state and len(state) != len(index):
            raise RunError(f"{out / CHECKPOINT}: the optimizer state covers {len(state)} of the {len(index)} "
                           f"trained tensors; {not_this_run}")
        # The groups (and so which tensors are decayed) are this run's; only the per-tensor state is loaded.
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
        # The RNG states only with the optimizer, that is when training continues; --sample seeds its own generator.
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors and torch.cuda.is_available():  # a GPU run may be resumed on a CPU, and the reverse
            torch.cuda.set_rng_state(tensors["rng.cuda"])
    # A copy: train.py's --resume restores one checkpoint twice (check_resume, then resume()), so the pop below
    # must leave scalar_keys in the checkpoint for the second.
    meta = dict(meta)
    meta.pop("scalar_keys")  # the file's own bookkeeping, not part of the training state returned
    return meta


def resume(checkpoint: tuple[dict, dict], out: Path, params: dict, optimizer, rank: int) -> dict:
    """The training state of a checkpoint, put back into the parameters and the optimizer; the log lines
    written after it are dropped (the resumed run writes them again, identically)."""
    state = restore(checkpoint, out, params, optimizer)
    if rank == 0:  # only rank 0 writes the log, so only it rewrites it
        rewrite_log(out, state["step"])
        print(f"resuming at step {state['step']}")
    return state
