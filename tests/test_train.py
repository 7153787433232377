"""train.py end to end on a tiny random checkpoint: every variant runs and writes its run directory, the loss
goes down, resume (also after Ctrl-C) is exact, the label shift is the next token, depth draws are seeded,
the schedule, the held-out split, --sample / --eval-only, and refusing to overwrite a run."""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from load_qwen import load_model
from tiny import make_checkpoint, tiny_config

import train  # importable because tiny puts the repository root on sys.path

ROOT = Path(__file__).resolve().parent.parent
QCFG = tiny_config(num_hidden_layers=6)
TEXT = "the quick brown fox jumps over the lazy dog. "
# 12 documents; with --val-fraction 0.3 the hash split holds 4 of them out.
DOCS = [f"{TEXT * 3}number {i} " + " ".join(["alpha beta gamma delta"] * (i % 3 + 1)) for i in range(12)]
FLAGS = ["--n-prelude", "1", "--recurrent-layer", "3", "--n-coda", "1", "--rank", "4", "--max-steps", "8",
         "--depth", "2", "--seq-len", "16", "--batch-size", "2", "--grad-accum", "2", "--steps", "3",
         "--eval-windows", "4", "--log-every", "1", "--save-every", "1", "--device", "cpu", "--val-fraction", "0.3",
         "--lr", "3e-3", "--warmup", "1"]
RUN_FILES = ("config.json", train.CHECKPOINT, "metrics.jsonl", "results.json")


def byte_bpe(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       show_progress=False))
    return tok


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A checkpoint with its tokenizer and a corpus directory of one file per document."""
    root = tmp_path_factory.mktemp("train")
    tok = byte_bpe(DOCS, QCFG.vocab_size)
    assert tok.get_vocab_size() <= QCFG.vocab_size
    ckpt = make_checkpoint(root / "ckpt", QCFG, seed=1, tokenizer=tok)
    corpus = root / "corpus"
    corpus.mkdir()
    for i, d in enumerate(DOCS):
        (corpus / f"doc{i:02d}.txt").write_text(d)
    return ckpt, corpus


def flags(world, out, *extra, base=FLAGS):
    ckpt, corpus = world
    return ["--model", str(ckpt), "--data", str(corpus), "--out", str(out), *base, *extra]


def with_flag(base, name, value):
    i = base.index(name)
    return base[:i + 1] + [value] + base[i + 2:]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def trainables(out):
    with safe_open(str(Path(out) / train.CHECKPOINT), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("param.")}


def checkpoint_state(out):
    with safe_open(str(Path(out) / train.CHECKPOINT), framework="pt") as f:
        return json.loads(f.metadata()["state"])


# ----------------------------------------------------------------------------------------------------------
# Every variant through the one loop.

@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The default variant (dynamic Controller, gate, step norms, causal pool) that the others are held against."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(flags(world, out)) == 0
    return out


VARIANTS = [["--controller", "static"], ["--controller", "none"], ["--no-gate"], ["--no-step-norm"],
            ["--pool", "mean"], ["--depths", "1,2"], ["--checkpoint-steps"]]


def check_run(out, world, depths):
    for f in RUN_FILES:
        assert (out / f).is_file(), f
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 3 and config["model"] == str(world[0])
    log = metrics(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert checkpoint_state(out)["step"] == 3

    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 + len(depths)
    assert rows[0]["name"].startswith("full model") and rows[1]["name"].startswith("cut baseline")
    assert rows[0]["trainable"] == rows[1]["trainable"] == 0
    assert rows[0]["kept"] > rows[1]["kept"]
    full, cut = rows[0]["loss"], rows[1]["loss"]
    assert full != cut
    for r, d in zip(rows[2:], depths):
        assert r["name"].endswith(f"depth {d}") and r["trainable"] > 0
        assert math.isfinite(r["loss"])
        assert r["gap_recovered"] == pytest.approx((cut - r["loss"]) / (cut - full), rel=1e-12)
    assert rows[0]["gap_recovered"] == pytest.approx(1.0) and rows[1]["gap_recovered"] == pytest.approx(0.0)
    return log, rows


def test_default_variant_runs(world, reference):
    check_run(reference, world, [2])
    keys = trainables(reference)
    assert {"param.gate.weight", "param.gate.bias", "param.step_norm"} <= keys.keys()
    assert any(k.startswith("param.controller.") for k in keys)
    assert json.loads((reference / "results.json").read_text())[2]["name"] == "Ouroboros, depth 2"


@pytest.mark.parametrize("extra", VARIANTS, ids=lambda e: "".join(e).lstrip("-"))
def test_variant_runs_and_differs_from_the_default(world, reference, tmp_path, extra):
    out = tmp_path / "run"
    assert train.main(flags(world, out, *extra)) == 0
    log, rows = check_run(out, world, [1, 2] if "--depths" in extra else [2])
    ref_log, ref_rows = metrics(reference), json.loads((reference / "results.json").read_text())
    assert rows[:2] == ref_rows[:2]  # the same reference rows on the same held-out windows
    keys, ref_keys = trainables(out).keys(), trainables(reference).keys()
    losses, ref_losses = [r["loss"] for r in log], [r["loss"] for r in ref_log]
    flag = extra[0]
    if flag == "--controller":
        # The Controller's heads are zero-initialised (c = 0), so the first step's loss equals the default's.
        assert losses[0] == pytest.approx(ref_losses[0], rel=1e-6)
        if extra[1] == "static":
            assert {k for k in keys if k.startswith("param.controller.")} == {"param.controller.c"}
            assert sum(trainables(out)[k].numel() for k in keys) \
                < sum(trainables(reference)[k].numel() for k in ref_keys)
            assert losses[1:] != ref_losses[1:]
        else:
            assert not any(k.startswith("param.controller.") for k in keys)
            assert keys < ref_keys
    elif flag == "--no-gate":
        assert "param.gate.weight" not in keys and keys < ref_keys
        assert losses[0] != pytest.approx(ref_losses[0], rel=1e-4)
    elif flag == "--no-step-norm":
        assert "param.step_norm" not in keys and keys < ref_keys
        assert losses[0] != pytest.approx(ref_losses[0], rel=1e-4)
    elif flag == "--pool":
        # c = 0 at init, so the pool matters only once the Controller has moved
        assert keys == ref_keys and losses[0] == pytest.approx(ref_losses[0], rel=1e-6)
        assert losses[1:] != ref_losses[1:]
        assert rows[2]["name"] == "Ouroboros (mean pool), depth 2"
    elif flag == "--depths":
        assert {r["depth"] for r in log} <= {1, 2}
    elif flag == "--checkpoint-steps":
        # recomputation in backward changes memory, not the numbers
        assert json.loads((out / "config.json").read_text())["checkpoint_steps"] is True
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        a, b = trainables(out), trainables(reference)
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


# ----------------------------------------------------------------------------------------------------------
# Learning.

def test_loss_goes_down(world, tmp_path):
    out = tmp_path / "run"
    base = with_flag(with_flag(FLAGS, "--steps", "30"), "--save-every", "30")
    assert train.main(flags(world, out, "--lr", "1e-2", base=base)) == 0
    log = metrics(out)
    assert len(log) == 30
    first, last = sum(r["loss"] for r in log[:3]) / 3, sum(r["loss"] for r in log[-3:]) / 3
    assert last < first - 0.2, (first, last)
    rows = json.loads((out / "results.json").read_text())
    assert rows[2]["loss"] < rows[1]["loss"] - 0.1, rows  # held out: the arm beats the cut baseline


# ----------------------------------------------------------------------------------------------------------
# Resume.

def test_resume_is_exact(world, tmp_path):
    base = with_flag(FLAGS, "--steps", "6")
    extra = ["--depths", "1,2", "--lr", "3e-3", "--warmup", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(flags(world, whole, *extra, base=base)) == 0
    assert train.main(flags(world, parts, *extra, "--stop-after", "3", base=base)) == 0
    assert checkpoint_state(parts)["step"] == 3
    assert [r["step"] for r in metrics(parts)] == [1, 2, 3]
    # Lines a crash left behind after the last checkpoint are dropped and written again by the resumed run.
    with open(parts / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.0}\n{"step": 5, "loss": 0.0}\n')
    assert train.main(flags(world, parts, *extra, "--resume", base=base)) == 0
    assert checkpoint_state(parts)["step"] == 6

    a, b = trainables(whole), trainables(parts)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics(whole) == metrics(parts)
    assert len({r["depth"] for r in metrics(whole)}) == 2
    # ...and the steps after the first did move the parameters.
    fresh = tmp_path / "fresh"
    assert train.main(flags(world, fresh, *extra, "--stop-after", "1", base=base)) == 0
    assert any(not torch.equal(a[k], v) for k, v in trainables(fresh).items())


def test_resume_with_other_flags_is_refused(world, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(world, out, "--stop-after", "1")) == 0
    before = (out / train.CHECKPOINT).read_bytes()
    assert train.main(flags(world, out, "--resume", "--lr", "1e-2")) == 2
    assert (out / train.CHECKPOINT).read_bytes() == before


def wait_for(cond, proc, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"train.py exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def test_ctrl_c_leaves_a_checkpoint_and_resume_finishes(world, tmp_path):
    out = tmp_path / "run"
    long = with_flag(FLAGS, "--steps", "80")
    # Saving and evaluating every step keeps the run slow and the interrupt likely to land in the bookkeeping
    # after an update; both flags may change on --resume.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "train.py", *flags(world, out, "--eval-every", "1", base=long)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / train.CHECKPOINT).is_file() and (out / "metrics.jsonl").is_file()
                 and len(metrics(out)) >= 3, proc, 120, "the first checkpoint")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    step = checkpoint_state(out)["step"]
    assert f"checkpoint at step {step} saved" in err
    assert 3 <= step < 80
    assert [r["step"] for r in metrics(out)] == list(range(1, step + 1))  # no step lost, none ahead

    assert train.main(flags(world, out, "--resume", "--save-every", "50", base=long)) == 0
    assert checkpoint_state(out)["step"] == 80
    assert (out / "results.json").is_file()
    # The interrupted run, resumed, is the uninterrupted run.
    whole = tmp_path / "whole"
    assert train.main(flags(world, whole, "--save-every", "50", base=long)) == 0
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(whole)]
    a, b = trainables(out), trainables(whole)
    assert all(torch.equal(a[k], b[k]) for k in a), f"resumed at step {step}"


# ----------------------------------------------------------------------------------------------------------
# The pieces of the loop.

def test_label_shift_is_the_next_token():
    torch.manual_seed(0)
    B, T, V = 2, 7, 11
    windows = torch.randint(0, V, (B, T + 1))
    logits = torch.randn(B, T, V)
    x, y = train.inputs_and_targets(windows)
    assert torch.equal(x, windows[:, :-1])
    loss = train.next_token_loss(logits, y)

    def reference(ahead):
        # position t (which has seen tokens 0..t) is scored against token t + ahead
        logp = torch.log_softmax(logits.double(), dim=-1)
        terms = [-logp[b, t, windows[b, t + ahead]] for b in range(B) for t in range(T) if t + ahead <= T]
        return torch.stack(terms).mean()

    assert loss.item() == pytest.approx(reference(1).item(), rel=1e-6)
    assert abs(loss.item() - reference(2).item()) > 1e-3  # the released code's double shift
    # The loss depends on the logits at every position.
    logits.requires_grad_(True)
    train.next_token_loss(logits, y).backward()
    assert (logits.grad.abs().sum(-1) > 0).all()


def depth_args(seed, depths="1,2,4"):
    return argparse.Namespace(depths=depths, depth=8, seed=seed)


def test_depth_draws_are_seeded():
    a = [train.depth_at(s, depth_args(0)) for s in range(64)]
    assert a == [train.depth_at(s, depth_args(0)) for s in range(64)]
    assert a != [train.depth_at(s, depth_args(1)) for s in range(64)]
    assert set(a) == {1, 2, 4}
    assert [train.depth_at(s, depth_args(0, None)) for s in range(5)] == [8] * 5


def test_logged_depths_are_the_draws(world, tmp_path):
    out = tmp_path / "run"
    base = with_flag(with_flag(FLAGS, "--steps", "8"), "--save-every", "8")
    assert train.main(flags(world, out, "--depths", "1,2", "--seed", "3", base=base)) == 0
    logged = [r["depth"] for r in metrics(out)]
    assert logged == [train.depth_at(s, depth_args(3, "1,2")) for s in range(8)]
    assert set(logged) == {1, 2}


def test_precision_is_recorded_and_used(world, tmp_path):
    cpu = torch.device("cpu")
    assert train.resolve_precision("fp32", cpu) == "fp32" and train.resolve_precision("bf16", cpu) == "bf16"
    assert train.resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert train.resolve_precision("auto", cpu) in ("bf16", "fp32")
    base = with_flag(FLAGS, "--steps", "1")
    losses = {}
    for p in ("fp32", "bf16"):
        assert train.main(flags(world, tmp_path / p, "--precision", p, base=base)) == 0
        assert json.loads((tmp_path / p / "config.json").read_text())["precision"] == p
        losses[p] = metrics(tmp_path / p)[0]["loss"]
    # the same step in both precisions: close, but bf16 rounding shows
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2) and losses["bf16"] != losses["fp32"]


def test_lr_schedule():
    args = argparse.Namespace(lr=1e-3, warmup=10, steps=100, min_lr_ratio=0.1)
    lrs = [train.get_lr(s, args) for s in range(args.steps)]
    warm = lrs[:args.warmup]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d == pytest.approx(steps[0]) and d > 0 for d in steps)  # linear rise
    assert warm[0] == pytest.approx(args.lr / args.warmup)
    assert max(lrs) == pytest.approx(args.lr) and lrs[args.warmup - 1] == pytest.approx(args.lr)
    decay = lrs[args.warmup - 1:]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert decay[len(decay) // 2] < args.lr * 0.7  # it really decays
    assert lrs[-1] == pytest.approx(args.lr * args.min_lr_ratio)  # the last step's rate is the minimum
    assert min(lrs) == pytest.approx(args.lr * args.min_lr_ratio)


def test_held_out_split_is_deterministic_and_disjoint():
    docs = [(f"file{i}.txt", f"document number {i}") for i in range(200)]
    train_docs, val_docs = train.split_documents(docs, 0.2)
    assert train.split_documents(list(reversed(docs)), 0.2) == (list(reversed(train_docs)), list(reversed(val_docs)))
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(t for _, t in docs)
    assert 10 < len(val_docs) < 70
    # a held-out document stays held out when others are added
    more = docs + [(f"extra{i}.txt", f"extra {i}") for i in range(50)]
    assert set(val_docs) <= set(train.split_documents(more, 0.2)[1])


def test_held_out_tokens_never_reach_training(world, reference, tmp_path):
    """The token streams of a real run: the training stream contains no held-out document's tokens, and the
    comparison table is computed on the held-out stream."""
    ckpt, corpus = world
    docs = train.read_documents(corpus)
    train_docs, val_docs = train.split_documents(docs, 0.3)
    assert train_docs and val_docs
    tok = train.load_tokenizer(ckpt)
    eos = train.eos_token_id(tok)
    train_ids, val_ids = train.load_tokens(docs, 0.3, tok, tmp_path, "key")
    assert len(train_ids) == sum(len(tok.encode(t).ids) + 1 for t in train_docs)
    assert len(val_ids) == sum(len(tok.encode(t).ids) + 1 for t in val_docs)
    stream = " " + " ".join(map(str, train_ids.tolist())) + " "
    for t in val_docs:  # each held-out document is unique ("number i"), so its tokens cannot recur
        assert " " + " ".join(map(str, tok.encode(t).ids + [eos])) + " " not in stream

    cut = load_model(ckpt, torch.float32, "cpu", layers=[0, 3, 5])
    cpu = torch.device("cpu")
    how = argparse.Namespace(eval_windows=4, batch_size=2, precision=train.resolve_precision("auto", cpu))
    losses = [train.evaluate(cut, train.Windows(ids, 16, 0), how, cpu) for ids in (val_ids, train_ids)]
    table = json.loads((reference / "results.json").read_text())
    assert table[1]["loss"] == pytest.approx(losses[0], rel=1e-6)
    assert table[1]["loss"] != pytest.approx(losses[1], rel=1e-4)


# ----------------------------------------------------------------------------------------------------------
# Using a finished run, and not clobbering one.

@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(flags(world, out, "--lr", "1e-2")) == 0
    return out


def test_sample_prints_text(finished, capsys):
    capsys.readouterr()
    assert train.main(["--out", str(finished), "--sample", "the quick", "--max-new-tokens", "8",
                       "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("the quick") and len(printed) > len("the quick")


def test_eval_only_rewrites_the_same_results(finished):
    file = finished / "results.json"
    before = json.loads(file.read_text())
    file.write_text("[]")
    assert train.main(["--out", str(finished), "--eval-only", "--device", "cpu"]) == 0
    after = json.loads(file.read_text())
    assert [r["name"] for r in after] == [r["name"] for r in before]
    assert after == before  # the same computation on the same held-out windows, to the bit


def test_existing_out_dir_is_refused(world, finished, capsys):
    before = {f: (finished / f).read_bytes() for f in RUN_FILES}
    capsys.readouterr()
    assert train.main(flags(world, finished)) == 2
    assert "--resume" in capsys.readouterr().err
    assert {f: (finished / f).read_bytes() for f in RUN_FILES} == before


def test_user_errors_return_2(world, tmp_path, capsys):
    assert train.main(flags(world, tmp_path / "a", "--depths", "1,x")) == 2
    assert train.main(flags(world, tmp_path / "b", "--depth", "9")) == 2  # beyond --max-steps 8
    assert train.main(flags(world, tmp_path / "c", "--resume")) == 2  # nothing to resume
    assert train.main(["--out", str(tmp_path / "d"), "--sample", "hi", "--device", "cpu"]) == 2
    assert train.main(flags(world, tmp_path / "e", "--no-such-flag")) == 2
    assert not any((tmp_path / d).exists() for d in "abcde")  # refused before anything was written
    err = capsys.readouterr().err
    assert err.count("error:") == 5
