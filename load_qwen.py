"""Reads and writes Hugging Face-layout Qwen2 directories directly: config.json, safetensors shards,
tokenizer.json. No transformers.

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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from controller import ConfigError, Ouroboros, svd_bases
from model import PROJECTIONS, Qwen2, Qwen2Config

LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.")


class CheckpointError(Exception):
    """A checkpoint directory that cannot be used; the message says which file and what to do."""


def _check_dir(path: Path) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory; pass the directory of a Qwen2/Qwen2.5 checkpoint "
                              "(the one holding config.json and *.safetensors)")
    return path


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; the directory is not a complete Hugging Face checkpoint")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); download the file again") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object; download the file again")
    return data


def load_config(path) -> Qwen2Config:
    path = _check_dir(Path(path))
    file = path / "config.json"
    raw = _read_json(file)
    if raw.get("model_type") != "qwen2":
        raise CheckpointError(f"{file}: model_type is {raw.get('model_type')!r}, expected 'qwen2'; "
                              "only Qwen2 / Qwen2.5 checkpoints are supported")
    # Qwen2.5 files put rope_theta at the top level; recent transformers write rope_parameters.rope_theta.
    rope = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default" or scaling.get("type", scaling.get("rope_type", "default")) != "default":
        raise CheckpointError(f"{file}: RoPE scaling is not supported; use a checkpoint with plain RoPE")
    if raw.get("use_sliding_window"):
        raise CheckpointError(f"{file}: sliding-window attention is not supported; set use_sliding_window to false")
    if raw.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{file}: hidden_act {raw['hidden_act']!r} is not supported (Qwen2 uses 'silu')")
    values = dict(raw)
    values["rope_theta"] = raw.get("rope_theta", rope.get("rope_theta", Qwen2Config.rope_theta))
    values["torch_dtype"] = raw.get("torch_dtype", raw.get("dtype", "float32"))
    if not isinstance(getattr(torch, str(values["torch_dtype"]), None), torch.dtype):
        raise CheckpointError(f"{file}: torch_dtype {values['torch_dtype']!r} is not a torch dtype")
    if values.get("num_key_value_heads") is None:  # absent or null: no GQA (transformers maps null the same way)
        values["num_key_value_heads"] = raw.get("num_attention_heads")
    values.setdefault("tie_word_embeddings", False)  # transformers' default for qwen2 when the key is absent
    names = {f.name for f in dataclasses.fields(Qwen2Config)} - {"extra"}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads"):
        if not isinstance(values.get(key), int) or isinstance(values[key], bool) or values[key] <= 0:
            raise CheckpointError(f"{file}: {key} must be a positive integer, found {values.get(key)!r}")
    for key in ("rope_theta", "rms_norm_eps"):  # absent or null: the default
        v = values.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0):
            raise CheckpointError(f"{file}: {key} must be a positive number, found {v!r}")
    if values["hidden_size"] % values["num_attention_heads"] or values["num_attention_heads"] % values["num_key_value_heads"]:
        raise CheckpointError(f"{file}: num_attention_heads must divide hidden_size and be a multiple of "
                              "num_key_value_heads")
    cfg = Qwen2Config(**{k: v for k, v in values.items() if k in names and v is not None},
                      extra={k: v for k, v in raw.items() if k not in names and k not in ("rope_parameters", "dtype")})
    return cfg


def config_dtype(cfg: Qwen2Config) -> torch.dtype:
    return getattr(torch, cfg.torch_dtype)


class Checkpoint:
    """A lazy view of a (possibly sharded) safetensors checkpoint: tensor names, shapes, and reads on demand."""

    def __init__(self, path):
        self.path = _check_dir(Path(path))
        index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map'; download the file again")
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, ["model.safetensors"]
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json; "
                                  "the weights are missing from the checkpoint directory")
        self.handles, self.where = {}, {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise CheckpointError(f"{file}: missing (listed in {index.name}); download the missing shard")
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                                      "it is truncated or corrupted, download it again") from None
            self.handles[name] = handle
            for key in handle.keys():
                self.where[key] = name
        if weight_map is not None:
            for key, name in weight_map.items():
                if self.where.get(key) != name:
                    raise CheckpointError(f"{self.path / name}: does not hold tensor {key} listed in {index.name}; "
                                          "the shards do not match the index, download them again")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handles[self.where[key]].get_slice(key).get_shape())

    def get(self, key: str, dtype: torch.dtype | None = None, device="cpu", shape=None) -> torch.Tensor:
        if key not in self.where:
            raise CheckpointError(f"{self.path}: tensor {key} is missing; the checkpoint is incomplete")
        file = self.path / self.where[key]
        try:
            t = self.handles[self.where[key]].get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {key} ({e}); the file is corrupted, download it again") from None
        if not t.is_floating_point():
            raise CheckpointError(f"{file}: tensor {key} is {str(t.dtype).removeprefix('torch.')}; Qwen2 weights are "
                                  "floating point, so the file is not a Qwen2 checkpoint or is damaged, download it again")
        if shape is not None and t.shape != shape:
            raise CheckpointError(f"{file}: tensor {key} has shape {list(t.shape)}, config.json implies {list(shape)}; "
                                  "the weights do not match the config")
        return t.to(device=device, dtype=dtype or t.dtype)

    def read(self, expected: dict[str, tuple], skip, dtype, device) -> dict[str, torch.Tensor]:
        """Reads exactly `expected` (name -> shape). Every other tensor must satisfy `skip(name)`."""
        for key in self.where:
            if key not in expected and not skip(key):
                raise CheckpointError(f"{self.path / self.where[key]}: unexpected tensor {key}; "
                                      "the checkpoint does not match config.json")
        state = {}
        for key, shape in expected.items():
            if key not in self.where:
                raise CheckpointError(f"{self.path}: tensor {key} is missing; the checkpoint is incomplete")
            if self.shape(key) != tuple(shape):
                raise CheckpointError(f"{self.path / self.where[key]}: tensor {key} has shape {list(self.shape(key))}, "
                                      f"config.json implies {list(shape)}; the weights do not match the config")
            state[key] = self.get(key, dtype, device)
        return state


def _skippable(cfg: Qwen2Config, layer_ids: list[int]):
    kept = set(layer_ids)

    def skip(key: str) -> bool:
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            return True  # some tied checkpoints store the head anyway; it is the embedding
        if key.endswith("rotary_emb.inv_freq"):
            return True  # old checkpoints store RoPE frequencies; we compute them
        m = LAYER_KEY.match(key)
        return m is not None and int(m.group(1)) < cfg.num_hidden_layers and int(m.group(1)) not in kept

    return skip


def load_model(path, dtype: torch.dtype | None = None, device="cpu", layers: list[int] | None = None) -> Qwen2:
    """Loads a Qwen2 checkpoint, or only `layers` of it (the others are never read). dtype None means
    the checkpoint's own (config.json torch_dtype). The model is returned frozen, in eval mode."""
    cfg = load_config(path)
    ckpt = Checkpoint(path)
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise CheckpointError(f"{ckpt.path}: the checkpoint has {cfg.num_hidden_layers} layers, "
                                  f"layer {bad[0]} does not exist")
    with torch.device("meta"):
        model = Qwen2(cfg, layers)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del expected["lm_head.weight"]
    state = ckpt.read(expected, _skippable(cfg, model.layer_ids), dtype or config_dtype(cfg), device)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
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
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, file)


def atomic_write(file: Path, write: Callable[[Path], None]) -> None:
    """Every file the project writes goes through here: write(tmp) fills a temporary file beside `file`, which
    is then published; if anything fails, the temporary file is removed and `file` is as it was."""
    file = Path(file)
    tmp = file.with_name(file.name + ".tmp")  # a stale one left by a killed process is simply written over
    try:
        write(tmp)
        publish(tmp, file)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def fingerprint(path) -> str:
    """A hash of a checkpoint's config.json and of its safetensors headers (every tensor's name, dtype, shape
    and offsets): cheap to compute, and it changes when the directory holds another model."""
    path = _check_dir(Path(path))
    h = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").is_file() else b"")
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(file.name.encode() + f.read(min(n, 100_000_000)))
    return h.hexdigest()


def save_model(model: Qwen2, path, tokenizer: Tokenizer | None = None) -> None:
    """Writes a directory that transformers' Qwen2ForCausalLM and `load_model` both load."""
    cfg = model.cfg
    if model.layer_ids != list(range(cfg.num_hidden_layers)):
        raise ValueError("save_model writes whole models; this one keeps only some layers")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    config = dict(cfg.extra)
    config.update({k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"})
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act="silu",
                  torch_dtype=str(dtype).removeprefix("torch."), use_sliding_window=False,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        del tensors["lm_head.weight"]  # the same tensor as the embedding
    atomic_write(path / "model.safetensors", lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
    atomic_write(path / "config.json", lambda f: f.write_text(json.dumps(config, indent=2)))
    if tokenizer is not None:
        atomic_write(path / "tokenizer.json", lambda f: tokenizer.save(str(f)))


def load_ouroboros(path, cfg, dtype: torch.dtype | None = None, device="cpu"):
    """Builds Ouroboros from a checkpoint: the kept layers (prelude, recurrent, coda) are loaded; the removed
    layers are streamed one at a time, only to build the SVD LoRA bases, so peak memory stays near the kept
    weights. The trainable parameters are fresh (fp32); load a trained run's on top with load_state_dict."""

    qcfg = load_config(path)
    prelude, rec, coda, removed = cfg.split(qcfg.num_hidden_layers)
    widths = {"q": qcfg.hidden_size, "k": qcfg.num_key_value_heads * qcfg.head_dim, "o": qcfg.hidden_size,
              "gate": min(qcfg.hidden_size, qcfg.intermediate_size)}
    narrow = min(widths, key=widths.get)
    if cfg.rank > widths[narrow]:
        raise ConfigError(f"rank {cfg.rank} is larger than projection {narrow} allows ({widths[narrow]}); "
                          f"use rank <= {widths[narrow]}")
    base = load_model(path, dtype, device, layers=prelude + [rec] + coda)
    dtype = next(base.parameters()).dtype
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
    bases = {k: (A.to(dtype), B.to(dtype)) for k, (A, B) in bases.items()}
    with torch.device(device):
        return Ouroboros(base, cfg, bases)
