"""What guards train.py's loop, so that the loop shows only the arithmetic: TrainingRun holds Ctrl-C and SIGTERM
during a step's bookkeeping, saves a checkpoint at the right steps and on interruption, skips a non-finite
update, keeps data-parallel processes in agreement, and prints the progress line. The files it writes are
runs.py's.
"""
from __future__ import annotations

import hashlib
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from runs import RunError, log_line, resume, save_checkpoint


class Interrupted(Exception):  # Ctrl-C or SIGTERM (StopSignals); TrainingRun saves, then raises KeyboardInterrupt
    pass


# ----------------------------------------------------------------------------------------------------------
# The loop's guard.

class TrainingRun:
    """with TrainingRun(...) as run: for step in run.steps(): ... run.end_step(record)

    What it does for the loop: resumes the state of a checkpoint; yields the steps still to train, stopping at
    --stop-after; holds Ctrl-C and SIGTERM from the end of a step's backward to the end of its bookkeeping
    (hold); counts the step, prints the progress line, appends metrics.jsonl and checkpoints every --save-every
    (end_step); skips a non-finite update (skip); on Ctrl-C saves a checkpoint and raises KeyboardInterrupt; at
    the end saves the last checkpoint. The state (step, samples, seconds) is what the checkpoint records."""

    def __init__(self, out: Path | None, params: dict, optimizer, args, device, resume_from: tuple | None,
                 world: int, rank: int, per_step: int):
        self.out, self.optimizer, self.args, self.world, self.rank, self.per_step = out, optimizer, args, world, rank, per_step
        # A new run's state: step 0, no skipped update yet, and the number of processes a --resume must match.
        self.state = resume(resume_from, out, params, optimizer, rank) if resume_from else dict(step=0, bad_steps=0, world=world)
        # Resumed, the checkpoint's step is on disk already; new, no step is, so even step 0 is saved on Ctrl-C.
        self.save = Saver(out, params, optimizer, world, rank, self.state["step"] if resume_from is not None else None)
        # this invocation's start: the progress line's speed counts only its own steps; seconds add up over resumes
        self.start_step, self.seconds, self.t0 = self.state["step"], self.state.get("seconds", 0.0), time.time()
        self.signals = StopSignals(world, device)  # its handlers are installed by __enter__, for the with-block only

    def __enter__(self):
        self.signals.__enter__()
        return self

    def __exit__(self, kind, error, traceback):
        # Stopped by the user: the state reached is saved. Interrupted is raised only outside a step's bookkeeping,
        # before the update of the step under way, so the parameters are still those of state["step"].
        if kind is not None and issubclass(kind, (KeyboardInterrupt, Interrupted)):
            self.signals.hold(True)  # a second Ctrl-C waits for this checkpoint
            try:
                self.save(self.state, interrupted=True)
            finally:  # the previous handlers come back even if the save fails
                self.signals.__exit__(kind, error, traceback)
            # One exception for the caller, whichever signal it was: train.py's main() turns it into exit code 130.
            raise KeyboardInterrupt from None
        # Any other error saves nothing and keeps the last complete checkpoint: the error may have struck mid-step,
        # and under torchrun the other processes may never reach the save's collectives.
        self.signals.__exit__(kind, error, traceback)
        if kind is None:
            self.save(self.state)  # the last step's checkpoint (a step already saved is not written again)
        return False  # the error, if any, goes on to the caller

    def steps(self):
        """The optimizer steps still to train: a signal that arrived since the last step stops the run here."""
        while self.state["step"] < self.args.steps:
            # The previous step's hold() ends here: a single process may be stopped anywhere in the next forward and
            # backward. Under torchrun, signals wait for the end of the step, since the processes must stop together.
            self.signals.hold(self.world > 1)
            # A signal held during the previous step stops the run here, between steps. Under torchrun check() is a
            # collective: every process calls it once per step, at this same point.
            self.signals.check()
            # --stop-after counts this invocation's steps (a time-sliced job); __exit__ then saves the checkpoint.
            if self.args.stop_after is not None and self.state["step"] - self.start_step >= self.args.stop_after:
                return
            yield self.state["step"]  # 0-based: the record the loop makes for it says "step": step + 1
        self.signals.check()  # arrived during the last step's bookkeeping

    def hold(self) -> None:
        """From here to the end of the step's bookkeeping a signal waits: landing between the update and the step
        count, it would save parameters one step ahead of the counter."""
        self.signals.hold(True)

    def skip(self, loss: float, grad_norm: float) -> None:
        skip_update(self.optimizer, self.state, loss, grad_norm, self.out, self.rank)

    def end_step(self, record: dict) -> None:
        """The step record["step"] is done: counted, printed every --log-every, logged, checkpointed."""
        step, args = record["step"], self.args
        # bad_steps=0: only skips in a row stop the run. samples: the windows seen by all processes (stats.json's
        # tokens). seconds: training time over every invocation of this run, the earlier ones' from the checkpoint.
        self.state.update(step=step, bad_steps=0, samples=step * self.per_step, seconds=self.seconds + time.time() - self.t0)
        if self.rank == 0 and (step % args.log_every == 0 or step == args.steps):
            done = step - self.start_step
            print_progress(record, args.steps, done, done * self.per_step * args.seq_len, self.t0)
        if self.rank == 0 and "dev_loss" in record:
            print(f"step {step}: dev loss {record['dev_loss']:.4f}", flush=True)
        log_line(self.out, record, self.rank)  # every process calls it; only rank 0 writes
        # On every process, not only rank 0: the save compares the parameters across processes, a collective.
        if step % args.save_every == 0 or step == args.steps:
            self.save(self.state)


def skip_update(optimizer, state: dict, loss: float, grad_norm: float, out: Path, rank: int) -> None:
    """A non-finite loss, or a finite one with non-finite gradients (an overflow in backward), skips the update;
    every process skips it alike, since loss and gradients are averaged first. Three in a row stop the run."""
    optimizer.zero_grad(set_to_none=True)  # the next backward adds into .grad: the bad gradients must be gone
    step, state["bad_steps"] = state["step"], state["bad_steps"] + 1
    if rank == 0:
        print(f"step {step}: loss {loss}, gradient norm {grad_norm}: update skipped ({state['bad_steps']} in a row)",
              file=sys.stderr)
    # "step": step + 1, as end_step's records. The numbers as strings: json.dumps writes nan as NaN, which is not JSON.
    log_line(out, {"step": step + 1, "skipped": True, "loss": str(loss), "grad_norm": str(grad_norm)}, rank)
    # Raised before the step is counted; __exit__ saves nothing on an error, so the checkpoint on disk stays the last
    # good one.
    if state["bad_steps"] >= 3:
        raise RunError(f"the loss or gradients were not finite for 3 steps in a row (the last at step {step}); the "
                       f"last good checkpoint is kept in {out}; start again with a lower --lr (and --overwrite)")
    # A skipped step still uses up its place: its windows and learning rate are not retried, and the run still ends
    # at --steps, with the same windows at the same steps as a run that skipped nothing.
    state["step"] += 1


class Saver:
    """save(state) at the same steps on every process: the parameters are checked to be identical everywhere
    before they are written; only rank 0 writes; a failed write stops every process; a step already on disk
    is not written again."""

    def __init__(self, out: Path, params: dict, optimizer, world: int, rank: int, saved_step: int | None):
        self.out, self.params, self.optimizer, self.world, self.rank = out, params, optimizer, world, rank
        self.saved_step = saved_step

    def __call__(self, state: dict, interrupted: bool = False) -> None:
        # A step already on disk is not written again: it would be a full write of the same state (the end of a run
        # whose last step was just saved, Ctrl-C right after a checkpoint, a resumed run stopped at once).
        # saved_step is the same on every process, so all of them skip the collectives alike.
        if self.saved_step != state["step"]:
            # One file stands for every process: that is right only if they all hold the same parameters.
            check_identical(self.world, self.params)
            error = None
            if self.rank == 0:  # the parameters were just found identical: one process writes the one file
                try:
                    save_checkpoint(self.out, self.params, self.optimizer, state)
                except RunError as e:  # kept, not raised: the other processes are about to wait for rank 0 below
                    error = e
            raise_everywhere(self.world, error)
            self.saved_step = state["step"]  # only once the write succeeded
        # Told even when the step was saved earlier: the user learns where --resume will start.
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
        # held: a signal waits instead of raising; pending: one arrived while held, and waits for check()
        self.world, self.device, self.held, self.pending = world, device, False, False

    def __enter__(self):
        # the handlers replaced (for SIGINT, normally Python's KeyboardInterrupt), which __exit__ puts back
        self.previous = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def on_signal(self, signum, frame):
        # Python runs a handler in the main thread, between two bytecodes: raising here stops the loop wherever it is.
        if not self.held:
            raise Interrupted()
        self.pending = True  # a second signal while held changes nothing: one stop is pending

    def hold(self, on: bool) -> None:
        self.held = on

    def check(self) -> None:
        """Raises Interrupted if a signal is pending on any process."""
        if self.world > 1:
            # On this process's device: NCCL reduces GPU tensors only (gloo, on the CPU, takes CPU tensors).
            flag = torch.tensor([float(self.pending)], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # MAX: 1 if any process has a signal pending
            self.pending = flag.item() > 0  # now the same on every process, so all of them stop at this same step
        if self.pending:
            raise Interrupted()


# ----------------------------------------------------------------------------------------------------------
# Agreement between data-parallel processes: an error or a difference on one process stops them all.

def raise_everywhere(world: int, error: Exception | None) -> None:
    """Called by every process at the same point: an error that any process met is raised on all of them as a
    RunError, since one process stopping alone would leave the others waiting for it in their next collective."""
    if world == 1:  # no one else to tell: the error itself, with its own type
        if error is not None:
            raise error
        return
    gathered = [None] * world
    # Each process's message, or None; only the message travels, which is what main() prints on an "error:" line.
    dist.all_gather_object(gathered, None if error is None else str(error))
    errors = [e for e in gathered if e is not None]
    if errors:
        raise RunError(errors[0])  # the lowest rank's: every process stops with the same message


def check_identical(world: int, tensors: dict, what: str = "trainable parameters", extra: str = "") -> None:
    """Called by every process at the same point: the tensors (and `extra`, a string such as a checkpoint's
    fingerprint) must be bit-identical on every process, compared by one hash each."""
    if world == 1:
        return
    # A hash, not the tensors: each process sends a 64-character digest, whatever the size of the model.
    h = hashlib.sha256(extra.encode())
    for t in tensors.values():  # the same order everywhere: every process built the same model
        # the raw bytes (a uint8 view): bit-identical, no tolerance; on the CPU, since numpy reads only CPU memory
        h.update(t.detach().cpu().flatten().view(torch.uint8).numpy())
    gathered = [None] * world
    dist.all_gather_object(gathered, h.hexdigest())
    if len(set(gathered)) > 1:
        raise RunError(f"the {what} differ between the processes, which should never happen in data-parallel "
                       "training; check that every process reads the same checkpoint and flags")


# ----------------------------------------------------------------------------------------------------------
# Progress lines.

def fmt_time(seconds: float) -> str:
    seconds = int(seconds)  # h:mm:ss, the hours not wrapped into days
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_progress(record: dict, steps: int, done: int, tokens: int, t0: float) -> None:
    """A progress line: the step's loss, lr and depth, the speed over the `done` steps (and `tokens`) of this
    invocation, and the time to the end at that speed."""
    elapsed = time.time() - t0
    eta = elapsed / max(done, 1) * (steps - record["step"])  # the steps left, at this invocation's mean time per step
    # tokens counts every process's windows, so tok/s is the whole job's speed; flush: shown at once in a log file.
    print(f"step {record['step']}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
          + (f"depth {record['depth']} | " if "depth" in record else "")
          + f"{tokens / max(elapsed, 1e-9):,.0f} tok/s | elapsed {fmt_time(elapsed)} | eta {fmt_time(eta)}", flush=True)
