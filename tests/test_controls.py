"""The controls a reviewer asks for: the input-blind Controller, LoRA healing (alone: plain LoRA fine-tuning of
the cut model), the reference rows alone (--steps 0), depth curves in one pass, the leak measured with
--eval-pool, and what a statistics script needs in the run directory."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

import tiny  # noqa: F401  (first: it puts the repository root on sys.path)

from load_qwen import load_model, load_ouroboros
from model import PROJECTIONS
from test_recursive import CFG, KEPT, QCFG, ckpt, ids  # noqa: F401 (ckpt: a fixture)
from test_train import flags, metrics, streams_by_hand, split_by_hand, windows_by_hand, world  # noqa: F401

import train
import evaluate
from flags import build_parser

@torch.no_grad()
def perturb(params, seed=0, std=0.1):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(std * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------------------------------------
# The input-blind Controller.

@torch.no_grad()
def test_input_blind_controller_depends_on_the_step_only(ckpt):
    dynamic = load_ouroboros(ckpt, CFG)
    blind = load_ouroboros(ckpt, dataclasses.replace(CFG, controller_input="none"))
    assert sum(p.numel() for p in blind.trainable_parameters().values()) == \
        sum(p.numel() for p in dynamic.trainable_parameters().values())
    perturb(blind.trainable_parameters().values())
    h1, h2 = torch.randn(2, 5, QCFG.hidden_size), 3 * torch.randn(2, 5, QCFG.hidden_size)
    c = {(s, i): blind.modulation(h, s, None)["q"][0][2] for s in (0, 3) for i, h in enumerate((h1, h2))}
    assert torch.equal(c[0, 0], c[0, 1]) and torch.equal(c[3, 0], c[3, 1])  # the same c for any input
    assert not torch.equal(c[0, 0], c[3, 0])  # but not at every step
    dynamic.load_state_dict(blind.state_dict())  # the same weights, reading the pooled state
    assert not torch.equal(dynamic.modulation(h1, 0, None)["q"][0][2][0, 0], dynamic.modulation(h2, 0, None)["q"][0][2][0, 0])


@torch.no_grad()
def test_only_the_input_reading_controller_computes_the_pool(ckpt, monkeypatch):
    """The static ablation and the input-blind control ignore the pooled state, so it is never computed for them;
    the dynamic Controller pools at every step."""
    from controller import Ouroboros
    calls = []
    pool = Ouroboros.pool
    monkeypatch.setattr(Ouroboros, "pool", lambda self, *a: calls.append(1) or pool(self, *a))
    x = ids()
    for controller, controller_input, expected in (("static", "pooled", 0), ("dynamic", "none", 0),
                                                   ("dynamic", "pooled", 3)):
        calls.clear()
        model = load_ouroboros(ckpt, dataclasses.replace(CFG, controller=controller, controller_input=controller_input))
        model(x, 3)
        assert len(calls) == expected, (controller, controller_input)


# ----------------------------------------------------------------------------------------------------------
# LoRA healing.

@pytest.mark.parametrize("layers", ["coda", "recurrent", "all"])
@torch.no_grad()
def test_adapters_at_init_change_nothing(ckpt, layers):
    plain = load_ouroboros(ckpt, CFG)
    perturb(plain.trainable_parameters().values())
    adapted = load_ouroboros(ckpt, dataclasses.replace(CFG, lora_layers=layers, lora_rank=4))
    adapted.load_state_dict(plain.state_dict(), strict=False)
    assert adapted.adapters is not None and any(n.startswith("adapters.") for n in adapted.trainable_parameters())
    x = ids()
    assert torch.equal(adapted(x, 3), plain(x, 3))


PLAIN_LORA = dataclasses.replace(CFG, controller="none", gate=False, step_norm=False, lora_layers="all", lora_rank=4)


def test_plain_lora_trains_only_the_adapters(ckpt):
    model = load_ouroboros(ckpt, PLAIN_LORA)
    trainable = model.trainable_parameters()
    assert trainable and all(n.startswith("adapters.") for n in trainable)
    # A (r, in) random, B (out, r) zero: 7 projections of 3 layers
    assert len(trainable) == 2 * len(PROJECTIONS) * len(KEPT)
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in trainable.items() if n.endswith("_A"))
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in trainable.items() if n.endswith("_B"))
    x = ids()
    F.cross_entropy(model(x, 1)[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("adapters."))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if n.endswith("_B"))


@torch.no_grad()
def test_plain_lora_equals_the_cut_model_with_merged_weights(ckpt):
    """Depth 1, no Controller, gate or step norm, adapters on every kept layer: the cut model whose weights are
    W + (alpha / r) B A, materialised here by hand."""
    model = load_ouroboros(ckpt, PLAIN_LORA)
    perturb(model.trainable_parameters().values(), std=0.3)
    merged = load_model(ckpt, layers=KEPT)
    for i in KEPT:
        w = model.adapters.layers[str(i)]
        for k, name in PROJECTIONS.items():
            merged.get_parameter(f"model.layers.{i}.{name}.weight").add_(
                PLAIN_LORA.lora_alpha / PLAIN_LORA.lora_rank * w[f"{k}_B"] @ w[f"{k}_A"])
    x = ids()
    assert not torch.allclose(model(x, 1), model.base(x), atol=1e-3)  # the adapters do act
    assert torch.allclose(model(x, 1), merged(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_adapters_combine_with_the_controllers_modulation(ckpt):
    """A static c and an adapter on the recurrent layer, one step, no gate or norm: the recurrent layer's
    weights are W + (alpha/r) B_k diag(c_k) A_k + (lora_alpha / lora_rank) B2 A2, merged by hand."""
    cfg = dataclasses.replace(CFG, controller="static", gate=False, step_norm=False, lora_layers="recurrent",
                              lora_rank=4)
    model = load_ouroboros(ckpt, cfg)
    perturb(model.trainable_parameters().values(), std=0.3)
    merged = load_model(ckpt, layers=KEPT)
    w = model.adapters.layers["3"]
    for j, (k, name) in enumerate(PROJECTIONS.items()):
        A, B = getattr(model, f"lora_A_{k}"), getattr(model, f"lora_B_{k}")
        delta = cfg.alpha / cfg.rank * B @ torch.diag(model.controller.c[0, j]) @ A
        delta += cfg.lora_alpha / cfg.lora_rank * w[f"{k}_B"] @ w[f"{k}_A"]
        merged.get_parameter(f"model.layers.3.{name}.weight").add_(delta)
    x = ids()
    assert torch.allclose(model(x, 1), merged(x), atol=1e-5, rtol=1e-5)


def test_plain_lora_through_the_command_line_prints_its_count(world, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--controller", "none", "--no-gate", "--no-step-norm", "--depth", "1", "--lora-layers", "all",
             "--lora-rank", "2"]
    assert train.main(flags(world, out, *extra)) == 0
    rows = json.loads((out / "results.json").read_text())
    d, layers = 64, 3  # tiny_config's hidden size; layers 0, 3, 5 kept
    per_layer = sum(2 * (i + o) for i, o in ((d, d), (d, 32), (d, 32), (d, d), (d, 96), (d, 96), (96, d)))
    assert rows[2]["trainable"] == layers * per_layer  # r (in + out) per projection, r = 2
    assert f"{layers * per_layer:,} trainable parameters" in capsys.readouterr().out
    assert rows[2]["name"] == "cut model, LoRA all r2, depth 1"  # not "gate + norm only (no gate, ...)"


@torch.no_grad()
def test_cached_generation_with_adapters_equals_the_uncached_loop(ckpt):
    model = load_ouroboros(ckpt, dataclasses.replace(CFG, lora_layers="all", lora_rank=4))
    perturb(model.trainable_parameters().values(), std=0.3)
    x = out = ids(B=2, T=5)
    for _ in range(6):
        out = torch.cat((out, model(out, 3)[:, -1].argmax(dim=-1, keepdim=True)), dim=1)
    assert torch.equal(model.generate(x, 3, 6), out)


# ----------------------------------------------------------------------------------------------------------
# Depth curves, the leak, the references alone.

@torch.no_grad()
def test_depth_curve_in_one_pass_equals_each_depth_alone(ckpt):
    model = load_ouroboros(ckpt, dataclasses.replace(CFG, lora_layers="coda"))
    perturb(model.trainable_parameters().values())
    x = ids()
    curve = {d: model.base.head(h) for d, h in model.hidden_at(x, [1, 2, 4, 7]).items()}
    assert sorted(curve) == [1, 2, 4, 7]
    for d, logits in curve.items():
        assert torch.allclose(logits, model(x, d), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(curve[1], curve[7], atol=1e-3)


@pytest.fixture(scope="module")
def mean_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("mean") / "run"
    assert train.main(flags(world, out, "--pool", "mean", "--lr", "1e-2", "--eval-windows", "0")) == 0
    return out


def test_eval_depths_of_a_finished_run(mean_run):
    assert train.main(["--out", str(mean_run), "--eval-only", "--eval-depths", "1,2,3", "--device", "cpu"]) == 0
    curve = json.loads((mean_run / "results-depths-1-2-3.json").read_text())
    table = json.loads((mean_run / "results.json").read_text())
    assert [r["name"].split(", depth ")[-1] for r in curve[2:]] == ["1", "2", "3"]
    assert curve[3]["loss"] == pytest.approx(table[2]["loss"], rel=1e-9)  # depth 2: as the run scored it
    assert curve[:2] == table[:2]
    assert (mean_run / "documents-depths-1-2-3.json").is_file()


def test_eval_pool_measures_the_leak(mean_run, tmp_path):
    """A run trained with the whole-sequence mean, scored causally: its deployable loss. Three steps of training
    barely teach the Controller to read its input, so the leak is made large by hand first: a copy of the run
    whose Controller reads the pool strongly (large random weights) and whose gate lets it through, else the two scores would differ
    only in the last digits, which differ from one CPU to another."""
    import shutil
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    run = tmp_path / "run"
    shutil.copytree(mean_run, run)
    file = run / train.CHECKPOINT
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    g = torch.Generator().manual_seed(0)
    for name in ("param.controller.pool_proj.weight", "param.controller.mlp.0.weight", "param.controller.mlp.2.weight",
                 "param.controller.heads.weight"):
        tensors[name] = 3 * torch.randn(tensors[name].shape, generator=g)
    tensors["param.gate.bias"].fill_(2.0)  # each step keeps 12% of the old state, not 88%: the modulation shows
    save_file(tensors, str(file), metadata=meta)
    assert train.main(["--out", str(run), "--eval-only", "--device", "cpu"]) == 0  # as trained: the mean pool
    assert train.main(["--out", str(run), "--eval-only", "--eval-pool", "causal", "--device", "cpu"]) == 0
    causal = json.loads((run / "results-pool-causal.json").read_text())
    table = json.loads((run / "results.json").read_text())
    assert "scored with the causal pool" in causal[2]["name"] and causal[:2] == table[:2]
    # far above any rounding: the loss moves by more than 0.1% (here 0.4%; CPUs differ by about 1e-7 relative)
    assert abs(causal[2]["loss"] - table[2]["loss"]) > 1e-3 * table[2]["loss"], (causal[2]["loss"], table[2]["loss"])


def test_steps_0_prints_the_reference_rows_on_dev_and_test(world, tmp_path, capsys):
    capsys.readouterr()
    assert train.main(flags(world, tmp_path / "none", "--steps", "0")) == 0
    printed = capsys.readouterr().out
    assert "next-token loss on the dev split:" in printed and "next-token loss on the test split:" in printed
    assert printed.count("full model (6 layers)") == 2 and printed.count("cut baseline (3 layers)") == 2
    assert "Ouroboros" not in printed
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------------------------------------
# What a statistics script needs.

def test_per_document_losses_add_up_to_the_table(world, mean_run):
    streams, tok = streams_by_hand(world)
    T = 16
    documents = json.loads((mean_run / "documents.json").read_text())
    table = json.loads((mean_run / "results.json").read_text())
    n_docs = len(split_by_hand(world[1], 0.15, 0.3)["test"])
    # How many scored targets (every window: --eval-windows 0) each document has, counted by hand: token i of
    # the stream is in the document numbered by the end-of-text tokens before it.
    end, counts = tok.token_to_id("<|endoftext|>"), [0] * n_docs
    doc_of = [sum(1 for t in streams["test"][:i] if t == end) for i in range(len(streams["test"]))]
    for j in range(len(windows_by_hand(streams["test"], T))):
        for i in range(j * T + 1, j * T + T + 1):
            counts[doc_of[i]] += 1
    for r in table:
        per_doc = documents[r["name"]]
        assert len(per_doc) == n_docs and all(v is not None for v in per_doc)
        assert sum(v * n for v, n in zip(per_doc, counts)) / sum(counts) == pytest.approx(r["loss"], rel=1e-6)


def test_results_hold_the_training_statistics(world, tmp_path):
    out = tmp_path / "run"
    assert train.main(flags(world, out)) == 0  # 3 steps of 2 x 2 windows of 16 tokens, depth 2 of 8
    arm = json.loads((out / "results.json").read_text())[2]
    unused = 6 * QCFG.hidden_size + 6 * CFG.step_dim  # step-norm rows and step embeddings of steps 2..7
    assert arm["trainable_used"] == arm["trainable"] - unused
    stats = json.loads((out / "stats.json").read_text())
    assert stats["tokens_seen"] == 3 * 2 * 2 * 16 and stats["tokens_per_s"] > 0 and stats["seconds"] > 0
    assert stats["flops_per_token"] > 0 and len(metrics(out)) == 3


def test_training_flops_grow_by_one_step_per_depth(world, tmp_path):
    """The FLOPs counter's per-token count is linear in depth: every recurrent step costs the same."""
    args = build_parser().parse_args(flags(world, tmp_path / "x", "--steps", "1", "--precision", "fp32"))
    _, model = train.prepare_arm(args, torch.device("cpu"))
    data = train.Windows(torch.arange(400).numpy() % QCFG.vocab_size, 16, 0)
    f = {}
    for d in (1, 2, 3):
        args.depth = d
        f[d] = train.training_flops(model, data, args, torch.device("cpu"))
    assert f[2] - f[1] == pytest.approx(f[3] - f[2], rel=1e-9) and f[2] > f[1] > 0
    # backward included: more than 1.5x the forward alone (frozen weights need input gradients only, and the
    # prelude none, so it is under the usual 3x)
    x = data.rows([0])[:, :-1]
    assert f[3] > 1.5 * evaluate.count_flops(lambda: model(x, 3)) / x.numel()
    assert math.isfinite(f[3])
