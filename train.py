"""Train and evaluate Ouroboros on a Qwen2 / Qwen2.5, Llama or Qwen3 checkpoint.

    python train.py --model DIR --data PATH --out DIR [flags]     train one variant, print the comparison table
    python train.py                                               the whole method offline on CPU (the demo)
    python train.py --out DIR --sample "prompt"                   generate with a trained run
    torchrun --nproc-per-node N train.py ...                      data-parallel

Read top to bottom: flags, the label shift and loss, the learning-rate schedule, the one training loop (every
variant's, and the demo's pretraining), evaluation, one run, the demo, main(). Data: data.py; what keeps a run
safe (checkpoints, signals, agreement between processes): runs.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from controller import ConfigError, Ouroboros, OuroborosConfig, paper_split
from data import DataError, Windows, token_cache
from data import splits as data_splits
from demo import DEMO_ARM, demo_base
from load_qwen import (CheckpointError, atomic_write, fingerprint, load_config, load_model, load_ouroboros,
                       load_tokenizer, resolve_model)
from runs import (CHECKPOINT, Interrupted, Parser, RunError, Saver, StopSignals, all_mean, all_sum, autocast,
                  check_flags, check_identical, check_out_dir, check_resume, check_same_model, check_writable, clip_gradients, compare,
                  count_flops, flag_names, fmt_time, number, init_distributed, log_line, pick_device, read_checkpoint,
                  read_run_config, resolve_precision, print_counter, print_progress, restore, resume, skip_update,
                  start_run, rank_world, write_results)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="Train Ouroboros (a looped decoder layer with input-conditioned LoRA) on a Qwen2 / Qwen2.5, "
                           "Llama or Qwen3 checkpoint. "
                           "Without --model: the offline CPU demo, whose defaults are sized for a 2-core CPU ("
                           + " ".join(f"--{k.replace('_', '-')} {DEMO_ARM[k]}" for k in ("steps", "seq_len", "batch_size",
                                                                                        "grad_accum", "depth")) + " ...).")
    a = p.add_argument
    a("--model", help="a Qwen2/Qwen2.5, Llama or Qwen3 checkpoint: a directory (Hugging Face layout) or a hub id such "
                      "as Qwen/Qwen3-0.6B (fetched once into the Hugging Face cache; HF_HUB_OFFLINE=1 reads only the "
                      "cache). Omit for the offline CPU demo.")
    a("--data", help="a text file (documents split at blank lines), a directory (a document per file), a .jsonl "
                     "('text', optional 'id'), a .parquet (its 'text' column, optional 'id'; needs pyarrow), or a .gz "
                     "of a text file or .jsonl; stdlib: the standard library's source, the demo's corpus and its default")
    a("--out", help="run directory: config, checkpoint, metrics.jsonl, results.json")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--overwrite", action="store_true", help="replace an existing run in --out")
    # the variant
    a("--controller", default="dynamic", choices=["dynamic", "static", "none"],
      help="dynamic: the Ouroboros Controller; static: learned c per step, ignores input; none: no LoRA")
    a("--no-gate", action="store_true", help="ablation: h = h_new each step instead of the gated mix")
    a("--no-step-norm", action="store_true", help="ablation: no per-step RMSNorm")
    a("--pool", default="causal", choices=["causal", "mean"],
      help="Controller input: causal running mean, or the paper's whole-sequence mean, which leaks future tokens")
    a("--rank", type=int, default=32, help="LoRA rank r")
    a("--alpha", type=number, default=16.0, help="LoRA alpha; the delta is scaled by alpha / r")
    a("--depth", type=int, default=8, help="recurrent steps per forward")
    a("--depths", help="e.g. 4,8,16: a depth drawn per optimizer step (seeded); evaluated at each")
    a("--max-depth", type=int, default=64, help="the largest depth a run can use: the rows of the Controller's step "
                                             "embedding and of the per-step norms (--steps is the run's length)")
    a("--n-prelude", type=int, help="frozen layers before the loop (default round(8L/36), 8 on Qwen2.5-3B)")
    a("--recurrent-layer", type=int, help="the looped layer (default L // 2, 18 on Qwen2.5-3B)")
    a("--n-coda", type=int, help="frozen layers after the loop (default round(8L/36))")
    a("--controller-input", default="pooled", choices=["pooled", "none"], help="none: the input-blind control")
    a("--lora-layers", default="none", choices=["none", "coda", "recurrent", "all"], help="LoRA-heal these layers")
    a("--lora-rank", type=int, default=8, help="the adapters' rank")
    a("--lora-alpha", type=number, default=16.0, help="the adapters' delta is scaled by alpha / rank")
    a("--checkpoint-steps", action="store_true", help="recompute each recurrent step in backward (less memory)")
    a("--compile", action="store_true", help="torch.compile each decoder layer (compiled once, reused at every depth)")
    training_flags(a)
    # using finished runs
    a("--eval-only", action="store_true", help="recompute the comparison table of the run in --out")
    a("--eval-depths", dest="score_depths", help="the table's depths, e.g. 1,2,4,8 (default: --depths or --depth)")
    a("--eval-pool", choices=["causal", "mean"], help="with --eval-only: score with this pool, not the training one")
    a("--compare", nargs="+", metavar="RUN", help="print one table of these finished runs (full and cut rows once)")
    a("--sample", metavar="PROMPT", help="generate text from PROMPT with the trained run in --out")
    a("--max-new-tokens", type=int, default=100, help="with --sample")
    a("--temperature", type=number, default=0.8, help="with --sample; 0 is greedy")
    a("--top-k", type=int, default=50, help="with --sample")
    return p


def training_flags(a) -> None:
    # the defaults are the paper's GPU setup
    a("--steps", type=int, default=1000, help="optimizer steps")
    a("--seq-len", type=int, default=2048, help="tokens per window")
    a("--batch-size", type=int, default=2, help="windows per micro-batch (per process)")
    a("--grad-accum", type=int, default=16, help="micro-batches per optimizer step")
    a("--lr", type=number, default=3e-4, help="peak learning rate")
    a("--lora-lr", type=number, help="peak lr of the LoRA adapters of --lora-layers (default: --lr)")
    a("--min-lr-ratio", type=number, default=0.1, help="final learning rate as a fraction of --lr")
    a("--warmup", type=int, default=50, help="linear warmup, in optimizer steps")
    a("--weight-decay", type=number, default=0.01, help="AdamW's, on the Controller's and gate's matrices only")
    a("--clip", type=number, default=1.0, help="gradient norm clip")
    a("--seed", type=int, default=0, help="seed for data order, depth draws and initialisation")
    a("--dev-fraction", type=number, default=0.01, help="share of documents in the dev split, read by --eval-every")
    a("--test-fraction", type=number, default=0.01, help="share of documents in the test split, read by the table")
    a("--eval-windows", type=int, default=256, help="windows per evaluation, spread over the split (0: all)")
    a("--eval-per-document", type=int, default=0, help="at most N windows of each document per evaluation, "
      "so that no long document holds most of the scored tokens (0: no cap)")
    a("--no-reference-rows", action="store_true", help="the final table without the full model and the cut "
      "baseline, which are the same for every run of a checkpoint and split (study.py scores them once)")
    a("--table-split", default="test", choices=["test", "dev"], help="the final table's; dev: to tune without test")
    a("--eval-every", type=int, default=200, help="dev-split evaluation every N steps (0: never)")
    a("--log-every", type=int, default=10, help="progress line every N steps")
    a("--save-every", type=int, default=100, help="checkpoint every N steps (also at the end and on Ctrl-C)")
    a("--stop-after", type=int, help="stop with a checkpoint after N steps in this invocation (for time-sliced jobs)")
    a("--token-cache", help="tokenised corpora, shared by every run (default: ~/.cache/ouroboros/tokens)")
    a("--pretrain-steps", type=int, default=400, help="demo only: optimizer steps pretraining its base model")
    a("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    a("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="compute and frozen-base dtype "
      "(trainables stay fp32); auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32. "
      "On CUDA, fp32 matmuls use TF32 tensor cores")
    a("--allow-slow-bf16", action="store_true", help="accept --precision bf16 on a CPU without native bf16 "
      "(about 100x slower than fp32 there; refused without this flag)")


# ----------------------------------------------------------------------------------------------------------
# The label shift, defined once: a window of T + 1 tokens gives inputs t_0..t_{T-1} and targets t_1..t_T, so
# the logit at position i is scored against the token at i + 1.

def inputs_and_targets(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return windows[:, :-1], windows[:, 1:]


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # logits (B, T, V) at the input positions, targets (B, T) already shifted: cross-entropy in nats
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


LOSS_CHUNK = 256  # positions whose logits exist at once: 156 MB of fp32 logits for a 151,936-token vocabulary


def loss_from_states(h: torch.Tensor, targets: torch.Tensor, head, reduction: str = "mean") -> torch.Tensor:
    """next_token_loss(head(h), targets), LOSS_CHUNK positions at a time. The logits are the largest tensors of a
    step (the vocabulary per token: their fp32 copy, the log-softmax kept for backward, its gradient); here they
    exist for one chunk at a time and are recomputed in backward, never for the whole batch. h (B, T, d)."""
    h, targets = h.flatten(0, 1), targets.flatten()

    def chunk(h_part, t_part):  # (n, d), (n,) -> (n,) losses
        return next_token_loss(head(h_part)[None], t_part[None], reduction="none")

    grad = torch.is_grad_enabled()
    losses = torch.cat([checkpoint(chunk, h[i:i + LOSS_CHUNK], targets[i:i + LOSS_CHUNK], use_reentrant=False)
                        if grad else chunk(h[i:i + LOSS_CHUNK], targets[i:i + LOSS_CHUNK])
                        for i in range(0, len(targets), LOSS_CHUNK)])
    return losses.mean() if reduction == "mean" else losses  # (B*T,) with reduction "none"


def get_lr(step: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to lr * min_lr_ratio at the last step. Counted in optimizer steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)  # the last step is steps - 1
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def depth_at(step: int, args) -> int:
    # Drawn in the training loop from a generator seeded by (seed, step): reproducible, resume-exact.
    if not args.depths:
        return args.depth
    depths = parse_depths(args.depths)
    return depths[np.random.default_rng([args.seed, 1, step]).integers(len(depths))]


def parse_depths(text: str, flag: str = "--depths") -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise RunError(f"{flag} {text!r} is not a comma list of integers, e.g. 4,8,16") from None


# ----------------------------------------------------------------------------------------------------------
# The training loop, shared by every Ouroboros variant and by the demo's pretraining of its base model.

def build_optimizer(model: torch.nn.Module, params: dict, args, device) -> torch.optim.AdamW:
    """AdamW over `params`. Weight decay pulls towards 0, so it goes only on the weight matrices of linear
    layers (the Controller's and the gate's; every matrix of a model pretrained from scratch). Never on norms
    (a norm row no step reaches would shrink), step embeddings, the static c or biases."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    # --lora-lr: the LoRA adapters on kept layers (parameters named adapters.*) in groups of their own, at their own
    # peak lr on the same schedule (the lr_scale of a group multiplies the scheduled lr).
    lora_lr = getattr(args, "lora_lr", None)
    apart = lora_lr is not None and lora_lr != args.lr
    groups = []
    for adapters in ((False, True) if apart else (None,)):
        mine = [p for n, p in params.items() if adapters is None or n.startswith("adapters.") == adapters]
        scale = lora_lr / args.lr if adapters else 1.0
        groups += [{"params": [p for p in mine if id(p) in linear], "weight_decay": args.weight_decay, "lr_scale": scale},
                   {"params": [p for p in mine if id(p) not in linear], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train(forward, head, model: torch.nn.Module, data: Windows, dev: Windows | None, args, out: Path, device,
          resume_from: tuple | None = None, looped: bool = True, world: int = 1, rank: int = 0) -> dict:
    """Optimizes the trainable parameters of `model` (fp32) so that head(forward(inputs, depth)) predicts the next
    token; forward gives the states before the head. --eval-every reads `dev`; `looped` is False for the demo's
    pretraining (no depth). Returns the final state."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = build_optimizer(model, params, args, device)
    state = resume(resume_from, out, params, optimizer, rank) if resume_from else dict(step=0, bad_steps=0, world=world)
    save = Saver(out, params, optimizer, world, rank, state["step"] if resume_from is not None else None)
    per_step = args.batch_size * args.grad_accum * world  # windows per optimizer step, all processes
    (start_step, seconds), t0 = (state["step"], state.get("seconds", 0.0)), time.time()
    with StopSignals(world, device) as signals:
        try:
            while state["step"] < args.steps:
                signals.hold(world > 1)  # under torchrun, signals wait for the end of the step
                signals.check()
                step = state["step"]
                if args.stop_after is not None and step - start_step >= args.stop_after:
                    break
                lr = get_lr(step, args)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                depth = depth_at(step, args) if looped else None
                loss_sum = torch.zeros((), device=device)
                for micro in range(args.grad_accum):
                    first = step * per_step + (micro * world + rank) * args.batch_size
                    x, y = inputs_and_targets(data.batch(first, args.batch_size).to(device, non_blocking=True))
                    with autocast(device, args.precision):
                        loss = loss_from_states(forward(x, depth), y, head)
                    (loss / args.grad_accum).backward()
                    loss_sum += loss.detach()
                loss = all_mean(loss_sum / args.grad_accum, world).item()
                signals.hold(True)  # from here to the end of the step's bookkeeping
                grad_norm = clip_gradients(params, args.clip, world) if math.isfinite(loss) else math.nan
                if not math.isfinite(grad_norm):
                    skip_update(optimizer, state, loss, grad_norm, out, rank)
                    continue
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.update(step=step + 1, bad_steps=0, samples=(step + 1) * per_step, seconds=seconds + time.time() - t0)
                step += 1
                record = {"step": step, "loss": loss, "lr": lr} | ({"depth": depth} if looped else {})
                if rank == 0 and (step % args.log_every == 0 or step == args.steps):
                    done = step - start_step
                    print_progress(record, args.steps, done, done * per_step * args.seq_len, t0)
                if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                    record["dev_loss"] = score(lambda x: {0: forward(x, max(args.eval_depths))}, [0], head, dev, args,
                                               device)[0][0]
                    if rank == 0:
                        print(f"step {step}: dev loss {record['dev_loss']:.4f}", flush=True)
                log_line(out, record, rank)
                if step % args.save_every == 0 or step == args.steps:
                    save(state)
            signals.check()  # arrived during the last step's bookkeeping
        except (KeyboardInterrupt, Interrupted):
            signals.hold(True)  # a second Ctrl-C waits for this checkpoint
            save(state, interrupted=True)
            raise KeyboardInterrupt from None
    save(state)
    return state


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the same windows, spread over the whole split, for every model; shared out between processes.

@torch.no_grad()
def score(forward, keys, head, split: Windows, args, device, what: str | None = None) -> dict:
    """Next-token loss of each output of forward(x), a dict of states before the head under `keys` (one per depth,
    say; the logits are made from one key's states at a time, a chunk at a time), over
    --eval-windows windows spread over the whole split: {key: (mean loss, per-document mean losses)}. Under torchrun
    each process scores its share of the windows and the sums are taken over all; with `what`, a progress line."""
    rank, world = rank_world()
    indices = split.spread(args.eval_windows, args.eval_per_document)
    n_docs = int(split.target_documents(indices[-1:]).max()) + 1
    count = torch.zeros(n_docs, dtype=torch.float64, device=device)
    sums = {key: torch.zeros_like(count) for key in keys}  # on every process, even one with no windows to score
    mine = list(range(rank * args.batch_size, len(indices), world * args.batch_size))
    for n, start in enumerate(mine):
        chunk = indices[start:start + args.batch_size]
        (x, y), doc = inputs_and_targets(split.rows(chunk).to(device)), split.target_documents(chunk).to(device).flatten()
        with autocast(device, args.precision):
            for key, states in forward(x).items():
                loss = loss_from_states(states, y, head, reduction="none").double()
                sums[key].index_add_(0, doc, loss)
        count.index_add_(0, doc, torch.ones_like(doc, dtype=count.dtype))
        if what and rank == 0:
            print_counter(f"evaluating {what}", n + 1, len(mine), "batches")
    count = all_sum(count, world)
    sums = {key: all_sum(s, world) for key, s in sums.items()}
    per_doc = lambda s: [None if n == 0 else v for v, n in zip((s / count).tolist(), count.tolist())]  # noqa: E731
    return {key: ((s.sum() / count.sum()).item(), per_doc(s)) for key, s in sums.items()}


def arm_name(args) -> str:
    if args.controller == "none" and args.no_gate and args.no_step_norm:  # nothing of the method left: the cut
        adapters = f", LoRA {args.lora_layers} r{args.lora_rank}" if args.lora_layers != "none" else ""
        return f"cut model{adapters}" + (", recurrent layer looped" if (args.depths or args.depth != 1) else "")
    name = {"dynamic": "Ouroboros", "static": "static per-step LoRA", "none": "gate + norm only"}[args.controller]
    ablations = [f for f, on in (("no gate", args.no_gate), ("no step norm", args.no_step_norm),
                                 ("mean pool", args.pool == "mean"), ("input-blind", args.controller_input == "none"),
                                 (f"LoRA {args.lora_layers} r{args.lora_rank}", args.lora_layers != "none")) if on]
    return name + (f" ({', '.join(ablations)})" if ablations else "")


def count(params) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def table_rows(model: Ouroboros, test: Windows, args, device, name: str | None = None, arms=True) -> list[dict]:
    """The table's rows, on the same windows: full model, cut baseline, and (with `arms`) the arm at each depth."""
    name, control = name or arm_name(args), model.controller is None and model.gate is not None and model.step_norm is not None
    if arms:
        scores = score(lambda x: model.eval().hidden_at(x, args.eval_depths), args.eval_depths, model.base.head, test,
                       args, device, name)
    rows = [] if arms and args.no_reference_rows else reference_rows(model, test, args, device)
    if not arms:
        return rows
    used = model.parameters_used(max(parse_depths(args.depths) if args.depths else [args.depth]))  # in training
    return rows + [dict(name=f"{name}, depth {d}", kept=count(model.base.parameters()), control=control,
                        trainable=count(model.trainable_parameters().values()), trainable_used=used,
                        loss=scores[d][0], per_document=scores[d][1]) for d in args.eval_depths]


def reference_rows(model: Ouroboros, test: Windows, args, device) -> list[dict]:
    """The full model's and the cut baseline's rows. They are the same in every run of a checkpoint and split
    (--compare checks it to the last digit), so they never run --compile's kernels, whose rounding depends on what
    was compiled before."""
    with torch.compiler.set_stance("force_eager"):
        cut = reference_row("cut baseline", model.base, test, args, device)
        if device.type == "cuda":  # the full model is never on the GPU beside the trained one, which waits on the CPU
            model.to("cpu")
        full = reference_row("full model", load_model(args.model, BASE_DTYPE[args.precision], device), test, args, device)
    model.to(device)
    return [full, cut]


def reference_row(what: str, m, test: Windows, args, device) -> dict:
    row = dict(name=f"{what} ({len(m.layer_ids)} layers)", kept=count(m.parameters()), trainable=0)
    row["loss"], row["per_document"] = score(lambda x: {0: m.hidden(x)}, [0], m.head, test, args, device, row["name"])[0]
    return row


def training_flops(model: Ouroboros, data: Windows, args, device) -> float:
    """Training FLOPs per token (matmul and attention, forward and backward; flop_counter), over the depths drawn."""
    x, y = inputs_and_targets(data.rows([0]).to(device))
    with autocast(device, args.precision):
        per_depth = {d: count_flops(lambda: loss_from_states(model.hidden(x, d), y, model.base.head).backward()) / x.numel()
                     for d in {depth_at(step, args) for step in range(args.steps)}}
    model.zero_grad(set_to_none=True)
    return sum(per_depth[depth_at(step, args)] for step in range(args.steps)) / args.steps


# ----------------------------------------------------------------------------------------------------------
# One Ouroboros run: check everything, then train, then the comparison table on the test split.

# The frozen base is stored in the compute dtype on every device: fp32 under fp32; bf16 under bf16 autocast,
# which would otherwise re-cast every frozen fp32 weight at every matmul.
BASE_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16}

def ouroboros_config(args, n_layers: int) -> OuroborosConfig:
    for flag, default in zip(("n_prelude", "recurrent_layer", "n_coda"), paper_split(n_layers)):
        setattr(args, flag, default if getattr(args, flag) is None else getattr(args, flag))
    fields = {f.name for f in dataclasses.fields(OuroborosConfig)}  # the flags named as the config's fields
    cfg = OuroborosConfig(**{k: v for k, v in vars(args).items() if k in fields}, gate=not args.no_gate,
                          step_norm=not args.no_step_norm)
    cfg.split(n_layers)
    trained = parse_depths(args.depths) if args.depths else [args.depth]
    args.eval_depths = parse_depths(args.score_depths, "--eval-depths") if args.score_depths else trained
    for d in sorted(set(trained) | set(args.eval_depths)):
        cfg.check_depth(d, "--max-depth")
    return cfg


def compile_by_region(model: Ouroboros, backend: str = "inductor") -> None:
    """--compile: each kept decoder layer is compiled on its own, not the unrolled model. The layers share their
    code, so a few graphs (plain, modulated) serve every layer and every depth: compile time does not grow with
    the depth or the number of depths. Fuses the elementwise work between the matmuls."""
    for i in model.base.layer_ids:
        model.base.layer(i).compile(backend=backend)


def prepare_arm(args, device, cfg: OuroborosConfig | None = None):
    """Validates the run and loads the model. Nothing is written."""
    qcfg = load_config(args.model)
    cfg = cfg or ouroboros_config(args, qcfg.num_hidden_layers)
    torch.manual_seed(args.seed)
    return qcfg, load_ouroboros(args.model, cfg, BASE_DTYPE[args.precision], device)


def run(args) -> int:
    check_flags(args)
    if args.sample is None and not args.eval_only:  # told now, not after the loading and tokenising
        check_writable(token_cache(args.token_cache), "--token-cache")
        if args.out and args.steps:
            check_writable(args.out, "--out")
    if args.model is not None:  # a hub id becomes its snapshot directory, which the run records
        args.model = str(resolve_model(args.model))
    device = pick_device(args.device)
    if args.sample is not None or args.eval_only:  # in the run's own precision
        return use_finished_run(args, check_out_dir(args), device)
    args.precision = resolve_precision(args.precision, device, args.allow_slow_bf16)
    cfg = ouroboros_config(args, load_config(args.model).num_hidden_layers)  # a bad flag is told before a bad --out
    out = check_out_dir(args) if args.steps else None
    qcfg, model = prepare_arm(args, device, cfg)
    checkpoint = check_resume(out, args, model.trainable_parameters()) if args.resume and out else None
    # Tokenised (or read from the cache) before the processes start: one at a time, so none waits in a collective.
    splits = data_splits(args.data, load_tokenizer(args.model), qcfg.vocab_size, args.seq_len, args.seed,
                         args.dev_fraction, args.test_fraction, token_cache(args.token_cache))
    if args.steps == 0:  # the reference rows alone, on dev and test, to choose a cut before anything trains
        for split in ("dev", "test"):
            write_results(None, table_rows(model, splits[split], args, device, arms=False),
                          splits[split].coverage(args.eval_windows, args.eval_per_document) | {"split": split})
        return 0
    rank, world = init_distributed(device)
    try:
        # The trainables and the bases (small) are compared bit for bit; the frozen base by its checkpoint's
        # fingerprint, so that no process copies the whole base to the CPU to hash it.
        check_identical(world, model.trainable_parameters() | dict(model.named_buffers()), extra=fingerprint(args.model),
                        what="trainable parameters, LoRA bases or base checkpoint")
        if rank == 0 and checkpoint is None:
            start_run(out, args)
        if rank == 0:
            print(f"{arm_name(args)}: {count(model.trainable_parameters().values()):,} trainable parameters, layers "
                  f"{model.prelude} + [{model.recurrent}] x depth + {model.coda}; {splits['train'].n:,} training "
                  f"windows of {args.seq_len} tokens")
        if args.compile:
            compile_by_region(model)
        state = train(model.hidden, model.base.head, model.train(), splits["train"], splits["dev"], args, out,
                      device, checkpoint, True, world, rank)
        if state["step"] < args.steps:  # stopped by --stop-after: the table comes when the run is finished
            return 0
        rows = table_rows(model, splits[args.table_split], args, device)
        tokens, seconds = state.get("samples", 0) * args.seq_len, state.get("seconds", 0.0)
        stats = dict(tokens_seen=tokens, seconds=seconds, tokens_per_s=tokens / max(seconds, 1e-9),
                     flops_per_token=training_flops(model, splits["train"], args, device))
        if rank == 0:  # stats.json apart: results.json must not vary with the machine's speed
            write_results(out, rows, splits[args.table_split].coverage(args.eval_windows, args.eval_per_document)
                          | {"split": args.table_split})
            atomic_write(out / "stats.json", lambda f: f.write_text(json.dumps(stats, indent=2)))
    except OSError as e:  # the file system's (a full disk, no permission): the user's to fix, so one line
        raise RunError(f"{e}; fix that, then start again or --resume from the last checkpoint") from None
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


def use_finished_run(args, out: Path, device) -> int:
    """--sample and --eval-only: rebuild the run from its config.json and checkpoint, in its own precision."""
    saved = argparse.Namespace(**{**vars(build_parser().parse_args([])), **read_run_config(out)})  # new flags: defaults
    saved.device, saved.token_cache = args.device, args.token_cache
    check_same_model(out, vars(saved), saved.model)
    name, tag = arm_name(saved), "results"  # scored as trained, or with another pool or other depths
    for flag, value in (("pool", args.eval_pool), ("score_depths", args.score_depths)):
        if value is not None and args.eval_only:
            setattr(saved, flag, value)
            tag += f"-{flag.split('_')[-1]}-{value.replace(',', '-')}"
    name += f" (scored with the {saved.pool} pool)" if saved.pool != read_run_config(out)["pool"] else ""
    resolve_precision(saved.precision, device, args.allow_slow_bf16)  # a bf16 run on a CPU that would crawl
    qcfg, model = prepare_arm(saved, device)
    restore(read_checkpoint(out), out, model.trainable_parameters())
    tokenizer = load_tokenizer(saved.model)
    if args.sample is not None:
        ids = torch.tensor([tokenizer.encode(args.sample).ids], device=device)
        if ids.numel() == 0:
            raise RunError("--sample needs a non-empty prompt")
        gen = torch.Generator(device=device).manual_seed(saved.seed)
        with autocast(device, saved.precision):
            depth = max(parse_depths(saved.depths) if saved.depths else [saved.depth])  # the largest trained
            ids = model.eval().generate(ids, depth, args.max_new_tokens, args.temperature, args.top_k, gen)
        print(tokenizer.decode(ids[0].tolist()))
        return 0
    test = data_splits(saved.data, tokenizer, qcfg.vocab_size, saved.seq_len, saved.seed, saved.dev_fraction,
                       saved.test_fraction, token_cache(saved.token_cache))["test"]
    write_results(out, table_rows(model, test, saved, device, name), test.coverage(saved.eval_windows, saved.eval_per_document),
                  f"{tag}.json")
    return 0


# ----------------------------------------------------------------------------------------------------------
# The demo (`python train.py`): a small Qwen2-shaped decoder pretrained from scratch on the standard library's source (demo.py,
# with this file's training loop), then two ordinary runs of the method on it, and one table of both.

def demo(args) -> int:
    check_flags(args)
    device = pick_device(args.device)
    args.precision = resolve_precision(args.precision, device, args.allow_slow_bf16)
    t0 = time.time()
    out = Path(args.out) if args.out else next(Path("runs") / f"demo-{i}" for i in range(1, 10**6)
                                               if not (Path("runs") / f"demo-{i}").exists())
    if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise RunError(f"{out} already holds files; pass --resume to continue that run or --overwrite to replace it")
    check_writable(out, "--out")
    check_writable(token_cache(args.token_cache), "--token-cache")
    base = demo_base(args, token_cache(args.token_cache), device, train)
    print(f"base model ready in {base} ({fmt_time(time.time() - t0)} so far)")
    arms = [out / controller for controller in ("none", "dynamic")]
    for arm in arms[:1] if args.steps == 0 else arms:  # --steps 0: the reference rows, once
        # With --resume, an arm that never reached its first checkpoint starts again.
        run(argparse.Namespace(**{**vars(args), "model": str(base), "controller": arm.name, "out": str(arm),
                                  "resume": args.resume and (arm / CHECKPOINT).is_file(),
                                  "overwrite": args.resume or args.overwrite}))
    if args.steps:
        compare(arms, out)
    print(f"demo finished in {fmt_time(time.time() - t0)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.compare:
            compare([Path(run) for run in args.compare], Path(args.out) if args.out else None)
            return 0
        if args.model is None and not (args.sample is not None or args.eval_only):
            parser.set_defaults(**DEMO_ARM)
            return demo(parser.parse_args(argv))
        if args.data is None and not (args.sample is not None or args.eval_only):  # (the demo's arms read the demo corpus)
            raise RunError("--data is required with --model; pass a text file, a directory or a .jsonl")
        return run(args)
    except (RunError, DataError, CheckpointError, ConfigError) as e:
        print(f"error: {flag_names(str(e)) if isinstance(e, ConfigError) else e}", file=sys.stderr)
        return 2
    except OSError as e:  # the demo's file system errors (run() words its own)
        print(f"error: {e}; fix that, then run again (--resume continues)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
