"""The decoder of Qwen2 / Qwen2.5, Llama (2, 3, 3.1, 3.2, SmolLM2) and Qwen3 (dense), written by hand.

The three families are one architecture (pre-norm, RoPE, grouped-query attention, SwiGLU) that differs in a
few flags: which projections carry a bias, Qwen3's RMSNorm on each query and key head, and Llama 3.1's RoPE
frequency scaling. Read bottom-up: the config, then the pieces (RMSNorm, RoPE, attention, MLP), then the
decoder layer, then the whole model and sampling. Module names equal the Hugging Face checkpoint's keys, so
`load_qwen.py` maps tensors by identity.

Every projection goes through `project`, which optionally adds a low-rank, per-token modulation
`(alpha/r) * B((A x) * c)`. A plain decoder never passes one; Ouroboros (controller.py) passes one to its
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
class DecoderConfig:
    # Defaults are Qwen2.5-3B's config.json. Field names are the config.json keys, except the four flags below,
    # which load_qwen.load_config sets from the family (model_type) and its attention_bias / mlp_bias keys.
    model_type: str = "qwen2"  # qwen2 | llama | qwen3
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2  # grouped-query attention: each key/value head serves 16 / 2 = 8 query heads
    head_dim: int = 0  # 0 means hidden_size // num_attention_heads; Qwen3 sets it apart (4B: 32 x 128 vs 2,560)
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0  # the RoPE base theta (Llama 2: 10,000)
    rope_scaling: dict | None = None  # None, or Llama 3.1's {"rope_type": "llama3", ...} or {"rope_type": "linear", ...}
    qkv_bias: bool = True  # Qwen2: a bias on q, k and v; Llama and Qwen3: attention_bias (default false)
    o_bias: bool = False  # Llama and Qwen3: attention_bias puts one on o as well
    mlp_bias: bool = False  # Llama's mlp_bias: on gate, up and down
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on every query and key head, before RoPE
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True  # lm_head.weight is embed_tokens.weight (Decoder.tie_weights)
    initializer_range: float = 0.02  # std of the random init, used only when no checkpoint is loaded
    torch_dtype: str = "bfloat16"  # the stored dtype; load_qwen.load_model loads in it unless given another
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
    y = linear(x)  # W x + b: (B, T, out)
    for A, B, c in (mod or {}).get(name, ()):  # one term per source (Controller, adapter); none without mod
        # y = W x + b + (alpha/r) B ((A x) * c). Two thin matmuls; B diag(c) A is never formed. addmm adds the
        # second into y as it multiplies: one y-sized temporary and one pass over y fewer (~3% of a step on CPU).
        lora = (F.linear(x, A) * c).flatten(0, -2)  # (A x) * c: (B, T, r) -> (B*T, r)
        y = torch.addmm(y.flatten(0, -2), lora, B.mT).view_as(y)  # y + lora B^T: (B*T, out) -> (B, T, out)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in fp32 whatever the input dtype, then back, then the weight (the order of all three families).
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # x / sqrt(mean(x^2) + eps), per token
    return weight * x32.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # init 1: the norm starts as pure normalisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_frequencies(cfg: DecoderConfig, device=None) -> torch.Tensor:
    """The rotation speed of each pair of dimensions, (head_dim / 2,): theta^(-2i / head_dim), then the scaling."""
    hd = cfg.head_dim
    # fp32 whatever the model's dtype: an angle is position x frequency, so a frequency rounded to bf16 would put
    # distant positions at angles far from the true ones.
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))  # older config.json files call the key "type"
    if kind == "linear":  # positions divided by the factor, i.e. every frequency
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: frequencies whose wavelength exceeds the original context / low_freq_factor are slowed by
        # `factor`; those shorter than context / high_freq_factor are kept; in between, a linear blend in
        # context / wavelength.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (context / wavelen - low) / (high - low)  # 0 at the slow edge of the band, 1 at its fast edge
        return torch.where(wavelen > context / low, inv_freq / factor,
                           torch.where(wavelen < context / high, inv_freq, (1 - smooth) * inv_freq / factor + smooth * inv_freq))
    return inv_freq


def rope_cos_sin(start: int, length: int, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Angles for positions start..start+length-1, computed in fp32: (T, head_dim).
    pos = torch.arange(start, start + length, device=inv_freq.device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # angle of position t in pair i: t * inv_freq[i], (T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)  # half-split layout: dims i and i + head_dim/2 share an angle
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd). Rotates the pair (x_i, x_{i+hd/2}) by the position's angle.
    x1, x2 = x.chunk(2, dim=-1)  # the two halves, (B, H, T, hd/2) each
    rotated = torch.cat((-x2, x1), dim=-1)  # (x1, x2) -> (-x2, x1): x cos + rotated sin turns each pair
    # cos and sin are fp32 and (T, hd), broadcast over B and H; cast, or bf16 q and k would be promoted to fp32.
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """Keys and values of one attention layer for the positions seen so far."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.k is None else self.k.shape[2]  # dim 2 of (B, Hkv, T, hd): positions cached

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Grows along T. cat copies the whole cache on every call: simple rather than fast.
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_head * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.n_kv_head * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, d, bias=cfg.o_bias)
        if cfg.qk_norm:  # created only when used, so Qwen2 and Llama state_dicts have no q_norm / k_norm keys
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mod: Modulation | None = None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = project(self.q_proj, x, "q", mod).view(B, T, self.n_head, self.head_dim)  # (B, T, H, hd)
        k = project(self.k_proj, x, "k", mod).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, hd)
        v = project(self.v_proj, x, "v", mod).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, hd)
        if hasattr(self, "q_norm"):  # Qwen3: each head's query and key normalised on their own, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v)  # stored rotated and with Hkv heads: (B, Hkv, past + T, hd)
        past = k.shape[2] - T  # positions cached before this call
        gqa = self.n_head != self.n_kv_head  # SDPA shares each key/value head among n_head / n_kv_head query heads
        if past == 0:
            # Explicitly causal: query t sees keys 0..t.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # New queries sit at positions past..past+T-1 and see every key up to their own position. is_causal would
            # align the triangle top-left (query 0 with key 0), wrong once keys outnumber queries, hence the mask.
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # True: may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, H*hd); reshape: not contiguous
        return project(self.o_proj, y, "o", mod)


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x, mod: Modulation | None = None):
        # SwiGLU: down(silu(gate x) * up x)
        h = F.silu(project(self.gate_proj, x, "gate", mod)) * project(self.up_proj, x, "up", mod)  # (B, T, inter)
        return project(self.down_proj, h, "down", mod)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mod: Modulation | None = None, cache: KVCache | None = None):
        # Pre-norm: each sublayer reads a normalised copy of x and adds its output to x itself, so the residual
        # stream is never normalised inside a layer. The same mod reaches all seven projections.
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mod, cache)
        return x + self.mlp(self.post_attention_layernorm(x), mod)


class Decoder(nn.Module):
    """The causal LM of every family. `layer_ids` keeps only some of the checkpoint's layers, run in the given order
    (the cut baseline is `layer_ids = prelude + [recurrent] + coda`); the default keeps them all."""

    def __init__(self, cfg: DecoderConfig, layer_ids: list[int] | None = None):
        super().__init__()
        self.cfg = cfg
        self.layer_ids = list(range(cfg.num_hidden_layers)) if layer_ids is None else list(layer_ids)
        # Keys "0", "1", ... so that state_dict names equal the checkpoint's (model.layers.18.mlp...).
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleDict({str(i): DecoderLayer(cfg) for i in self.layer_ids}),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # (B, T, d) -> (B, T, vocab)
        self.tie_weights()
        # On the meta device (where load_qwen.load_model builds it) there is no storage: the checkpoint fills it.
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)

    def tie_weights(self):
        # Called again after loading: load_state_dict(assign=True) puts new Parameter objects in place, undoing the tie.
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module):
        # Only used when training from scratch; loading a checkpoint overwrites everything.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def layer(self, i: int) -> DecoderLayer:
        return self.model.layers[str(i)]  # by the checkpoint's layer index, not the position in layer_ids

    def rope(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        # Not a buffer: model.to(torch.bfloat16) would round one. Recomputed per call, in fp32 (head_dim / 2 values).
        return rope_cos_sin(start, length, rope_frequencies(self.cfg, device))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))  # final RMSNorm, then logits (B, T, vocab)

    def forward(self, input_ids: torch.Tensor, caches: dict[int, KVCache] | None = None) -> torch.Tensor:
        # input_ids (B, T) -> logits (B, T, vocab). With caches, input_ids continue the cached positions.
        return self.head(self.hidden(input_ids, caches))

    def hidden(self, input_ids: torch.Tensor, caches: dict[int, KVCache] | None = None) -> torch.Tensor:
        # input_ids (B, T) -> the last layer's output (B, T, d), before the final norm and the head. Training and
        # evaluation stop here and apply the head a chunk of positions at a time (evaluate.loss_from_states).
        start = len(caches[self.layer_ids[0]]) if caches else 0  # positions cached so far (the same in every layer)
        cos, sin = self.rope(start, input_ids.shape[1], input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (B, T, d)
        for i in self.layer_ids:
            x = self.layer(i)(x, cos, sin, cache=caches[i] if caches is not None else None)
        return x

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        caches = {i: KVCache() for i in self.layer_ids}  # one per kept layer, keyed like the layers
        return sampling_loop(lambda ids: self(ids, caches), input_ids, max_new_tokens, temperature, top_k, generator)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    # logits (B, vocab) -> next token ids (B, 1). Temperature 0 is greedy.
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature  # softmax in fp32 whatever the model's dtype
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1): each row's k-th largest
        logits = logits.masked_fill(logits < kth, -math.inf)  # strictly below: ties with the k-th survive
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


def sampling_loop(step: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor, max_new_tokens: int,
             temperature: float, top_k: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sampling loop shared by the decoder and Ouroboros. `step(ids)` feeds new tokens to a model holding its
    own KV cache and returns their logits; the prompt goes in once, then one token at a time."""
    out = input_ids
    logits = step(input_ids)  # the whole prompt in one call, which fills the caches
    for i in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, generator)  # only the last position predicts the next
        out = torch.cat((out, nxt), dim=1)
        if i + 1 < max_new_tokens:  # the last token is not fed back: its logits would go unused
            logits = step(nxt)
    return out
