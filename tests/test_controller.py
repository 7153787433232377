"""The Controller, the static ablation, the gate, the modulated projection, the parameter budget and the
configuration checks."""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from tiny import make_checkpoint, tiny_config  # first: it puts the repository root on sys.path

from controller import ConfigError, Ouroboros, OuroborosConfig, StaticModulation
from load_qwen import load_ouroboros
from model import PROJECTIONS, DecoderLayer, Decoder, DecoderConfig, project

QCFG = tiny_config(num_hidden_layers=6)
CFG = OuroborosConfig(n_prelude=1, recurrent_layer=3, n_coda=1, rank=8, max_depth=8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("six"), QCFG, seed=2)


def ids(seed=0, B=2, T=12):
    return torch.randint(0, QCFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("controller", ["dynamic", "static"])
@torch.no_grad()
def test_zero_init_heads_change_nothing(ckpt, controller):
    x = ids()
    model = load_ouroboros(ckpt, dataclasses.replace(CFG, controller=controller))
    plain = load_ouroboros(ckpt, dataclasses.replace(CFG, controller="none"))
    for n_steps in (1, 3):
        assert torch.equal(model(x, n_steps), plain(x, n_steps))
    # The equality is not vacuous: once c != 0 the LoRA path does change the logits.
    head = model.controller.heads.weight if controller == "dynamic" else model.controller.c
    head.normal_(std=0.5)
    assert (model(x, 3) - plain(x, 3)).abs().max() > 1e-3


@torch.no_grad()
def test_gate_keeps_88_percent_of_the_old_state_at_init(ckpt):
    model = load_ouroboros(ckpt, dataclasses.replace(CFG, controller="none", step_norm=False))
    torch.manual_seed(0)
    d = QCFG.hidden_size
    h_new, h_old = torch.randn(2, 5, d), torch.randn(2, 5, d)
    g = torch.sigmoid(model.gate(torch.cat((h_new, h_old), dim=-1)))
    torch.testing.assert_close(g, torch.full_like(g, 1 / (1 + math.exp(2))))  # sigmoid(-2) = 0.1192
    assert 1 - g[0, 0, 0].item() == pytest.approx(0.8808, abs=1e-4)
    # Through one whole step: h = 0.1192 * layer(h) + 0.8808 * h.
    cos, sin = model.base.rope(0, 5, "cpu")
    h_layer = model.base.layer(CFG.recurrent_layer)(h_old, cos, sin)
    expected = 0.11920292 * h_layer + 0.88079708 * h_old
    torch.testing.assert_close(model.step(h_old, 0, cos, sin), expected)


def paper_sized(controller: str) -> Ouroboros:
    # Qwen2.5-3B shapes on the meta device: no memory, no weights, the exact parameter counts.
    with torch.device("meta"):
        base = Decoder(DecoderConfig(), list(range(8)) + [18] + list(range(28, 36)))
        bases = {k: (torch.empty(32, 1), torch.empty(1, 32)) for k in PROJECTIONS}
        return Ouroboros(base, OuroborosConfig(controller=controller), bases)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_trainable_parameter_counts_at_paper_scale():
    m = paper_sized("dynamic")
    trainable = m.trainable_parameters()
    assert sum(p.numel() for p in trainable.values()) == 9_214_592
    assert count(m.controller) == 692_864
    assert count(m.gate) == 8_390_656
    assert m.step_norm.numel() == 131_072
    assert all(n.startswith(("controller.", "gate.")) or n == "step_norm" for n in trainable)
    assert not any(p.requires_grad for p in m.base.parameters())
    static = paper_sized("static")
    assert isinstance(static.controller, StaticModulation)
    assert sum(p.numel() for p in static.trainable_parameters().values()) == 8_536_064  # 64 x 7 x 32 + gate + norms
    assert sum(p.numel() for p in paper_sized("none").trainable_parameters().values()) == 8_390_656 + 131_072


def test_project_equals_the_materialised_formula():
    torch.manual_seed(0)
    B_, T, d_in, d_out, r = 2, 3, 10, 7, 4
    linear = nn.Linear(d_in, d_out)
    A, B = torch.randn(r, d_in), torch.randn(d_out, r)
    c = torch.randn(B_, T, r)  # a different c per token
    x = torch.randn(B_, T, d_in)
    y = project(linear, x, "q", {"q": [(A, B, c)]})
    for b in range(B_):
        for t in range(T):
            W = linear.weight + B @ torch.diag(c[b, t]) @ A  # W + B diag(c) A, materialised here only
            torch.testing.assert_close(y[b, t], W @ x[b, t] + linear.bias)
    assert torch.equal(project(linear, x, "k", {"q": [(A, B, c)]}), linear(x))  # other names are untouched


@torch.no_grad()
def test_modulated_step_equals_a_layer_with_materialised_weights(ckpt):
    # Static c ignores the input, so each step's layer is an ordinary layer with weights
    # W_k + (alpha / r) B_k diag(c_k) A_k: build that layer by hand and compare.
    cfg = dataclasses.replace(CFG, controller="static", gate=False, step_norm=False)
    model = load_ouroboros(ckpt, cfg)
    torch.manual_seed(0)
    model.controller.c.normal_()
    s = 2
    layer = model.base.layer(CFG.recurrent_layer)
    explicit = DecoderLayer(QCFG)
    explicit.load_state_dict(layer.state_dict())
    for j, k in enumerate(PROJECTIONS):
        A, B = getattr(model, f"lora_A_{k}"), getattr(model, f"lora_B_{k}")
        delta = (cfg.alpha / cfg.rank) * B @ torch.diag(model.controller.c[s, j]) @ A
        explicit.get_submodule(PROJECTIONS[k]).weight += delta
    h = torch.randn(2, 6, QCFG.hidden_size)
    cos, sin = model.base.rope(0, 6, "cpu")
    torch.testing.assert_close(model.step(h, s, cos, sin), explicit(h, cos, sin), rtol=1e-5, atol=1e-5)
    assert (explicit(h, cos, sin) - layer(h, cos, sin)).abs().max() > 1e-3  # the deltas matter


@pytest.mark.parametrize("n_prelude, recurrent_layer, n_coda", [
    (3, 3, 3),  # prelude + coda + 1 = 7 > 6 layers
    (2, 1, 1),  # recurrent layer inside the prelude
    (1, 5, 1),  # recurrent layer inside the coda
    (1, 6, 0),  # recurrent layer past the last layer
    (-1, 2, 1), (1, 2, -1),  # negative sizes
    (0, -1, 1),
])
def test_bad_splits_raise(n_prelude, recurrent_layer, n_coda):
    cfg = OuroborosConfig(n_prelude=n_prelude, recurrent_layer=recurrent_layer, n_coda=n_coda)
    with pytest.raises(ConfigError):
        cfg.split(6)


def test_good_split():
    assert OuroborosConfig().split(36) == (list(range(8)), 18, list(range(28, 36)),
                                           list(range(8, 18)) + list(range(19, 28)))
    assert CFG.split(6) == ([0], 3, [5], [1, 2, 4])


@pytest.mark.parametrize("field, value", [("controller", "mlp"), ("pool", "max"), ("rank", 0), ("max_depth", 0)])
def test_bad_options_raise_when_the_config_is_made(field, value):
    with pytest.raises(ConfigError):  # not later, in split(), which only checks the split
        dataclasses.replace(CFG, **{field: value})


def test_bad_split_raises_through_load_ouroboros(ckpt):
    with pytest.raises(ConfigError):
        load_ouroboros(ckpt, dataclasses.replace(CFG, recurrent_layer=0))


def test_base_must_keep_the_split_layers(ckpt):
    with torch.device("meta"):
        base = Decoder(QCFG, [0, 2, 5])  # the split needs 0, 3, 5
    with pytest.raises(ConfigError):
        Ouroboros(base, CFG, {})


@torch.no_grad()
def test_bad_depth_raises(ckpt):
    model = load_ouroboros(ckpt, CFG)
    x = ids()
    for n_steps in (0, CFG.max_depth + 1):
        with pytest.raises(ConfigError):
            model(x, n_steps)
        with pytest.raises(ConfigError):
            model.generate(x, n_steps, 2)
    assert model(x, CFG.max_depth).shape == (2, 12, QCFG.vocab_size)  # the largest depth works


def test_rank_larger_than_a_projection_allows(ckpt):
    # k and v project 64 -> 2 heads x 16 = 32, so rank 32 is the largest possible.
    kv_width = QCFG.num_key_value_heads * QCFG.head_dim
    with pytest.raises(ConfigError, match="rank"):
        load_ouroboros(ckpt, dataclasses.replace(CFG, rank=kv_width + 1))
    model = load_ouroboros(ckpt, dataclasses.replace(CFG, rank=kv_width))
    assert model.lora_B_k.shape == (kv_width, kv_width)
