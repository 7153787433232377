"""Reads and writes Hugging Face-layout checkpoint directories of Qwen2 / Qwen2.5, Llama and Qwen3 directly:
config.json, safetensors shards, tokenizer.json. No transformers. A hub id is resolved to such a directory first.
Also the atomic file writes (atomic_write, publish) that every module uses.

Tensors are read lazily with `safe_open` (memory-mapped), so loading some layers never reads the others.
Loading is strict: every checkpoint tensor is used or deliberately skipped, every parameter is filled,
every shape is checked. Problems raise `CheckpointError` with one line naming the file and the fix.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from controller import ConfigError, Ouroboros, svd_bases
from model import PROJECTIONS, Decoder, DecoderConfig

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")  # a per-layer tensor's name; group 1 is the layer index


class CheckpointError(Exception):
    """A checkpoint directory that cannot be used; the message says which file and what to do."""


def _check_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; pass a checkpoint directory "
                              "(the one holding config.json and *.safetensors)")
    return path


# A hub id is owner/name; anything else (or an existing path) is a directory.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# What a run reads from a hub repository: never the other formats (.bin, .gguf, .onnx) repositories also hold.
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json"]


def resolve_model(name: str) -> Path:
    """--model: a checkpoint directory, or a hub id (Qwen/Qwen3-0.6B) resolved through huggingface_hub to its
    snapshot in the user's cache (downloading only HUB_FILES, once; HF_HUB_OFFLINE=1 reads the cache alone)."""
    path = Path(name).expanduser()
    # An existing path wins over a hub id spelled the same; a name that is no id goes on to _check_dir as a path.
    if path.exists() or not HUB_ID.fullmatch(name):
        return path
    # Each `from None` below drops the hub's traceback: the one-line message says what to do.
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))  # cached files are not fetched again
    except GatedRepoError:
        raise CheckpointError(f"--model {name}: the repository is gated; accept its terms on the hub and log in "
                              "(hf auth login), or pass a local directory") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"--model {name}: no such directory, and no such repository on the hub (or it is "
                              "private: log in with hf auth login)") from None
    except LocalEntryNotFoundError:  # neither in the cache nor downloadable
        how = "HF_HUB_OFFLINE is set" if hub_constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        raise CheckpointError(f"--model {name}: not in the Hugging Face cache ({hub_constants.HF_HUB_CACHE}) and {how}; "
                              f"download it on a machine with a network (hf download {name}) into that cache, "
                              "or pass a checkpoint directory") from None
    except OSError as e:  # the cache cannot be written, the connection broke mid-download
        raise CheckpointError(f"--model {name}: could not fetch it from the hub ({e}); try again, or pass a "
                              "checkpoint directory") from None


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the directory is not a complete Hugging Face checkpoint")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); download the file again") from None
    # Valid JSON can still be a list or a string; a config and an index are objects.
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object; download the file again")
    return data


# The families this decoder reads, with the transformers class that writes and reads the same files.
FAMILIES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED = "qwen2 (Qwen2, Qwen2.5), llama (Llama 2, 3, 3.1, 3.2, SmolLM2) or qwen3 (dense Qwen3)"


def _positive(file: Path, key: str, v, kind=(int, float)):
    # bool is a subclass of int (true would pass as 1); `not v > 0` rather than `v <= 0` also rejects NaN.
    if not isinstance(v, kind) or isinstance(v, bool) or not v > 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise CheckpointError(f"{file}: {key} must be {what}, found {v!r}")
    return v


def _rope(file: Path, raw: dict) -> tuple[float, dict | None]:
    """rope_theta and the scaling dict, from either spelling: the older top-level rope_theta / rope_scaling, or
    the newer rope_parameters (theta and scaling in one dict)."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params  # a non-empty rope_scaling wins; null falls through
    field = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"  # errors name the key the file used
    kind = scaling.get("rope_type", scaling.get("type", "default"))  # 'type': the older name of 'rope_type'
    # Absent from both: DecoderConfig's default (Qwen2.5's 1e6).
    theta = raw.get("rope_theta", params.get("rope_theta", DecoderConfig.rope_theta))
    # Some models rotate only a fraction of each head; apply_rope rotates all of head_dim.
    if scaling.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{file}: partial_rotary_factor is not supported; every dimension of a head must rotate")
    if kind == "default":
        return theta, None
    # The keys each scaling needs, as model.rope_frequencies reads them.
    needs = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}.get(kind)
    if needs is None:
        raise CheckpointError(f"{file}: {field} type {kind!r} is not supported; only plain RoPE, 'llama3' and "
                              "'linear' scaling are")
    for key in needs:
        _positive(file, f"{field}.{key}", scaling.get(key))
    kept = {"rope_type": kind} | {k: scaling[k] for k in needs}  # only what rope_frequencies reads
    if kind == "llama3":  # absent: transformers takes max_position_embeddings, and so do we
        context = scaling.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
        kept["original_max_position_embeddings"] = _positive(file, f"{field}.original_max_position_embeddings", context, int)
        # rope_frequencies divides by high_freq_factor - low_freq_factor to blend between the band's edges.
        if kept["high_freq_factor"] <= kept["low_freq_factor"]:
            raise CheckpointError(f"{file}: {field}.high_freq_factor must exceed low_freq_factor")
    return theta, kept


def load_config(path) -> DecoderConfig:
    path = _check_dir(Path(path))
    file = path / "config.json"
    raw = _read_json(file)
    family = raw.get("model_type")
    if family not in FAMILIES:
        raise CheckpointError(f"{file}: model_type is {family!r}; supported: {SUPPORTED}")
    # A nonzero expert count means routed MLPs, which Decoder does not have (0 or null: dense).
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if raw.get(key):
            raise CheckpointError(f"{file}: {key} is {raw[key]!r}: mixture-of-experts models are not supported")
    # Qwen2.5's configs give a sliding_window size yet switch it off: only the switch or a layer_types entry counts.
    if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or []):
        key = "use_sliding_window" if raw.get("use_sliding_window") else "layer_types"
        raise CheckpointError(f"{file}: {key} switches on sliding-window attention, which is not supported; "
                              "use a checkpoint with full attention in every layer")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file}: hidden_act {raw['hidden_act']!r} is not supported (all three families use 'silu')")
    values = dict(raw)  # a copy: raw stays as read, for `extra` below
    values["rope_theta"], values["rope_scaling"] = _rope(file, raw)
    # Newer transformers write `dtype`; with neither key, float32, PyTorch's default.
    values["torch_dtype"] = raw.get("torch_dtype", raw.get("dtype", "float32"))
    # The name must be a dtype attribute of torch: this rejects 'auto', typos, and attributes that are not dtypes.
    if not isinstance(getattr(torch, str(values["torch_dtype"]), None), torch.dtype):
        raise CheckpointError(f"{file}: torch_dtype {values['torch_dtype']!r} is not a torch dtype")
    if values.get("num_key_value_heads") is None:  # absent or null: no GQA (transformers maps null the same way)
        values["num_key_value_heads"] = raw.get("num_attention_heads")
    if values.get("head_dim") is None and family == "qwen3":
        values["head_dim"] = 128  # transformers' Qwen3 default; every released Qwen3 states it
    values.setdefault("tie_word_embeddings", False)  # transformers' default for all three when the key is absent
    # head_dim is checked only when given; otherwise DecoderConfig derives it as hidden_size // num_attention_heads.
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads") + (("head_dim",) if values.get("head_dim") is not None else ()):
        _positive(file, key, values.get(key), int)
    for key in ("rope_theta", "rms_norm_eps"):  # absent or null: the default
        if values.get(key) is not None:
            _positive(file, key, values[key])
    if values.get("head_dim") is None and values["hidden_size"] % values["num_attention_heads"]:
        raise CheckpointError(f"{file}: num_attention_heads must divide hidden_size (or head_dim must be given)")
    # Grouped-query attention: each key/value head serves the same number of query heads.
    if values["num_attention_heads"] % values["num_key_value_heads"]:
        raise CheckpointError(f"{file}: num_attention_heads must be a multiple of num_key_value_heads")
    # The family decides where the biases and norms are (transformers' Qwen2 hard-codes q/k/v bias, no o bias).
    bias = bool(raw.get("attention_bias", False))  # Llama, Qwen3: one key for q, k, v and o together
    flags = dict(qkv_bias=family == "qwen2" or bias, o_bias=family != "qwen2" and bias,
                 mlp_bias=family == "llama" and bool(raw.get("mlp_bias", False)), qk_norm=family == "qwen3")
    # Keys with a field go to DecoderConfig (null: the field's default; the bias and norm flags from the family);
    # every other key (bos_token_id, ...) is kept in `extra` for save_model, except the four translated above.
    names = {f.name for f in dataclasses.fields(DecoderConfig)} - {"extra"}
    kept = {k: v for k, v in values.items() if k in names and v is not None} | flags
    extra = {k: v for k, v in raw.items() if k not in names | {"rope_parameters", "dtype", "attention_bias", "mlp_bias"}}
    cfg = DecoderConfig(**kept, extra=extra)
    if cfg.head_dim % 2:
        raise CheckpointError(f"{file}: head_dim {cfg.head_dim} is odd; RoPE rotates pairs of dimensions")
    return cfg


def config_dtype(cfg: DecoderConfig) -> torch.dtype:
    return getattr(torch, cfg.torch_dtype)  # 'bfloat16' -> torch.bfloat16


class Checkpoint:
    """A lazy view of a (possibly sharded) safetensors checkpoint: tensor names, shapes, and reads on demand."""

    def __init__(self, path):
        self.path = _check_dir(Path(path))
        # Large checkpoints are sharded: an index maps every tensor name to the shard file that holds it.
        index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map'; download the file again")
            files = sorted(set(weight_map.values()))  # each shard once, in a fixed order
        elif single.is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json; "
                                  "the weights are missing from the checkpoint directory")
        self.handles, self.where = {}, {}  # shard file -> open handle; tensor name -> shard file
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (listed in {index.name}); download the missing shard")
            # Parses the header only; the tensor data is memory-mapped and read when a tensor is asked for.
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                                      "it is truncated or corrupted, download it again") from None
            self.handles[name] = handle
            # Where each tensor is comes from the shards' own headers; the index is only checked against them.
            for key in handle.keys():
                self.where[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.where.get(key) != name:
                    raise CheckpointError(f"{self.path / name}: does not hold tensor {key} listed in {index.name}; "
                                          "the shards do not match the index, download them again")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())  # from the header: no data is read

    def get(self, key: str, dtype: torch.dtype | None = None, device="cpu", shape=None) -> torch.Tensor:
        if key not in self.where:
            raise CheckpointError(f"{self.path}: tensor {key} is missing; the checkpoint is incomplete")
        file = self.path / self.where[key]
        try:
            t = self.handles[self.where[key]].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {key} ({e}); the file is corrupted, download it again") from None
        # An integer tensor would be cast silently to float by .to(dtype) below; weights are never integers.
        if not t.is_floating_point():
            raise CheckpointError(f"{file}: tensor {key} is {str(t.dtype).removeprefix('torch.')}; the weights are "
                                  "floating point, so the file is not a model checkpoint or is damaged, download it again")
        # load_ouroboros passes the expected shape of a removed layer's projection, a tensor read() never sees.
        if shape is not None and t.shape != shape:
            raise CheckpointError(f"{file}: tensor {key} has shape {list(t.shape)}, config.json implies {list(shape)}; "
                                  "the weights do not match the config")
        return t.to(device=device, dtype=dtype or t.dtype)  # no copy when both already match

    def read(self, expected: dict[str, tuple], skip, dtype, device) -> dict[str, torch.Tensor]:
        """Reads exactly `expected` (name -> shape). Every other tensor must satisfy `skip(name)`."""
        # Every name is checked before any data is read, so a mismatched checkpoint fails at once.
        for key in self.where:
            if key not in expected and not skip(key):
                raise CheckpointError(f"{self.path / self.where[key]}: unexpected tensor {key}; "
                                      "the checkpoint does not match config.json")
        state = {}
        for key, shape in expected.items():
            if key not in self.where:
                raise CheckpointError(f"{self.path}: tensor {key} is missing; the checkpoint is incomplete")
            if self.shape(key) != tuple(shape):  # from the header, before the data is read
                raise CheckpointError(f"{self.path / self.where[key]}: tensor {key} has shape {list(self.shape(key))}, "
                                      f"config.json implies {list(shape)}; the weights do not match the config")
            state[key] = self.get(key, dtype, device)
        return state


def _skippable(cfg: DecoderConfig, layer_ids: list[int]):
    kept = set(layer_ids)

    def skip(key: str) -> bool:
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            return True  # some tied checkpoints store the head anyway; it is the embedding
        if key.endswith("rotary_emb.inv_freq"):
            return True  # old checkpoints store RoPE frequencies; we compute them
        # A layer this model does not keep. An index past num_hidden_layers is not skipped: read() reports it, as the
        # file then holds more layers than config.json says.
        m = LAYER_KEY.match(key)
        return m is not None and int(m.group(1)) < cfg.num_hidden_layers and int(m.group(1)) not in kept

    return skip


def load_model(path, dtype: torch.dtype | None = None, device="cpu", layers: list[int] | None = None) -> Decoder:
    """Loads a checkpoint, or only `layers` of it (the others are never read). dtype None means
    the checkpoint's own (config.json torch_dtype). The model is returned frozen, in eval mode."""
    cfg = load_config(path)
    ckpt = Checkpoint(path)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise CheckpointError(f"{ckpt.path}: the checkpoint has {cfg.num_hidden_layers} layers, "
                                  f"layer {bad[0]} does not exist")
    # On the meta device, parameters have shapes but no storage: nothing is allocated or initialised before loading.
    with torch.device("meta"):
        model = Decoder(cfg, layers)
    expected = {k: v.shape for k, v in model.state_dict().items()}  # name -> shape, kept layers only
    if cfg.tie_word_embeddings:
        del expected["lm_head.weight"]  # the head is the embedding; it is not read from the file
    # dtype None: the one config.json declares.
    state = ckpt.read(expected, _skippable(cfg, model.layer_ids), dtype or config_dtype(cfg), device)
    # assign=True puts the loaded tensors in place of the meta ones (a copy into a meta tensor keeps no data);
    # strict=False only for a tied lm_head.weight, which is absent: read() has checked every other key.
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()  # assign gave embed_tokens a new tensor: point lm_head at it again
    model.requires_grad_(False)
    return model.eval()


def load_tokenizer(path) -> Tokenizer:
    file = _check_dir(Path(path)) / "tokenizer.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the checkpoint needs its tokenizer.json")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises plain Exception subclasses for malformed files
        raise CheckpointError(f"{file}: not a valid tokenizer ({e}); download it again") from None


def publish(tmp: Path, file: Path) -> None:
    """Puts a finished temporary file in place: flushed to disk, then renamed over `file` in one step, so a
    crash at any moment leaves either the old file or the new one, whole."""
    # fsync first: without it the rename can reach the disk before the data, and a crash could leave `file` empty.
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, file)  # atomic when tmp is beside `file` (one filesystem), as every caller makes it


def atomic_write(file: Path, write: Callable[[Path], None]) -> None:
    """Whole files the project writes (checkpoints, configs, tables) go through here; the log is appended and the
    token files are published (publish). write(tmp) fills a temporary file beside `file`, which
    is then published; if anything fails, the temporary file is removed and `file` is as it was."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")  # a stale one left by a killed process is simply written over
    try:
        write(tmp)
        publish(tmp, file)
    except BaseException:  # Ctrl-C and SystemExit too
        with contextlib.suppress(OSError):  # a failed clean-up must not hide the original error
            tmp.unlink(missing_ok=True)
        raise


def fingerprint(path) -> str:
    """A hash of a checkpoint's config.json and of its safetensors headers (every tensor's name, dtype, shape
    and offsets): cheap to compute, and it changes when the directory holds another model."""
    path = _check_dir(Path(path))
    # A missing config.json hashes as empty: it is load_config that reports it, not this.
    h = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").is_file() else b"")
    for file in sorted(path.glob("*.safetensors")):  # sorted: independent of the directory's listing order
        with open(file, "rb") as f:
            # A safetensors file opens with its header's length (8 bytes, little-endian), then that many bytes of JSON
            # header; the cap bounds what a corrupted length can make this read.
            n = int.from_bytes(f.read(8), "little")
            h.update(file.name.encode() + f.read(min(n, 100_000_000)))
    return h.hexdigest()


def save_model(model: Decoder, path, tokenizer: Tokenizer | None = None) -> None:
    """Writes a directory that transformers (Qwen2ForCausalLM, LlamaForCausalLM or Qwen3ForCausalLM) and
    `load_model` both load."""
    cfg = model.cfg
    if model.layer_ids != list(range(cfg.num_hidden_layers)):
        raise ValueError("save_model writes whole models; this one keeps only some layers")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype  # written as torch_dtype: the weights' own dtype
    config = dict(cfg.extra)  # keys carried but not used (bos_token_id, ...); ours override them
    ours = ("extra", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "rope_scaling")  # said in the family's own keys
    config.update({k: v for k, v in dataclasses.asdict(cfg).items() if k not in ours})
    # Both spellings that _rope reads: rope_scaling (null for plain RoPE) and rope_parameters (theta and scaling).
    rope = {"rope_type": "default"} | (cfg.rope_scaling or {})
    config.update(architectures=[FAMILIES[cfg.model_type]], hidden_act="silu", torch_dtype=str(dtype).removeprefix("torch."),
                  rope_scaling=cfg.rope_scaling, rope_parameters=rope | {"rope_theta": cfg.rope_theta})
    if cfg.model_type == "qwen2":
        config.update(use_sliding_window=False)  # every layer attends fully (load_config refuses sliding windows)
    else:  # Llama, Qwen3: attention_bias sets q, k, v and o together
        config.update(attention_bias=cfg.o_bias, mlp_bias=cfg.mlp_bias)  # o_bias is attention_bias here
    # safetensors refuses non-contiguous tensors and tensors that share storage (hence the tied head's removal).
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del tensors["lm_head.weight"]  # the same tensor as the embedding
    # Each file whole or absent, whatever the moment of a crash (atomic_write).
    atomic_write(path / "model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    atomic_write(path / "config.json", lambda f: f.write_text(json.dumps(config, indent=2)))
    if tokenizer is not None:
        atomic_write(path / "tokenizer.json", lambda f: tokenizer.save(str(f)))


def load_ouroboros(path, cfg, dtype: torch.dtype | None = None, device="cpu"):
    """Builds Ouroboros from a checkpoint: the kept layers (prelude, recurrent, coda) are loaded; the removed
    layers are streamed one at a time, only to build the SVD LoRA bases, so peak memory stays near the kept
    weights. The trainable parameters are fresh (fp32); load a trained run's on top with runs.restore."""

    qcfg = load_config(path)  # the base model's; cfg is Ouroboros' own (split, rank, ...)
    prelude, rec, coda, removed = cfg.split(qcfg.num_hidden_layers)
    # the rank of a projection's residual is at most its smaller side (q and o: hidden vs heads x head_dim)
    attn = min(qcfg.hidden_size, qcfg.num_attention_heads * qcfg.head_dim)
    # v has k's shape; up and down have gate's.
    widths = {"q": attn, "k": min(qcfg.hidden_size, qcfg.num_key_value_heads * qcfg.head_dim), "o": attn,
              "gate": min(qcfg.hidden_size, qcfg.intermediate_size)}
    narrow = min(widths, key=widths.get)  # the tightest one, named in the error
    # SVD yields only min(out, in) directions: a larger rank would leave A and B with fewer than r of them.
    if cfg.rank > widths[narrow]:
        raise ConfigError(f"rank {cfg.rank} is larger than projection {narrow} allows ({widths[narrow]}); "
                          f"use rank <= {widths[narrow]}")
    base = load_model(path, dtype, device, layers=prelude + [rec] + coda)  # the removed layers are not read here
    dtype = next(base.parameters()).dtype  # as loaded: the checkpoint's own when dtype is None
    # load_model checked the kept layers' shapes; the removed layers' projections must have the recurrent one's.
    shapes = {k: base.get_parameter(f"model.layers.{rec}.{name}.weight").shape for k, name in PROJECTIONS.items()}

    def weights(i, dtype=None):
        # A fresh Checkpoint per layer: pages read from a memory-mapped file stay resident until it is unmapped,
        # so one Checkpoint open across the loop would end up holding every removed layer in memory.
        ckpt = Checkpoint(path)
        return {k: ckpt.get(f"model.layers.{i}.{name}.weight", dtype, device, shapes[k]) for k, name in PROJECTIONS.items()}

    # The recurrent layer in fp32, the dtype the bases are computed in; the removed layers as stored (svd_bases
    # sums them in fp32), so no fp32 copy of a whole removed layer is made.
    bases = svd_bases(weights(rec, torch.float32), (weights(i) for i in removed), cfg.rank)
    # In the base's dtype: project multiplies A and B with activations of that dtype.
    bases = {k: (A.to(dtype), B.to(dtype)) for k, (A, B) in bases.items()}
    with torch.device(device):  # the fresh trainable parameters are made on `device` directly
        return Ouroboros(base, cfg, bases)
