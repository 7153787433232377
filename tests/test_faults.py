"""Faults lose nothing: a process killed with SIGKILL at any moment (mid-checkpoint, mid-log-line, mid-resume)
resumes to exactly the uninterrupted result; a failed checkpoint write keeps the previous checkpoint and says so
in one line; a stale temporary checkpoint does not break a resume; non-finite losses or gradients skip their
update, and three in a row stop the run with the last good checkpoint kept."""
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

from test_errors import error_line
from test_train import (FLAGS, ROOT, checkpoint_state, flags, metrics, trainables,  # noqa: F401
                        with_flag, world)

import runs
import train

SHORT = with_flag(with_flag(FLAGS, "--steps", "6"), "--save-every", "2")
# Long enough that random kills land in training; --save-every 3 leaves log lines after the last checkpoint,
# which a resume must drop and write again; --eval-every puts held-out losses in the log too.
LONG = with_flag(with_flag(with_flag(FLAGS, "--steps", "40"), "--save-every", "3"), "--log-every", "10") \
    + ["--eval-every", "7"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# How long a subprocess may take before the test calls it hung. No test waits for a duration: every wait ends on
# an event (a file, a line, the process's exit), so this only bounds a real hang, and is set for a machine many
# times slower than usual (a run here takes seconds; CI allows 90 minutes for the whole suite).
HANG = 1200


def same_run(out, ref):
    """Bit-identical trainable parameters, the same metrics.jsonl and the same comparison table."""
    a, b = trainables(out), trainables(ref)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics(out) == metrics(ref)
    assert json.loads((out / "results.json").read_text()) == json.loads((ref / "results.json").read_text())


@pytest.fixture(scope="module")
def short_ref(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("short_ref") / "run"
    assert train.main(flags(world, out, base=SHORT)) == 0
    return out


@pytest.fixture(scope="module")
def long_ref(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("long_ref") / "run"
    assert train.main(flags(world, out, base=LONG)) == 0
    return out


def restart_flags(out: Path) -> list[str]:
    """How to continue after a kill: --resume from a checkpoint; with none yet, start again over the leftovers."""
    if (out / train.CHECKPOINT).is_file():
        return ["--resume"]
    return ["--overwrite"] if out.exists() else []


# ----------------------------------------------------------------------------------------------------------
# SIGKILL.

def test_sigkill_at_random_moments_resumes_to_the_same_result(world, long_ref, tmp_path):
    """Five real processes, each killed with SIGKILL: at a seeded random moment of the start-up, as soon as a
    temporary checkpoint file appears (mid-write), then at seeded random moments of training. Each one
    continues the last; the finished run equals the uninterrupted one."""
    out = tmp_path / "run"
    rng = random.Random(0)
    kills = []  # (return code, checkpoint step, temporary files) after each kill
    for cycle in range(5):
        argv = flags(world, out, *restart_flags(out), base=LONG)
        lines_before = len(metrics_lines(out))
        with open(tmp_path / f"stderr-{cycle}", "w") as err:
            proc = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=err)
            try:
                # Each wait ends on an event, or on the process's own exit (then it finished before the kill
                # came); only a hang reaches HANG. Where a kill lands does not change what is asserted.
                if cycle == 0:  # somewhere in the start-up: loading, tokenising, writing config.json ...
                    time.sleep(rng.uniform(0.2, 2.5))  # (a slower machine only moves this earlier in the start-up)
                elif cycle == 1:  # mid-checkpoint: the moment a temporary checkpoint file appears (safetensors
                    # writes a hidden .tmpXXXXXX, renamed to checkpoint.safetensors.tmp, renamed over the target)
                    until(proc, lambda: out.exists() and any(
                        n.startswith(".tmp") or n == train.CHECKPOINT + ".tmp" for n in os.listdir(out)), 0.0002)
                else:  # in training: once a step more is logged, after a random delay
                    until(proc, lambda: len(metrics_lines(out)) > lines_before, 0.01)
                    time.sleep(rng.uniform(0.0, 0.25))
                proc.send_signal(signal.SIGKILL)
                proc.wait(HANG)
            finally:
                if proc.poll() is None:
                    proc.kill()
        # killed, or finished before the kill came; never failed
        assert proc.returncode in (-signal.SIGKILL, 0), (tmp_path / f"stderr-{cycle}").read_text()
        step = checkpoint_state(out)["step"] if (out / train.CHECKPOINT).is_file() else None
        kills.append((proc.returncode, step, sorted(n for n in os.listdir(out) if ".tmp" in n) if out.exists() else None))
    assert train.main(flags(world, out, *restart_flags(out), base=LONG)) == 0
    same_run(out, long_ref)
    print("after each kill (return code, checkpoint step, temporary files):", kills)


def until(proc, cond, poll):
    """Returns once cond() holds or proc has exited; a process still going after HANG seconds is hung."""
    end = time.monotonic() + HANG
    while proc.poll() is None and not cond():
        if time.monotonic() > end:
            proc.kill()
            pytest.fail(f"train.py hung: neither done nor at the moment to kill it after {HANG}s")
        time.sleep(poll)


def metrics_lines(out):
    file = out / "metrics.jsonl"
    return file.read_text().splitlines() if file.is_file() else []


# Run train.main in a process that SIGKILLs itself at one exact point.
KILLER = r'''
import os, signal, sys
sys.path.insert(0, {root!r})
import guard
import runs
import train

mode, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
calls = [0]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def nth():
    calls[0] += 1
    return calls[0] == n


if mode == "mid-save":  # the checkpoint's temporary file half written
    real_save = runs.save_file

    def save_file(tensors, path, metadata=None):
        if nth():
            real_save(tensors, path + ".whole", metadata=metadata)
            data = open(path + ".whole", "rb").read()
            os.remove(path + ".whole")
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
            die()
        real_save(tensors, path, metadata=metadata)
    runs.save_file = save_file
elif mode.startswith("before-rename"):  # a complete temporary file, not yet renamed over the target
    target = mode.split(":")[1]
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(target) and nth():
            die()
        real_replace(src, dst)
    os.replace = replace
elif mode == "mid-log-line":  # a metrics line cut short
    real_log = guard.log_line

    def log_line(out, record, rank=0):
        if nth():
            import json
            line = json.dumps(record) + "\n"
            with open(out / "metrics.jsonl", "a") as f:
                f.write(line[:len(line) // 2])
            die()
        real_log(out, record, rank)
    guard.log_line = log_line  # TrainingRun.end_step's
sys.exit(train.main(argv))
'''


def run_killed(tmp_path, mode, n, argv):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT)))
    proc = subprocess.run([sys.executable, str(script), mode, str(n), *argv], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("mode, n, leftover", [
    ("mid-save", 3, "tmp"),  # during the third checkpoint (step 9)
    ("before-rename:" + train.CHECKPOINT, 2, "tmp"),  # the second checkpoint written, not renamed
    ("mid-log-line", 5, "partial line"),  # the 5th log line, after the checkpoint of step 3
])
def test_sigkill_at_an_exact_moment(world, long_ref, tmp_path, mode, n, leftover):
    out = tmp_path / "run"
    run_killed(tmp_path, mode, n, flags(world, out, base=LONG))
    if leftover == "tmp":
        assert (out / (train.CHECKPOINT + ".tmp")).is_file()  # the stale temporary file is there...
    else:
        assert not (out / "metrics.jsonl").read_text().endswith("\n")  # ...or the cut line
    step = checkpoint_state(out)["step"]
    assert step == {"mid-save": 6, "mid-log-line": 3}.get(mode, 3)  # the last complete checkpoint
    assert train.main(flags(world, out, "--resume", base=LONG)) == 0
    same_run(out, long_ref)
    assert not (out / (train.CHECKPOINT + ".tmp")).exists()


def test_sigkill_while_a_resume_rewrites_the_log(world, long_ref, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(world, out, "--stop-after", "5", base=LONG)) == 0  # checkpoint at 5, log to 5
    assert checkpoint_state(out)["step"] == 5
    with open(out / "metrics.jsonl", "a") as f:  # lines a kill left after the checkpoint
        f.write('{"step": 6, "loss": 0.0}\n{"step": 7, "lo')
    before = metrics_lines(out)
    run_killed(tmp_path, "before-rename:metrics.jsonl", 1, flags(world, out, "--resume", base=LONG))
    assert metrics_lines(out) == before  # the rewrite went to a temporary file: nothing lost
    assert train.main(flags(world, out, "--resume", base=LONG)) == 0
    same_run(out, long_ref)


# ----------------------------------------------------------------------------------------------------------
# A checkpoint write that fails (a full disk), in process.

@pytest.mark.parametrize("how", ["save_file-OSError", "save_file-SafetensorError", "os.replace"])
def test_failed_checkpoint_write_keeps_the_previous_one(world, short_ref, tmp_path, monkeypatch, capsys, how):
    out = tmp_path / "run"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    seen = {"saves": 0}

    def second_fails():
        seen["saves"] += 1
        if seen["saves"] == 2:  # the checkpoint of step 4; the one of step 2 is on disk
            seen["before"] = (out / train.CHECKPOINT).read_bytes()
            return True
        return False

    if how.startswith("save_file"):
        real = runs.save_file

        def save_file(tensors, path, metadata=None):
            if second_fails():
                with open(path, "wb") as f:  # a partial file, then the error
                    f.write(b"partial")
                raise full if how.endswith("OSError") else SafetensorError(f"Error while serializing: {full}")
            real(tensors, path, metadata=metadata)
        monkeypatch.setattr(runs, "save_file", save_file)
    else:
        real_replace = os.replace

        def replace(src, dst):
            if str(dst).endswith(train.CHECKPOINT) and second_fails():
                raise full
            real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)

    capsys.readouterr()
    assert train.main(flags(world, out, base=SHORT)) == 2
    line = error_line(capsys.readouterr().err)
    assert train.CHECKPOINT in line and "step 4 failed" in line and "No space left on device" in line
    assert "last complete checkpoint is kept" in line and "--resume" in line
    assert (out / train.CHECKPOINT).read_bytes() == seen["before"]  # the previous checkpoint, untouched
    assert checkpoint_state(out)["step"] == 2
    assert not (out / (train.CHECKPOINT + ".tmp")).exists()
    monkeypatch.undo()
    assert train.main(flags(world, out, "--resume", base=SHORT)) == 0
    same_run(out, short_ref)


def test_stale_temporary_checkpoint_does_not_break_a_resume(world, short_ref, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(world, out, "--stop-after", "2", base=SHORT)) == 0
    (out / (train.CHECKPOINT + ".tmp")).write_bytes(b"\x00garbage from a killed write")
    (out / ".tmpAbC123").write_bytes(b"safetensors' own temporary file")
    assert train.main(flags(world, out, "--resume", base=SHORT)) == 0
    same_run(out, short_ref)
    assert not (out / (train.CHECKPOINT + ".tmp")).exists()


# ----------------------------------------------------------------------------------------------------------
# Non-finite losses and gradients.

def poison(monkeypatch, bad_steps: set[int], what: str, grad_accum: int = 2) -> dict:
    """Makes the loss (what="loss") or only the gradients (what="grad") of the given 0-based optimizer steps
    non-finite. Returns a record with the trainable parameters as they were at the start of every step."""
    seen = {"calls": 0, "at_step": {}}
    real_loss, real_train = train.loss_from_states, train.train

    def spy_train(forward, head, model, *args, **kwargs):
        seen["params"] = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return real_train(forward, head, model, *args, **kwargs)

    def loss(states, targets, head, reduction="mean"):
        if reduction != "mean":  # an evaluation's per-token losses, not a training step's
            return real_loss(states, targets, head, reduction)
        step, micro = divmod(seen["calls"], grad_accum)
        seen["calls"] += 1
        out = real_loss(states, targets, head)
        if "params" in seen and micro == 0 and step not in seen["at_step"]:
            seen["at_step"][step] = {k: p.detach().clone() for k, p in seen["params"].items()}
        if step in bad_steps and states.requires_grad:
            if what == "loss":
                return out * math.nan
            out = out.clone()
            out.register_hook(lambda g: g * math.inf)  # the loss stays finite; its gradients do not
        return out

    monkeypatch.setattr(train, "train", spy_train)
    monkeypatch.setattr(train, "loss_from_states", loss)
    return seen


def same_params(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("what", ["loss", "grad"])
def test_non_finite_steps_are_skipped_and_logged(world, tmp_path, monkeypatch, capsys, what):
    out = tmp_path / "run"
    seen = poison(monkeypatch, {1, 2}, what)
    capsys.readouterr()
    assert train.main(flags(world, out, base=SHORT)) == 0
    err = capsys.readouterr().err
    assert err.count("update skipped") == 2 and "(2 in a row)" in err
    log = metrics(out)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r.get("skipped", False) for r in log] == [False, True, True, False, False, False]
    if what == "grad":
        assert math.isfinite(float(log[1]["loss"])) and not math.isfinite(float(log[1]["grad_norm"]))
    snap = seen["at_step"]
    assert not same_params(snap[0], snap[1])  # step 0 updated
    assert same_params(snap[1], snap[2]) and same_params(snap[2], snap[3])  # steps 1 and 2 changed nothing
    assert not same_params(snap[3], snap[4])  # step 3 updated again
    assert all(torch.isfinite(v).all() for v in trainables(out).values())
    with safe_open(str(out / train.CHECKPOINT), framework="pt") as f:
        assert f.get_tensor("opt.step.gate.weight").item() == 4  # AdamW took 4 steps of 6
    assert checkpoint_state(out)["bad_steps"] == 0


def test_three_non_finite_steps_in_a_row_stop_the_run(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    base = with_flag(SHORT, "--steps", "8")
    seen = poison(monkeypatch, {3, 4, 5}, "loss")
    capsys.readouterr()
    assert train.main(flags(world, out, base=base)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("update skipped") == 3
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "3 steps in a row" in last and "last good checkpoint" in last
    assert [r.get("skipped", False) for r in metrics(out)] == [False] * 3 + [True] * 3
    # The checkpoint of step 2 is kept; the parameters in memory are those after step 3: the skips changed nothing.
    assert checkpoint_state(out)["step"] == 2
    ckpt, snap = trainables(out), seen["at_step"]
    assert all(torch.equal(ckpt[f"param.{k}"], v) for k, v in snap[2].items())
    assert same_params(seen["params"], snap[3])
    # The kept checkpoint resumes (here without the fault) to the result of a run that never had one.
    monkeypatch.undo()
    assert train.main(flags(world, out, "--resume", base=base)) == 0
    clean = tmp_path / "clean"
    assert train.main(flags(world, clean, base=base)) == 0
    same_run(out, clean)
