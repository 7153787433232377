"""Ouroboros: one recurrent decoder layer, looped, with input-dependent LoRA weights at every step.

Read with README.md's "The method, next to the code". The pieces, leaves first: the configuration and the layer split, the SVD
LoRA bases, the Controller (and the static ablation with the same call signature), then the recursive
model: embed -> prelude -> N x (Controller, modulated layer, step norm, gate) -> coda -> norm -> head.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import PROJECTIONS, KVCache, Modulation, Decoder, rms_norm, sampling_loop


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


@dataclass
class OuroborosConfig:
    # The paper's values on Qwen2.5-3B (36 layers): keep 0-7 and 28-35, loop layer 18.
    n_prelude: int = 8
    recurrent_layer: int = 18
    n_coda: int = 8
    rank: int = 32  # r
    alpha: float = 16.0  # LoRA scale is alpha / r
    max_depth: int = 64  # size of the step embedding and of the per-step norms
    pool_dim: int = 256  # Controller: Linear(d, 256) on the pooled state
    step_dim: int = 128  # Controller: Embedding(max_depth, 128)
    hidden_dim: int = 256  # Controller: Linear(256 + 128, 256)
    mlp_out_dim: int = 128  # Controller: Linear(256, 128), then the heads Linear(128, r) (not attention's head_dim)
    gate_bias: float = -2.0  # sigmoid(-2) = 0.119: at init each step keeps 88% of the old state
    controller: str = "dynamic"  # dynamic | static (learned c per step, ignores input) | none (no LoRA)
    gate: bool = True  # False: h = h_new every step
    step_norm: bool = True  # False: no per-step RMSNorm
    pool: str = "causal"  # causal: position t sees 0..t | mean: whole sequence, the paper's, LEAKS the future
    controller_input: str = "pooled"  # pooled | none: the Controller reads zeros, so c depends on the step only
    lora_layers: str = "none"  # none | coda | recurrent | all: trainable LoRA adapters on these kept layers
    lora_rank: int = 8  # the adapters' rank, independent of the Controller's r
    lora_alpha: float = 16.0  # the adapters' scale is lora_alpha / lora_rank
    checkpoint_steps: bool = False  # recompute each step in backward, so memory does not grow with depth

    def __post_init__(self):  # the choices, checked once when the config is made
        if self.controller not in ("dynamic", "static", "none"):
            raise ConfigError(f"controller must be dynamic, static or none, not {self.controller!r}")
        if self.pool not in ("causal", "mean"):
            raise ConfigError(f"pool must be causal or mean, not {self.pool!r}")
        if self.controller_input not in ("pooled", "none"):
            raise ConfigError(f"controller_input must be pooled or none, not {self.controller_input!r}")
        if self.lora_layers not in ("none", "coda", "recurrent", "all"):
            raise ConfigError(f"lora_layers must be none, coda, recurrent or all, not {self.lora_layers!r}")
        if self.rank < 1 or self.max_depth < 1 or self.lora_rank < 1:
            raise ConfigError("rank, lora_rank and max_depth must be >= 1")

    def check_depth(self, depth: int, limit: str = "max_depth") -> None:
        """The one depth check: the step embedding and the per-step norms have max_depth rows. limit: how the
        caller names max_depth (train.py: --max-depth)."""
        if not 1 <= depth <= self.max_depth:
            raise ConfigError(f"depth {depth} is outside 1..{self.max_depth} ({limit}); choose a depth in that range")

    def split(self, n_layers: int) -> tuple[list[int], int, list[int], list[int]]:
        """(prelude, recurrent, coda, removed) layer indices of an n_layers-deep checkpoint."""
        p, rec, c = self.n_prelude, self.recurrent_layer, self.n_coda
        if p < 0 or c < 0:
            raise ConfigError(f"n_prelude ({p}) and n_coda ({c}) must be >= 0")
        if p + c + 1 > n_layers:
            raise ConfigError(f"n_prelude + n_coda + 1 = {p + c + 1} exceeds the checkpoint's {n_layers} layers; "
                              "use a smaller prelude or coda")
        if not p <= rec < n_layers - c:
            raise ConfigError(f"recurrent_layer {rec} must lie between the prelude and the coda, "
                              f"in {p}..{n_layers - c - 1} for this {n_layers}-layer checkpoint")
        prelude, coda = list(range(p)), list(range(n_layers - c, n_layers))
        removed = [i for i in range(p, n_layers - c) if i != rec]  # never run: used only to build the SVD bases
        return prelude, rec, coda, removed


def paper_split(n_layers: int) -> tuple[int, int, int]:
    """The paper's proportions for any depth L: prelude = coda = round(8L/36), recurrent = L // 2."""
    edge = round(8 * n_layers / 36)  # L = 36: 8, the paper's (8, 18, 8)
    return edge, n_layers // 2, edge


@torch.no_grad()
def svd_bases(weights: dict[str, torch.Tensor], removed: list[dict[str, torch.Tensor]], rank: int):
    """LoRA bases per projection k: R_k = mean_i (W_i,k - W_rec,k); U S Vh = svd(R_k); A = Vh[:r], B = U[:, :r] S[:r].

    `weights` are the recurrent layer's weights; `removed` yields the removed layers' weights one at a time,
    so only one of them is in memory at once. With c = 1, (B @ A) is the best rank-r approximation of R_k.
    """
    total = {k: torch.zeros_like(w, dtype=torch.float32) for k, w in weights.items()}  # sum_i W_i,k, (out, in)
    n = 0  # counted while iterating: `removed` may be a generator (load_qwen streams it), with no len()
    for layer in removed:
        for k in total:
            total[k] += layer[k]  # accumulated in fp32 whatever the checkpoint's dtype
        n += 1
    bases = {}
    for k, w in weights.items():
        if n == 0:  # nothing removed: there is no residual to approximate
            bases[k] = (w.new_zeros(rank, w.shape[1]), w.new_zeros(w.shape[0], rank))  # A = B = 0: no delta
            continue
        R = total[k] / n - w.float()  # R_k = mean_i W_i,k - W_rec,k
        # LAPACK's SVD (MKL, CPU) is about 3x slower on a wide matrix than on its transpose (down_proj is
        # wide), so decompose the tall one: R^T = V S U^T.
        wide = R.shape[0] < R.shape[1]
        U, S, Vh = torch.linalg.svd(R.mT if wide else R, full_matrices=False)
        if wide:
            U, Vh = Vh.mT, U.mT  # svd gave R^T = U' S Vh', so R = Vh'^T S U'^T
        # S is folded into B: A's rows are orthonormal (||A x|| <= ||x||), and B A = U_r S_r Vh_r, the best
        # rank-r approximation of R_k (Eckart-Young).
        bases[k] = (Vh[:rank].to(w.dtype), (U[:, :rank] * S[:rank]).to(w.dtype))  # A (r, in), B (out, r)
    return bases


class Controller(nn.Module):
    """c = heads(MLP([silu(W_p p) ; E[s]])): one r-vector per projection, from the pooled state and the step."""

    def __init__(self, d: int, cfg: OuroborosConfig):
        super().__init__()
        self.rank = cfg.rank
        self.pool_proj = nn.Linear(d, cfg.pool_dim)  # W_p
        self.step_embed = nn.Embedding(cfg.max_depth, cfg.step_dim)  # E, one row per step s
        self.mlp = nn.Sequential(
            nn.Linear(cfg.pool_dim + cfg.step_dim, cfg.hidden_dim), nn.SiLU(),
            nn.Linear(cfg.hidden_dim, cfg.mlp_out_dim), nn.SiLU(),
        )
        # The seven heads Linear(128, r, bias=False), fused into one matrix. Zero-initialised: c = 0 at the
        # start, so the model begins as the plain looped layer.
        self.heads = nn.Linear(cfg.mlp_out_dim, len(PROJECTIONS) * cfg.rank, bias=False)
        nn.init.zeros_(self.heads.weight)  # the Controller: 692,864 parameters at d=2048, r=32

    def forward(self, p: torch.Tensor, step: int) -> torch.Tensor:
        # p (B, T, d) pooled state -> c (B, T, 7, r)
        a = F.silu(self.pool_proj(p))  # (B, T, pool_dim)
        # E[s], read straight from the table (no index tensor); cast to a's dtype, since the table is fp32 and a is
        # bf16 under autocast; expanded to (B, T, step_dim) as a view, without a copy.
        e = self.step_embed.weight[step].to(a.dtype).expand(*a.shape[:-1], -1)
        # [a ; e] (B, T, pool_dim + step_dim) -> (B, T, 7 * r) -> (B, T, 7, r), projections in PROJECTIONS' order
        return self.heads(self.mlp(torch.cat((a, e), dim=-1))).unflatten(-1, (len(PROJECTIONS), self.rank))


class StaticModulation(nn.Module):
    """The static per-step LoRA baseline: a learned c per (step, projection) that ignores the input."""

    def __init__(self, cfg: OuroborosConfig):
        super().__init__()
        # (max_depth, 7, r), zero like the Controller's heads: the plain looped layer at the start
        self.c = nn.Parameter(torch.zeros(cfg.max_depth, len(PROJECTIONS), cfg.rank))

    def forward(self, p: torch.Tensor, step: int) -> torch.Tensor:
        return self.c[step]  # (7, r), broadcast over batch and positions; p unused, kept for the Controller's signature


class Adapters(nn.Module):
    """LoRA healing: a trainable low-rank delta (alpha/r) B A on every projection of some kept layers, with the
    usual initialisation (A random, B = 0), so at the start the model is exactly the one without adapters. The
    delta goes through model.project like the Controller's, and is the same at every recurrent step."""

    def __init__(self, base: Decoder, layers: list[int], rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank  # passed as c, as the Controller's alpha / r is folded into its c
        self.layers = nn.ModuleDict()
        for i in layers:
            weights = nn.ParameterDict()
            for k, name in PROJECTIONS.items():
                out_dim, in_dim = base.get_parameter(f"model.layers.{i}.{name}.weight").shape  # nn.Linear: (out, in)
                A = torch.empty(rank, in_dim)
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # nn.Linear's initialisation, as LoRA's authors use
                # B = 0, so B A = 0 at the start. A must not be 0 too: with both zero, both gradients are zero for good.
                weights[f"{k}_A"], weights[f"{k}_B"] = nn.Parameter(A), nn.Parameter(torch.zeros(out_dim, rank))
            self.layers[str(i)] = weights

    def modulation(self, i: int) -> Modulation | None:
        if str(i) not in self.layers:
            return None
        w = self.layers[str(i)]
        # y = W x + b + (lora_alpha / r) B (A x): a modulation term whose c is the constant scale
        return {k: [(w[f"{k}_A"], w[f"{k}_B"], self.scale)] for k in PROJECTIONS}


def combined(mod: Modulation | None, extra: Modulation | None) -> Modulation | None:
    """The Controller's terms and an adapter's on the same layer: project() adds each in turn."""
    if mod is None or extra is None:
        return mod or extra  # whichever is given, or None
    return {k: mod.get(k, []) + extra.get(k, []) for k in {*mod, *extra}}  # every projection either touches


class RecurrentCache:
    """Generation state: KV caches of the prelude and coda layers, one KV cache per recurrent step (each
    step sees different keys), and per step the running sum of the hidden state for the causal pool."""

    def __init__(self, model: "Ouroboros", n_steps: int):
        self.layers = {i: KVCache() for i in model.prelude + model.coda}
        self.steps = [KVCache() for _ in range(n_steps)]  # step s's keys come from step s's input state
        self.pool_sum: list[torch.Tensor | float] = [0.0] * n_steps  # 0 until the first call stores a (B, 1, d) sum
        self.length = 0  # positions seen so far; Ouroboros.forward advances it


class Ouroboros(nn.Module):
    def __init__(self, base: Decoder, cfg: OuroborosConfig, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.cfg = cfg
        qcfg = base.cfg
        self.prelude, self.recurrent, self.coda, self.removed = cfg.split(qcfg.num_hidden_layers)
        if base.layer_ids != self.prelude + [self.recurrent] + self.coda:
            raise ConfigError(f"the base keeps layers {base.layer_ids}, the split needs "
                              f"{self.prelude + [self.recurrent] + self.coda}")
        # The frozen part. `base` alone, run as a Qwen2, is the cut baseline: prelude, layer once, coda.
        self.base = base.requires_grad_(False)  # every base weight, embeddings and LM head included
        # Buffers, not parameters: never trained, but saved in the state_dict and moved by .to() with the model.
        for k, (A, B) in bases.items():
            self.register_buffer(f"lora_A_{k}", A)  # (r, in)
            self.register_buffer(f"lora_B_{k}", B)  # (out, r)
        # The trainable part, always fp32 (bf16 weights would round small AdamW updates away).
        d = qcfg.hidden_size
        self.controller = {"dynamic": lambda: Controller(d, cfg), "static": lambda: StaticModulation(cfg),
                           "none": lambda: None}[cfg.controller]()  # lambdas: only the chosen variant is built
        self.gate = None
        if cfg.gate:
            self.gate = nn.Linear(2 * d, d)  # W_g, b_g: [h_new ; h_old] (2d) -> one g per channel
            nn.init.zeros_(self.gate.weight)  # W_g = 0: g = sigmoid(b_g) for every token and input at the start
            nn.init.constant_(self.gate.bias, cfg.gate_bias)
        self.step_norm = nn.Parameter(torch.ones(cfg.max_depth, d)) if cfg.step_norm else None  # norm_s = row s, init 1
        adapted = {"none": [], "coda": self.coda, "recurrent": [self.recurrent],
                   "all": self.prelude + [self.recurrent] + self.coda}[cfg.lora_layers]
        self.adapters = Adapters(base, adapted, cfg.lora_rank, cfg.lora_alpha) if adapted else None

    def forward(self, input_ids: torch.Tensor, n_steps: int, cache: RecurrentCache | None = None,
                logits: bool = True) -> torch.Tensor:
        """The method: input_ids (B, T) -> logits (B, T, vocab), looping the recurrent layer n_steps times.

            h = prelude(embed(x));  for s in 0..N-1: h = step_s(h);  logits = head(norm(coda(h)))

        With a cache (generation), input_ids continue the cached positions. logits=False: the coda's output,
        before the final norm and the head (see hidden)."""
        self.cfg.check_depth(n_steps)
        start = cache.length if cache else 0  # the position of input_ids[:, 0]
        cos, sin = self.base.rope(start, input_ids.shape[1], input_ids.device)  # rotary angles, shared by all layers
        h = self.embed_and_prelude(input_ids, cos, sin, cache)  # the frozen layers 0 .. n_prelude - 1
        for s in range(n_steps):  # the loop: one layer, with new input-dependent LoRA weights at every step
            # Only when a backward will follow, and never with a cache: the recomputation would write to it twice.
            if self.cfg.checkpoint_steps and torch.is_grad_enabled() and cache is None:
                h = checkpoint(self.step, h, s, cos, sin, use_reentrant=False)  # recomputed in backward
            else:
                h = self.step(h, s, cos, sin, cache)
        h = self.run_coda(h, cos, sin, cache)  # the frozen last n_coda layers
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.base.head(h) if logits else h  # final RMSNorm, then the LM head

    def step(self, h, s: int, cos, sin, cache: RecurrentCache | None = None):
        """Recurrent step s: the looped layer with this step's weights W + (alpha/r) B diag(c) A, then the step's
        RMSNorm, then the gate's mix of the new state and the old."""
        mod = combined(self.modulation(h, s, cache), self.adapted(self.recurrent))  # c = Controller(h, s)
        # The whole layer, residuals included: h_new is the next state, not a delta. Step s has its own KV cache.
        h_new = self.base.layer(self.recurrent)(h, cos, sin, mod, cache.steps[s] if cache else None)
        if self.step_norm is not None:  # the fp32 weight cast to the compute dtype, so h stays in it (bf16)
            h_new = rms_norm(h_new, self.step_norm[s].to(h_new.dtype), self.base.cfg.rms_norm_eps)  # h_new = norm_s(h_new)
        if self.gate is None:
            return h_new  # no gate: h = h_new
        g = torch.sigmoid(self.gate(torch.cat((h_new, h), dim=-1)))  # g = sigmoid(W_g [h_new ; h_old] + b_g), (B, T, d)
        return h + g * (h_new - h)  # h = g * h_new + (1 - g) * h_old, rearranged to one multiply

    def pool(self, h: torch.Tensor, s: int, cache: RecurrentCache | None) -> torch.Tensor:
        if self.cfg.pool == "mean":
            # The paper's pool: every position sees the mean over the whole sequence, future tokens
            # included. Kept only to reproduce the paper; it leaks, and cannot generate.
            if cache is not None:
                raise ConfigError("pool='mean' reads future tokens and cannot generate; use pool='causal'")
            return h.mean(dim=1, keepdim=True)  # (B, 1, d), broadcast over positions
        # Causal pool: p_t = mean(h_0 .. h_t), so the weights at position t never depend on tokens after t.
        T = h.shape[1]
        total = h.float().cumsum(dim=1)  # (B, T, d), in fp32: a long bf16 running sum rounds small terms away
        count = torch.arange(1, T + 1, device=h.device, dtype=torch.float32)  # (T,): t + 1 states in p_t
        if cache is not None:
            total = total + cache.pool_sum[s]  # plus the sum over the cached positions
            count = count + cache.length  # the cached positions are in the mean too
            cache.pool_sum[s] = total[:, -1:]  # the sum through the last position, for the next call
        return (total / count[:, None]).to(h.dtype)  # p_t (B, T, d), back in the compute dtype

    def modulation(self, h: torch.Tensor, s: int, cache: RecurrentCache | None):
        if self.controller is None:
            return None
        # The input-blind control reads zeros instead of the pooled state: the same Controller, c from s alone.
        # The static ablation reads nothing, so no pool is computed for it.
        reads_input = self.cfg.controller == "dynamic" and self.cfg.controller_input == "pooled"
        # p: (B, T, d); (B, 1, d) for pool='mean'; zeros (1, 1, d), whose c broadcasts over batch and positions.
        p = self.pool(h, s, cache) if reads_input else h.new_zeros(1, 1, h.shape[-1])
        c = (self.controller(p, s) * (self.cfg.alpha / self.cfg.rank)).to(h.dtype)  # (..., 7, r), the compute dtype
        # c_k = c[..., j, :] (alpha / r folded in); model.project adds B_k ((A_k x) * c_k).
        return {k: [(getattr(self, f"lora_A_{k}"), getattr(self, f"lora_B_{k}"), c[..., j, :])]
                for j, k in enumerate(PROJECTIONS)}

    def adapted(self, i: int) -> Modulation | None:
        return self.adapters.modulation(i) if self.adapters is not None else None

    def embed_and_prelude(self, input_ids, cos, sin, cache: RecurrentCache | None = None) -> torch.Tensor:
        # The prelude is frozen and its input needs no gradient, unless it carries adapters (--lora-layers all):
        # without this, backward would run through layers that have nothing to train.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.cfg.lora_layers == "all"):
            h = self.base.model.embed_tokens(input_ids)  # (B, T, d)
            for i in self.prelude:
                h = self.base.layer(i)(h, cos, sin, self.adapted(i), cache.layers[i] if cache else None)
        return h

    def run_coda(self, h, cos, sin, cache: RecurrentCache | None = None) -> torch.Tensor:
        for i in self.coda:  # frozen, as in the full model (with --lora-layers coda or all: adapted)
            h = self.base.layer(i)(h, cos, sin, self.adapted(i), cache.layers[i] if cache else None)
        return h

    def hidden(self, input_ids: torch.Tensor, n_steps: int) -> torch.Tensor:
        """forward's states before the final norm and the head (B, T, d): what training and evaluation read, since
        evaluate.loss_from_states applies the head a chunk of positions at a time (the whole vocabulary's logits
        never exist)."""
        return self(input_ids, n_steps, logits=False)

    def hidden_at(self, input_ids: torch.Tensor, depths: list[int]) -> dict[int, torch.Tensor]:
        """{depth: forward's states before the head} for several depths in one pass, for scoring. The state after
        step s does not depend on how many steps follow, so the coda runs after each requested step: 1, 2, 4 and 8
        steps cost 8 steps and 4 codas, not 15 steps. (States of d values per token: far smaller than the logits,
        which the caller makes from one depth at a time.)"""
        for d in depths:
            self.cfg.check_depth(d)
        cos, sin = self.base.rope(0, input_ids.shape[1], input_ids.device)  # from position 0: no cache here
        h = self.embed_and_prelude(input_ids, cos, sin)
        states = {}
        for s in range(max(depths)):
            h = self.step(h, s, cos, sin)
            if s + 1 in depths:
                states[s + 1] = self.run_coda(h, cos, sin)  # the loop goes on from h, not from the coda's output
        return states

    def parameters_used(self, depth: int) -> int:
        """Trainable parameters that a forward of `depth` steps reads: the rows of the step norms, the step
        embedding and the static c beyond `depth` are allocated but never used."""
        total = sum(p.numel() for p in self.trainable_parameters().values())
        per_step = [t for t in (self.step_norm, getattr(self.controller, "c", None),
                                getattr(getattr(self.controller, "step_embed", None), "weight", None)) if t is not None]
        return total - sum(t[depth:].numel() for t in per_step)  # rows depth.. are never read

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}  # everything but the frozen base

    @torch.no_grad()
    def generate(self, input_ids, n_steps: int, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        cache = RecurrentCache(self, n_steps)  # n_steps is fixed for the generation: one KV cache per step
        return sampling_loop(lambda ids: self(ids, n_steps, cache), input_ids, max_new_tokens, temperature,
                             top_k, generator)
