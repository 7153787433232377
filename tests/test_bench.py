"""bench.py's reference, Ouroboros built the authors' way (transformers' decoder layers, wrapped projections):
the same function as ours, so that its timings compare like with like."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import tiny
import bench
from controller import OuroborosConfig
from load_qwen import load_ouroboros

pytest.importorskip("transformers")


@pytest.mark.parametrize("trained", [False, True])
def test_the_authors_way_gives_our_logits_and_gradients(tmp_path, trained):
    path = tiny.make_checkpoint(tmp_path / "ckpt", tiny.tiny_config(num_hidden_layers=5))
    torch.manual_seed(0)
    ours = load_ouroboros(path, OuroborosConfig(n_prelude=1, recurrent_layer=2, n_coda=1, rank=8), torch.float32)
    if trained:  # values a trained run has: c, the gate and the step norms all away from their initial values
        with torch.no_grad():
            nn.init.normal_(ours.controller.heads.weight, std=0.5)
            nn.init.normal_(ours.gate.weight, std=0.1)
            ours.step_norm.mul_(1 + 0.3 * torch.randn_like(ours.step_norm))
    reference = bench.AuthorsWay(ours, path, torch.float32)
    x = torch.randint(0, 128, (2, 24))
    y = torch.randint(0, 128, (2, 24))
    a, b = ours(x, 3), reference(x, 3)
    assert (a - ours.base(x)).abs().max() > 1e-3  # the recursion changes the logits: the test is not of the cut
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    F.cross_entropy(a.flatten(0, 1), y.flatten()).backward()
    F.cross_entropy(b.flatten(0, 1), y.flatten()).backward()
    ref_params = reference.trainable_parameters()
    assert set(ref_params) == set(ours.trainable_parameters())
    for name, p in ours.trainable_parameters().items():
        torch.testing.assert_close(ref_params[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_the_memory_models_meta_count_is_the_real_count():
    """memory_model counts what autograd saves on the meta device; on real tensors the same forward saves the
    same bytes, and the count grows by the same amount with every recurrent step (and less with checkpointing)."""
    cfg = tiny.tiny_config(num_hidden_layers=5, vocab_size=300)
    split = (1, 2, 1)
    meta = bench.meta_ouroboros(cfg, split)
    real = bench.meta_ouroboros(cfg, split).to_empty(device="cpu")  # the same module, with (garbage) CPU memory
    for depth in (1, 2, 5):
        assert bench.saved_activation_bytes(meta, 2, 40, depth) == bench.saved_activation_bytes(real, 2, 40, depth)
    counts = [bench.saved_activation_bytes(meta, 2, 40, d) for d in (1, 2, 3, 4)]
    steps = {b - a for a, b in zip(counts, counts[1:])}
    assert len(steps) == 1 and steps.pop() > 2 * 40 * cfg.hidden_size * 4  # a step saves more than its input
    plain = bench.memory_model(cfg, split, 2, 40, 4)
    ckpt = bench.memory_model(cfg, split, 2, 40, 4, checkpoint_steps=True)
    assert ckpt["activations"] < plain["activations"] and plain["total"] > plain["weights"] > 0
