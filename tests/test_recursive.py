"""The recursive model end to end: exact conversion from the cut and the full model, causality of the pool,
depth as an argument, gradients and optimizer steps that touch only the trainables, activation
checkpointing, cached generation and fp32 trainables over a bf16 base."""
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tiny import make_checkpoint, tiny_config  # first: it puts the repository root on sys.path

from controller import ConfigError, OuroborosConfig, RecurrentCache
from load_qwen import load_model, load_ouroboros

QCFG = tiny_config(num_hidden_layers=6)
CFG = OuroborosConfig(n_prelude=1, recurrent_layer=3, n_coda=1, rank=8, max_depth=8)
KEPT = [0, 3, 5]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("six"), QCFG, seed=3)


@pytest.fixture(scope="module")
def build(ckpt):
    """load_ouroboros(ckpt, cfg, dtype), loaded once per configuration and handed out as fresh copies
    (the SVD of the bases dominates a tiny model's load time)."""
    loaded = {}

    def build(cfg=CFG, dtype=None):
        key = (repr(cfg), dtype)
        if key not in loaded:
            loaded[key] = load_ouroboros(ckpt, cfg, dtype)
        return copy.deepcopy(loaded[key])

    return build


def ids(seed=0, B=2, T=12):
    return torch.randint(0, QCFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def perturb(model, seed=0, std=0.1):
    """Random non-zero trainables, so the Controller, gate and norms all act (at init the heads are zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.trainable_parameters().values():
        p.add_(std * torch.randn(p.shape, generator=g))
    return model


def loss_of(model, x, n_steps):
    logits = model(x, n_steps)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())


@torch.no_grad()
def test_one_plain_step_is_the_cut_model(ckpt, build):
    cfg = dataclasses.replace(CFG, controller="none", gate=False, step_norm=False)
    model = build(cfg)
    x = ids()
    cut = load_model(ckpt, layers=KEPT)
    logits = model(x, 1)
    assert torch.equal(logits, cut(x))
    assert torch.equal(logits, model.base(x))
    assert not torch.allclose(model(x, 2), logits)  # a second step is a real second pass


@torch.no_grad()
def test_a_split_covering_every_layer_is_the_full_model(tmp_path):
    path = make_checkpoint(tmp_path, tiny_config(num_hidden_layers=4), seed=4)
    cfg = OuroborosConfig(n_prelude=1, recurrent_layer=1, n_coda=2, rank=8, max_depth=8,
                          controller="none", gate=False, step_norm=False)
    model = load_ouroboros(path, cfg)
    assert model.base.layer_ids == [0, 1, 2, 3] and model.removed == []
    x = ids()
    torch.testing.assert_close(model(x, 1), load_model(path)(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("pool", ["causal", "mean"])
@torch.no_grad()
def test_causal_pool_never_sees_the_future_and_mean_pool_does(build, pool):
    model = perturb(build(dataclasses.replace(CFG, pool=pool)))
    t = 5
    x = ids(B=2, T=12)
    y = x.clone()
    y[:, t + 1:] = (x[:, t + 1:] + 1 + torch.arange(12 - t - 1)) % QCFG.vocab_size  # every later token differs
    past = (model(x, 3)[:, :t + 1] - model(y, 3)[:, :t + 1]).abs().max().item()
    if pool == "causal":
        assert past < 1e-5
    else:
        assert past > 1e-4  # the paper's whole-sequence pool leaks the future into earlier positions
        with pytest.raises(ConfigError):
            model.generate(x, 3, 2)


@torch.no_grad()
def test_depth_is_an_argument_and_forward_is_deterministic(build):
    model = perturb(build(CFG)).train()  # train mode too: nothing is drawn inside forward
    x = ids()
    a, b, c = model(x, 2), model(x, 2), model(x, 4)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def split_params(model):
    trainable = model.trainable_parameters()
    frozen = {n: p for n, p in model.named_parameters() if n not in trainable}
    return trainable, frozen


@pytest.mark.parametrize("controller", ["dynamic", "static"])
def test_gradients_reach_every_trainable_and_no_frozen_tensor(build, controller):
    model = perturb(build(dataclasses.replace(CFG, controller=controller)))
    trainable, frozen = split_params(model)
    assert len(frozen) == len(list(model.base.parameters())) > 0
    loss_of(model, ids(), 3).backward()
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in frozen.items():
        assert p.grad is None, name
    for name, b in model.named_buffers():
        assert b.grad is None and not b.requires_grad, name


@pytest.mark.parametrize("controller", ["dynamic", "static"])
def test_adamw_moves_every_trainable_and_no_frozen_tensor(build, controller):
    # From the real init (zero heads): the heads move first, and through them the rest of the Controller.
    model = build(dataclasses.replace(CFG, controller=controller))
    trainable, frozen = split_params(model)
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    # Every parameter is handed to the optimizer, and weight decay is off, so a tensor moves only if it
    # received a gradient.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, ids(seed=step), 3).backward()
        opt.step()
    after = model.state_dict()
    for name in trainable:
        assert not torch.equal(after[name], before[name]), f"{name} did not move"
    for name in after:
        if name not in trainable:  # base weights and LoRA buffers
            assert torch.equal(after[name], before[name]), f"frozen {name} changed"
    assert len(frozen) > 0 and any(n.startswith("lora_") for n in after)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(build):
    model = perturb(build(CFG))
    calls = []
    step = model.step
    model.step = lambda *a, **kw: calls.append(1) or step(*a, **kw)

    def run(checkpoint_steps):
        model.cfg.checkpoint_steps = checkpoint_steps  # model.cfg is this copy's own
        model.zero_grad(set_to_none=True)
        calls.clear()
        loss = loss_of(model, ids(), 3)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters().items()}, len(calls)

    loss, grads, n_plain = run(False)
    loss_ckpt, grads_ckpt, n_ckpt = run(True)
    assert (n_plain, n_ckpt) == (3, 6)  # each step recomputed once in backward
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(grads_ckpt, grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("controller", ["dynamic", "static"])
@torch.no_grad()
def test_cached_generation_equals_the_uncached_greedy_loop(build, controller):
    model = perturb(build(dataclasses.replace(CFG, controller=controller)))
    x = ids(B=2, T=5)
    out = x
    for _ in range(8):
        nxt = model(out, 3)[:, -1].argmax(dim=-1, keepdim=True)
        out = torch.cat((out, nxt), dim=1)
    assert torch.equal(model.generate(x, 3, 8), out)


@pytest.mark.parametrize("controller", ["dynamic", "static"])
@torch.no_grad()
def test_recurrent_cache_matches_the_full_forward(build, controller):
    model = perturb(build(dataclasses.replace(CFG, controller=controller)))
    x = ids(B=2, T=12)
    full = model(x, 3)
    cache = RecurrentCache(model, 3)
    pieces = [model(x[:, :5], 3, cache)]  # the prompt
    pieces += [model(x[:, t:t + 1], 3, cache) for t in range(5, 9)]  # one token at a time
    pieces.append(model(x[:, 9:], 3, cache))  # a few at once
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_trainables_stay_fp32_over_a_bf16_base(build):
    model = perturb(build(CFG, torch.bfloat16))
    assert all(p.dtype == torch.bfloat16 for p in model.base.parameters())
    assert model.lora_A_q.dtype == torch.bfloat16
    trainable = model.trainable_parameters()
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    # Mixed precision as in training: bf16 compute under autocast, fp32 gradients for the fp32 trainables.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, ids(), 2)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.dtype == torch.float32, name


@pytest.mark.parametrize("variant", [{}, dict(controller="static"), dict(controller="none"), dict(gate=False),
                                     dict(step_norm=False), dict(controller_input="none"), dict(lora_layers="all")],
                         ids=["dynamic", "static", "none", "no-gate", "no-step-norm", "blind", "lora-all"])
def test_one_compute_dtype_through_every_row_under_bf16(ckpt, build, variant):
    """Under bf16 the hidden state is bf16 from the embedding to the head in every row of a table: the trained
    arm (whatever its fp32 trainables: step norms, gate, Controller, adapters), the cut baseline, the full model."""
    model = perturb(build(dataclasses.replace(CFG, **variant), torch.bfloat16))
    full = load_model(ckpt, torch.bfloat16)
    seen = []

    def record(module, args):
        seen.append((type(module).__name__, args[0].dtype))

    hooks = [m.register_forward_pre_hook(record) for net in (model.base, full) for m in net.modules()
             if type(m).__name__ in ("DecoderLayer", "RMSNorm", "Linear") and m is not getattr(net, "gate", None)]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for logits in (model(ids(), 3), model.base(ids()), full(ids())):
                assert logits.dtype == torch.bfloat16
    finally:
        for h in hooks:
            h.remove()
    layers = [d for name, d in seen if name == "DecoderLayer"]
    assert len(layers) == (1 + 3 + 1) + 3 + QCFG.num_hidden_layers  # prelude, 3 steps, coda; the cut; the full model
    assert {d for _, d in seen} == {torch.bfloat16}, sorted({(n, str(d)) for n, d in seen})
