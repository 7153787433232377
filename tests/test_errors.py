"""Every user error: one line on stderr saying what was wrong and what to do, exit code 2, no traceback, and the
out directory exactly as it was (absent stays absent, an existing run stays byte for byte)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from test_train import QCFG, ROOT, flags, world  # noqa: F401 (world: fixtures)
from tiny import make_checkpoint, tiny_config

import data
import train


def snapshot(path: Path):
    """Every file under path with the hash of its bytes; None when path does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def error_line(err: str) -> str:
    """The one line of an error, from stderr that may also hold tokenising progress."""
    assert "Traceback" not in err, err
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and not l.startswith("tokenising")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def refused(argv, capsys, out: Path, *words):
    """Runs train.main(argv); checks the refusal and that `out` did not change. Returns the message."""
    before = snapshot(out)
    capsys.readouterr()
    assert train.main(argv) == 2
    line = error_line(capsys.readouterr().err)
    for w in words:
        assert w in line, line
    assert snapshot(out) == before
    return line


@pytest.fixture(scope="module")
def existing(world, tmp_path_factory):
    """A finished run (stopped after 1 step), to check that refused commands leave it byte for byte."""
    out = tmp_path_factory.mktemp("existing") / "run"
    assert train.main(flags(world, out, "--stop-after", "1")) == 0
    return out


def broken_checkpoint(world, path: Path, change_config=None, change_tensors=None) -> Path:
    """A copy of the good checkpoint with its config.json and/or tensors changed."""
    shutil.copytree(world[0], path)
    if change_config is not None:
        config = json.loads((path / "config.json").read_text())
        change_config(config)
        (path / "config.json").write_text(json.dumps(config))
    if change_tensors is not None:
        tensors = load_file(path / "model.safetensors")
        change_tensors(tensors)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


# ----------------------------------------------------------------------------------------------------------
# The model directory.

def test_model_directory_missing(world, tmp_path, capsys):
    argv = flags(world, tmp_path / "out")
    argv[argv.index("--model") + 1] = str(tmp_path / "nowhere")
    refused(argv, capsys, tmp_path / "out", "nowhere", "no such directory", "checkpoint directory")


def test_not_a_supported_family(world, tmp_path, capsys):
    ckpt = broken_checkpoint(world, tmp_path / "gemma", change_config=lambda c: c.update(model_type="gemma"))
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", "model_type", "'gemma'", "qwen3")


@pytest.mark.parametrize("change, words", [
    (dict(model_type="qwen3_moe"), ["model_type is 'qwen3_moe'"]),
    (dict(num_experts=8), ["num_experts", "mixture-of-experts"]),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), ["'yarn' is not supported"]),
    (dict(use_sliding_window=True), ["use_sliding_window", "sliding-window"]),
], ids=["moe-type", "experts", "yarn", "sliding-window"])
def test_unsupported_architecture_is_refused_before_anything_is_written(world, tmp_path, capsys, change, words):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt", change_config=lambda c: c.update(change))
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", "config.json", *words)


def test_directory_without_a_checkpoint(world, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    refused(flags((tmp_path / "empty", world[1]), tmp_path / "out"), capsys, tmp_path / "out",
            "config.json", "missing")


@pytest.mark.parametrize("config, words", [
    ("{not json", ["config.json", "not valid JSON"]),
    ("[1, 2]", ["config.json", "JSON object"]),
    ('{"model_type": "qwen2", "hidden_size": "big"}', ["vocab_size must be a positive integer"]),
], ids=["not-json", "not-an-object", "missing-fields"])
def test_malformed_config(world, tmp_path, capsys, config, words):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt")
    (ckpt / "config.json").write_text(config)
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", *words)


@pytest.mark.parametrize("key, value, words", [
    ("hidden_size", "big", ["hidden_size must be a positive integer", "'big'"]),
    ("num_hidden_layers", 0, ["num_hidden_layers must be a positive integer"]),
    ("rms_norm_eps", "tiny", ["rms_norm_eps must be a positive number"]),
    ("rope_theta", -1.0, ["rope_theta must be a positive number"]),
    ("num_attention_heads", 3, ["num_attention_heads must be a multiple of num_key_value_heads"]),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_config_value(world, tmp_path, capsys, key, value, words):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt", change_config=lambda c: c.update({key: value}))
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", "config.json", *words)


def test_safetensors_missing(world, tmp_path, capsys):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", "no model.safetensors", "missing")


def test_safetensors_truncated(world, tmp_path, capsys):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:len(data) // 2])
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", "model.safetensors",
            "truncated or corrupted")


def test_safetensors_corrupted(world, tmp_path, capsys):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt")
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header, just after its 8-byte length
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", "model.safetensors",
            "truncated or corrupted")


def test_shard_missing(world, tmp_path, capsys):
    ckpt, corpus = world
    sharded = make_checkpoint(tmp_path / "sharded", QCFG, seed=1, shards=2, tokenizer=train.load_tokenizer(ckpt))
    (sharded / "model-00002-of-00002.safetensors").unlink()
    refused(flags((sharded, corpus), tmp_path / "out"), capsys, tmp_path / "out", "model-00002-of-00002", "missing")


@pytest.mark.parametrize("key", ["model.layers.0.mlp.up_proj.weight",  # a kept (prelude) layer
                                 "model.layers.2.self_attn.q_proj.weight"],  # a removed layer, read for the bases
                         ids=["kept", "removed"])
def test_tensor_missing(world, tmp_path, capsys, key):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt", change_tensors=lambda t: t.pop(key))
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", key, "missing")


@pytest.mark.parametrize("key", ["model.layers.3.mlp.down_proj.weight",  # the recurrent layer
                                 "model.layers.2.mlp.up_proj.weight"],  # a removed layer
                         ids=["kept", "removed"])
def test_tensor_of_the_wrong_shape(world, tmp_path, capsys, key):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt", change_tensors=lambda t: t.update({key: torch.zeros(3, 5)}))
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", key, "[3, 5]", "shape")


@pytest.mark.parametrize("key", ["model.layers.3.mlp.down_proj.weight", "model.layers.2.mlp.up_proj.weight",
                                 "model.embed_tokens.weight"], ids=["kept", "removed", "embedding"])
def test_tensor_of_an_integer_dtype(world, tmp_path, capsys, key):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt", change_tensors=lambda t: t.update({key: t[key].to(torch.int64)}))
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", key, "int64", "floating point")


@pytest.mark.parametrize("where", [".", "runs/a"])
def test_out_inside_the_model_directory(world, tmp_path, capsys, where):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt")
    before = snapshot(ckpt)
    refused(flags((ckpt, world[1]), ckpt / where, "--overwrite"), capsys, ckpt / where, "inside the checkpoint directory")
    assert snapshot(ckpt) == before  # config.json (say) not replaced by a run's


def test_tokenizer_missing(world, tmp_path, capsys):
    ckpt = broken_checkpoint(world, tmp_path / "ckpt")
    (ckpt / "tokenizer.json").unlink()
    refused(flags((ckpt, world[1]), tmp_path / "out"), capsys, tmp_path / "out", "tokenizer.json", "missing")


# ----------------------------------------------------------------------------------------------------------
# The split, the rank and the depth (the tiny checkpoint has 6 layers; FLAGS use --max-depth 8).

@pytest.mark.parametrize("extra, words", [
    (["--n-prelude", "3", "--n-coda", "3"], ["--n-prelude + --n-coda + 1 = 7", "6 layers"]),
    (["--recurrent-layer", "0"], ["--recurrent-layer 0", "1..4"]),  # inside the prelude (layer 0)
    (["--recurrent-layer", "5"], ["--recurrent-layer 5", "1..4"]),  # inside the coda (layer 5)
    (["--recurrent-layer", "9"], ["--recurrent-layer 9"]),
    (["--n-prelude", "-1"], ["--n-prelude (-1)", ">= 0"]),
    (["--n-coda", "-2"], ["--n-coda (-2)", ">= 0"]),
    (["--rank", "65"], ["--rank 65 is larger than projection", "--rank <= "]),
    (["--rank", "0"], ["--rank, --lora-rank and --max-depth must be >= 1"]),
    (["--depth", "0"], ["depth 0 is outside 1..8"]),
    (["--depth", "9"], ["depth 9 is outside 1..8"]),
    (["--depths", "2,9"], ["depth 9 is outside 1..8"]),
    (["--depths", "1,x"], ["--depths '1,x'"]),
    (["--depth", "9", "--eval-depths", "2"], ["depth 9 is outside 1..8"]),  # the trained depth, checked too
    (["--eval-depths", "1,x"], ["--eval-depths '1,x'"]),
    (["--max-depth", "0", "--depth", "1"], ["--max-depth must be >= 1"]),
], ids=lambda v: "".join(v).lstrip("-") if isinstance(v, list) and v[0].startswith("--") else None)
def test_bad_split_rank_or_depth(world, tmp_path, capsys, extra, words):
    refused(flags(world, tmp_path / "out", *extra), capsys, tmp_path / "out", *words)


# ----------------------------------------------------------------------------------------------------------
# Flags with values no run can use.

@pytest.mark.parametrize("extra, words", [
    (["--seq-len", "0"], ["--seq-len 0", ">= 1"]),
    (["--batch-size", "-1"], ["--batch-size -1"]),
    (["--grad-accum", "0"], ["--grad-accum 0"]),
    (["--save-every", "0"], ["--save-every 0"]),
    (["--lr", "-1"], ["--lr -1.0", "> 0"]),
    (["--lr", "nan"], ["--lr", "'nan'"]),
    (["--lr", "inf"], ["--lr", "'inf'"]),
    (["--alpha", "nan"], ["--alpha", "'nan'"]),
    (["--alpha", "0"], ["--alpha 0.0", "> 0"]),
    (["--clip=-inf"], ["--clip", "'-inf'"]),
    (["--weight-decay", "nan"], ["--weight-decay", "'nan'"]),
    (["--min-lr-ratio", "inf"], ["--min-lr-ratio", "'inf'"]),
    (["--temperature", "nan"], ["--temperature", "'nan'"]),
    (["--temperature", "-1"], ["--temperature -1.0", ">= 0"]),
    (["--top-k", "-5"], ["--top-k -5", ">= 1"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens 0", ">= 1"]),
    (["--eval-windows", "-1"], ["--eval-windows -1", ">= 0"]),
    (["--dev-fraction", "1.5"], ["--dev-fraction 1.5", "between 0 and 1"]),
    (["--test-fraction", "0"], ["--test-fraction 0.0"]),
    (["--dev-fraction", "0.6", "--test-fraction", "0.5"], ["--test-fraction 0.5", "1 - --dev-fraction"]),
    (["--warmup", "50"], ["--warmup 50 is longer than the run (--steps 3)", "at most 3"]),
    (["--step", "40"], ["unrecognized arguments: --step 40"]),  # no abbreviations: --step is not --steps
    (["--seqlen", "40"], ["unrecognized arguments: --seqlen 40"]),
    (["--data", ""], ["--data is empty", "unset shell variable"]),
    (["--eval-pool", "causal"], ["--eval-pool", "--eval-only"]),
    (["--token-cache", "/dev/null/tokens"], ["--token-cache /dev/null/tokens", "pass another"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag", "--help"]),
    (["--steps", "three"], ["--steps", "'three'"]),
    (["--precision", "fp16"], ["--precision", "'fp16'", "bf16"]),
], ids=lambda v: "".join(v).lstrip("-") if isinstance(v, list) and v[0].startswith("--") else None)
def test_bad_flag_value(world, tmp_path, capsys, extra, words):
    refused(flags(world, tmp_path / "out", *extra), capsys, tmp_path / "out", *words)


@pytest.mark.parametrize("device, words", [("tpu", ["'tpu' is not a device", "cpu"]),
                                           ("mps", ["only cpu and cuda"]),
                                           ("cuda:99", ["cuda:99"])])
def test_unknown_device(world, tmp_path, capsys, device, words):
    if device.startswith("cuda") and torch.cuda.is_available():
        words = ["only", "CUDA devices"]
    refused(flags(world, tmp_path / "out", "--device", device), capsys, tmp_path / "out", *words)


# ----------------------------------------------------------------------------------------------------------
# The data.

def corpus_of(tmp_path, name, texts) -> Path:
    d = tmp_path / name
    d.mkdir()
    for i, t in enumerate(texts):
        (d / f"doc{i:02d}.txt").write_text(t)
    return d


def test_data_missing(world, tmp_path, capsys):
    refused(flags((world[0], tmp_path / "nothing.txt"), tmp_path / "out"), capsys, tmp_path / "out",
            "nothing.txt", "no such file")


@pytest.mark.parametrize("kind", ["empty-file", "blank-file", "empty-dir", "empty-jsonl"])
def test_data_empty(world, tmp_path, capsys, kind):
    path = {"empty-file": tmp_path / "a.txt", "blank-file": tmp_path / "b.txt", "empty-dir": tmp_path / "dir",
            "empty-jsonl": tmp_path / "c.jsonl"}[kind]
    if kind == "empty-dir":
        path.mkdir()
    else:
        path.write_text({"empty-file": "", "blank-file": "\n \n\n\t\n", "empty-jsonl": '{"text": " "}\n'}[kind])
    refused(flags((world[0], path), tmp_path / "out"), capsys, tmp_path / "out", "holds no text")


@pytest.mark.parametrize("line, words", [('{"body": "no text field"}', ["no 'text' field"]),
                                         ('{"text": null}', ["'text' is null, not a string"]),
                                         ('{"text": 12}', ["'text' is 12, not a string"]),
                                         ('["a list"]', ["not a JSON object"]),
                                         ('{"text": "cut', ["not a JSON object"])])
def test_data_bad_jsonl_line(world, tmp_path, capsys, line, words):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    refused(flags((world[0], path), tmp_path / "out"), capsys, tmp_path / "out", "data.jsonl:2", *words)


@pytest.mark.parametrize("name", ["data.bin", "data.txt", "corpus.txt.gz"])
def test_data_binary_file(world, tmp_path, capsys, name):
    path = tmp_path / name
    raw = bytes(range(256)) * 4
    path.write_bytes(raw if not name.endswith(".gz") else b"\x1f\x8b broken gzip")
    refused(flags((world[0], path), tmp_path / "out"), capsys, tmp_path / "out", name, "not a UTF-8 text file")
    # a binary file inside a data directory is named too; hidden ones (.git) are skipped
    d = tmp_path / "dir"
    (d / ".git").mkdir(parents=True)
    (d / ".git" / "index").write_bytes(raw)
    (d / "a.txt").write_text("some text")
    assert [doc.text for doc in data.read_documents(d)] == ["some text"]
    (d / name).write_bytes(path.read_bytes())
    refused(flags((world[0], d), tmp_path / "out"), capsys, tmp_path / "out", name, "not a UTF-8 text file")


def test_data_shorter_than_one_window(world, tmp_path, capsys):
    refused(flags(world, tmp_path / "out", "--seq-len", "1000"), capsys, tmp_path / "out",
            "fewer than one window of --seq-len 1000", "lower --seq-len")


def test_data_with_no_held_out_document(world, tmp_path, capsys):
    refused(flags(world, tmp_path / "out", "--dev-fraction", "0.001"), capsys, tmp_path / "out",
            "0 dev", "--dev-fraction")


@pytest.fixture(scope="module")
def small_vocab(world, tmp_path_factory):
    """A checkpoint whose vocabulary (64) is smaller than its tokenizer's (up to 128): ids beyond it."""
    tok = train.load_tokenizer(world[0])
    assert tok.get_vocab_size() > 64
    return make_checkpoint(tmp_path_factory.mktemp("small_vocab") / "ckpt", tiny_config(num_hidden_layers=6, vocab_size=64),
                           seed=1, tokenizer=tok)


def test_token_ids_beyond_the_vocabulary(world, small_vocab, tmp_path, capsys):
    refused(flags((small_vocab, world[1]), tmp_path / "out"), capsys, tmp_path / "out",
            "beyond the model's vocabulary (64)", "tokenizer")


# A run refused for its data used to create --out and cache its tokens there first. A --dev-fraction no other
# command used means the tokens are not cached yet, so they are tokenised, refused and not written.
@pytest.mark.parametrize("case", ["vocab", "short"])
def test_refused_data_leaves_an_existing_run_unchanged(world, small_vocab, existing, capsys, case):
    if case == "vocab":
        argv = flags((small_vocab, world[1]), existing, "--overwrite", "--dev-fraction", "0.2")
        refused(argv, capsys, existing, "beyond the model's vocabulary")
    else:
        argv = flags(world, existing, "--overwrite", "--dev-fraction", "0.25", "--seq-len", "1000")
        refused(argv, capsys, existing, "--seq-len 1000")


# ----------------------------------------------------------------------------------------------------------
# The out directory and --resume.

def test_existing_out_dir_needs_resume_or_overwrite(world, existing, capsys):
    refused(flags(world, existing), capsys, existing, "already holds files", "--resume", "--overwrite")


def test_out_is_a_file(world, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    refused(flags(world, tmp_path / "file"), capsys, tmp_path / "file", "is a file")


def test_resume_with_a_different_configuration_names_the_fields(world, existing, capsys):
    line = refused(flags(world, existing, "--resume", "--lr", "1e-2", "--depth", "3"), capsys, existing,
                   "different configuration")
    assert "--depth: 2 -> 3" in line and "--lr: 0.003 -> 0.01" in line
    # flags that do not change the result may differ
    assert "save_every" not in line and "log_every" not in line


def test_resume_without_a_checkpoint(world, tmp_path, capsys):
    refused(flags(world, tmp_path / "out", "--resume"), capsys, tmp_path / "out", "no checkpoint", "without --resume")
    # a run killed before its first checkpoint left files: start again with --overwrite
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    refused(flags(world, tmp_path / "out", "--resume"), capsys, tmp_path / "out", "no checkpoint", "--overwrite")


def test_resume_of_a_damaged_run(world, existing, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(existing, run)
    ckpt = run / train.CHECKPOINT
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:len(good) // 2])
    refused(flags(world, run, "--resume"), capsys, run, "unreadable checkpoint", "--overwrite")
    ckpt.write_bytes(good)
    (run / "config.json").write_text("{truncated")
    refused(flags(world, run, "--resume"), capsys, run, "config.json", "unreadable")


def test_resume_of_a_checkpoint_from_another_model(world, existing, tmp_path, capsys):
    # Same flags, but the checkpoint holds other shapes (as if copied from another run): refused, not a crash.
    run = tmp_path / "run"
    shutil.copytree(existing, run)
    with safe_open(str(run / train.CHECKPOINT), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["param.gate.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(run / train.CHECKPOINT), metadata=meta)
    refused(flags(world, run, "--resume"), capsys, run, "gate.weight", "not this run's")


def test_sample_with_an_empty_prompt(existing, capsys):
    refused(["--out", str(existing), "--sample", "", "--device", "cpu"], capsys, existing, "non-empty prompt")


def test_sample_without_out_asks_for_out(tmp_path, capsys):
    line = refused(["--sample", "hi", "--device", "cpu"], capsys, tmp_path / "none", "--out is required")
    assert "--sample" in line and "--model" not in line


def test_a_bad_flag_is_reported_before_an_existing_out(world, existing, capsys):
    refused(flags(world, existing, "--lr", "-1"), capsys, existing, "--lr -1.0")
    refused(flags(world, existing, "--warmup", "9"), capsys, existing, "--warmup 9")


def test_a_bad_split_or_depth_is_reported_before_an_existing_out(world, existing, capsys):
    refused(flags(world, existing, "--depth", "99"), capsys, existing, "depth 99 is outside")
    refused(flags(world, existing, "--recurrent-layer", "0"), capsys, existing, "--recurrent-layer 0")


def test_resume_or_eval_only_against_a_replaced_model_directory(world, existing, tmp_path, capsys):
    """The run record holds a fingerprint of the base checkpoint (config.json and tensor headers)."""
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    shutil.copytree(existing, run)
    make_checkpoint(ckpt, tiny_config(num_hidden_layers=6, intermediate_size=80), seed=1,
                    tokenizer=train.load_tokenizer(world[0]))
    config = json.loads((run / "config.json").read_text())
    config["model"] = str(ckpt)  # as if the model directory had been replaced by another model
    (run / "config.json").write_text(json.dumps(config))
    refused(flags((ckpt, world[1]), run, "--resume"), capsys, run, "is not the one", "was trained on")
    refused(["--out", str(run), "--eval-only", "--device", "cpu"], capsys, run, "is not the one")


def test_a_run_from_before_fingerprints_is_refused(world, existing, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(existing, run)
    config = json.loads((run / "config.json").read_text())
    del config["model_fingerprint"]
    (run / "config.json").write_text(json.dumps(config))
    refused(["--out", str(run), "--eval-only", "--device", "cpu"], capsys, run, "older train.py", "train it again")


def test_optimizer_state_of_another_parameter_is_refused(world, existing, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(existing, run)
    with safe_open(str(run / train.CHECKPOINT), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["opt.exp_avg.gate.weight_old"] = tensors.pop("opt.exp_avg.gate.weight")
    save_file(tensors, str(run / train.CHECKPOINT), metadata=meta)
    refused(flags(world, run, "--resume"), capsys, run, "optimizer state for gate.weight_old", "not this run's")


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 0.0003)", "(default: 0.01)", "(default: dynamic)", "(default: 2048)"):
        assert shown in text, shown


def test_sample_and_eval_only_need_a_finished_run(tmp_path, capsys):
    refused(["--out", str(tmp_path / "none"), "--sample", "hi", "--device", "cpu"], capsys, tmp_path / "none",
            "no finished run")
    refused(["--out", str(tmp_path / "none"), "--eval-only", "--device", "cpu"], capsys, tmp_path / "none",
            "no finished run")


# ----------------------------------------------------------------------------------------------------------
# The same through a real process: stderr holds one line and no traceback.

@pytest.mark.parametrize("case", ["device", "vocab", "split"])
def test_refusal_in_a_subprocess(world, small_vocab, tmp_path, case):
    ckpt = small_vocab if case == "vocab" else world[0]
    extra = {"device": ["--device", "tpu"], "vocab": [], "split": ["--n-prelude", "5"]}[case]
    argv = flags((ckpt, world[1]), tmp_path / "out", *extra)  # a repeated flag: the last one wins
    proc = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=1200)  # a hang, not a slow machine
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert {"device": "tpu", "vocab": "vocabulary", "split": "--n-prelude"}[case] in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--out", "--token-cache"])
@pytest.mark.parametrize("where", ["proc", "under-a-file"])
def test_unwritable_out_or_token_cache_is_refused_before_any_work(world, tmp_path, capsys, monkeypatch, flag, where):
    """Told in one line naming the flag, before the model is loaded or anything tokenised. (As root every
    permission check passes, so the unwritable places are /proc and a path under a regular file.)"""
    (tmp_path / "a-file").write_text("x")
    bad = "/proc/ouroboros-test/run" if where == "proc" else str(tmp_path / "a-file" / "run")
    argv = flags(world, tmp_path / "out", "--token-cache", str(tmp_path / "cache"))
    argv += [flag, bad]  # argparse takes the last value
    monkeypatch.setattr(train, "load_ouroboros", lambda *a, **k: pytest.fail("loaded the model before refusing"))
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "tokenising" not in err
    line = error_line(err)
    assert line.startswith(f"error: {flag} ") and ("is a file" in line or "cannot write" in line), line
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
