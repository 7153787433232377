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
import torch.nn.functional as F
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from flags import build_parser
from load_qwen import load_model
from tiny import make_checkpoint, tiny_config

import data
import devices
import evaluate
import runs
import train  # importable because tiny puts the repository root on sys.path

ROOT = Path(__file__).resolve().parent.parent
QCFG = tiny_config(num_hidden_layers=6)
TEXT = "the quick brown fox jumps over the lazy dog. "
# 12 documents; with --dev-fraction 0.15 --test-fraction 0.3 the hash split gives 9 train, 1 dev, 2 test.
DOCS = [f"{TEXT * 3}number {i} " + " ".join(["alpha beta gamma delta"] * (i % 3 + 1)) for i in range(12)]
FLAGS = ["--n-prelude", "1", "--recurrent-layer", "3", "--n-coda", "1", "--rank", "4", "--max-depth", "8",
         "--depth", "2", "--seq-len", "16", "--batch-size", "2", "--grad-accum", "2", "--steps", "3",
         "--eval-windows", "4", "--log-every", "1", "--save-every", "1", "--device", "cpu", "--dev-fraction", "0.15",
         "--test-fraction", "0.3",
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


# How long a subprocess may take before a test calls it hung: waits end on events (a file, a line, an exit),
# so this only bounds a real hang, on a machine many times slower than usual.
HANG = 1200


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
                 and (out / "metrics.jsonl").read_text().count("\n") >= 3, proc, HANG, "the first checkpoint")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=HANG)
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
    x, y = evaluate.inputs_and_targets(windows)
    assert torch.equal(x, windows[:, :-1])
    loss = evaluate.next_token_loss(logits, y)

    def reference(ahead):
        # position t (which has seen tokens 0..t) is scored against token t + ahead
        logp = torch.log_softmax(logits.double(), dim=-1)
        terms = [-logp[b, t, windows[b, t + ahead]] for b in range(B) for t in range(T) if t + ahead <= T]
        return torch.stack(terms).mean()

    assert loss.item() == pytest.approx(reference(1).item(), rel=1e-6)
    assert abs(loss.item() - reference(2).item()) > 1e-3  # the released code's double shift
    # The loss depends on the logits at every position.
    logits.requires_grad_(True)
    evaluate.next_token_loss(logits, y).backward()
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


@pytest.mark.parametrize("native", [True, False], ids=["native-bf16", "no-native-bf16"])
def test_precision_follows_the_hardware(world, tmp_path, monkeypatch, capsys, native):
    monkeypatch.setattr(devices, "native_bf16", lambda device: native)
    cpu = torch.device("cpu")
    assert devices.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert devices.resolve_precision("fp32", cpu) == "fp32"
    assert devices.resolve_precision("bf16", cpu, allow_slow=True) == "bf16"
    argv = flags(world, tmp_path / "run", "--precision", "bf16", base=with_flag(FLAGS, "--steps", "1"))
    if native:
        assert devices.resolve_precision("bf16", cpu) == "bf16"
        return
    # an explicit bf16 where it would crawl: one line, exit 2, nothing written; accepted when the user says so
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --precision bf16") and "--allow-slow-bf16" in err and "\n" not in err
    assert not (tmp_path / "run").exists()
    assert train.main(argv + ["--allow-slow-bf16"]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "bf16"


def test_precision_is_recorded_and_used(world, tmp_path):
    base = with_flag(FLAGS, "--steps", "1")
    losses = {}
    for p in ("fp32", "bf16"):
        assert train.main(flags(world, tmp_path / p, "--precision", p, "--allow-slow-bf16", base=base)) == 0
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


def cross_entropy_by_hand(logits, windows):
    """Position t of window b (having seen its tokens 0..t) against token t + 1: the shift written out."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    T = logits.shape[1]
    terms = [-logp[b, t, windows[b, t + 1]] for b in range(len(windows)) for t in range(T)]
    return torch.stack(terms).mean().item()


def split_by_hand(path, dev_fraction, test_fraction):
    parts = {"train": [], "dev": [], "test": []}
    for doc in data.read_documents(path):
        parts[data.split_of(doc, dev_fraction, test_fraction)].append(doc.text)
    return parts


def streams_by_hand(world, dev_fraction=0.15, test_fraction=0.3):
    """The train / dev / test token streams, tokenised here: each document's ids, then end-of-text."""
    ckpt, corpus = world
    tok = train.load_tokenizer(ckpt)
    eos = tok.token_to_id("<|endoftext|>")
    parts = split_by_hand(corpus, dev_fraction, test_fraction)
    return {k: [i for t in v for i in tok.encode(t).ids + [eos]] for k, v in parts.items()}, tok


def windows_by_hand(stream, T=16):
    n = (len(stream) - 1) // T
    return torch.tensor([stream[j * T: j * T + T + 1] for j in range(n)])


def test_held_out_tokens_never_reach_training(world, tmp_path):
    """The token streams of a real run: the training stream contains no dev or test document's tokens; the table
    is the next-token loss on every test window, computed here by hand; dev and test share no document."""
    streams, tok = streams_by_hand(world)
    parts = split_by_hand(world[1], 0.15, 0.3)
    assert not set(parts["dev"]) & set(parts["test"])
    stream = " " + " ".join(map(str, streams["train"])) + " "
    for t in parts["dev"] + parts["test"]:  # each document is unique ("number i"), so its tokens cannot recur
        assert " " + " ".join(map(str, tok.encode(t).ids)) + " " not in stream

    out = tmp_path / "run"
    assert train.main(flags(world, out, "--eval-windows", "0", "--precision", "fp32")) == 0
    table = json.loads((out / "results.json").read_text())
    windows = windows_by_hand(streams["test"])
    with torch.no_grad():
        full = load_model(world[0], torch.float32)(windows[:, :-1])
        cut = load_model(world[0], torch.float32, layers=[0, 3, 5])(windows[:, :-1])
    assert table[0]["loss"] == pytest.approx(cross_entropy_by_hand(full, windows), rel=1e-5)
    assert table[1]["loss"] == pytest.approx(cross_entropy_by_hand(cut, windows), rel=1e-5)
    assert table[1]["windows"] == len(windows) and table[1]["tokens"] == 16 * len(windows)
    assert table[1]["documents"] == len(parts["test"]) and table[1]["split"] == "test"


def test_first_logged_loss_is_the_next_token_cross_entropy(world, tmp_path):
    """Step 1's logged loss, on a batch of every training window, against the cross-entropy computed here of the
    initial model (heads zero: the plain looped layer). A second shift anywhere in the loop shows up."""
    streams, _ = streams_by_hand(world)
    windows = windows_by_hand(streams["train"])
    base = with_flag(with_flag(with_flag(FLAGS, "--steps", "1"), "--grad-accum", "1"), "--batch-size", str(len(windows)))
    out = tmp_path / "run"
    assert train.main(flags(world, out, "--precision", "fp32", base=base)) == 0
    cfg = train.OuroborosConfig(n_prelude=1, recurrent_layer=3, n_coda=1, rank=4, max_depth=8)
    model = train.load_ouroboros(world[0], cfg, torch.float32)
    with torch.no_grad():
        expected = cross_entropy_by_hand(model(windows[:, :-1], 2), windows)
    assert metrics(out)[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_dev_split_during_training_and_test_split_in_the_table(world, tmp_path, monkeypatch):
    seen = []
    score = evaluate.score
    for module in (train, evaluate):  # the dev evaluation is train.py's, the table's rows evaluate.py's
        monkeypatch.setattr(module, "score", lambda f, keys, head, split, *a: seen.append(split) or score(f, keys, head, split, *a))
    streams, _ = streams_by_hand(world)
    assert train.main(flags(world, tmp_path / "run", "--eval-every", "1")) == 0
    during, table = seen[:2], seen[2:]  # steps 1 and 2 of 3 evaluate on dev; then full, cut and the arm
    assert all(s.tokens.tolist() == streams["dev"] for s in during)
    assert len(table) == 3 and all(s.tokens.tolist() == streams["test"] for s in table)
    assert [r["dev_loss"] for r in metrics(tmp_path / "run") if "dev_loss" in r] != []


def test_dev_evaluation_and_sample_use_the_largest_depth(world, tmp_path, monkeypatch):
    depths = []
    forward = train.Ouroboros.forward  # what training, the dev evaluation and generation all call
    monkeypatch.setattr(train.Ouroboros, "forward",
                        lambda self, x, n, *a, **k: depths.append((n, torch.is_grad_enabled())) or forward(self, x, n, *a, **k))
    out = tmp_path / "run"
    assert train.main(flags(world, out, "--depths", "2,1", "--eval-every", "1")) == 0
    evaluated = [n for n, grad in depths if not grad]
    assert evaluated[0] == 2  # the dev evaluation after step 1, at the largest depth, not the last listed
    depths.clear()
    assert train.main(["--out", str(out), "--sample", "the", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert {n for n, _ in depths} == {2}


def decayed_names(model, optimizer):
    name = {id(p): n for n, p in model.named_parameters()}
    return {name[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}


@pytest.mark.parametrize("controller, expected", [
    ("dynamic", {"controller.pool_proj.weight", "controller.mlp.0.weight", "controller.mlp.2.weight",
                 "controller.heads.weight", "gate.weight"}),
    ("static", {"gate.weight"}), ("none", {"gate.weight"})])
def test_weight_decay_only_on_the_linear_weights(world, controller, expected):
    cfg = train.OuroborosConfig(n_prelude=1, recurrent_layer=3, n_coda=1, rank=4, max_depth=8, controller=controller)
    model = train.load_ouroboros(world[0], cfg, torch.float32)
    params = model.trainable_parameters()
    args = argparse.Namespace(weight_decay=0.1, lr=1e-3)
    optimizer = train.build_optimizer(model, params, args, torch.device("cpu"))
    assert decayed_names(model, optimizer) == expected
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)


def test_rows_no_step_reaches_stay_as_initialised(world, tmp_path):
    """At depth 2 of --max-depth 8, the norm rows and step embeddings of steps 2..7 get no gradient; with weight
    decay on, they must still be exactly their initial values (decay would shrink them)."""
    out = tmp_path / "run"
    assert train.main(flags(world, out, "--weight-decay", "0.1", base=with_flag(FLAGS, "--steps", "4"))) == 0
    trained = trainables(out)
    assert torch.equal(trained["param.step_norm"][2:], torch.ones(6, QCFG.hidden_size))
    assert not torch.equal(trained["param.step_norm"][:2], torch.ones(2, QCFG.hidden_size))
    torch.manual_seed(0)  # the run's --seed: the same initial Controller
    cfg = train.OuroborosConfig(n_prelude=1, recurrent_layer=3, n_coda=1, rank=4, max_depth=8)
    init = train.load_ouroboros(world[0], cfg, torch.float32).controller.step_embed.weight
    assert torch.equal(trained["param.controller.step_embed.weight"][2:], init[2:].detach())


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_precision_decides_the_base_dtype(world, tmp_path, precision, dtype):
    """A bf16 checkpoint under --precision fp32 gets an fp32 base (no mixed-dtype matmul), and under bf16 a bf16
    base, on CPU as on CUDA (the same code path); the trainables stay fp32 either way."""
    bf16 = make_checkpoint(tmp_path / "bf16", QCFG, seed=1, dtype=torch.bfloat16, tokenizer=train.load_tokenizer(world[0]))
    args = build_parser().parse_args(flags((bf16, world[1]), tmp_path / "run", "--precision", precision))
    _, model = train.prepare_arm(args, torch.device("cpu"))
    assert {p.dtype for p in model.base.parameters()} == {dtype}
    assert {p.dtype for p in model.trainable_parameters().values()} == {torch.float32}
    assert train.main(flags((bf16, world[1]), tmp_path / "run", "--precision", precision, "--allow-slow-bf16",
                            base=with_flag(FLAGS, "--steps", "1"))) == 0
    assert math.isfinite(metrics(tmp_path / "run")[0]["loss"])


def test_each_checkpoint_is_written_once_and_read_once(world, tmp_path, monkeypatch):
    written, read = [], []
    save_file, safe_open_ = runs.save_file, runs.safe_open
    monkeypatch.setattr(runs, "save_file", lambda t, f, metadata: written.append(f) or save_file(t, f, metadata=metadata))
    monkeypatch.setattr(runs, "safe_open", lambda f, **k: read.append(f) or safe_open_(f, **k))
    out = tmp_path / "run"
    assert train.main(flags(world, out, "--stop-after", "2", base=with_flag(FLAGS, "--save-every", "2"))) == 0
    assert len(written) == 1 and read == []  # step 2: saved by --save-every, not again when the run stops
    assert train.main(flags(world, out, "--resume", base=with_flag(FLAGS, "--save-every", "2"))) == 0
    assert len(written) == 2 and len(read) == 1  # step 3, the last; the checkpoint of step 2 read once


# ----------------------------------------------------------------------------------------------------------
# Using a finished run, and not clobbering one.

@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train.main(flags(world, out, "--lr", "1e-2")) == 0
    return out


def test_compare_puts_runs_in_one_table(world, finished, reference, tmp_path, capsys):
    capsys.readouterr()
    assert train.main(["--compare", str(reference), str(finished), "--out", str(tmp_path / "both")]) == 0
    rows = json.loads((tmp_path / "both" / "results.json").read_text())
    own = [json.loads((d / "results.json").read_text()) for d in (reference, finished)]
    assert rows == own[0][:2] + own[0][2:] + own[1][2:]  # the full and cut rows once, then each run's
    assert "gap recovered = (cut - loss) / (cut - full)" in capsys.readouterr().out
    other = tmp_path / "other"  # scored on other windows: refused
    assert train.main(flags(world, other, "--eval-windows", "2", base=with_flag(FLAGS, "--steps", "1"))) == 0
    assert train.main(["--compare", str(reference), str(other)]) == 2
    assert "not scored on the same test windows" in capsys.readouterr().err
    before = (finished / "results.json").read_bytes()
    assert train.main(["--compare", str(reference), "--out", str(finished)]) == 2  # never over a run's own table
    assert (finished / "results.json").read_bytes() == before


def test_a_stopped_run_has_no_table_and_overwrite_clears_the_old_one(world, finished, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(world, out, "--stop-after", "1")) == 0
    assert not (out / "results.json").exists() and not (out / "stats.json").exists()  # not finished: no table
    assert train.main(["--compare", str(finished), str(out)]) == 2
    assert train.main(flags(world, out, "--resume")) == 0 and (out / "results.json").is_file()
    assert train.main(["--out", str(out), "--eval-only", "--eval-depths", "1", "--device", "cpu"]) == 0
    assert (out / "results-depths-1.json").is_file()
    assert train.main(flags(world, out, "--overwrite", "--stop-after", "1")) == 0
    assert sorted(f.name for f in out.iterdir()) == sorted(["config.json", train.CHECKPOINT, "metrics.jsonl"])


def test_overwrite_clears_the_old_table_under_a_relative_out(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = Path("run")  # relative, as the demo's runs/demo-N/none
    assert train.main(flags(world, out)) == 0 and (out / "results.json").is_file()
    assert train.main(flags(world, out, "--overwrite", "--stop-after", "1")) == 0
    assert sorted(f.name for f in out.iterdir()) == sorted(["config.json", train.CHECKPOINT, "metrics.jsonl"])


def test_eval_only_scores_in_the_runs_own_precision(world, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(world, out, "--precision", "fp32")) == 0
    before = (out / "results.json").read_bytes()
    assert train.main(["--out", str(out), "--eval-only", "--device", "cpu", "--precision", "bf16"]) == 0
    assert (out / "results.json").read_bytes() == before


def test_steps_0_with_resume_prints_the_references(world, tmp_path, capsys):
    assert train.main(flags(world, tmp_path / "none", "--steps", "0", "--resume")) == 0
    assert "cut baseline" in capsys.readouterr().out and not (tmp_path / "none").exists()


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
    assert train.main(flags(world, tmp_path / "b", "--depth", "9")) == 2  # beyond --max-depth 8
    assert train.main(flags(world, tmp_path / "c", "--resume")) == 2  # nothing to resume
    assert train.main(["--out", str(tmp_path / "d"), "--sample", "hi", "--device", "cpu"]) == 2
    assert train.main(flags(world, tmp_path / "e", "--no-such-flag")) == 2
    assert not any((tmp_path / d).exists() for d in "abcde")  # refused before anything was written
    err = capsys.readouterr().err
    assert err.count("error:") == 5


def test_compile_trains_the_same_model(world, tmp_path):
    # --compile fuses the elementwise work; the losses and trained values stay those of eager mode (fp32 rounding).
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.main(flags(world, eager, "--precision", "fp32")) == 0
    assert train.main(flags(world, compiled, "--precision", "fp32", "--compile")) == 0
    for a, b in zip(metrics(eager), metrics(compiled), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    a, b = trainables(eager), trainables(compiled)
    for k in a:
        # Adam moved each value by up to 3 x 3e-3; it also turns the fp32 rounding of a near-zero gradient into a
        # difference of up to ~2e-5 (seen on mlp.2 of the Controller), which depends on the kernels: 1e-4 allows
        # that and still fails a wrong graph, whose updates would differ by their own size.
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=k)
    assert a["param.controller.heads.weight"].abs().max() > 1e-3  # trained: not both still at their zero init


def test_reference_rows_never_run_compiled_kernels(world, tmp_path, monkeypatch):
    """The full and cut rows are the same in every run of a checkpoint and split (--compare and the demo check them
    to the last digit), so under --compile they are still scored by the plain layers. A backend that adds 0.1 to
    every compiled output shows in any row it reaches: in the arm's, not in the references."""
    import torch._dynamo

    def off_by_a_tenth(gm, example_inputs):  # a shift, which the final RMSNorm does not undo (a scale it would)
        return lambda *a: [o + 0.1 if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in gm(*a)]

    compile_by_region = train.compile_by_region
    monkeypatch.setattr(train, "compile_by_region", lambda model: compile_by_region(model, off_by_a_tenth))
    torch._dynamo.reset()
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train.main(flags(world, eager, "--precision", "fp32")) == 0
    assert train.main(flags(world, compiled, "--precision", "fp32", "--compile")) == 0
    torch._dynamo.reset()
    a, b = (json.loads((out / "results.json").read_text()) for out in (eager, compiled))
    assert a[:2] == b[:2]
    assert abs(a[2]["loss"] - b[2]["loss"]) > 1e-3  # the backend was in effect where it should be


def test_a_run_from_before_the_max_depth_rename_still_reads(finished, tmp_path):
    """Runs written when --max-depth was called --max-steps keep working: scored, sampled, resumed."""
    import shutil
    out = tmp_path / "old"
    shutil.copytree(finished, out)
    config = json.loads((out / "config.json").read_text())
    assert config["max_depth"] == 8  # not the default 64: the step norms' shape depends on it
    config["max_steps"] = config.pop("max_depth")
    (out / "config.json").write_text(json.dumps(config))
    (out / "results.json").unlink()
    assert train.main(["--out", str(out), "--eval-only", "--device", "cpu"]) == 0
    assert (out / "results.json").read_text() == (finished / "results.json").read_text()
    assert train.main(["--out", str(out), "--sample", "the", "--max-new-tokens", "3", "--device", "cpu"]) == 0


def test_compile_by_region_does_not_grow_with_depth(world):
    """--compile compiles the decoder layers, not the unrolled model: once the plain and the modulated layer (with
    and without a gradient into the state) have been traced, deeper and other depths add no graph. Dynamo's own
    count of graphs, with its eager backend (what is traced is the same; inductor would only take longer)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    args = build_parser().parse_args(flags(world, "unused", "--precision", "fp32"))
    _, model = train.prepare_arm(args, torch.device("cpu"))
    train.compile_by_region(model, backend="eager")
    x = torch.randint(0, QCFG.vocab_size, (2, 12))
    graphs = []
    for depth in (1, 2, 6, 3, 8):
        model(x, depth).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > 0 and graphs[1:] == [graphs[1]] * 4, graphs
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(monkeypatch, dtype):
    """loss_from_states applies the head a chunk of positions at a time (recomputed in backward): the same loss
    and gradients as the plain cross-entropy of the whole batch's logits, and no call ever sees more rows."""
    torch.manual_seed(0)
    B, T, d, V = 3, 37, 16, 50  # 111 positions: chunks of 25 leave a short last one
    head = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, V)).to(dtype)
    h = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    y = torch.randint(0, V, (B, T))
    plain = evaluate.next_token_loss(head(h), y)
    plain_grads = torch.autograd.grad(plain, [h, *head.parameters()])
    monkeypatch.setattr(evaluate, "LOSS_CHUNK", 25)
    rows, cross_entropy = [], F.cross_entropy
    monkeypatch.setattr(evaluate.F, "cross_entropy", lambda logits, *a, **k: rows.append(len(logits)) or cross_entropy(logits, *a, **k))
    chunked = evaluate.loss_from_states(h, y, head)
    grads = torch.autograd.grad(chunked, [h, *head.parameters()])
    assert rows and max(rows) == 25 and sum(rows) == 2 * B * T  # each chunk once forward, once recomputed in backward
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(chunked, plain, **tol)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, **tol)
    with torch.no_grad():  # per-token losses, as evaluation reads them
        per_token = evaluate.loss_from_states(h, y, head, reduction="none")
    torch.testing.assert_close(per_token, evaluate.next_token_loss(head(h).detach(), y, reduction="none"), **tol)


def test_lora_lr_moves_the_adapters_by_their_own_step(world, tmp_path):
    # Adam's first update moves every parameter with a gradient by about lr (g / (|g| + eps)): after one step at
    # --lr 1e-4 --lora-lr 1e-2 the adapters must have moved by ~1e-2 and the Controller by ~1e-4, whatever the
    # gradients' sizes. Weight decay off, so nothing else moves them.
    out = tmp_path / "run"
    base = with_flag(with_flag(with_flag(FLAGS, "--steps", "1"), "--lr", "1e-4"), "--grad-accum", "1")
    torch.manual_seed(0)
    cfg = train.OuroborosConfig(n_prelude=1, recurrent_layer=3, n_coda=1, rank=4, max_depth=8, lora_layers="coda",
                                lora_rank=2)
    init = {f"param.{k}": v.detach().clone() for k, v in
            train.load_ouroboros(world[0], cfg, torch.float32).trainable_parameters().items()}
    assert train.main(flags(world, out, "--lora-layers", "coda", "--lora-rank", "2", "--lora-lr", "1e-2",
                            "--weight-decay", "0", base=base)) == 0
    moved = {k: (v - init[k]).abs().max().item() for k, v in trainables(out).items()}
    # (the A matrices get no gradient at the first step: their B starts at zero)
    adapters = [m for k, m in moved.items() if k.startswith("param.adapters.") and k.endswith("_B")]
    rest = [m for k, m in moved.items() if k.startswith("param.controller.") and m > 0]
    assert len(adapters) == 7 and rest
    assert all(0.9e-2 < m < 1.01e-2 for m in adapters), moved
    assert all(m < 1.01e-4 for m in rest) and max(rest) > 0.9e-4, moved


def test_no_reference_rows_scores_the_arm_alone_on_the_same_windows(world, tmp_path):
    both, alone = tmp_path / "both", tmp_path / "alone"
    assert train.main(flags(world, both)) == 0
    assert train.main(flags(world, alone, "--no-reference-rows")) == 0
    rows = lambda out: json.loads((out / "results.json").read_text())  # noqa: E731
    assert [r["name"] for r in rows(alone)] == [rows(both)[2]["name"]]
    assert rows(alone)[0]["loss"] == rows(both)[2]["loss"]
    assert "gap_recovered" not in rows(alone)[0]
