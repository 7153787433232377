"""The offline demo's base model (`python train.py` with no arguments): no checkpoint, no GPU, no network.

A byte-level BPE is trained on the training split of the standard library's source, and a small Qwen2 is
pretrained from scratch on it, with train.py's own training loop (passed in, so that imports run one way),
then saved in Hugging Face layout and cached. train.py then applies the method to it like to any downloaded
checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import os
from pathlib import Path

import torch

from data import Windows, demo_tokenizer, eos_token_id, locked, source_digest, token_streams, windows_for
from load_qwen import save_model
from model import Decoder, DecoderConfig
from runs import CHECKPOINT, RunError, read_checkpoint

# Sized for a quick cold demo (BPE, tokenising, pretraining, two arms) on a 2-core CPU; pretraining is most of it
# (README: 1 min 51 s with native bf16, 3 min 43 s in fp32, measured). study.py pretrains an 8-layer sibling longer.
# rope_theta 10,000 is the original RoPE base: Qwen2.5's 1,000,000 serves its 32k context, the demo's is 256.
# Two key/value heads for four query heads: grouped-query attention, as in Qwen2.5.
DEMO_BASE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32")
DEMO_VOCAB = 4096  # a 4096 x 256 embedding; Qwen's 151,936 tokens would make it most of the model
# The base's recipe is fixed (only --pretrain-steps and --precision change it, and each base is cached under
# its own key): --seed, --lr, --batch-size etc. vary only the Ouroboros arms trained on it.
DEMO_PRETRAIN = dict(seq_len=256, batch_size=4, grad_accum=1, lr=2e-3, warmup=20, min_lr_ratio=0.1,
                     weight_decay=0.1, clip=1.0, seed=0)  # seed: the base's initial weights and its data order
# Flag defaults for the demo's arms, sized for a 2-core CPU; every flag can still override them.
# dev_fraction and test_fraction are shares of the documents (for the stdlib, its files); see data.split_of.
DEMO_ARM = dict(seq_len=256, batch_size=8, grad_accum=1, steps=80, warmup=5, lr=3e-4, depth=4,
                dev_fraction=0.05, test_fraction=0.1, eval_windows=128, eval_every=0, log_every=25, save_every=50)


def demo_base(args, cache: Path, device, train, shape: dict = DEMO_BASE) -> Path:
    """The demo's base checkpoint directory: from the cache, or pretrained now with `train` (train.train). Its
    files live beside the default token cache (~/.cache/ouroboros), or in a demo/ folder of --token-cache.
    shape: the decoder's size (DEMO_BASE, or the study's larger base)."""
    root = cache.parent if args.token_cache is None else cache / "demo"
    tokenizer = demo_tokenizer(args.data, DEMO_VOCAB, args.dev_fraction, args.test_fraction, root)
    # The base depends on the data, its split, the recipe and the precision: any change pretrains another.
    recipe = (f"{source_digest(args.data)}|{args.dev_fraction}|{args.test_fraction}|{DEMO_VOCAB}|{shape}|"
              f"{DEMO_PRETRAIN}|{args.pretrain_steps}|{args.precision}")
    base_dir = root / f"base-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    base_dir.mkdir(parents=True, exist_ok=True)  # for the lock file; the finished model appears in it last
    with locked(base_dir / "lock"):  # two demos at once: one pretrains, the other then reads its base
        if not (base_dir / "model" / "config.json").is_file():  # checked under the lock: a waiter finds it written
            pretrain(args, tokenizer, cache, base_dir, device, train, shape)
    return base_dir / "model"


def pretrain(args, tokenizer, cache: Path, base_dir: Path, device, train, shape: dict) -> None:
    streams = token_streams(args.data, tokenizer, args.dev_fraction, args.test_fraction, cache)
    # The arms' windows must fit too: a corpus too small for them is refused before minutes of pretraining.
    windows_for(streams, args.seq_len, args.seed, tokenizer.get_vocab_size(), eos_token_id(tokenizer))
    data = Windows(streams["train"], DEMO_PRETRAIN["seq_len"], DEMO_PRETRAIN["seed"])  # no eos_id: no evaluation
    if data.n < 1:  # the check above used the arms' --seq-len, not the recipe's 256
        raise RunError(f"the training split has {len(streams['train'])} tokens, too few to pretrain the demo base on "
                       f"windows of {DEMO_PRETRAIN['seq_len']}; pass --data with more text")
    # A --pretrain-steps shorter than the recipe's warmup (the tests' few steps) warms up over all of them.
    # The arms' flags with the recipe on top. No dev split is passed, hence eval_every 0; no --stop-after, which would
    # end pretraining early and save the half-trained model below as the finished base.
    pargs = argparse.Namespace(**{**vars(args), **DEMO_PRETRAIN, "steps": args.pretrain_steps, "eval_every": 0,
                                  "stop_after": None, "warmup": min(DEMO_PRETRAIN["warmup"], args.pretrain_steps)})
    # max_position_embeddings: the context it was trained on, for config.json (model.py's RoPE takes any length).
    cfg = DecoderConfig(vocab_size=tokenizer.get_vocab_size(), max_position_embeddings=pargs.seq_len, **shape)
    torch.manual_seed(pargs.seed)  # the same recipe starts from the same weights
    model = Decoder(cfg).to(device).train()
    (run_dir := base_dir / "pretrain").mkdir(parents=True, exist_ok=True)  # its checkpoints and metrics.jsonl
    print(f"pretraining the demo base: Qwen2 with {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {pargs.steps} steps (cached for later runs)")
    checkpoint = read_checkpoint(run_dir) if (run_dir / CHECKPOINT).is_file() else None  # an interrupted one resumes
    # Plain next-token pretraining in train.py's loop: looped=False passes depth=None, which forward ignores.
    train(lambda x, depth: model.hidden(x), model.head, model, data, None, pargs, run_dir, device, checkpoint, looped=False)
    save_model(model.eval(), base_dir / "model.tmp", tokenizer)  # same folder: the rename below is atomic
    os.replace(base_dir / "model.tmp", base_dir / "model")  # a directory: renamed whole once all its files are written
