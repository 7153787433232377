"""The checkpoint loader and writer: strictness, laziness, config spellings, and errors that say what is wrong."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Qwen2ForCausalLM

import load_qwen
from load_qwen import CheckpointError, load_config, load_model, load_tokenizer, save_model
from tiny import make_checkpoint, random_model, tiny_config

LIVELY = dict(initializer_range=0.2)  # every layer matters to the logits (see test_model.py)
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def hf_logits(path, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).float()


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def edit_config(path, **changes):
    """Sets config.json keys; a value of None deletes the key."""
    file = path / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))
    return config


def edit_tensors(file, change):
    tensors = load_file(str(file))
    change(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A read-only tied fp32 checkpoint shared by the tests that do not modify it."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_config(**LIVELY), seed=1)


# ---- the loaded model ---------------------------------------------------------------------------

def test_loaded_model_is_frozen_and_in_eval_mode(ckpt):
    model = load_model(ckpt)
    assert not model.training
    params = list(model.parameters())
    assert len(params) > 0 and not any(p.requires_grad for p in params)
    assert not any(p.is_meta for p in params)


def test_config_values_come_from_config_json(tmp_path):
    cfg = tiny_config(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-3, rope_theta=123.0,
                      tie_word_embeddings=False)
    path = make_checkpoint(tmp_path / "ckpt", cfg)
    got = load_config(path)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "tie_word_embeddings"):
        assert getattr(got, key) == getattr(cfg, key), key
    model = load_model(path)
    assert model.layer_ids == [0, 1, 2]
    assert model.lm_head.weight.shape == (96, 48)
    assert model.layer(2).mlp.up_proj.weight.shape == (80, 48)
    assert model.layer(0).self_attn.k_proj.weight.shape == (16, 48)
    assert model.layer(0).input_layernorm.eps == 1e-3 and model.model.norm.eps == 1e-3
    assert max_diff(logits(model, IDS % 96), hf_logits(path, IDS % 96)) <= 1e-4


@pytest.mark.parametrize("key,value", [("rms_norm_eps", 0.3), ("rope_theta", 50.0)])
def test_eps_and_theta_are_read_from_config(tmp_path, key, value):
    base = make_checkpoint(tmp_path / "base", tiny_config(**LIVELY))
    changed = tmp_path / "changed"
    shutil.copytree(base, changed)
    if key == "rope_theta":
        edit_config(changed, rope_theta=value, rope_parameters={"rope_type": "default", "rope_theta": value})
    else:
        edit_config(changed, **{key: value})
    model = load_model(changed)
    assert getattr(model.cfg, key) == value
    assert max_diff(logits(model), logits(load_model(base))) > 1e-2  # the value changes the computation
    assert max_diff(logits(model), hf_logits(changed)) <= 1e-4  # exactly as transformers reads it


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_tying_comes_from_config(tmp_path, tied):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(tie_word_embeddings=tied))
    model = load_model(path)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    stored = load_file(str(path / "model.safetensors"))
    assert ("lm_head.weight" in stored) == (not tied)
    if not tied:
        assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_dtype_defaults_to_config_and_can_be_overridden(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(), dtype=torch.bfloat16)
    assert load_config(path).torch_dtype == "bfloat16"
    assert {p.dtype for p in load_model(path).parameters()} == {torch.bfloat16}
    fp32 = load_model(path, dtype=torch.float32)
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    # Upcasting is exact: the fp32 tensors hold the bf16 values.
    assert torch.equal(fp32.layer(1).mlp.down_proj.weight, load_model(path).layer(1).mlp.down_proj.weight.float())


def test_tied_checkpoint_may_store_the_head_and_old_rope_buffers(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(**LIVELY))
    before = logits(load_model(path))

    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    edit_tensors(path / "model.safetensors", add)
    assert torch.equal(logits(load_model(path)), before)


# ---- config spellings ---------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["top-level", "rope_parameters"])
def test_rope_theta_spellings(tmp_path, spelling):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(**LIVELY, rope_theta=10000.0))
    if spelling == "top-level":  # Qwen2.5's own files
        edit_config(path, rope_theta=77.0, rope_parameters=None)
    else:  # what recent transformers write
        edit_config(path, rope_theta=None, rope_parameters={"rope_type": "default", "rope_theta": 77.0})
    model = load_model(path)
    assert model.cfg.rope_theta == 77.0
    assert max_diff(logits(model), hf_logits(path)) <= 1e-4


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
def test_dtype_spellings(tmp_path, key):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(), dtype=torch.bfloat16)
    edit_config(path, **{"torch_dtype": None, "dtype": None, key: "bfloat16"})
    assert load_config(path).torch_dtype == "bfloat16"
    assert next(load_model(path).parameters()).dtype == torch.bfloat16
    edit_config(path, torch_dtype=None, dtype=None)  # neither: fp32, transformers' default too
    assert next(load_model(path).parameters()).dtype == torch.float32


def test_config_without_num_key_value_heads_means_no_gqa(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(**LIVELY, num_attention_heads=4, num_key_value_heads=4))
    ref = hf_logits(path)
    # Absent: as many kv heads as heads. (transformers' DecoderConfig would assume 32 here, which is not even a
    # divisor of 4 heads, so the oracle is the same checkpoint with the key present.)
    edit_config(path, num_key_value_heads=None)
    model = load_model(path)
    assert model.cfg.num_key_value_heads == 4
    assert max_diff(logits(model), ref) <= 1e-4
    # null: transformers maps it to num_attention_heads, and so must we.
    config = edit_config(path)
    config["num_key_value_heads"] = None
    (path / "config.json").write_text(json.dumps(config))
    model = load_model(path)
    assert model.cfg.num_key_value_heads == 4
    assert max_diff(logits(model), hf_logits(path)) <= 1e-4


def test_config_without_tie_word_embeddings_is_untied_like_transformers(tmp_path):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(**LIVELY, tie_word_embeddings=False))
    edit_config(path, tie_word_embeddings=None)
    model = load_model(path)
    assert model.cfg.tie_word_embeddings is False
    assert max_diff(logits(model), hf_logits(path)) <= 1e-4


def test_qwen25_style_config(tmp_path):
    # The keys a released Qwen2.5 config.json has: no head_dim, no rope_parameters, extra generation keys.
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(**LIVELY))
    config = json.loads((path / "config.json").read_text())
    qwen25 = {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                     "rope_theta", "rms_norm_eps", "tie_word_embeddings")}
    qwen25.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_act="silu", torch_dtype="bfloat16",
                  attention_dropout=0.0, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
                  max_window_layers=4, rope_scaling=None, sliding_window=512, use_sliding_window=False,
                  use_cache=True, transformers_version="4.43.1")
    (path / "config.json").write_text(json.dumps(qwen25))
    model = load_model(path, dtype=torch.float32)
    assert model.cfg.head_dim == 16 and model.cfg.torch_dtype == "bfloat16"
    assert model.cfg.extra["bos_token_id"] == 1
    assert max_diff(logits(model), hf_logits(path)) <= 1e-4


# ---- loading some layers ------------------------------------------------------------------------

class RecordingSafeOpen:
    """Stands in for safetensors.safe_open and records every tensor whose data is read."""

    def __init__(self, real, read: list):
        self.real, self.read = real, read

    def __call__(self, *args, **kwargs):
        return _RecordingHandle(self.real(*args, **kwargs), self.read)


class _RecordingHandle:
    def __init__(self, handle, read):
        self.handle, self.read = handle, read

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def get_tensor(self, key):
        self.read.append(key)
        return self.handle.get_tensor(key)

    def get_slice(self, key):
        return _RecordingSlice(self.handle.get_slice(key), key, self.read)


class _RecordingSlice:
    def __init__(self, piece, key, read):
        self.piece, self.key, self.read = piece, key, read

    def __getattr__(self, name):  # get_shape, get_dtype: header only
        return getattr(self.piece, name)

    def __getitem__(self, index):
        self.read.append(self.key)
        return self.piece[index]


@pytest.mark.parametrize("shards", [1, 3])
def test_loading_some_layers_reads_only_those(tmp_path, monkeypatch, shards):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(**LIVELY), shards=shards)
    read = []
    monkeypatch.setattr(load_qwen, "safe_open", RecordingSafeOpen(load_qwen.safe_open, read))
    model = load_model(path, layers=[0, 3])
    assert model.layer_ids == [0, 3]
    assert not [k for k in read if k.startswith(("model.layers.1.", "model.layers.2."))]
    # The recorder works: everything the subset needs was read through it, once.
    assert sorted(read) == sorted(model.state_dict().keys() - {"lm_head.weight"})
    assert any(k.startswith("model.layers.3.") for k in read)


def test_subset_forward_equals_running_those_layers_by_hand(ckpt):
    full, sub = load_model(ckpt), load_model(ckpt, layers=[0, 3])
    assert {k.split(".")[2] for k in sub.state_dict() if k.startswith("model.layers.")} == {"0", "3"}
    with torch.no_grad():
        cos, sin = full.rope(0, IDS.shape[1], "cpu")
        x = full.model.embed_tokens(IDS)
        x = full.layer(3)(full.layer(0)(x, cos, sin), cos, sin)
        by_hand = full.head(x)
    assert torch.equal(logits(sub), by_hand)
    assert max_diff(logits(sub), logits(full)) > 1e-2  # layers 1 and 2 mattered


def test_subset_layers_run_in_the_given_order(ckpt):
    full, sub = load_model(ckpt), load_model(ckpt, layers=[3, 0])
    assert sub.layer_ids == [3, 0]
    with torch.no_grad():
        cos, sin = full.rope(0, IDS.shape[1], "cpu")
        by_hand = full.head(full.layer(0)(full.layer(3)(full.model.embed_tokens(IDS), cos, sin), cos, sin))
    assert torch.equal(logits(sub), by_hand)
    assert max_diff(logits(sub), logits(load_model(ckpt, layers=[0, 3]))) > 1e-3


def test_loading_a_layer_that_does_not_exist_fails(ckpt):
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt, layers=[0, 4])
    assert "\n" not in str(e.value) and str(ckpt) in str(e.value) and "layer 4" in str(e.value)


# ---- save_model ---------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_model_loads_in_transformers_and_round_trips(tmp_path, tied):
    source = make_checkpoint(tmp_path / "src", tiny_config(**LIVELY, tie_word_embeddings=tied), seed=3)
    model = load_model(source)
    out = tmp_path / "out"
    save_model(model, out)
    assert not list(out.glob("*.tmp"))
    assert max_diff(hf_logits(out), logits(model)) <= 1e-4
    again = load_model(out)
    assert again.cfg == model.cfg
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again.lm_head.weight is again.model.embed_tokens.weight) == tied


def test_save_model_keeps_dtype_and_extra_config_keys(tmp_path):
    path = make_checkpoint(tmp_path / "src", tiny_config(), dtype=torch.bfloat16)
    edit_config(path, bos_token_id=1, eos_token_id=2)
    model = load_model(path)
    save_model(model, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["bos_token_id"] == 1 and config["eos_token_id"] == 2
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16


def test_save_model_refuses_a_subset(tmp_path, ckpt):
    with pytest.raises(ValueError, match="some layers"):
        save_model(load_model(ckpt, layers=[0]), tmp_path / "out")


def tiny_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "loop"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_tokenizer_round_trips_through_save_model(tmp_path):
    save_model(random_model(tiny_config()), tmp_path, tokenizer=tiny_tokenizer())
    assert load_tokenizer(tmp_path).encode("hello loop world zzz").ids == [1, 3, 2, 0]


# ---- bad checkpoints ----------------------------------------------------------------------------
# Each breaker damages a fresh checkpoint and returns (the path the message must name, words it must hold).

def _missing_dir(p):
    shutil.rmtree(p)
    return p, "no such directory"


def _missing_config(p):
    (p / "config.json").unlink()
    return p / "config.json", "missing"


def _malformed_config(p):
    (p / "config.json").write_text('{"model_type": "qwen2",')
    return p / "config.json", "not valid JSON"


def _config_not_an_object(p):
    (p / "config.json").write_text("[1, 2]")
    return p / "config.json", "JSON object"


def _missing_weights(p):
    (p / "model.safetensors").unlink()
    return p, "weights are missing"


def _wrong_model_type(p):
    edit_config(p, model_type="gemma")
    return p / "config.json", "model_type is 'gemma'"


def _bad_head_count(p):
    edit_config(p, num_attention_heads=5)
    return p / "config.json", "num_attention_heads"


def _bad_kv_head_count(p):
    edit_config(p, num_key_value_heads=3)
    return p / "config.json", "num_key_value_heads"


def _size_not_an_int(p):
    edit_config(p, hidden_size="64")
    return p / "config.json", "hidden_size must be a positive integer"


def _unknown_dtype(p):
    edit_config(p, torch_dtype="float99")
    return p / "config.json", "float99"


def _rope_scaling(p):
    edit_config(p, rope_scaling={"type": "yarn", "factor": 4.0})
    return p / "config.json", "rope_scaling type 'yarn' is not supported"


def _sliding_window(p):
    edit_config(p, use_sliding_window=True)
    return p / "config.json", "sliding-window"


def _wrong_activation(p):
    edit_config(p, hidden_act="gelu")
    return p / "config.json", "hidden_act"


def _missing_tensor(p):
    edit_tensors(p / "model.safetensors", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    return p, "model.layers.2.mlp.up_proj.weight is missing"


def _missing_untied_head(p):
    edit_config(p, tie_word_embeddings=False)
    return p, "lm_head.weight is missing"


def _wrong_shape(p):
    edit_tensors(p / "model.safetensors", lambda t: t.update({"model.layers.1.self_attn.k_proj.bias": torch.zeros(64)}))
    return p / "model.safetensors", "model.layers.1.self_attn.k_proj.bias has shape [64]"


def _extra_tensor(p):
    edit_tensors(p / "model.safetensors", lambda t: t.update({"model.layers.0.self_attn.extra": torch.zeros(3)}))
    return p / "model.safetensors", "unexpected tensor model.layers.0.self_attn.extra"


def _extra_layer(p):
    # Layer 4 in a 4-layer config is not "a layer we chose not to load"; the config is wrong.
    edit_tensors(p / "model.safetensors", lambda t: t.update({"model.layers.4.mlp.up_proj.weight": torch.zeros(96, 64)}))
    return p / "model.safetensors", "unexpected tensor model.layers.4.mlp.up_proj.weight"


def _truncated(p):
    file = p / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    return file, "truncated or corrupted"


def _corrupted_header(p):
    file = p / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"#" * 32
    file.write_bytes(bytes(data))
    return file, "truncated or corrupted"


def _huge_header_length(p):
    file = p / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    file.write_bytes(bytes(data))
    return file, "truncated or corrupted"


def _empty_file(p):
    (p / "model.safetensors").write_bytes(b"")
    return p / "model.safetensors", "truncated or corrupted"


BREAKERS = [_missing_dir, _missing_config, _malformed_config, _config_not_an_object, _missing_weights,
            _wrong_model_type, _bad_head_count, _bad_kv_head_count, _size_not_an_int, _unknown_dtype, _rope_scaling,
            _sliding_window, _wrong_activation, _missing_tensor, _missing_untied_head, _wrong_shape, _extra_tensor,
            _extra_layer, _truncated, _corrupted_header, _huge_header_length, _empty_file]


def assert_one_line_error(path, named, words):
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message, message
    assert str(named) in message, message
    assert words in message, message


@pytest.mark.parametrize("breaker", BREAKERS, ids=lambda f: f.__name__.strip("_"))
def test_bad_checkpoint_fails_with_one_line_naming_the_file(tmp_path, breaker):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config())
    load_model(path)  # intact, it loads
    named, words = breaker(path)
    assert_one_line_error(path, named, words)


def _missing_shard(p):
    shard = p / "model-00002-of-00003.safetensors"
    shard.unlink()
    return shard, "missing (listed in model.safetensors.index.json)"


def _index_points_elsewhere(p):
    index = p / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    key = next(k for k, v in data["weight_map"].items() if v == "model-00001-of-00003.safetensors")
    data["weight_map"][key] = "model-00003-of-00003.safetensors"
    index.write_text(json.dumps(data))
    return p / "model-00003-of-00003.safetensors", f"does not hold tensor {key}"


def _index_without_weight_map(p):
    (p / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    return p / "model.safetensors.index.json", "no 'weight_map'"


def _malformed_index(p):
    (p / "model.safetensors.index.json").write_text("{")
    return p / "model.safetensors.index.json", "not valid JSON"


def _truncated_shard(p):
    shard = p / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    return shard, "truncated or corrupted"


@pytest.mark.parametrize("breaker", [_missing_shard, _index_points_elsewhere, _index_without_weight_map,
                                     _malformed_index, _truncated_shard], ids=lambda f: f.__name__.strip("_"))
def test_bad_sharded_checkpoint_fails_with_one_line_naming_the_file(tmp_path, breaker):
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(), shards=3)
    load_model(path)
    named, words = breaker(path)
    assert_one_line_error(path, named, words)


def test_tokenizer_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json: missing") as e:
        load_tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value)
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(CheckpointError, match="not a valid tokenizer") as e:
        load_tokenizer(tmp_path)
    assert "\n" not in str(e.value)
