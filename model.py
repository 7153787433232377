"""Qwen2 / Qwen2.5, written by hand.

Read bottom-up: the config, then the pieces (RMSNorm, RoPE, attention, MLP), then the decoder layer,
then the whole model and sampling. Module names equal the Hugging Face checkpoint's keys, so
`load_qwen.py` maps tensors by identity.

Every projection goes through `project`, which optionally adds a low-rank, per-token modulation
`(alpha/r) * B((A x) * c)`. A plain Qwen2 never passes one; Ouroboros (controller.py) passes one to its
recurrent layer at every step. The modulation is an argument, never state stored on a module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Qwen2Config:
    # Defaults are Qwen2.5-3B's config.json. Field names are the config.json keys.
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 means hidden_size // num_attention_heads, as in every released Qwen2
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    extra: dict = field(default_factory=dict, repr=False)  # other config.json keys, kept for save_model

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads


# Projection names used by modulations, and where each lives inside a decoder layer.
PROJECTIONS = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}

# A modulation: for some projection names, a list of low-rank terms (A (r, in), B (out, r), c (B, T, r) or
# broadcastable), with the scale alpha/r already folded into c: the Controller's, and a LoRA adapter's.
Modulation = dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]]]


def project(linear: nn.Linear, x: torch.Tensor, name: str, mod: Modulation | None) -> torch.Tensor:
    y = linear(x)
    for A, B, c in (mod or {}).get(name, ()):
        # y = W x + b + (alpha/r) B ((A x) * c). Two thin matmuls; B diag(c) A is never formed. addmm adds the
        # second into y as it multiplies: one y-sized temporary and one pass over y fewer (~3% of a step on CPU).
        lora = (F.linear(x, A) * c).flatten(0, -2)  # (B*T, r)
        y = torch.addmm(y.flatten(0, -2), lora, B.mT).view_as(y)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in fp32 whatever the input dtype, then back, then the weight (Qwen2's order).
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_cos_sin(start: int, length: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Angles for positions start..start+length-1, computed in fp32: (T, head_dim).
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    pos = torch.arange(start, start + length, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout: dims i and i + head_dim/2 share an angle
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd). Rotates the pair (x_i, x_{i+hd/2}) by the position's angle.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of one attention layer for the positions seen so far."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        # Qwen2 has biases on q, k and v, none on o.
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, mod: Modulation | None = None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = project(self.q_proj, x, "q", mod).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = project(self.k_proj, x, "k", mod).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = project(self.v_proj, x, "v", mod).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)
        past = k.shape[2] - T
        gqa = self.n_head != self.n_kv_head
        if past == 0:
            # Explicitly causal: query t sees keys 0..t.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # New queries sit at positions past..past+T-1 and see every key up to their own position.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*hd)
        return project(self.o_proj, y, "o", mod)


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, mod: Modulation | None = None):
        # SwiGLU: down(silu(gate x) * up x)
        h = F.silu(project(self.gate_proj, x, "gate", mod)) * project(self.up_proj, x, "up", mod)
        return project(self.down_proj, h, "down", mod)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mod: Modulation | None = None, cache: KVCache | None = None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mod, cache)
        return x + self.mlp(self.post_attention_layernorm(x), mod)


class Qwen2(nn.Module):
    """Qwen2 causal LM. `layer_ids` keeps only some of the checkpoint's layers, run in the given order
    (the cut baseline is `layer_ids = prelude + [recurrent] + coda`); the default keeps them all."""

    def __init__(self, cfg: Qwen2Config, layer_ids: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = list(range(cfg.num_hidden_layers)) if layer_ids is None else list(layer_ids)
        # Keys "0", "1", ... so that state_dict names equal the checkpoint's (model.layers.18.mlp...).
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleDict({str(i): DecoderLayer(cfg) for i in self.layer_ids}),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    def tie_weights(self):
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        # Only used when training from scratch; loading a checkpoint overwrites everything.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def layer(self, i: int) -> DecoderLayer:
        return self.model.layers[str(i)]

    def rope(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(start, length, self.cfg.head_dim, self.cfg.rope_theta, device)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))

    def forward(self, input_ids: torch.Tensor, caches: dict[int, KVCache] | None = None) -> torch.Tensor:
        # input_ids (B, T) -> logits (B, T, vocab). With caches, input_ids continue the cached positions.
        start = len(caches[self.layer_ids[0]]) if caches else 0
        cos, sin = self.rope(start, input_ids.shape[1], input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        for i in self.layer_ids:
            x = self.layer(i)(x, cos, sin, cache=caches[i] if caches is not None else None)
        return self.head(x)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        caches = {i: KVCache() for i in self.layer_ids}
        return sampling_loop(lambda ids: self(ids, caches), input_ids, max_new_tokens, temperature, top_k, generator)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    # logits (B, vocab) -> next token ids (B, 1). Temperature 0 is greedy.
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def sampling_loop(step: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor, max_new_tokens: int,
             temperature: float, top_k: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sampling loop shared by Qwen2 and Ouroboros. `step(ids)` feeds new tokens to a model holding its
    own KV cache and returns their logits; the prompt goes in once, then one token at a time."""
    out = input_ids
    logits = step(input_ids)
    for i in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, generator)
        out = torch.cat((out, nxt), dim=1)
        if i + 1 < max_new_tokens:
            logits = step(nxt)
    return out
