"""Llama and Qwen3 (and Qwen2 again) through the one hand-written decoder, against transformers as the oracle.

Every checkpoint here is written by transformers itself (its own random model, save_pretrained), so the files,
the key names and the config.json spellings are the real ones, then loaded through our loader. Also: what the
loader refuses, the save round-trip, and the Ouroboros parts on a Llama and a Qwen3 base.
"""
import json
from pathlib import Path

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

from tiny import ROOT  # noqa: F401  (puts the repository root on sys.path)

from controller import OuroborosConfig, RecurrentCache
from load_qwen import CheckpointError, load_config, load_model, load_ouroboros, save_model

HF = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM),
      "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
# initializer_range 0.2: every layer moves the residual stream, so a wrong detail shows in the logits.
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512, initializer_range=0.2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}  # with head_dim 16 and theta 1e4, frequencies in all three bands

CASES = {
    "llama-tied-gqa": ("llama", dict(tie_word_embeddings=True)),
    "llama-untied-mha-biases": ("llama", dict(tie_word_embeddings=False, num_key_value_heads=4,
                                              attention_bias=True, mlp_bias=True)),
    "llama-3.1-rope": ("llama", dict(tie_word_embeddings=True, rope_parameters=LLAMA3 | {"rope_theta": 10000.0})),
    "llama-linear-rope": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0})),
    "qwen3-head-dim-32": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),  # 4 x 32 heads against d = 64
    "qwen3-untied-bias-mqa": ("qwen3", dict(head_dim=16, tie_word_embeddings=False, num_key_value_heads=1,
                                            attention_bias=True)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False)),
}


def hf_checkpoint(path, family: str, seed: int = 0, **overrides):
    """A random checkpoint written by transformers. Norm weights (q_norm and k_norm too) and biases are random,
    so that none is trivially 1 or 0."""
    config_cls, model_cls = HF[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**(BASE | overrides))).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return path, model


def edit_config(path, **changes) -> dict:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return config


def ids(seed=0, B=2, T=40):
    # 40 positions: long enough that RoPE scaling changes the angles noticeably
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path, hf = hf_checkpoint(tmp_path_factory.mktemp(request.param), family, **overrides)
    return request.param, path, hf


@torch.no_grad()
def test_logits_match_transformers(case):
    name, path, hf = case
    ours = load_model(path, dtype=torch.float32)
    for x in (ids(0, 1, 1), ids(1, 3, 7), ids(2, 2, 40)):
        ref = hf(x).logits
        assert ref.abs().max() > 1.0
        assert max_diff(ours(x), ref) <= 1e-4, name


@torch.no_grad()
def test_greedy_generation_matches_transformers_and_the_uncached_loop(case):
    name, path, hf = case
    ours = load_model(path, dtype=torch.float32)
    prompt, n = ids(3, 2, 5), 12
    got = ours.generate(prompt, n)
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, ref), name
    uncached = prompt
    for _ in range(n):
        uncached = torch.cat((uncached, ours(uncached)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(got, uncached)
    assert len(set(got[:, 5:].flatten().tolist())) > 3  # a real sequence, not one token repeated


@torch.no_grad()
def test_save_round_trip_loads_in_transformers(case, tmp_path):
    name, path, hf = case
    ours = load_model(path, dtype=torch.float32)
    save_model(ours, tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    assert load_config(tmp_path / "saved").model_type == ours.cfg.model_type
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    reread = HF[ours.cfg.model_type][1].from_pretrained(tmp_path / "saved", dtype=torch.float32).eval()
    x = ids(4)
    assert max_diff(reread(x).logits, hf(x).logits) <= 1e-5, name


def test_family_flags_follow_config_json(case):
    name, path, hf = case
    cfg = load_config(path)
    model = load_model(path)
    attn, mlp = model.layer(0).self_attn, model.layer(0).mlp
    bias = getattr(hf.config, "attention_bias", False)
    assert (attn.q_proj.bias is not None) == (cfg.model_type == "qwen2" or bias)
    assert (attn.o_proj.bias is not None) == (cfg.model_type != "qwen2" and bias)
    assert (mlp.down_proj.bias is not None) == bool(getattr(hf.config, "mlp_bias", False))
    assert hasattr(attn, "q_norm") == (cfg.model_type == "qwen3")
    assert cfg.head_dim == (getattr(hf.config, "head_dim", None) or hf.config.hidden_size // hf.config.num_attention_heads)


def test_llama3_scaling_in_the_older_top_level_spelling(tmp_path):
    path, hf = hf_checkpoint(tmp_path, "llama", rope_parameters=LLAMA3 | {"rope_theta": 10000.0})
    with torch.no_grad():
        ref = hf(ids()).logits
    # Llama 3.1's own config.json: top-level rope_theta, rope_scaling with rope_type, no rope_parameters
    edit_config(path, rope_parameters=None, rope_theta=10000.0, rope_scaling=LLAMA3)
    model = load_model(path)
    assert model.cfg.rope_scaling == LLAMA3
    with torch.no_grad():
        assert max_diff(model(ids()), ref) <= 1e-4
    # and the oldest: "type" instead of "rope_type", no original context (falls back to max_position_embeddings)
    edit_config(path, rope_scaling={"type": "linear", "factor": 2.0})
    assert load_config(path).rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_scaling_really_changes_the_model(tmp_path):
    # Guards the oracle comparison above: the same weights without the scaling give other logits.
    path, _ = hf_checkpoint(tmp_path, "llama", rope_parameters=LLAMA3 | {"rope_theta": 10000.0})
    scaled = load_model(path)
    edit_config(path, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with torch.no_grad():
        assert max_diff(scaled(ids()), load_model(path)(ids())) > 1e-2


REFUSED = {
    "moe model_type": (dict(model_type="qwen3_moe"), "model_type is 'qwen3_moe'"),
    "mistral": (dict(model_type="mistral"), "model_type is 'mistral'"),
    "experts": (dict(num_experts=8), "num_experts"),
    "local experts": (dict(num_local_experts=4), "num_local_experts"),
    "yarn": (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "'yarn'"),
    "dynamic": (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "'dynamic'"),
    "longrope": (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "'longrope'"),
    "llama3 missing factor": (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    "sliding window": (dict(use_sliding_window=True), "use_sliding_window"),
    "sliding layer types": (dict(layer_types=["full_attention", "sliding_attention"] * 2), "layer_types"),
    "partial rotary": (dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    "gelu": (dict(hidden_act="gelu"), "hidden_act"),
    "odd head_dim": (dict(head_dim=15), "head_dim"),
    "heads not dividing d": (dict(num_attention_heads=6, num_key_value_heads=2, head_dim=None), "must divide hidden_size"),
}


@pytest.mark.parametrize("what", list(REFUSED))
def test_unsupported_configs_are_one_line_naming_the_field(tmp_path, what):
    path, _ = hf_checkpoint(tmp_path, "llama" if what != "sliding window" else "qwen3")
    changes, needle = REFUSED[what]
    edit_config(path, **({"rope_scaling": None} | changes))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    message = str(e.value)
    assert needle in message and "\n" not in message and "config.json" in message


# ---- the Ouroboros parts on every family ------------------------------------------------------------

CFG = OuroborosConfig(n_prelude=1, recurrent_layer=2, n_coda=1, rank=8, max_depth=8)


@pytest.fixture(scope="module", params=["llama-untied-mha-biases", "llama-3.1-rope", "qwen3-head-dim-32"])
def ouro_base(request, tmp_path_factory):
    family, overrides = CASES[request.param]
    path, _ = hf_checkpoint(tmp_path_factory.mktemp(request.param), family, seed=1, **overrides)
    return path


@torch.no_grad()
def test_ouroboros_at_init_is_the_plain_looped_layer(ouro_base):
    # Zero heads (c = 0), the gate at init and the step norms at 1: by hand, h <- h + g (norm(layer(h)) - h)
    model = load_ouroboros(ouro_base, CFG).eval()
    plain = load_model(ouro_base, layers=[0, 2, 3])
    x = ids()
    cos, sin = plain.rope(0, x.shape[1], "cpu")
    h = plain.model.embed_tokens(x)
    h = plain.layer(0)(h, cos, sin)
    for _ in range(3):
        new = plain.layer(2)(h, cos, sin)
        new = new * torch.rsqrt(new.pow(2).mean(-1, keepdim=True) + plain.cfg.rms_norm_eps)
        h = h + torch.sigmoid(torch.tensor(-2.0)) * (new - h)
    expected = plain.head(plain.layer(3)(h, cos, sin))
    assert max_diff(model(x, 3), expected) <= 1e-5
    assert max_diff(model(x, 3), model(x, 1)) > 1e-3  # the depth matters


@torch.no_grad()
def test_ouroboros_bases_and_cached_generation(ouro_base):
    model = load_ouroboros(ouro_base, CFG).eval()
    assert {k for k in dict(model.named_buffers()) if k.startswith("lora_A_")} == \
        {f"lora_A_{k}" for k in ("q", "k", "v", "o", "gate", "up", "down")}
    g = torch.Generator().manual_seed(0)
    for p in model.trainable_parameters().values():  # a Controller that acts, so the cache must carry the pool
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = ids(5, 2, 6)
    got = model.generate(x, 3, 10)
    uncached = x
    for _ in range(10):
        uncached = torch.cat((uncached, model(uncached, 3)[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(got, uncached)
    # one step at a time through the cache equals the whole forward
    cache, full = RecurrentCache(model, 3), model(x, 3)
    parts = torch.cat([model(x[:, t:t + 1], 3, cache) for t in range(x.shape[1])], dim=1)
    assert max_diff(parts, full) <= 1e-4


# ---- train.py on a Llama and a Qwen3 checkpoint, and --model as a hub id --------------------------------

@pytest.fixture(scope="module", params=["llama", "qwen3"])
def family_world(request, tmp_path_factory):
    """A 6-layer checkpoint written by transformers, with a tokenizer, and a corpus (test_train's)."""
    from test_train import DOCS, byte_bpe
    root = tmp_path_factory.mktemp(f"world-{request.param}")
    extra = dict(head_dim=32) if request.param == "qwen3" else dict(attention_bias=True, rope_parameters=LLAMA3 | {"rope_theta": 1e4})
    path, _ = hf_checkpoint(root / "ckpt", request.param, seed=2, num_hidden_layers=6, **extra)
    byte_bpe(DOCS, 128).save(str(path / "tokenizer.json"))
    corpus = root / "corpus"
    corpus.mkdir()
    for i, d in enumerate(DOCS):
        (corpus / f"doc{i:02d}.txt").write_text(d)
    return path, corpus


def test_train_and_sample_on_the_family(family_world, tmp_path, capsys):
    import train
    from test_train import flags
    out = tmp_path / "run"
    assert train.main(flags(family_world, out)) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["name"].split(" (")[0] for r in rows] == ["full model", "cut baseline", "Ouroboros, depth 2"]
    assert all(0 < r["loss"] < 10 for r in rows)
    assert rows[0]["loss"] != rows[1]["loss"] != rows[2]["loss"]
    capsys.readouterr()
    assert train.main(["--out", str(out), "--sample", "the quick", "--max-new-tokens", "8", "--temperature", "0"]) == 0
    text = capsys.readouterr().out.strip()
    assert text.startswith("the quick") and len(text) > len("the quick")


def hub_cache(root, repo_id: str, files) -> Path:
    """The Hugging Face cache layout, laid out by hand: refs/main names a commit, whose snapshot folder links each
    file to its blob."""
    import hashlib
    import os
    import shutil
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    for d in (repo / "refs", snapshot, blobs):
        d.mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for f in files:
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def run_offline(args, cache, *extra_env):
    import os
    import subprocess
    import sys
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("family_world", ["llama"], indirect=True)
def test_model_as_a_hub_id_reads_the_cache_offline(family_world, tmp_path):
    from test_train import flags
    path, corpus = family_world
    snapshot = hub_cache(tmp_path / "hub", "acme/tiny-llama", sorted(path.iterdir()))
    out = tmp_path / "run"
    argv = flags(family_world, out)
    argv[argv.index("--model") + 1] = "acme/tiny-llama"
    done = run_offline(argv, tmp_path / "hub")
    assert done.returncode == 0, done.stderr
    assert "full model" in done.stdout
    assert json.loads((out / "config.json").read_text())["model"] == str(snapshot)  # the run records the snapshot
    # not in the cache: one line, exit 2, nothing written
    argv = flags(family_world, tmp_path / "other")
    argv[argv.index("--model") + 1] = "acme/not-cached"
    done = run_offline(argv, tmp_path / "hub")
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "acme/not-cached" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "Hugging Face cache" in lines[0]
    assert not (tmp_path / "other").exists()


def test_a_hub_id_fetches_only_what_a_run_reads():
    # huggingface_hub's own filter, applied to the files of a typical repository
    from huggingface_hub.utils import filter_repo_objects
    from load_qwen import HUB_FILES
    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "vocab.json", "merges.txt", "pytorch_model.bin", "README.md", "model.gguf",
            "onnx/model.onnx", "original/consolidated.00.pth"]
    assert sorted(filter_repo_objects(repo, allow_patterns=HUB_FILES)) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json", "tokenizer.json"]


def test_a_directory_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    from load_qwen import resolve_model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acme" / "local").mkdir(parents=True)
    assert resolve_model("acme/local") == Path("acme/local")  # exists: a directory, not a hub id
    assert resolve_model("/abs/nowhere") == Path("/abs/nowhere")  # not owner/name: left to the directory check
