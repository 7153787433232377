"""Tiny random Qwen2 checkpoints in Hugging Face layout, written to disk for the tests."""
from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from load_qwen import save_model  # noqa: E402
from model import Decoder, DecoderConfig  # noqa: E402


def tiny_config(**overrides) -> DecoderConfig:
    values = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, max_position_embeddings=512, torch_dtype="float32")
    values.update(overrides)
    return DecoderConfig(**values)


def random_model(cfg: DecoderConfig, seed: int = 0) -> Decoder:
    """A Qwen2 whose every tensor, norms and biases included, is random (so nothing is trivially 1 or 0)."""
    torch.manual_seed(seed)
    model = Decoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def make_checkpoint(path, cfg: DecoderConfig | None = None, seed: int = 0, dtype: torch.dtype = torch.float32,
                    shards: int = 1, tokenizer=None) -> Path:
    """Writes a random checkpoint to `path`; with shards > 1, as model-0000k-of-0000n.safetensors + index."""
    cfg = cfg or tiny_config()
    path = Path(path)
    model = random_model(cfg, seed).to(dtype)
    save_model(model, path, tokenizer)
    if shards > 1:
        (path / "model.safetensors").unlink()
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            del tensors["lm_head.weight"]
        keys = list(tensors)
        weight_map = {}
        for s in range(shards):
            name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[s::shards]}
            save_file(part, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in part})
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# A few standard-library files: a small corpus of real text for the demo's and the study's chain.
STDLIB_FILES = ["abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py", "heapq.py", "keyword.py",
                "linecache.py", "numbers.py", "opcode.py", "operator.py", "queue.py", "random.py", "sched.py",
                "shlex.py", "string.py", "textwrap.py", "token.py", "types.py", "uu.py", "weakref.py"]


def stdlib_corpus(path) -> Path:
    """A directory holding STDLIB_FILES (those this Python has), one document per file."""
    stdlib, path = Path(sysconfig.get_paths()["stdlib"]), Path(path)
    path.mkdir(parents=True)
    for name in STDLIB_FILES:
        if (stdlib / name).is_file():
            shutil.copy(stdlib / name, path / name)
    return path
