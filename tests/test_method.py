"""The method's equations, checked against an independent hand-written computation: the causal pool, the
Controller, one recurrent step (modulated layer, per-step RMSNorm, gate) and a whole forward over several steps.

Every trainable is set to random, non-zero values (heads, gate and norms included), so each term of each
equation moves the numbers: a swapped gate input, a wrong pool or a wrong step index shows up as a mismatch.
"""
import pytest
import torch
import torch.nn.functional as F

from tiny import make_checkpoint, tiny_config  # first: it puts the repository root on sys.path

from controller import OuroborosConfig
from load_qwen import load_ouroboros
from model import PROJECTIONS

QCFG = tiny_config(num_hidden_layers=6)
CFG = OuroborosConfig(n_prelude=1, recurrent_layer=3, n_coda=1, rank=8, max_depth=8)
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32; every mistake these tests target changes the numbers by > 1e-2


@torch.no_grad()
def randomise(model):
    """Random, non-zero trainables: at init the heads and W_g are zero and the norms are 1, which would hide
    a swapped gate input or a wrong step index."""
    g = torch.Generator().manual_seed(0)
    for p in model.controller.parameters():
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.controller.step_embed.weight.mul_(10)  # unit-scale embeddings, far apart, so the step index matters
    model.gate.weight.copy_(0.15 * torch.randn(model.gate.weight.shape, generator=g))
    model.gate.bias.copy_(torch.randn(model.gate.bias.shape, generator=g))
    model.step_norm.copy_(1 + 0.5 * torch.randn(model.step_norm.shape, generator=g))  # a different row per step
    return model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return randomise(load_ouroboros(make_checkpoint(tmp_path_factory.mktemp("six"), QCFG, seed=5), CFG))


def hidden(seed, scale, B=2, T=7):
    return scale * torch.randn(B, T, QCFG.hidden_size, generator=torch.Generator().manual_seed(seed))


def hand_pool(h):
    # p_t = mean(h_0 .. h_t), one position at a time.
    return torch.stack([h[:, :t + 1].mean(dim=1) for t in range(h.shape[1])], dim=1)


def hand_controller(ctrl, p, s):
    # c = heads(silu(W_2 silu(W_1 [silu(W_p p + b_p) ; E[s]] + b_1) + b_2)), written out with the raw weights.
    a = F.silu(p @ ctrl.pool_proj.weight.T + ctrl.pool_proj.bias)
    e = ctrl.step_embed.weight[s].expand(*a.shape[:-1], -1)
    lin1, lin2 = ctrl.mlp[0], ctrl.mlp[2]
    z = F.silu(torch.cat((a, e), dim=-1) @ lin1.weight.T + lin1.bias)
    z = F.silu(z @ lin2.weight.T + lin2.bias)
    return (z @ ctrl.heads.weight.T).unflatten(-1, (len(PROJECTIONS), CFG.rank))  # (B, T, 7, r)


def hand_step(model, h_old, s, cos, sin):
    c = hand_controller(model.controller, hand_pool(h_old), s) * (CFG.alpha / CFG.rank)
    mod = {k: [(getattr(model, f"lora_A_{k}"), getattr(model, f"lora_B_{k}"), c[..., j, :])]
           for j, k in enumerate(PROJECTIONS)}
    h_new = model.base.layer(CFG.recurrent_layer)(h_old, cos, sin, mod)
    # norm_s, before the gate, with step s's own weight row.
    h_new = model.step_norm[s] * h_new * torch.rsqrt(h_new.pow(2).mean(-1, keepdim=True) + QCFG.rms_norm_eps)
    # W_g [h_new ; h_old] = W_1 h_new + W_2 h_old: the first d columns of W_g read h_new.
    d = QCFG.hidden_size
    W_1, W_2 = model.gate.weight[:, :d], model.gate.weight[:, d:]
    g = torch.sigmoid(h_new @ W_1.T + h_old @ W_2.T + model.gate.bias)
    return g * h_new + (1 - g) * h_old


@torch.no_grad()
def test_causal_pool_is_the_mean_of_positions_0_to_t(model):
    h = hidden(0, 1.0) + 2.0  # a non-zero mean, so a running sum is far from a running mean
    torch.testing.assert_close(model.pool(h, 0, None), hand_pool(h), **TOL)


@torch.no_grad()
def test_controller_at_step_s_is_the_hand_written_mlp(model):
    p = hand_pool(hidden(1, 1.0))
    outputs = []
    for s in (0, 3, CFG.max_depth - 1):
        outputs.append(model.controller(p, s))
        torch.testing.assert_close(outputs[-1], hand_controller(model.controller, p, s), **TOL)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2  # the step embedding does change c


@pytest.mark.parametrize("s", [0, 2])
@torch.no_grad()
def test_one_step_equals_the_hand_written_recurrence(model, s):
    # h_old at 3x the scale of the normalised h_new, so the two halves of the gate input are told apart.
    h_old = hidden(2, 3.0)
    cos, sin = model.base.rope(0, h_old.shape[1], "cpu")
    torch.testing.assert_close(model.step(h_old, s, cos, sin), hand_step(model, h_old, s, cos, sin), **TOL)


@torch.no_grad()
def test_forward_equals_the_hand_written_loop(model):
    x = torch.randint(0, QCFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    base, layer = model.base, model.base.layer
    cos, sin = base.rope(0, x.shape[1], "cpu")
    h = base.model.embed_tokens(x)
    for i in model.prelude:
        h = layer(i)(h, cos, sin)
    for s in range(4):
        h = hand_step(model, h, s, cos, sin)
    for i in model.coda:
        h = layer(i)(h, cos, sin)
    logits = base.lm_head(base.model.norm(h))
    torch.testing.assert_close(model(x, 4), logits, **TOL)
