"""The demo path (`python train.py` with no --model), shortened: a few stdlib files, a few steps."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny  # (also puts the project on sys.path)
import data
import demo
import study
import train
from flags import build_parser
from load_qwen import load_config, load_model, load_tokenizer



@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    corpus = tiny.stdlib_corpus(root / "corpus")
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
    argv = ["--data", str(corpus), "--out", str(root / "run"), "--pretrain-steps", "3", "--steps", "2",
            "--seq-len", "32", "--batch-size", "2", "--eval-windows", "2", "--depth", "2", "--device", "cpu",
            "--dev-fraction", "0.15", "--test-fraction", "0.2", "--warmup", "1"]
    assert train.main(argv) == 0
    yield root, corpus, argv
    mp.undo()


def test_demo_prints_the_table(demo_run, capsys):
    root, _, _ = demo_run
    rows = json.loads((root / "run" / "results.json").read_text())
    names = [r["name"] for r in rows]
    assert names[0].startswith("full model") and names[1].startswith("cut baseline")
    assert names[2].startswith("gate + norm only") and names[3].startswith("Ouroboros")
    assert rows[2]["trainable"] < rows[3]["trainable"]  # the control has no Controller
    for r in rows:
        assert np.isfinite(r["loss"])
    for arm in ("none", "dynamic"):
        assert (root / "run" / arm / "checkpoint.safetensors").is_file()


def test_base_is_cached_in_xdg_cache_and_loads_in_transformers(demo_run):
    root, _, _ = demo_run
    bases = list((root / "cache" / "ouroboros").glob("base-*/model"))
    assert len(bases) == 1
    transformers = pytest.importorskip("transformers")
    ours = load_model(bases[0], torch.float32)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(bases[0], torch_dtype=torch.float32)
    ids = torch.tensor([load_tokenizer(bases[0]).encode("def f(x):\n    return x + 1\n").ids])
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_second_run_reuses_the_cache(demo_run, monkeypatch):
    root, _, argv = demo_run
    calls = []
    monkeypatch.setattr(data, "train_bpe", lambda *a: calls.append("bpe"))
    monkeypatch.setattr(data, "tokenize", lambda *a: calls.append("tokenize"))
    out = root / "run2"
    # The arms' flags (seed, batch size, learning rate) are not the base's recipe: the cached base serves them.
    argv = [a if a != str(root / "run") else str(out) for a in argv] + ["--batch-size", "3", "--seed", "1", "--lr", "1e-3"]
    assert train.main(argv) == 0
    assert calls == []  # tokenizer, tokens and base all came from the cache
    assert len(list((root / "cache" / "ouroboros").glob("base-*"))) == 1
    assert not list((root / "cache" / "ouroboros").glob("base-*/pretrain/*.tmp"))


def test_base_recipe_keys_the_cache(demo_run, monkeypatch):
    root, _, argv = demo_run
    monkeypatch.setitem(demo.DEMO_PRETRAIN, "lr", demo.DEMO_PRETRAIN["lr"] / 2)
    argv = [a if a != str(root / "run") else str(root / "run3") for a in argv]
    assert train.main(argv) == 0
    assert len(list((root / "cache" / "ouroboros").glob("base-*/model"))) == 2  # another recipe, another base


def test_the_base_follows_the_split_and_lives_in_token_cache(demo_run, tmp_path):
    root, corpus, argv = demo_run
    args = build_parser().parse_args([*argv, "--token-cache", str(tmp_path / "tokens"), "--precision", "fp32"])
    one = demo.demo_base(args, tmp_path / "tokens", torch.device("cpu"), train.train)
    args.test_fraction = 0.25  # another split: the base must not have seen the new test documents
    other = demo.demo_base(args, tmp_path / "tokens", torch.device("cpu"), train.train)
    assert one != other and one.parent.parent == other.parent.parent == tmp_path / "tokens" / "demo"
    assert not list(Path.cwd().glob("base-*"))


def test_the_study_base_is_a_larger_sibling_with_its_own_cache_entry(demo_run, tmp_path):
    root, corpus, argv = demo_run
    args = build_parser().parse_args([*argv, "--token-cache", str(tmp_path / "tokens"), "--precision", "fp32"])
    small = demo.demo_base(args, tmp_path / "tokens", torch.device("cpu"), train.train)
    large = demo.demo_base(args, tmp_path / "tokens", torch.device("cpu"), train.train, study.STUDY_BASE)
    assert small != large
    assert load_config(small).num_hidden_layers == demo.DEMO_BASE["num_hidden_layers"] == 6
    assert load_config(large).num_hidden_layers == study.STUDY_BASE["num_hidden_layers"] == 8


def test_demo_with_steps_0_prints_the_references(demo_run, capsys):
    root, _, argv = demo_run
    argv = [a if a != str(root / "run") else str(root / "run0") for a in argv] + ["--steps", "0"]
    capsys.readouterr()
    assert train.main(argv) == 0
    assert capsys.readouterr().out.count("cut baseline (3 layers) ") == 2  # dev and test


def test_held_out_files_never_appear_in_training(demo_run):
    _, corpus, _ = demo_run
    parts = {"train": [], "dev": [], "test": []}
    for doc in data.read_documents(corpus):
        parts[data.split_of(doc, 0.15, 0.2)].append(doc.text)
    held_out = parts["dev"] + parts["test"]
    assert parts["train"] and parts["dev"] and parts["test"]
    assert not set(parts["train"]) & set(held_out)
    tok = load_tokenizer(next((demo_run[0] / "cache" / "ouroboros").glob("base-*/model")))
    stream = data.token_streams(corpus, tok, 0.15, 0.2, demo_run[0] / "tokcheck")["train"].tobytes()
    for text in held_out:  # no held-out file's token sequence is inside the training stream
        ids = np.asarray(tok.encode(text).ids[:64], dtype=np.uint32)
        assert ids.tobytes() not in stream


def test_stdlib_corpus_is_the_default(monkeypatch):
    names = [d.name for d in data.read_documents(None)]
    assert "os.py" in names and not any(n.startswith("test/") for n in names)
    assert names == sorted(names)


def test_data_too_small_to_pretrain_the_base_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"m{i}.py").write_text(f"x{i} = {i} + 1\n")
    out = tmp_path / "run"
    argv = ["--data", str(corpus), "--out", str(out), "--seq-len", "4", "--dev-fraction", "0.2", "--test-fraction", "0.2",
            "--device", "cpu"]
    capsys.readouterr()
    assert train.main(argv) == 2
    err = [l for l in capsys.readouterr().err.replace("\r", "\n").splitlines() if l.startswith("error")]
    assert len(err) == 1 and "too few to pretrain the demo base" in err[0] and "--data" in err[0], err
    assert not out.exists()
