"""The SVD LoRA bases: B @ A is the best rank-r approximation of the mean residual of the removed layers,
and load_ouroboros builds them by streaming the removed layers' projection weights, nothing else."""
import weakref

import pytest
import torch
from safetensors.torch import load_file

from tiny import make_checkpoint, tiny_config  # first: it puts the repository root on sys.path

import load_qwen
from controller import OuroborosConfig, svd_bases
from load_qwen import load_ouroboros
from model import PROJECTIONS

QCFG = tiny_config(num_hidden_layers=6)
CFG = OuroborosConfig(n_prelude=1, recurrent_layer=3, n_coda=1, rank=8, max_depth=8)  # removes 1, 2, 4
REMOVED = [1, 2, 4]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("six"), QCFG, seed=1)


def weight(tensors, layer, k):
    return tensors[f"model.layers.{layer}.{PROJECTIONS[k]}.weight"].double()


def test_bases_are_the_rank_r_truncation_of_the_mean_residual(ckpt):
    model = load_ouroboros(ckpt, CFG)
    tensors = load_file(str(ckpt / "model.safetensors"))
    r = CFG.rank
    for k in PROJECTIONS:
        # R = mean_i (W_i - W_rec), computed here from the file, in float64.
        R = sum(weight(tensors, i, k) for i in REMOVED) / len(REMOVED) - weight(tensors, CFG.recurrent_layer, k)
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        A, B = getattr(model, f"lora_A_{k}").double(), getattr(model, f"lora_B_{k}").double()
        out_features, in_features = R.shape
        assert A.shape == (r, in_features) and B.shape == (out_features, r), k
        # Eckart-Young: the error of the best rank-r approximation is the norm of the dropped singular values.
        err = torch.linalg.matrix_norm(R - B @ A)
        assert err.item() == pytest.approx(S[r:].square().sum().sqrt().item(), rel=1e-4), k
        truncation = (U[:, :r] * S[:r]) @ Vh[:r]
        torch.testing.assert_close(B @ A, truncation, rtol=0, atol=1e-5 * S[0].item())
        torch.testing.assert_close(A @ A.T, torch.eye(r, dtype=A.dtype), rtol=0, atol=1e-5)  # A = Vh[:r]


def test_bases_are_frozen_buffers_not_parameters(ckpt):
    model = load_ouroboros(ckpt, CFG)
    buffers = dict(model.named_buffers())
    params = dict(model.named_parameters())
    state = model.state_dict()
    for k in PROJECTIONS:
        for name in (f"lora_A_{k}", f"lora_B_{k}"):
            assert name in buffers and name not in params
            assert not buffers[name].requires_grad
            assert buffers[name].abs().sum() > 0  # removed layers exist, so the residual is not zero
            assert name in state  # saved with the model, so a reload reproduces the run
    assert not any(name.startswith("lora_") for name in model.trainable_parameters())


def test_no_removed_layers_gives_zero_bases(tmp_path):
    path = make_checkpoint(tmp_path, tiny_config(num_hidden_layers=4))
    cfg = OuroborosConfig(n_prelude=1, recurrent_layer=1, n_coda=2, rank=8, max_depth=8)
    assert cfg.split(4)[3] == []
    model = load_ouroboros(path, cfg)
    for k in PROJECTIONS:
        A, B = getattr(model, f"lora_A_{k}"), getattr(model, f"lora_B_{k}")
        layer_w = model.base.get_submodule(f"model.layers.1.{PROJECTIONS[k]}").weight
        assert A.shape == (8, layer_w.shape[1]) and B.shape == (layer_w.shape[0], 8)
        assert torch.count_nonzero(A) == 0 and torch.count_nonzero(B) == 0


def test_svd_bases_consumes_a_one_pass_iterator():
    torch.manual_seed(0)
    rec = {k: torch.randn(12, 10) for k in PROJECTIONS}
    removed = [{k: torch.randn(12, 10) for k in PROJECTIONS} for _ in range(3)]
    from_list = svd_bases(rec, removed, 4)
    from_iter = svd_bases(rec, iter(removed), 4)  # a generator can be read only once
    for k in PROJECTIONS:
        A, B = from_iter[k]
        torch.testing.assert_close(B @ A, from_list[k][1] @ from_list[k][0])
        R = sum(layer[k] for layer in removed) / 3 - rec[k]
        S = torch.linalg.svdvals(R)
        assert torch.linalg.matrix_norm(R - B @ A).item() == pytest.approx(S[4:].square().sum().sqrt().item(), rel=1e-4)


class RecordingHandle:
    """Stands in for a safetensors handle: records every tensor read and which removed layers' tensors are
    still alive (through weak references) at the moment each removed-layer tensor is read."""

    def __init__(self, handle, log):
        self.handle, self.log = handle, log

    def keys(self):
        return self.handle.keys()

    def get_slice(self, key):
        self.log["slices"].append(key)
        return self.handle.get_slice(key)

    def get_tensor(self, key):
        t = self.handle.get_tensor(key)
        self.log["reads"].append(key)
        layer = load_qwen.LAYER_KEY.match(key)
        if layer is not None and int(layer.group(1)) in REMOVED:
            i = int(layer.group(1))
            alive = {j for j, ref in self.log["refs"] if ref() is not None and j != i}
            self.log["alive"].append((i, alive))
            self.log["refs"].append((i, weakref.ref(t)))
        return t


def test_load_ouroboros_streams_only_the_removed_projection_weights(ckpt, monkeypatch):
    log = {"reads": [], "slices": [], "refs": [], "alive": []}
    real = load_qwen.safe_open
    monkeypatch.setattr(load_qwen, "safe_open", lambda *a, **kw: RecordingHandle(real(*a, **kw), log))
    load_ouroboros(ckpt, CFG)

    def of_removed(keys):
        return [key for key in keys if (m := load_qwen.LAYER_KEY.match(key)) and int(m.group(1)) in REMOVED]

    wanted = sorted(f"model.layers.{i}.{name}.weight" for i in REMOVED for name in PROJECTIONS.values())
    # Each removed projection weight read exactly once; their biases and norms never touched.
    assert sorted(of_removed(log["reads"])) == wanted
    assert of_removed(log["slices"]) == []
    # Streaming: while a removed layer is read, no removed layer older than the previous one is still alive.
    assert [i for i, _ in log["alive"]] == sorted(i for i, _ in log["alive"])  # one layer after another
    for i, alive in log["alive"]:
        previous = [j for j in REMOVED if j < i][-1:]
        assert alive <= set(previous), f"while reading layer {i}, layers {alive} were still in memory"
