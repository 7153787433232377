"""Benchmarks, each ours against an alternative in the same process, on the same weights and inputs.

`python bench.py` runs the CPU suite (a few minutes) and prints one table:
  1. our Qwen2 against transformers' Qwen2ForCausalLM (sdpa), fp32: forward and forward+backward tokens/s;
  2. the Ouroboros training step against the same model built the authors' way (transformers' decoder layers,
     the LoRA term in wrapped projections), fp32 and bf16, eager and --compile; at depth 1, 4, 8; and one
     recurrence step against one plain decoder layer;
  3. activation memory of a training step at depth 1..16, with and without checkpoint_steps;
  4. loading a Qwen2.5-0.5B-shaped checkpoint into Ouroboros (SVD bases included) against from_pretrained;
  5. model FLOP utilisation of the training step against this machine's measured matmul rate;
  6. tokenising a generated 50M-token corpus into the token cache: speed, peak memory, and a second run.
`python bench.py --device cuda` instead trains at Qwen2.5-3B shapes on a GPU (the paper's setting).

Timings are medians of repeats after a warm-up, and ours and the alternative take turns within each repeat,
so background load falls on both alike. Every weight is random: speed and memory do not depend on values.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import data
import train
from controller import Ouroboros, OuroborosConfig, paper_split, svd_bases
from devices import BASE_DTYPE, autocast, native_bf16
from evaluate import LOSS_CHUNK, count_flops, loss_from_states, next_token_loss
from load_qwen import load_config, load_model, load_ouroboros, save_model
from model import PROJECTIONS, Decoder, DecoderConfig, rms_norm

ROOT = Path(__file__).resolve().parent  # the children run here, so their `import bench` finds this file
SEQ = 256  # tokens per sequence on CPU, batch 1
# ~25M parameters, 12.6M of them the tied embedding (32,768 x 384); 8 layers, so the paper's split is 2 / 4 / 2.
SMALL = DecoderConfig(vocab_size=32768, hidden_size=384, intermediate_size=1024, num_hidden_layers=8,
                    num_attention_heads=6, num_key_value_heads=2, torch_dtype="float32")
# Qwen2.5-0.5B's shapes (24 layers, tied embedding), stored in bf16 as released.
QWEN_05B = DecoderConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, torch_dtype="bfloat16")
QWEN_3B = DecoderConfig(torch_dtype="bfloat16")  # the config defaults are Qwen2.5-3B's
# For warm-up loads: about 300 KiB of weights, so a warm-up pays a load's one-time costs and little else.
TINY = DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, torch_dtype="bfloat16")


# ----------------------------------------------------------------------------------------------------------
# Measuring

def median_seconds(fns: dict, repeats: int, warmup: int = 1, sync=lambda: None) -> dict[str, float]:
    """Calls the functions in turn, `warmup` rounds untimed, then `repeats` timed rounds; median seconds each.
    Each round starts with the next function, so that none is always the one that runs first."""
    times = {name: [] for name in fns}
    names = list(fns)
    for i in range(warmup + repeats):
        # The functions run back to back within a round, so a burst of load from other processes falls on all of
        # them alike, not on whichever happened to be measured then.
        for name in names[i % len(names):] + names[:i % len(names)]:
            fn = fns[name]
            # On CUDA, sync waits for queued kernels: the clock starts on an idle device and stops when fn is done.
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if i >= warmup:  # warm-up rounds take one-time costs (first allocations, compilation) off the clock
                times[name].append(time.perf_counter() - t)
    # A median: one round slowed by another process moves it less than it would move a mean.
    return {name: statistics.median(ts) for name, ts in times.items()}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident pages now, not the peak


def peak_rss_bytes() -> int:
    # A high-water mark: a step shows in it only if it climbs above every earlier peak of this process.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def in_subprocess(call: str, env: dict | None = None) -> dict:
    """Runs `bench.<call>` in a fresh Python and returns the JSON it prints. Linux carries a process's peak RSS
    over into a program it execs, so a child exec'd straight from this (large) process would report our peak
    as its own; started by a shell, which forks again, it starts from the shell's few MiB."""
    # "$0" and "$1" are the interpreter and the code, passed as arguments, so the code needs no shell quoting.
    # `; exit $?` leaves the shell a command after python's, so it cannot exec python in its own place (what sh
    # does for a lone command): it forks, and python starts from the shell's small process.
    command = ["/bin/sh", "-c", '"$0" -c "$1"; exit $?', sys.executable, f"import bench; bench.{call}"]
    # Our environment (OMP_NUM_THREADS from --threads) plus `env`: settings glibc reads only at start-up, such as
    # malloc's, have to be in place before the child starts.
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
    if done.returncode != 0:
        raise RuntimeError(f"bench.{call} failed:\n{done.stderr[-3000:]}")
    # The child's JSON is its last stdout line; anything a library printed before it is skipped.
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_flops_per_s(n: int = 2048, repeats: int = 5, device="cpu", dtype=torch.float32) -> float:
    # The CPU MFU rows' denominator: the rate this machine's BLAS sustains on one large fp32 matmul, measured here
    # rather than taken from a datasheet.
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    seconds = median_seconds({"mm": lambda: a @ b}, repeats, warmup=2, sync=sync)["mm"]
    return 2 * n ** 3 / seconds  # a multiply-add counts as 2 FLOPs, as in count_flops


# ----------------------------------------------------------------------------------------------------------
# Models, checkpoints and the training step

def write_random_checkpoint(cfg: DecoderConfig, path: Path, shards: int = 2, device="cpu") -> Path:
    """A Hugging Face-layout checkpoint of random weights in cfg.torch_dtype, as `shards` safetensors files
    plus model.safetensors.index.json, like the released Qwen2.5 checkpoints."""
    dtype = getattr(torch, cfg.torch_dtype)
    with torch.device("meta"):  # the state_dict's names and shapes, no memory
        model = Decoder(cfg)
    generator = torch.Generator(device).manual_seed(0)  # seeded: the same weights in every process and run
    state = {}
    for key, p in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:  # tied: the head is the embedding, not stored
            continue
        if key.endswith("norm.weight"):  # 1, a fresh RMSNorm's weight, so activations keep their scale
            state[key] = torch.ones(p.shape, dtype=dtype)
        else:  # made on `device` (fast on a GPU), stored on the CPU in the checkpoint's dtype
            state[key] = (torch.randn(p.shape, generator=generator, device=device) * 0.02).to("cpu", dtype)
    model.load_state_dict(state, strict=False, assign=True)  # strict=False: a tied head is absent
    model.tie_weights()  # assign replaced the embedding: tie the head to it again
    save_model(model, path)  # config.json, and the weights as one file, which we re-split below
    (path / "model.safetensors").unlink()
    keys = list(state)
    per_shard = -(-len(keys) // shards)  # ceil(len(keys) / shards)
    weight_map = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s * per_shard:(s + 1) * per_shard]}
        save_file(part, str(path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))  # the index: key -> the shard that holds it
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def token_batch(vocab_size: int, batch: int, seq: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    # A fixed generator: every call gives the same batch, so ours and the alternative see the same tokens. Drawn on
    # the CPU, then moved: the same ids on every device. seq + 1 ids make seq inputs and their seq targets.
    ids = torch.randint(vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    return ids[:, :-1], ids[:, 1:]  # inputs, next-token targets


def small_ouroboros(path: Path, checkpoint_steps: bool = False):
    p, r, c = paper_split(SMALL.num_hidden_layers)
    cfg = OuroborosConfig(n_prelude=p, recurrent_layer=r, n_coda=c, checkpoint_steps=checkpoint_steps)
    torch.manual_seed(0)  # the fresh trainables' initialisation: the same in every process
    model = load_ouroboros(path, cfg, torch.float32).train()
    # train.py's betas. Only the trainables: the base is frozen, as in training.
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=3e-4, betas=(0.9, 0.95))
    return model, optimizer


def train_step(model: Ouroboros, optimizer, x, y, depth: int) -> None:
    # bf16 autocast on GPU; fp32 on CPU, so the CPU rows compare against the fp32 matmul rate.
    step_with(model, optimizer, x, y, depth, "bf16" if x.is_cuda else "fp32")


# ----------------------------------------------------------------------------------------------------------
# The reference: Ouroboros built the way the authors' release builds it, from transformers' decoder layers, with
# the LoRA term added by wrapping the seven projections of the looped layer and c set on the wrappers before each
# step. The Controller, gate and step norms are copies of ours (controller.py), so the two compute one function.

class WrappedProjection(nn.Module):
    """y = W x + b + B ((A x) * c), with c stored on the module by the caller (the authors' set_diag)."""

    def __init__(self, linear: nn.Linear, A: torch.Tensor, B: torch.Tensor):
        super().__init__()
        self.linear, self.c = linear, None  # c: set by the caller before each step
        # Buffers: never trained, and moved by .to() with the model.
        self.register_buffer("A", A)
        self.register_buffer("B", B)

    def forward(self, x):
        y = self.linear(x)
        # No c: the plain projection. Else two thin matmuls, B ((A x) * c), as ours; B diag(c) A is never formed.
        return y if self.c is None else y + ((x @ self.A.T) * self.c) @ self.B.T


class AuthorsWay(nn.Module):
    def __init__(self, ours: Ouroboros, path: Path, dtype: torch.dtype):
        super().__init__()
        from transformers import Qwen2ForCausalLM
        # transformers' whole model from the same checkpoint, with sdpa attention as ours uses; frozen, so only the
        # copies made below train.
        hf = Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").requires_grad_(False)
        self.hf, self.cfg, self.eps = hf, ours.cfg, hf.config.rms_norm_eps
        layers = hf.model.layers
        # Plain lists of hf's layers in the order they run; hf still holds them as its submodules. The removed layers
        # stay in hf and never run.
        self.prelude, self.coda = [layers[i] for i in ours.prelude], [layers[i] for i in ours.coda]
        self.recurrent = layers[ours.recurrent]
        self.wrapped = {}  # a plain dict: each wrapper becomes hf's submodule by setattr below
        for k, name in PROJECTIONS.items():
            parent, attr = name.split(".")
            module = self.recurrent.get_submodule(parent)
            # Our SVD bases, in this model's dtype: the same A and B as ours.
            self.wrapped[k] = WrappedProjection(getattr(module, attr), getattr(ours, f"lora_A_{k}").to(dtype),
                                                getattr(ours, f"lora_B_{k}").to(dtype))
            setattr(module, attr, self.wrapped[k])  # the layer's own forward now calls the wrapper
        # The trainables: copies of ours, in the checkpoint's dtype (the authors keep them in bf16 under bf16).
        self.controller = copy.deepcopy(ours.controller).to(dtype)
        self.gate = copy.deepcopy(ours.gate).to(dtype)
        self.step_norm = nn.Parameter(ours.step_norm.detach().clone().to(dtype))

    def forward(self, input_ids: torch.Tensor, n_steps: int) -> torch.Tensor:
        model = self.hf.model
        h = model.embed_tokens(input_ids)
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
        rope = model.rotary_emb(h, position_ids)  # (cos, sin), shared by every layer, as in ours
        # Neither the prelude's weights nor its input need a gradient, so autograd records nothing here, as in ours.
        for layer in self.prelude:
            h = layer(h, position_ids=position_ids, position_embeddings=rope)
        # t + 1 states in position t's causal mean. In h's dtype: under bf16 this pool sums in bf16, where ours
        # (Ouroboros.pool) sums in fp32.
        count = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[:, None]
        for s in range(n_steps):
            # c (B, T, 7, r) from the pooled state and the step, alpha / r folded in, as ours computes it.
            c = self.controller(h.cumsum(dim=1) / count, s) * (self.cfg.alpha / self.cfg.rank)  # causal pool
            # The authors' set_diag: each wrapper holds its c until the next step overwrites it (ours passes c as an
            # argument to the layer instead).
            for j, k in enumerate(PROJECTIONS):
                self.wrapped[k].c = c[..., j, :]
            # h_new = norm_s(layer(h)): the whole layer, residuals included, then step s's RMSNorm.
            h_new = rms_norm(self.recurrent(h, position_ids=position_ids, position_embeddings=rope),
                             self.step_norm[s], self.eps)
            g = torch.sigmoid(self.gate(torch.cat((h_new, h), dim=-1)))  # g = sigmoid(W_g [h_new ; h] + b_g)
            h = g * h_new + (1 - g) * h  # as the paper writes it; ours computes h + g (h_new - h)
        for layer in self.coda:
            h = layer(h, position_ids=position_ids, position_embeddings=rope)
        return self.hf.lm_head(model.norm(h))  # the whole vocabulary's logits, as ours' forward returns

    def trainable_parameters(self) -> dict:
        # The copies of the Controller, gate and step norms: hf is frozen.
        return {n: p for n, p in self.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------------------
# The CPU suite, one function per part; each returns table rows.

def row(name, ours, alternative, unit, ratio=None, ratio_is="", target=None, met=None) -> dict:
    # One table row; ratio, target and met stay None where a row has none, and print as '-'.
    return dict(name=name, ours=ours, alternative=alternative, unit=unit, ratio=ratio, ratio_is=ratio_is,
                target=target, met=met)


def qwen2_vs_transformers(label: str, path: Path, repeats: int, backward_repeats: int = 0) -> list[dict]:
    """Our Qwen2 and transformers' on the checkpoint at `path`, both in fp32: forward, and forward+backward
    if backward_repeats."""
    from transformers import Qwen2ForCausalLM

    ours = load_model(path, torch.float32)  # frozen, in eval mode (load_model)
    theirs = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    x, y = token_batch(ours.cfg.vocab_size, 1, SEQ)
    # First, that both compute the same function: a speed ratio between two different models would mean nothing.
    with torch.no_grad():
        a, b = ours(x), theirs(x).logits
        # atol relative to the largest logit: the two sum in different orders, which moves fp32 results by rounding.
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item()):
            raise RuntimeError(f"{label}: our logits differ from transformers' ({(a - b).abs().max():.2e}); "
                               "the comparison would not be on the same model")
        del a, b  # two (1, T, vocab) logits, freed before the timing
    logits = {"ours": lambda: ours(x), "transformers": lambda: theirs(x).logits}

    def forward(fn):
        with torch.no_grad():  # inference: no graph is recorded
            fn()

    def forward_backward(fn, model):
        F.cross_entropy(fn().flatten(0, 1), y.flatten()).backward()
        model.zero_grad(set_to_none=True)  # no .grad left to add into: every round does the same work

    # fn=fn binds each function when its lambda is made; a plain closure would see only the loop's last one.
    t = median_seconds({k: lambda fn=fn: forward(fn) for k, fn in logits.items()}, repeats)
    # The ratio is their time over ours, i.e. our speed over theirs: above 1 when ours is faster.
    rows = [row(f"Qwen2 {label}: forward", SEQ / t["ours"], SEQ / t["transformers"], "tok/s",
                t["transformers"] / t["ours"], "ours/HF speed", ">= 1.0", t["transformers"] >= t["ours"])]
    if backward_repeats:
        ours.requires_grad_(True)  # load_model freezes; train every weight, as transformers does by default
        models = {"ours": ours, "transformers": theirs}
        t = median_seconds({k: lambda k=k: forward_backward(logits[k], models[k]) for k in logits}, backward_repeats)
        rows.append(row(f"Qwen2 {label}: forward+backward", SEQ / t["ours"], SEQ / t["transformers"], "tok/s",
                        t["transformers"] / t["ours"], "ours/HF speed", ">= 1.0", t["transformers"] >= t["ours"]))
    return rows


def ouroboros_training(path: Path, repeats: int, flops_per_s: float) -> list[dict]:
    """The small Ouroboros training step (forward, backward, AdamW over the trainables) at depths 1, 4, 8."""
    model, optimizer = small_ouroboros(path)
    x, y = token_batch(SMALL.vocab_size, 1, SEQ)
    depths = (1, 4, 8)
    # One model and optimizer for every depth: the depth is an argument of forward, not part of the model.
    steps = {d: lambda d=d: train_step(model, optimizer, x, y, d) for d in depths}
    flops = {d: count_flops(steps[d]) for d in depths}  # one untimed step per depth; its matmul and attention FLOPs
    t = median_seconds(steps, repeats)
    rows = []
    for d in depths:
        rows.append(row(f"Ouroboros small train step, depth {d}", SEQ / t[d], None, "tok/s"))
    # MFU: counted FLOPs per second over the measured matmul rate, the share of BLAS's rate the step reaches.
    for d in depths:
        rows.append(row(f"MFU, small train step, depth {d} (vs measured fp32 matmul)", flops[d] / t[d] / flops_per_s,
                        flops_per_s / 1e9, "MFU | GFLOP/s"))
    return rows


# Two shapes: the demo's widths (d = 256, vocabulary 4096) with 8 layers (2 / 4 / 2, batch 4), and Qwen2.5-0.5B's
# layers (12 of them, 3 / 6 / 3, batch 1); depth 4, seq 256, the causal pool.
DEMO_SHAPE = DecoderConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, torch_dtype="float32")
# Qwen2.5-0.5B's shapes with 12 layers instead of 24, and a new `extra` dict rather than QWEN_05B's own.
QWEN_05B_12 = DecoderConfig(**{**QWEN_05B.__dict__, "num_hidden_layers": 12, "extra": {}})


def step_with(model, optimizer, x, y, depth: int, precision: str) -> None:
    """One training step as train.py takes it: autocast under bf16 (a no-op for a model held in bf16)."""
    # The whole vocabulary's logits and one fp32 cross-entropy, for ours and theirs alike (train.py chunks the loss
    # with loss_from_states): the same loss work on both sides, so a row compares the models.
    with autocast(x.device, precision):
        loss = F.cross_entropy(model(x, depth).flatten(0, 1).float(), y.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no zeroing pass: the next backward writes fresh gradients


def authors_way_training(work: Path, repeats: int) -> list[dict]:
    """The training step (forward, loss, backward, AdamW) of ours against the reference built the authors' way,
    on the same weights and batch: fp32 both; bf16 as each is meant to run (ours: a bf16 base and fp32 trainables
    under autocast; theirs: every parameter in bf16)."""
    rows = []
    for label, cfg, split, batch in (("d=256 8 layers 2/4/2, batch 4", DEMO_SHAPE, (2, 4, 2), 4),
                                     ("0.5B layers x12 3/6/3, batch 1", QWEN_05B_12, (3, 6, 3), 1)):
        path = write_random_checkpoint(cfg, work / f"authors-{cfg.num_hidden_layers}")
        x, y = token_batch(cfg.vocab_size, batch, SEQ)  # one batch for all three models
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if precision == "bf16" and not native_bf16(torch.device("cpu")):  # it would crawl, not measure
                rows.append(row(f"train step {label}, depth 4, bf16: skipped, this CPU has no native bf16 "
                                "(a bf16 matmul runs ~100x slower than fp32 here)", None, None, "tok/s"))
                continue
            torch.manual_seed(0)  # the trainables' initialisation
            ours = load_ouroboros(path, OuroborosConfig(*split), dtype).train()  # base in dtype, trainables fp32
            with torch.no_grad():  # trained-looking values: no multiplication by the initial zeros
                nn.init.normal_(ours.controller.heads.weight, std=0.02)
                nn.init.normal_(ours.gate.weight, std=0.01)
            theirs = AuthorsWay(ours, path, dtype).train()  # copies ours' trainables: both start equal
            compiled = copy.deepcopy(ours)  # the same weights, so that ours stays eager
            torch._dynamo.reset()  # each row compiles afresh: the rows before would fill dynamo's recompile limit
            train.compile_by_region(compiled)  # train.py --compile; it compiles during the warm-up round
            optimizers = {k: torch.optim.AdamW(m.trainable_parameters().values(), lr=1e-5, betas=(0.9, 0.95))
                          for k, m in (("ours", ours), ("theirs", theirs), ("compiled", compiled))}
            # Theirs runs without autocast: every one of its parameters is in `dtype` already, the trainables included.
            steps = {"ours": lambda: step_with(ours, optimizers["ours"], x, y, 4, precision),
                     "compiled": lambda: step_with(compiled, optimizers["compiled"], x, y, 4, precision),
                     "theirs": lambda: step_with(theirs, optimizers["theirs"], x, y, 4, "fp32")}
            # The three take turns in every round, so load from other processes falls on all three alike.
            t = median_seconds(steps, repeats)
            # The ratio is their time over ours: above 1 when ours is faster; the target asks for 15% faster.
            for what, name in (("ours", f"train step {label}, depth 4, {precision} (alt: the authors' way)"),
                               ("compiled", "  same, ours with --compile (each layer compiled; theirs as released)")):
                rows.append(row(name, batch * SEQ / t[what], batch * SEQ / t["theirs"], "tok/s", t["theirs"] / t[what],
                                "ours/theirs speed", ">= 1.15", t["theirs"] >= 1.15 * t[what]))
    return rows


def recurrence_step_overhead(repeats: int) -> list[dict]:
    """One recurrence step (Controller, modulated layer, step norm, gate) against one plain decoder layer, at
    Qwen2.5-3B's layer shapes (one layer, random weights, batch 1)."""
    torch.manual_seed(0)
    # One layer at Qwen2.5-3B's shapes (the config's defaults); a 64-token vocabulary, since no embedding is timed.
    base = Decoder(DecoderConfig(vocab_size=64, num_hidden_layers=1, torch_dtype="float32"))
    cfg = OuroborosConfig(n_prelude=0, recurrent_layer=0, n_coda=0)  # that one layer is the looped one
    layer = base.layer(0)
    # Random bases at the SVD's scale: A's rows of about unit norm, like the orthonormal rows of Vh; B small.
    bases = {}
    for k, name in PROJECTIONS.items():
        linear = layer.get_submodule(name)
        bases[k] = (torch.randn(cfg.rank, linear.in_features) / linear.in_features ** 0.5,
                    torch.randn(linear.out_features, cfg.rank) * 0.01)  # A (r, in), B (out, r)
    model = Ouroboros(base, cfg, bases)
    with torch.no_grad():  # trained-looking values: no multiplication by the initial zeros
        nn.init.normal_(model.controller.heads.weight, std=0.02)
        nn.init.normal_(model.gate.weight, std=0.01)
    h = torch.randn(1, SEQ, base.cfg.hidden_size)  # a state (1, T, d), as the prelude would hand it
    cos, sin = base.rope(0, SEQ, h.device)  # once, outside the timing
    grad = torch.randn_like(h)  # the gradient the layers above would send back
    h_grad = h.clone().requires_grad_(True)  # backward reaches the state, as in a loop

    def forward(fn):
        with torch.no_grad():
            fn(h)

    def forward_backward(fn):
        fn(h_grad).backward(grad)
        model.zero_grad(set_to_none=True)
        h_grad.grad = None  # reset, like the weights' gradients

    # Step 3: every step costs the same; s only picks rows of the step embedding and the step norms.
    fns = {"step": lambda x: model.step(x, 3, cos, sin), "layer": lambda x: layer(x, cos, sin)}
    rows = []
    # The forward ratio sits near its target: three times the repeats keep other processes' load out of it.
    for what, run, n in (("forward", forward, 3 * repeats), ("forward+backward", forward_backward, repeats)):
        t = median_seconds({k: lambda fn=fn: run(fn) for k, fn in fns.items()}, n)
        ratio = t["step"] / t["layer"]  # the recurrence step's cost in plain decoder layers
        target = (("<= 1.2", ratio <= 1.2) if what == "forward" else (None, None))
        rows.append(row(f"recurrence step vs DecoderLayer, 3B shapes, {what}", t["step"] * 1e3, t["layer"] * 1e3,
                        "ms", ratio, "step/layer time", *target))
    return rows


def memory_child(path: str, depth: int, checkpoint_steps: bool) -> None:
    """In a fresh process: one small Ouroboros training step; prints the RSS before it and the peak."""
    model, optimizer = small_ouroboros(Path(path), checkpoint_steps)
    x, y = token_batch(SMALL.vocab_size, 1, SEQ)
    # Setup's cyclic garbage freed now: collected during the step, its memory would be reused there and hide part
    # of the step's increase.
    gc.collect()
    before, high_water_before = rss_bytes(), peak_rss_bytes()  # the high-water mark that setup left
    train_step(model, optimizer, x, y, depth)
    print(json.dumps(dict(before=before, high_water_before=high_water_before, peak=peak_rss_bytes())))


# glibc's malloc raises its mmap threshold as large blocks are freed, after which freed activations stay in
# a fragmented heap and RSS grows with every allocate/free cycle, i.e. with depth. A fixed threshold returns
# large blocks to the system on free, so that RSS follows the live tensors.
# 64 KiB; set in a child's environment, since glibc reads it when the process starts.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def training_memory(path: Path) -> list[dict]:
    """Peak RSS of one training step over the RSS just before it, i.e. activation memory (plus AdamW's state)."""
    increase = {}
    # (depth, checkpoint_steps, env): every depth with per-step checkpointing (ours) and without (the alternative).
    runs = [(d, ckpt, FIXED_MMAP_THRESHOLD) for d in (1, 4, 8, 16) for ckpt in (True, False)]
    runs += [(d, True, None) for d in (1, 16)]  # the same with glibc's default, for comparison
    for depth, ckpt, env in runs:
        # A fresh process per measurement: the peak is a high-water mark, so each step must start below it.
        m = in_subprocess(f"memory_child({str(path)!r}, {depth}, {ckpt})", env)
        if m["peak"] <= m["high_water_before"]:
            raise RuntimeError(f"depth {depth}: the training step did not raise the process's peak RSS "
                               f"({m}); the setup's own peak hides it")
        # MiB, keyed by (depth, checkpoint_steps, glibc's default malloc).
        increase[depth, ckpt, env is None] = (m["peak"] - m["before"]) / 2 ** 20
    rows = []
    # Each depth against depth 1, both checkpointed: how the activation memory grows with depth.
    for depth in (1, 4, 8, 16):
        ratio = increase[depth, True, False] / increase[1, True, False]
        target = ("<= 1.25", ratio <= 1.25) if depth == 16 else (None, None)
        rows.append(row(f"train-step activation memory, depth {depth}", increase[depth, True, False],
                        increase[depth, False, False], "MiB", ratio, "ckpt / ckpt depth 1", *target))
    ratio = increase[16, True, True] / increase[1, True, True]
    rows.append(row("  same, glibc default malloc, ckpt: depth 16 (alt: depth 1)", increase[16, True, True],
                    increase[1, True, True], "MiB", ratio, "depth 16 / depth 1"))
    return rows


# --memory: one training step at Qwen2.5-0.5B's real shapes (the vocabulary included), and the whole command.
MEMORY = dict(seq=2048, depth=8)


def reset_peak() -> int:
    """Resets the kernel's record of this process's peak RSS to its current RSS (Linux 4.0+); returns the RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # 5: the peak RSS (VmHWM) set back to the current RSS, see proc(5)
    return rss_bytes()


def vm_hwm_bytes() -> int:
    # VmHWM, in kB: the peak RSS that clear_refs resets (reset_peak).
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def step_memory_child(path: str, precision: str, loss: str, device: str) -> None:
    """In a fresh process: Ouroboros at the paper's split of the checkpoint at `path`, then one training step
    (forward, loss, backward, AdamW) of batch 1 at MEMORY's seq and depth; prints the peak memory the step added
    to what loading left (peak RSS on the CPU, torch.cuda.max_memory_allocated on CUDA), and the sizes it had.
    loss "chunked": loss_from_states; "logits": the whole vocabulary's logits, then the cross-entropy."""
    dev = torch.device(device)
    cfg = load_config(path)
    p, r, c = paper_split(cfg.num_hidden_layers)
    # The base in the compute dtype (BASE_DTYPE), as train.py loads it; the trainables in fp32.
    model = load_ouroboros(path, OuroborosConfig(n_prelude=p, recurrent_layer=r, n_coda=c),
                           BASE_DTYPE[precision], dev).train()
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-5, betas=(0.9, 0.95))
    x, y = token_batch(cfg.vocab_size, 1, MEMORY["seq"], dev)
    gc.collect()  # as in memory_child: setup's garbage gone before `before`
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)  # the peak counts from here
        before = torch.cuda.memory_allocated(dev)  # live tensors' bytes, not the allocator's reserve
    else:
        before = reset_peak()  # and the peak RSS counts from here
    # train.py's loss: the hidden states, then the chunked loss; or, the alternative, the whole vocabulary's logits.
    with autocast(dev, precision):
        h = model.hidden(x, MEMORY["depth"])
        if loss == "chunked":
            value = loss_from_states(h, y, model.base.head)
        else:
            value = next_token_loss(model.base.head(h), y)
    value.backward()
    optimizer.step()  # AdamW's moments made now, after backward freed the activations
    # The peak over the whole step, forward to AdamW's update.
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else vm_hwm_bytes()
    # For the table: the frozen base with the LoRA bases (buffers), and the fp32 trainables.
    kept = sum(t.numel() * t.element_size() for t in [*model.base.parameters(), *model.buffers()])
    trainable = sum(t.numel() * t.element_size() for t in model.trainable_parameters().values())
    print(json.dumps(dict(increase=peak - before, kept=kept, trainable=trainable)))


def command_peak_child(argv: list[str], train_py: str) -> None:
    """In a fresh process: runs `python train_py argv` and prints that child's peak RSS."""
    done = subprocess.run([sys.executable, train_py, *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{train_py} {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    # RUSAGE_CHILDREN: the largest peak among the children this process has waited for, here train.py alone;
    # in the long-lived bench process it would include every earlier child's.
    print(json.dumps(dict(peak=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)))


def meta_ouroboros(cfg: DecoderConfig, split: tuple[int, int, int]) -> Ouroboros:
    """Ouroboros at cfg's shapes on the meta device: sizes without memory."""
    p, r, c = split
    with torch.device("meta"):
        # Only the kept layers, as load_ouroboros keeps them: prelude, recurrent, coda.
        base = Decoder(cfg, list(range(p)) + [r] + list(range(cfg.num_hidden_layers - c, cfg.num_hidden_layers)))
        base.requires_grad_(False)
        shapes = {k: base.get_parameter(f"model.layers.{r}.{name}.weight").shape for k, name in PROJECTIONS.items()}
        # Bases of rank 32 (OuroborosConfig's r) with the recurrent layer's shapes; on meta only the shapes exist.
        bases = {k: (torch.zeros(32, n_in), torch.zeros(n_out, 32)) for k, (n_out, n_in) in shapes.items()}
        return Ouroboros(base, OuroborosConfig(n_prelude=p, recurrent_layer=r, n_coda=c), bases)


def saved_activation_bytes(model: Ouroboros, batch: int, seq: int, depth: int) -> int:
    """What autograd keeps for backward in one fp32 training forward (and its chunked loss): every saved tensor's
    storage once, weights excluded. On the meta device (shapes only) it costs no memory at any size."""
    # Token ids on the model's device (meta, or the CPU where the test checks the count on real tensors).
    x = torch.zeros(batch, seq, dtype=torch.long, device=model.base.model.embed_tokens.weight.device)
    saved = {}

    # The pack hook sees every tensor autograd saves for backward. Keyed by storage, so views of one storage
    # count once; the tensor is handed back unchanged.
    def keep(t):
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    def flash(q, k, v, is_causal=False, **kwargs):
        # The fused kernel a real run takes, which keeps q, k, v, the output and the log-sum-exp; on the meta
        # device scaled_dot_product_attention would take the math path, which keeps the T x T weights.
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal)[0]

    # The unpack hook never runs: no backward follows. mock.patch swaps F's attention for `flash` inside the with
    # only, and puts it back after.
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            mock.patch.object(F, "scaled_dot_product_attention", flash):
        # x doubles as the targets: any (B, T) ids have the shapes the loss needs.
        loss_from_states(model.hidden(x, depth), x, model.base.head)
    # Weights that autograd saves (a linear layer keeps its weight for backward) are the model's weights, counted
    # apart; only activations remain.
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    return sum(n for k, n in saved.items() if k not in weights)


def memory_model(cfg: DecoderConfig, split, batch: int, seq: int, depth: int, precision: str = "fp32",
                 checkpoint_steps: bool = False) -> dict:
    """A training step's memory in bytes, by parts:
    - weights: the kept layers, embedding, norms and LoRA bases, in the compute dtype;
    - trainable: the fp32 trainables; their gradients as much again, AdamW's two moments twice that;
    - activations: what autograd saves, counted in fp32 on the meta device: `per_step` for each recurrent step
      (the Controller, the modulated layer, the step norm, the gate), plus the rest (the coda, the loss's chunk
      inputs; the frozen prelude saves nothing). Under bf16 (one compute dtype) taken as half, a slight
      underestimate: norm statistics, the pool's running sum and the loss stay fp32. With checkpoint_steps each
      step keeps only its input state, and one step's state is rebuilt at a time in backward;
    - loss: one chunk's transient in backward (logits, their fp32 copy, the log-softmax, its gradient).
    The first step's peak above the loaded model: activations + loss + gradients (AdamW's moments are made after
    backward has freed the activations); `total` is a later step's, with the moments."""
    model = meta_ouroboros(cfg, split)
    full = saved_activation_bytes(model, batch, seq, depth)
    # One more step's saved bytes. depth - 1 must be at least 1: forward refuses 0 steps.
    per_step = full - saved_activation_bytes(model, batch, seq, depth - 1)
    rest, d = full - depth * per_step, cfg.hidden_size  # rest: what does not grow with depth
    half = 0.5 if precision == "bf16" else 1.0  # bf16 activations: 2 bytes an element, not 4
    # Checkpointed: each step keeps its input state, B T d values of 4 bytes, and backward rebuilds one step's
    # saved tensors at a time. Otherwise every step keeps all of its own.
    steps = depth * batch * seq * d * 4 + per_step if checkpoint_steps else depth * per_step
    activations = half * (rest + steps)
    width = 2 if precision == "bf16" else 4  # bytes per weight in the compute dtype
    weights = width * sum(t.numel() for t in [*model.base.parameters(), *model.buffers()])
    trainable = 4 * sum(p.numel() for p in model.trainable_parameters().values())  # fp32: 4 bytes each
    # Four (n, V) tensors, 4 bytes an element, in a chunk's backward (see LOSS_CHUNK); n: a chunk, or all if fewer.
    loss = 4 * 4 * min(LOSS_CHUNK, batch * seq) * cfg.vocab_size
    step_peak = activations + loss + trainable  # the gradients: as large as the trainables
    # From the second step on, AdamW's moments are there too: weights, trainables, moments, then the step's peak.
    return dict(weights=weights, trainable=trainable, optimizer=2 * trainable, per_step=half * per_step,
                activations=activations, loss=loss, step_peak=step_peak, total=weights + 3 * trainable + step_peak)


def memory_suite(args) -> list[dict]:
    """--memory: the training step's peak at 0.5B shapes with the chunked loss against the whole vocabulary's
    logits, per precision the device runs natively; on the CPU also the whole `train.py --steps 1` command, against
    the same command in another checkout (--baseline) when one is given."""
    device = torch.device(args.device)
    mib, rows = 2 ** 20, []
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        work = Path(work)
        progress("writing a Qwen2.5-0.5B-shaped bf16 checkpoint")
        path = write_random_checkpoint(QWEN_05B, work / "qwen05")
        shape = f"0.5B shapes (vocab 151,936), 5/12/5, seq {MEMORY['seq']}, depth {MEMORY['depth']}, batch 1"
        for precision in ("fp32", "bf16"):
            if precision == "bf16" and not native_bf16(device):
                rows.append(row(f"train step {shape}, bf16: skipped, no native bf16 here", None, None, "MiB"))
                continue
            progress(f"training-step memory, {precision}, fresh processes")
            # Each loss in a fresh process: one step's peak, with nothing left over from the other.
            m = {loss: in_subprocess(f"step_memory_child({str(path)!r}, {precision!r}, {loss!r}, {args.device!r})",
                                     FIXED_MMAP_THRESHOLD) for loss in ("chunked", "logits")}
            what = "max allocated" if device.type == "cuda" else "peak RSS"
            rows.append(row(f"train step {shape}, {precision}: {what} above the loaded model (alt: whole-vocabulary "
                            "logits)", m["chunked"]["increase"] / mib, m["logits"]["increase"] / mib, "MiB",
                            m["chunked"]["increase"] / m["logits"]["increase"], "chunked / logits"))
            rows.append(row(f"  loaded model: kept weights and bases {m['chunked']['kept'] / mib:,.0f} MiB, trainables "
                            f"{m['chunked']['trainable'] / mib:,.1f} MiB", None, None, "MiB"))
            # The memory model's first-step peak (activations + loss + gradients), against the measured increase.
            predicted = memory_model(QWEN_05B, paper_split(QWEN_05B.num_hidden_layers), 1, MEMORY["seq"],
                                     MEMORY["depth"], precision)["step_peak"]
            error = predicted / m["chunked"]["increase"] - 1  # relative; the target allows 15% either way
            rows.append(row("  the memory model's prediction of that peak (alt: measured)", predicted / mib,
                            m["chunked"]["increase"] / mib, "MiB", predicted / m["chunked"]["increase"],
                            "predicted / measured", "within 15%", abs(error) <= 0.15))
        # The paper's setting at Qwen2.5-3B's shapes in bf16, from the model alone (on meta: nothing is allocated).
        # 4 x the trainables' bytes: the trainables, their gradients and AdamW's two moments.
        for depth, batch, ckpt in ((8, 1, False), (8, 2, False), (16, 1, False), (16, 2, False), (8, 2, True),
                                   (16, 2, True)):
            m = memory_model(QWEN_3B, paper_split(QWEN_3B.num_hidden_layers), batch, MEMORY["seq"], depth, "bf16", ckpt)
            rows.append(row(f"memory model, 3B shapes 8/18/8, seq {MEMORY['seq']}, bf16, depth {depth}, batch {batch}"
                            f"{', --checkpoint-steps' if ckpt else ''}: weights {m['weights'] / 2 ** 30:.1f} + trainables, "
                            f"grads, AdamW {4 * m['trainable'] / 2 ** 30:.2f} + activations {m['activations'] / 2 ** 30:.1f} "
                            f"+ loss {m['loss'] / 2 ** 30:.2f} GiB", m["total"] / mib, None, "MiB"))
        if device.type == "cpu":
            corpus = generated_corpus(work / "corpus", 60_000)  # ~60k tokens: enough for one step
            shutil.copy(corpus / "tokenizer.json", path / "tokenizer.json")  # train.py reads it from --model
            # One step of batch 1 at MEMORY's shapes, the table on one window, and a token cache under `work`, which
            # starts empty.
            argv = ["--model", str(path), "--data", str(corpus / "corpus.jsonl"), "--steps", "1", "--warmup", "0",
                    "--seq-len", str(MEMORY["seq"]), "--depth", str(MEMORY["depth"]), "--batch-size", "1",
                    "--grad-accum", "1", "--eval-windows", "1", "--eval-every", "0", "--precision", "fp32",
                    "--device", "cpu", "--dev-fraction", "0.2", "--test-fraction", "0.2",
                    "--token-cache", str(work / "tokens")]
            peaks = {}
            for which, root in (("ours", ROOT), ("baseline", args.baseline)):
                if root is not None:
                    progress(f"the whole train.py --steps 1 command ({which}), fresh process")
                    out = ["--out", str(work / f"run-{which}")]  # each run writes its own directory
                    peaks[which] = in_subprocess(f"command_peak_child({argv + out!r}, {str(Path(root) / 'train.py')!r})",
                                                 FIXED_MMAP_THRESHOLD)["peak"] / mib
            base = peaks.get("baseline")
            rows.append(row(f"whole train.py --steps 1 (load, tokenise, one step, table on one window), {shape}, fp32: "
                            "peak RSS (alt: --baseline's train.py)", peaks["ours"], base, "MiB",
                            None if base is None else peaks["ours"] / base, "ours / baseline",
                            "<= 0.6", None if base is None else peaks["ours"] <= 0.6 * base))
    return rows


def load_bf16(which: str, path) -> nn.Module:
    if which == "ours":  # the paper's split, 5 / 12 / 5 for 24 layers
        p, r, c = paper_split(load_config(path).num_hidden_layers)
        return load_ouroboros(path, OuroborosConfig(n_prelude=p, recurrent_layer=r, n_coda=c), dtype=torch.bfloat16)
    from transformers import Qwen2ForCausalLM
    # transformers' whole model: every layer, those Ouroboros removes included.
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    if which == "authors":  # what a user of the authors' release waits for: the whole model, then the SVD bases
        L = model.config.num_hidden_layers
        p, r, c = paper_split(L)
        layers = model.model.layers

        # Layer i's seven projection weights, under our short names (q, k, ..., down).
        def weights(i):
            return {k: layers[i].get_parameter(f"{name}.weight") for k, name in PROJECTIONS.items()}
        # The bases as load_ouroboros builds them: the recurrent layer in fp32, the removed layers one at a time.
        model.bases = svd_bases({k: w.float() for k, w in weights(r).items()},
                                (weights(i) for i in range(p, L - c) if i != r), OuroborosConfig().rank)
    return model


def load_child(path: str, which: str, warmup_path: str | None) -> None:
    """In a fresh process: load the checkpoint, into Ouroboros (ours) or as transformers' full model. With
    `warmup_path`, a tiny checkpoint is loaded the same way first, so that one-time costs (lazy imports, e.g.
    torch._dynamo, which transformers imports at import time and torch on the first meta-device normal_) are
    not timed."""
    if which != "ours":
        from transformers import Qwen2ForCausalLM  # noqa: F401  imported before the clock starts, as ours is
    if warmup_path:
        load_bf16(which, warmup_path)
    gc.collect()  # the warm-up's leftovers in reference cycles freed before `before`
    before = rss_bytes()
    t = time.perf_counter()
    model = load_bf16(which, path)
    seconds = time.perf_counter() - t
    # The bytes ours keeps: embedding (tied head) + kept layers + final norm.
    kept = sum(p.numel() * p.element_size() for p in model.base.parameters()) if which == "ours" else None
    # The load's peak RSS above the RSS before it: the most memory the load needed at once.
    print(json.dumps(dict(seconds=seconds, increase=peak_rss_bytes() - before, kept=kept)))


def loading(path: Path, warmup_path: Path, repeats: int) -> list[dict]:
    """load_ouroboros of a Qwen2.5-0.5B-shaped bf16 checkpoint, SVD bases included, against transformers'
    from_pretrained of the full model, and against that followed by the same SVD bases (the authors' way); each
    load in a fresh process, taking turns."""
    # (loader, warmed up?): one fresh process per load, every pair once in each repeat, taking turns.
    runs = {(which, warm): [] for warm in (True, False) for which in ("ours", "transformers", "authors")}
    for _ in range(repeats):
        for which, warm in runs:
            warmup = str(warmup_path) if warm else None
            runs[which, warm].append(in_subprocess(f"load_child({str(path)!r}, {which!r}, {warmup!r})"))
    seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
    # Peak RSS from the cold processes, where no warm-up load came before; the largest of the repeats.
    increase = {which: max(r["increase"] for r in runs[which, False]) / 2 ** 20 for which in ("ours", "transformers")}
    kept = runs["ours", False][0]["kept"] / 2 ** 20  # MiB; the same in every run
    warm_ratio = seconds["ours", True] / seconds["transformers", True]
    cold_ratio = seconds["ours", False] / seconds["transformers", False]
    rss_ratio = increase["ours"] / kept
    authors = seconds["ours", True] / seconds["authors", True]  # ours/theirs time: below 1 when ours loads faster
    return [row("load 0.5B-shaped bf16 ckpt into Ouroboros 5/12/5 + SVD bases (alt: HF whole model + same SVDs)",
                seconds["ours", True], seconds["authors", True], "s", authors, "ours/theirs time"),
            row("  same, against HF from_pretrained alone (it reads no weight during the call)",
                seconds["ours", True], seconds["transformers", True], "s", warm_ratio, "ours/HF time"),
            row("  same, first load in a cold process (lazy imports counted)", seconds["ours", False],
                seconds["transformers", False], "s", cold_ratio, "ours/HF time"),
            row(f"load, peak RSS increase (kept layers' tensors: {kept:,.0f} MiB)", increase["ours"],
                increase["transformers"], "MiB", rss_ratio, "ours / kept bytes", "<= 1.3", rss_ratio <= 1.3)]


# ----------------------------------------------------------------------------------------------------------
# Tokenising a corpus into the token cache (data.py), against the way it was done before: every document read
# into memory, ids collected in a Python list, then one array.

def generated_corpus(path: Path, tokens: int) -> Path:
    """A .jsonl of documents of random words (a Zipf-like draw from 30k made-up words), about `tokens` tokens
    for a 4096-token BPE trained on its first 2 MB, and that BPE as tokenizer.json."""
    rng = np.random.default_rng(0)  # seeded: the same corpus in every run
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(30_000)]  # 2 to 8 letters
    p = 1 / np.arange(1, len(words) + 1) ** 1.1  # Zipf-like: the k-th word's frequency ~ 1 / k^1.1
    p /= p.sum()
    path.mkdir(parents=True, exist_ok=True)
    sample, written = [], 0
    with open(path / "corpus.jsonl", "w") as f:
        while written < tokens * 4.7:  # ~4.55 characters per token for this text and tokenizer, measured
            # A document: 600 words, each drawn by its frequency.
            text = " ".join(words[i] for i in rng.choice(len(words), 600, p=p))
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)
            if written < 2e6:  # the BPE trains on the first ~2 MB of text
                sample.append(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # byte-level, as Qwen2's tokenizer
    # <|endoftext|>: the end-of-document token that data.eos_token_id looks up.
    tok.train_from_iterator(sample, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                        show_progress=False))
    tok.save(str(path / "tokenizer.json"))
    return path


def tokenise_child(corpus: str, cache: str, which: str) -> None:
    """In a fresh process: the corpus into train / dev / test uint32 streams; seconds, tokens, peak RSS."""
    tok = Tokenizer.from_file(str(Path(corpus) / "tokenizer.json"))
    # data.tokenize is wrapped to record whether it ran: on a cache hit token_streams reads the streams and never
    # calls it. token_streams looks the name up in data's globals at each call, so replacing the attribute works.
    calls = []
    tokenize = data.tokenize
    data.tokenize = lambda *a: calls.append(1) or tokenize(*a)  # append returns None: on to the real call
    t = time.perf_counter()
    if which == "ours":
        streams = data.token_streams(Path(corpus) / "corpus.jsonl", tok, 0.01, 0.01, Path(cache))
        n = sum(len(s) for s in streams.values())
        max(int(s.max()) for s in streams.values())  # read every token back, as a run's checks do
    else:  # the previous pipeline: all documents in memory, ids in a Python list of ints
        texts = [d.text for d in data.read_documents(Path(corpus) / "corpus.jsonl")]
        eos, ids = data.eos_token_id(tok), []
        for i in range(0, len(texts), 256):  # 256 documents per encode_batch
            for enc in tok.encode_batch(texts[i:i + 256]):
                ids.extend(enc.ids)
                ids.append(eos)
        n = len(np.asarray(ids, dtype=np.uint32))  # the array the old pipeline ended with, made from the list
        calls.append(1)  # the old way always tokenises
    print(json.dumps(dict(seconds=time.perf_counter() - t, tokens=n, peak=peak_rss_bytes(), tokenised=bool(calls))))


def tokenising(work: Path, tokens: int = 50_000_000) -> list[dict]:
    corpus = generated_corpus(work / "corpus", tokens)
    mb = (corpus / "corpus.jsonl").stat().st_size / 1e6
    # In this order: `again` finds the cache the first run wrote; the old way neither reads nor writes one.
    ours = in_subprocess(f"tokenise_child({str(corpus)!r}, {str(work / 'cache')!r}, 'ours')")
    again = in_subprocess(f"tokenise_child({str(corpus)!r}, {str(work / 'cache')!r}, 'ours')")
    old = in_subprocess(f"tokenise_child({str(corpus)!r}, {str(work / 'cache')!r}, 'list')")
    array_gb = 4 * ours["tokens"] / 1e9  # uint32: 4 bytes a token
    # Peak RSS above the array a run ends with: what each pipeline needed beyond its result.
    above = {k: (r["peak"] / 1e9 - array_gb) for k, r in (("ours", ours), ("old", old))}
    name = f"tokenise a generated {ours['tokens'] / 1e6:.1f}M-token .jsonl ({mb:.0f} MB) into uint32 streams"
    return [row(name + " (alt: ids in a Python list)", ours["tokens"] / ours["seconds"],
                old["tokens"] / old["seconds"], "tok/s", ours["seconds"] / old["seconds"], "ours/old time"),
            row(f"  peak RSS above the finished array ({array_gb:.2f} GB)", above["ours"], above["old"], "GB",
                above["ours"], "GB above array", "<= 0.5", above["ours"] <= 0.5),
            row("  second run, same data: seconds to the streams (alt: first run)", again["seconds"], ours["seconds"],
                "s", again["seconds"] / ours["seconds"], "tokenised again?" if again["tokenised"] else "no tokenising",
                "no tokenising", not again["tokenised"])]


def cpu_suite(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        work = Path(work)
        progress("measuring the fp32 matmul rate")
        rate = matmul_flops_per_s()  # the MFU rows' denominator
        progress("Qwen2, small config")
        small = write_random_checkpoint(SMALL, work / "small")
        # Repeats are cheap at this size, and ours and transformers' run the same kernels, so the ratios sit
        # near 1: more repeats keep the noise of a shared machine out of them.
        rows += qwen2_vs_transformers("small (25M), seq 256", small, 3 * args.repeats, 2 * args.repeats)
        progress("writing a Qwen2.5-0.5B-shaped bf16 checkpoint")
        qwen05 = write_random_checkpoint(QWEN_05B, work / "qwen05")
        progress("Qwen2, 0.5B shapes")
        rows += qwen2_vs_transformers("0.5B shapes, seq 256", qwen05, args.repeats)
        gc.collect()  # the 0.5B models above, if a cycle holds them, freed before the next part
        progress("Ouroboros training step, against the authors' way")
        rows += authors_way_training(work, args.repeats)
        progress("Ouroboros training step")
        rows += ouroboros_training(small, args.repeats, rate)
        progress("recurrence step overhead, 3B shapes")
        rows += recurrence_step_overhead(args.repeats)
        progress("training-step memory, fresh processes")
        rows += training_memory(small)
        progress("loading, fresh processes")
        rows += loading(qwen05, write_random_checkpoint(TINY, work / "tiny"), repeats=2)
        progress("tokenising a generated corpus, fresh processes")
        rows += tokenising(work)
    return rows


# ----------------------------------------------------------------------------------------------------------
# The GPU benchmark: the paper's training setting at Qwen2.5-3B shapes.

def gpu_suite(args) -> list[dict]:
    device = torch.device(args.device)
    depth, batch, seq = 8, 2, 2048  # the paper's setting
    with tempfile.TemporaryDirectory(prefix="bench-") as work:
        progress("writing a Qwen2.5-3B-shaped bf16 checkpoint")
        path = write_random_checkpoint(QWEN_3B, Path(work) / "qwen3b", device=device)
        torch.manual_seed(0)
        model = load_ouroboros(path, OuroborosConfig(), device=device).train()  # frozen bf16, trainables fp32
    # Outside the with: the weights are on the GPU by now, so the checkpoint may go. fused: AdamW's update in
    # one kernel over all trainables, as train.py runs it on CUDA.
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=3e-4, betas=(0.9, 0.95), fused=True)
    x, y = token_batch(QWEN_3B.vocab_size, batch, seq, device)
    # count_flops runs one step, untimed; median_seconds then adds two warm-up steps of its own.
    step = lambda: train_step(model, optimizer, x, y, depth)  # noqa: E731
    flops = count_flops(step)
    torch.cuda.reset_peak_memory_stats(device)  # from here: steps with AdamW's moments already made
    t = median_seconds({"step": step}, args.repeats, warmup=2, sync=torch.cuda.synchronize)["step"]
    peak = torch.cuda.max_memory_allocated(device) / 1e9  # GB, the paper's unit
    mfu = flops / t / args.peak_flops  # against an assumed peak (--peak-flops), not a measured one
    return [row(f"Ouroboros 3B-shaped train step, depth {depth}, seq {seq}, micro-batch {batch}, bf16 autocast",
                batch * seq / t, None, "tok/s"),
            row(f"MFU (vs assumed bf16 peak {args.peak_flops / 1e12:.0f} TFLOP/s)", mfu, None, "MFU"),
            row("peak GPU memory (max_memory_allocated) vs the paper's ~21 GB", peak, 21.0, "GB", peak / 21.0,
                "ours/paper")]


# ----------------------------------------------------------------------------------------------------------
# Output

def fmt(value, unit: str) -> str:
    if value is None:
        return "-"
    if unit.startswith("MFU"):  # a fraction, printed as a percentage
        return f"{100 * value:.1f}%"
    if unit == "GFLOP/s" or unit.endswith("| GFLOP/s"):
        return f"{value:,.1f} GFLOP/s"
    return f"{value:,.0f} {unit}" if unit in ("tok/s", "MiB", "ms") else f"{value:,.2f} {unit}"


def table(rows: list[dict], header: list[str]) -> str:
    cells = [["benchmark", "ours", "alternative", "ratio", "ratio is", "target", "met"]]
    for r in rows:
        # An MFU row holds the MFU in `ours` and the measured matmul rate in `alternative`.
        alt_unit = "GFLOP/s" if r["unit"] == "MFU | GFLOP/s" else r["unit"]
        cells.append([r["name"], fmt(r["ours"], r["unit"]), fmt(r["alternative"], alt_unit),
                      "-" if r["ratio"] is None else f"{r['ratio']:.3f}", r["ratio_is"] or "-", r["target"] or "-",
                      "-" if r["met"] is None else ("yes" if r["met"] else "NO")])
    widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]  # each column as its widest cell
    # Names left-aligned, numbers right-aligned.
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cell, widths)))
             for cell in cells]
    lines.insert(1, "-" * len(lines[0]))  # a rule under the header row
    return "\n".join(header + [""] + lines)


def progress(message: str) -> None:
    # stderr: stdout holds the table, and in a child the JSON that in_subprocess reads.
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cpu: the CPU suite; cuda: the Qwen2.5-3B-shaped training benchmark on a GPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (medians)")
    parser.add_argument("--peak-flops", type=float, default=989e12,
                        help="GPU bf16 peak for MFU; the default is H100 SXM dense bf16, an assumption")
    parser.add_argument("--threads", type=int,
                        help="torch threads, here and in the subprocesses (default: torch's, one per core); "
                             "1 gives steadier ratios on a machine busy with other work")
    parser.add_argument("--json", type=Path, help="also write the table's rows to this JSON file")
    parser.add_argument("--memory", action="store_true", help="instead: the training step's peak memory at "
                        "Qwen2.5-0.5B's real shapes (seq 2048, depth 8), chunked loss against whole logits, and on "
                        "the CPU the whole train.py --steps 1 command")
    parser.add_argument("--baseline", type=Path, help="with --memory: another checkout whose train.py runs the same "
                        "command, for the alternative column (e.g. a git worktree of an older commit)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)  # this process's threads; OMP_NUM_THREADS below sets the children's
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the subprocesses
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    start, load_before = time.time(), os.getloadavg()[0]  # shown with the one after: did other work share the machine?
    rows = memory_suite(args) if args.memory else gpu_suite(args) if args.device == "cuda" else cpu_suite(args)
    meta = dict(device=torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {os.cpu_count()} cores",
                torch=torch.__version__, threads=torch.get_num_threads(), seconds=round(time.time() - start),
                load_average_before=load_before, load_average_after=os.getloadavg()[0])
    header = [f"bench.py --device {args.device}: {meta['device']}, torch {meta['torch']}, {meta['threads']} threads, "
              f"{meta['seconds']} s, load average {load_before:.2f} before / {meta['load_average_after']:.2f} after"]
    if args.memory:
        header += ["Each measurement in a fresh process (on the CPU with MALLOC_MMAP_THRESHOLD_=65536, so that RSS",
                   "follows the live tensors). The step's peak is over what loading left: the activations, the loss,",
                   "the gradients and AdamW's state. Random weights: memory does not depend on values."]
    elif args.device == "cuda":
        header.append(f"MFU assumes a bf16 peak of {args.peak_flops / 1e12:.0f} TFLOP/s (--peak-flops)")
    else:
        header += [
            "Speed: ours and the alternative side by side in one process, medians of interleaved repeats; batch 1",
            "unless a row says otherwise. The authors' way: transformers' Qwen2DecoderLayers, LoRA in wrapped projections.",
            "Memory and loading: each measurement in a fresh process. Activation memory = peak RSS of one training",
            "step (ru_maxrss) minus the RSS just before it; ours = checkpoint_steps on, alternative = off; run with",
            "MALLOC_MMAP_THRESHOLD_=65536 so that RSS follows live tensors (glibc's default: the row below them).",
            "Loading: the alternative is what a user of the authors' release waits for, transformers' from_pretrained",
            "of the whole model and then the same 7 SVDs from its removed layers; from_pretrained alone memory-maps",
            "the weights and reads none of them during the call. Timed after a warm-up load of a tiny checkpoint",
            "(one-time imports excluded; the cold row includes them). MFU: matmul and attention FLOPs counted by",
            "torch.utils.flop_counter, over the measured fp32 2048^3 matmul rate. Tokenising: fresh processes."]
    print(table(rows, header))
    if args.json:
        args.json.write_text(json.dumps(dict(meta, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
