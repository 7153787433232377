"""The hand-written Qwen2 against transformers' Qwen2ForCausalLM (an oracle only), plus the invariants of
the KV cache, causality, the projection modulation and sampling."""
import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from load_qwen import load_model
from model import (PROJECTIONS, Decoder, DecoderLayer, KVCache, project, rms_norm, rope_cos_sin, rope_frequencies, sample_next,
                   sampling_loop)
from tiny import make_checkpoint, random_model, tiny_config

# initializer_range 0.2 makes every layer move the residual stream (at 0.02 the embedding dominates and
# greedy decoding repeats one token), so a wrong attention or RoPE detail shows in the logits.
LIVELY = dict(initializer_range=0.2)


def hf_model(path) -> Qwen2ForCausalLM:
    return Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


ORACLE_CASES = {
    "tied": dict(cfg={}),
    "untied": dict(cfg=dict(tie_word_embeddings=False)),
    "sharded": dict(cfg=dict(tie_word_embeddings=False), shards=3),
    "bf16-on-disk": dict(cfg={}, dtype=torch.bfloat16),
    "gqa-4h-1kv": dict(cfg=dict(num_attention_heads=4, num_key_value_heads=1)),
    "gqa-6h-2kv": dict(cfg=dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)),
    "mha-4h-4kv": dict(cfg=dict(num_attention_heads=4, num_key_value_heads=4)),
    "head-dim-32": dict(cfg=dict(head_dim=32)),  # q/k/v width 128 != hidden 64
    "eps-theta": dict(cfg=dict(rms_norm_eps=1e-2, rope_theta=50.0)),
}


@pytest.mark.parametrize("case", list(ORACLE_CASES), ids=list(ORACLE_CASES))
def test_logits_match_transformers(tmp_path, case):
    spec = ORACLE_CASES[case]
    cfg = tiny_config(**LIVELY, **spec["cfg"])
    path = make_checkpoint(tmp_path / "ckpt", cfg, seed=1, dtype=spec.get("dtype", torch.float32),
                           shards=spec.get("shards", 1))
    if case == "sharded":
        assert len(list(path.glob("model-*-of-00003.safetensors"))) == 3
    if case == "bf16-on-disk":
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    ours, hf = load_model(path, dtype=torch.float32), hf_model(path)
    assert next(ours.parameters()).dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    for batch, length in [(1, 1), (3, 7), (2, 13)]:  # batch > 1 and odd lengths
        ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
        ids[0, 0], ids[-1, -1] = 0, cfg.vocab_size - 1  # both ends of the vocabulary
        with torch.no_grad():
            ref = hf(ids).logits
            got = ours(ids)
        assert got.shape == (batch, length, cfg.vocab_size)
        assert ref.abs().max() > 1.0  # the comparison is not between near-zero logits
        assert max_diff(got, ref) <= 1e-4, (case, batch, length)


def test_logits_match_transformers_in_bf16(tmp_path):
    # In bf16 both implementations round at the same places (norm statistics and RoPE angles in fp32),
    # so they agree far better than either agrees with fp32.
    path = make_checkpoint(tmp_path / "ckpt", tiny_config(**LIVELY), dtype=torch.bfloat16)
    ours = load_model(path)
    assert next(ours.parameters()).dtype == torch.bfloat16
    hf = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, ref, fp32 = ours(ids), hf(ids).logits, load_model(path, dtype=torch.float32)(ids)
    assert got.dtype == torch.bfloat16
    assert max_diff(got, ref) <= 0.25 * max_diff(ref, fp32)


def test_rms_norm_matches_transformers_in_bf16():
    torch.manual_seed(0)
    x = (3 * torch.randn(2, 5, 64)).bfloat16()
    ref = Qwen2RMSNorm(64, eps=1e-5).bfloat16()
    with torch.no_grad():
        ref.weight.copy_(1 + 0.2 * torch.randn(64))
        assert torch.equal(rms_norm(x, ref.weight, 1e-5), ref(x))


def greedy_without_cache(model: Decoder, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids


@pytest.mark.parametrize("heads", [(4, 2), (4, 1)], ids=["4h-2kv", "4h-1kv"])
def test_greedy_generation_matches_no_cache_and_transformers(tmp_path, heads):
    cfg = tiny_config(**LIVELY, num_attention_heads=heads[0], num_key_value_heads=heads[1])
    path = make_checkpoint(tmp_path / "ckpt", cfg, seed=2)
    ours, hf = load_model(path, dtype=torch.float32), hf_model(path)
    prompt = torch.randint(0, cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    n = 12
    got = ours.generate(prompt, n)
    assert got.shape == (2, 5 + n) and torch.equal(got[:, :5], prompt)
    assert torch.equal(got, greedy_without_cache(ours, prompt, n))
    # eos_token_id=None: HF must not stop early; pad_token_id only silences its warning.
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                      do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, ref)
    assert len(set(got[:, 5:].flatten().tolist())) > 3  # a real sequence, not one token repeated


def test_sampling_loop_feeds_the_prompt_once_then_one_token_at_a_time():
    fed = []

    def step(ids):
        fed.append(ids.shape)
        return torch.zeros(ids.shape[0], ids.shape[1], 10).index_fill_(2, torch.tensor([len(fed)]), 1.0)

    out = sampling_loop(step, torch.zeros(2, 4, dtype=torch.long), 3, temperature=0.0, top_k=None)
    assert fed == [(2, 4), (2, 1), (2, 1)]  # no forward for a token that is never sampled from
    assert out[:, 4:].tolist() == [[1, 2, 3], [1, 2, 3]]


def test_generate_zero_new_tokens_returns_prompt():
    model = random_model(tiny_config(**LIVELY)).eval()
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(model.generate(prompt, 0), prompt)
    assert model.generate(prompt, 1).shape == (1, 4)


@pytest.mark.parametrize("chunks", [[4, 1, 1, 1, 1, 1, 1, 1], [5, 6], [1, 6], [3, 1, 4, 2, 1]],
                         ids=["one-by-one", "prefix-5-chunk-6", "prefix-1-chunk-6", "mixed"])
def test_kv_cache_matches_full_forward(chunks):
    # After a prefix, a chunk of T > 1 new tokens takes Attention's explicitly masked branch.
    model = random_model(tiny_config(**LIVELY, num_key_value_heads=1), seed=4).eval()
    ids = torch.randint(0, 128, (3, sum(chunks)), generator=torch.Generator().manual_seed(5))
    caches = {i: KVCache() for i in model.layer_ids}
    pieces, start = [], 0
    with torch.no_grad():
        full = model(ids)
        for n in chunks:
            pieces.append(model(ids[:, start:start + n], caches))
            start += n
            assert all(len(c) == start for c in caches.values())
    assert max_diff(torch.cat(pieces, dim=1), full) <= 1e-5


def test_kv_cache_on_a_subset_of_layers_in_a_chosen_order():
    model = random_model(tiny_config(**LIVELY), seed=6).eval()
    sub = Decoder(model.cfg, layer_ids=[3, 1]).eval()
    sub.load_state_dict({k: v for k, v in model.state_dict().items() if sub.state_dict().get(k) is not None})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    caches = {i: KVCache() for i in sub.layer_ids}
    with torch.no_grad():
        full = sub(ids)
        stepped = torch.cat((sub(ids[:, :4], caches), sub(ids[:, 4:], caches)), dim=1)
        # By hand: embed, layer 3, then layer 1, then norm and head.
        cos, sin = model.rope(0, 9, "cpu")
        x = model.model.embed_tokens(ids)
        x = model.layer(1)(model.layer(3)(x, cos, sin), cos, sin)
        by_hand = model.head(x)
    assert max_diff(stepped, full) <= 1e-5
    assert max_diff(full, by_hand) <= 1e-6


def test_attention_is_causal():
    model = random_model(tiny_config(**LIVELY), seed=8).eval()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(9))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 128
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :6], b[:, :6])  # positions before the change cannot see it
    assert max_diff(a[:, 7:], b[:, 7:]) > 1e-3  # positions after it do


def test_rope_depends_on_position():
    # In one layer without positions, position 3 (context 5 9 5 9) would equal position 1 (context 5 9):
    # duplicating every key and value leaves softmax attention unchanged. Only RoPE tells them apart.
    model = random_model(tiny_config(**LIVELY, num_hidden_layers=1), seed=10).eval()
    ids = torch.tensor([[5, 9, 5, 9, 5, 9]])
    with torch.no_grad():
        logits = model(ids)
    assert max_diff(logits[0, 1], logits[0, 3]) > 1e-3
    cos, sin = model.rope(3, 4, "cpu")
    cos0, sin0 = model.rope(0, 7, "cpu")
    assert torch.equal(cos, cos0[3:]) and torch.equal(sin, sin0[3:])


def test_project_adds_the_low_rank_modulation_per_token():
    torch.manual_seed(11)
    linear = torch.nn.Linear(16, 24, bias=True)
    x, A, B, c = torch.randn(2, 5, 16), torch.randn(3, 16), torch.randn(24, 3), torch.randn(2, 5, 3)
    with torch.no_grad():
        got = project(linear, x, "q", {"q": [(A, B, c)]})
        # y_t = W x_t + b + B diag(c_t) A x_t, with the per-token weight delta materialised.
        delta = torch.einsum("or,btr,ri->btoi", B, c, A)
        expected = linear(x) + torch.einsum("btoi,bti->bto", delta, x)
        assert max_diff(got, expected) <= 1e-4
        assert torch.equal(project(linear, x, "q", {"k": [(A, B, c)]}), linear(x))  # other names: untouched
        assert torch.equal(project(linear, x, "q", None), linear(x))


@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_modulation_reaches_the_named_projection(name):
    # A constant c modulates the projection PROJECTIONS[name] exactly like adding B diag(c) A to its weight.
    cfg = tiny_config(**LIVELY)
    torch.manual_seed(12)
    layer = DecoderLayer(cfg).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.2) if p.dim() > 1 else p.normal_(mean=1.0, std=0.2)
    linear = layer.get_submodule(PROJECTIONS[name])
    r = 3
    A, B = 0.3 * torch.randn(r, linear.in_features), 0.3 * torch.randn(linear.out_features, r)
    c = torch.tensor([0.5, -1.0, 2.0])
    x = torch.randn(2, 6, cfg.hidden_size)
    cos, sin = rope_cos_sin(0, 6, rope_frequencies(cfg))
    with torch.no_grad():
        plain = layer(x, cos, sin)
        got = layer(x, cos, sin, mod={name: [(A, B, c)]})
        zero = layer(x, cos, sin, mod={name: [(A, B, torch.zeros(r))]})
        linear.weight += B @ torch.diag(c) @ A
        expected = layer(x, cos, sin)
    assert max_diff(got, expected) <= 1e-4
    assert max_diff(got, plain) > 1e-3
    assert torch.equal(zero, plain)  # c = 0 is exactly the unmodulated layer


def test_sample_next():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0], [4.0, 0.0, 0.0, 0.0, 3.9]])
    assert sample_next(logits, 0.0, None).tolist() == [[1], [0]]
    assert sample_next(logits, 1.0, top_k=1).tolist() == [[1], [0]]
    gen = torch.Generator().manual_seed(0)
    draws = torch.cat([sample_next(logits, 5.0, top_k=2, generator=gen) for _ in range(300)], dim=1)
    assert set(draws[0].tolist()) == {1, 3} and set(draws[1].tolist()) == {0, 4}
    again = torch.Generator().manual_seed(0)
    assert torch.equal(torch.cat([sample_next(logits, 5.0, 2, again) for _ in range(300)], dim=1), draws)
    # Without top_k a high temperature reaches every token.
    wide = torch.cat([sample_next(logits, 50.0, None, generator=gen) for _ in range(300)], dim=1)
    assert set(wide[0].tolist()) == set(range(5))


def test_fresh_model_init_and_tying():
    cfg = tiny_config()
    model = Decoder(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert abs(model.model.embed_tokens.weight.std().item() - cfg.initializer_range) < 0.005
    assert torch.equal(model.layer(0).self_attn.q_proj.bias, torch.zeros_like(model.layer(0).self_attn.q_proj.bias))
    untied = Decoder(tiny_config(tie_word_embeddings=False))
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert model.cfg.head_dim == 16 and tiny_config(head_dim=32).head_dim == 32
