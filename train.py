"""Train and evaluate Ouroboros on a Qwen2 / Qwen2.5, Llama or Qwen3 checkpoint.

    python train.py --model DIR --data PATH --out DIR [flags]     train one variant, print the comparison table
    python train.py                                               the whole method offline on CPU (the demo)
    python train.py --out DIR --sample "prompt"                   generate with a trained run
    torchrun --nproc-per-node N train.py ...                      data-parallel

Read top to bottom: the learning-rate schedule and the depth per step, the one training loop (every variant's,
and the demo's pretraining), one run, using a finished run (--sample, --eval-only), the demo, main(). The flags:
flags.py; the loss and the comparison table: evaluate.py; the run on disk (its directory, checkpoints, resume):
runs.py; what guards the loop (Ctrl-C, saving, skipped updates, agreement between processes): guard.py; the
device, the dtype and the averages over processes: devices.py; data: data.py.
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

from controller import ConfigError, Ouroboros, OuroborosConfig, paper_split
from data import DataError, Windows, token_cache
from data import splits as data_splits
from demo import DEMO_ARM, demo_base
from devices import BASE_DTYPE, all_mean, autocast, clip_gradients, init_distributed, pick_device, resolve_precision
from evaluate import (arm_name, compare, count, count_flops, inputs_and_targets, loss_from_states, score, table_rows,
                      write_results)
from flags import build_parser, check_flags, flag_names, parse_depths
from load_qwen import (CheckpointError, atomic_write, fingerprint, load_config, load_ouroboros,
                       load_tokenizer, resolve_model)
from guard import TrainingRun, check_identical, fmt_time
from runs import (CHECKPOINT, RunError, check_out_dir, check_resume, check_writable, finished_run, read_checkpoint,
                  restore, start_run)


# ----------------------------------------------------------------------------------------------------------
# The schedule: the learning rate and the number of recurrent steps at each optimizer step.

def get_lr(step: int, args) -> float:
    """Linear warmup to --lr, then cosine decay to lr * min_lr_ratio at the last step. Counted in optimizer steps."""
    if step < args.warmup:  # step 0 already takes a step of lr / warmup, not 0
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)  # the last step is steps - 1
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def depth_at(step: int, args) -> int:
    # Drawn in the training loop from a generator seeded by (seed, step): reproducible, resume-exact.
    if not args.depths:
        return args.depth
    depths = parse_depths(args.depths)
    # A generator of its own per step (the 1 keeps it apart from the data order's streams): no state to save, and
    # the same draw whether the run went straight through or was resumed.
    return depths[np.random.default_rng([args.seed, 1, step]).integers(len(depths))]


# ----------------------------------------------------------------------------------------------------------
# The training loop, shared by every Ouroboros variant and by the demo's pretraining of its base model.

def build_optimizer(model: torch.nn.Module, params: dict, args, device) -> torch.optim.AdamW:
    """AdamW over `params`. Weight decay pulls towards 0, so it goes only on the weight matrices of linear
    layers (the Controller's and the gate's; every matrix of a model pretrained from scratch). Never on norms
    (a norm row no step reaches would shrink), step embeddings, the static c or biases."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}  # by identity: no copies
    # --lora-lr: the LoRA adapters on kept layers (parameters named adapters.*) in groups of their own, at their own
    # peak lr on the same schedule (the lr_scale of a group multiplies the scheduled lr).
    lora_lr = getattr(args, "lora_lr", None)
    apart = lora_lr is not None and lora_lr != args.lr  # else one set of groups, as without --lora-lr
    groups = []  # per lr: the decayed matrices, then the rest
    for adapters in ((False, True) if apart else (None,)):
        mine = [p for n, p in params.items() if adapters is None or n.startswith("adapters.") == adapters]
        scale = lora_lr / args.lr if adapters else 1.0
        groups += [dict(params=[p for p in mine if id(p) in linear], weight_decay=args.weight_decay, lr_scale=scale),
                   dict(params=[p for p in mine if id(p) not in linear], weight_decay=0.0, lr_scale=scale)]
    # beta2 0.95, as in most LLM training: the second moment forgets faster, steadier with few, noisy steps.
    # fused: one kernel for every tensor's update on CUDA; the CPU keeps the reference loop.
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train(forward, head, model: torch.nn.Module, data: Windows, dev: Windows | None, args, out: Path, device,
          resume_from: tuple | None = None, looped: bool = True, world: int = 1, rank: int = 0) -> dict:
    """Optimizes the trainable parameters of `model` (fp32) so that head(forward(inputs, depth)) predicts the next
    token; forward gives the states before the head. --eval-every reads `dev`; `looped` is False for the demo's
    pretraining (no depth). Returns the final state. The checkpoints, Ctrl-C, skipped updates and the log are
    guard.TrainingRun's: the loop below is the arithmetic."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # by name: the checkpoint's keys
    optimizer = build_optimizer(model, params, args, device)
    per_step = args.batch_size * args.grad_accum * world  # windows per optimizer step, all processes together
    with TrainingRun(out, params, optimizer, args, device, resume_from, world, rank, per_step) as run:
        for step in run.steps():
            lr = get_lr(step, args)
            for group in optimizer.param_groups:  # lr_scale: the LoRA adapters' own peak lr (--lora-lr)
                group["lr"] = lr * group.get("lr_scale", 1.0)
            depth = depth_at(step, args) if looped else None  # N, the number of recurrent steps this update
            loss_sum = torch.zeros((), device=device)  # on the device: no sync with the CPU per micro-batch
            for micro in range(args.grad_accum):  # gradient accumulation: grad_accum micro-batches per update
                # The step's windows, in order; this process takes every world-th micro-batch's share.
                first = step * per_step + (micro * world + rank) * args.batch_size
                x, y = inputs_and_targets(data.batch(first, args.batch_size).to(device, non_blocking=True))
                with autocast(device, args.precision):
                    loss = loss_from_states(forward(x, depth), y, head)  # next-token cross-entropy, in nats
                (loss / args.grad_accum).backward()  # the mean over the micro-batches, summed into .grad
                loss_sum += loss.detach()
            loss = all_mean(loss_sum / args.grad_accum, world).item()  # the same number on every process
            run.hold()  # Ctrl-C waits from here to the end of the step's bookkeeping
            # The gradients averaged over the processes (data parallelism), then their norm clipped to --clip.
            grad_norm = clip_gradients(params, args.clip, world) if math.isfinite(loss) else math.nan
            if not math.isfinite(grad_norm):  # an overflow: no update, and three in a row stop the run
                run.skip(loss, grad_norm)  # gradients cleared, the step used up (counted, not retried)
                continue
            optimizer.step()  # AdamW on the fp32 trainables; the frozen base has no gradients
            optimizer.zero_grad(set_to_none=True)  # None, not zeros: the next backward writes instead of adding
            record = {"step": step + 1, "loss": loss, "lr": lr} | ({"depth": depth} if looped else {})
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                record["dev_loss"] = dev_loss(forward, head, dev, args, device)
            run.end_step(record)  # counted, printed, logged to metrics.jsonl, checkpointed every --save-every
    return run.state


def dev_loss(forward, head, dev: Windows, args, device) -> float:
    """--eval-every's number: the mean loss on the dev split at the largest depth the table reports."""
    return score(lambda x: {0: forward(x, max(args.eval_depths))}, [0], head, dev, args, device)[0][0]


def training_flops(model: Ouroboros, data: Windows, args, device) -> float:
    """Training FLOPs per token (matmul and attention, forward and backward; flop_counter), over the depths drawn."""
    x, y = inputs_and_targets(data.rows([0]).to(device))  # one window: FLOPs per token do not depend on the data

    def one_step(d):  # forward and backward at depth d
        with autocast(device, args.precision):
            loss = loss_from_states(model.hidden(x, d), y, model.base.head)
        loss.backward()

    drawn = {depth_at(step, args) for step in range(args.steps)}
    per_depth = {d: count_flops(lambda: one_step(d)) / x.numel() for d in drawn}
    model.zero_grad(set_to_none=True)  # the counted backward left gradients behind
    # Weighted by how often each depth was drawn over the run's steps.
    return sum(per_depth[depth_at(step, args)] for step in range(args.steps)) / args.steps


# ----------------------------------------------------------------------------------------------------------
# One Ouroboros run: check everything, then train, then the comparison table on the test split.

def ouroboros_config(args, n_layers: int) -> OuroborosConfig:
    """The flags as an OuroborosConfig, checked now: a bad split or depth is told before --out is looked at."""
    # Unset split flags take the paper's proportions for this checkpoint's depth, and are recorded in config.json.
    for flag, default in zip(("n_prelude", "recurrent_layer", "n_coda"), paper_split(n_layers)):
        setattr(args, flag, default if getattr(args, flag) is None else getattr(args, flag))
    fields = {f.name for f in dataclasses.fields(OuroborosConfig)}  # the flags named as the config's fields
    cfg = OuroborosConfig(**{k: v for k, v in vars(args).items() if k in fields}, gate=not args.no_gate,
                          step_norm=not args.no_step_norm)
    cfg.split(n_layers)  # only to check it here; Ouroboros computes it again when built
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
    torch.manual_seed(args.seed)  # the Controller's and adapters' initialisation follow from --seed
    return qcfg, load_ouroboros(args.model, cfg, BASE_DTYPE[args.precision], device)


def run(args) -> int:
    """One run: every check first (flags, directories, the checkpoint, the resume), then train, then the table."""
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
    out = check_out_dir(args) if args.steps else None  # --steps 0 writes no run directory
    qcfg, model = prepare_arm(args, device, cfg)
    checkpoint = check_resume(out, args, model.trainable_parameters()) if args.resume and out else None
    # Tokenised (or read from the cache) before the process group starts: the processes take the cache's lock one
    # at a time, and none waits in a collective meanwhile.
    splits = data_splits(args.data, load_tokenizer(args.model), qcfg.vocab_size, args.seq_len, args.seed,
                         args.dev_fraction, args.test_fraction, token_cache(args.token_cache))
    if args.steps == 0:  # the reference rows alone, on dev and test, to choose a cut before anything trains
        for split in ("dev", "test"):
            write_results(None, table_rows(model, splits[split], args, device, arms=False),
                          splits[split].coverage(args.eval_windows, args.eval_per_document) | {"split": split})
        return 0
    rank, world = init_distributed(device)  # (0, 1) without torchrun
    try:
        # The trainables and the bases (small) are compared bit for bit; the frozen base by its checkpoint's
        # fingerprint, so that no process copies the whole base to the CPU to hash it.
        small = model.trainable_parameters() | dict(model.named_buffers())
        check_identical(world, small, extra=fingerprint(args.model),
                        what="trainable parameters, LoRA bases or base checkpoint")
        if rank == 0 and checkpoint is None:  # a new run: config.json written, an old run's files removed
            start_run(out, args)
        if rank == 0:
            print(f"{arm_name(args)}: {count(model.trainable_parameters().values()):,} trainable parameters, layers "
                  f"{model.prelude} + [{model.recurrent}] x depth + {model.coda}; {splits['train'].n:,} training "
                  f"windows of {args.seq_len} tokens")
        if args.compile:  # after the checks: compiling is slow, and a refused run should not wait for it
            compile_by_region(model)
        state = train(model.hidden, model.base.head, model.train(), splits["train"], splits["dev"], args, out,
                      device, checkpoint, True, world, rank)
        if state["step"] < args.steps:  # stopped by --stop-after: the table comes when the run is finished
            return 0
        rows = table_rows(model, splits[args.table_split], args, device)  # the test split unless --table-split dev
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
        if world > 1:  # also after an error, so that torchrun's processes exit instead of waiting
            torch.distributed.destroy_process_group()
    return 0


def use_finished_run(args, out: Path, device) -> int:
    """--sample and --eval-only: rebuild the run from its config.json and checkpoint, in its own precision."""
    config = finished_run(out)  # config.json, checked against the checkpoint the run was trained on
    saved = argparse.Namespace(**{**vars(build_parser().parse_args([])), **config})  # flags added since: defaults
    saved.device, saved.token_cache = args.device, args.token_cache  # where it runs now, not where it trained
    name, tag = arm_name(saved), "results"  # scored as trained, or with another pool or other depths
    for flag, value in (("pool", args.eval_pool), ("score_depths", args.score_depths)):
        if value is not None and args.eval_only:
            setattr(saved, flag, value)
            tag += f"-{flag.split('_')[-1]}-{value.replace(',', '-')}"
    name += f" (scored with the {saved.pool} pool)" if saved.pool != config["pool"] else ""
    resolve_precision(saved.precision, device, args.allow_slow_bf16)  # a bf16 run on a CPU that would crawl
    qcfg, model = prepare_arm(saved, device)
    restore(read_checkpoint(out), out, model.trainable_parameters())  # the trained parameters, no optimizer
    tokenizer = load_tokenizer(saved.model)
    if args.sample is not None:
        ids = torch.tensor([tokenizer.encode(args.sample).ids], device=device)
        if ids.numel() == 0:
            raise RunError("--sample needs a non-empty prompt")
        gen = torch.Generator(device=device).manual_seed(saved.seed)  # the same prompt samples the same text
        with autocast(device, saved.precision):
            depth = max(parse_depths(saved.depths) if saved.depths else [saved.depth])  # the largest trained
            ids = model.eval().generate(ids, depth, args.max_new_tokens, args.temperature, args.top_k, gen)
        print(tokenizer.decode(ids[0].tolist()))
        return 0
    # The run's own test split: the same data, tokenizer, seed and fractions as in training.
    test = data_splits(saved.data, tokenizer, qcfg.vocab_size, saved.seq_len, saved.seed, saved.dev_fraction,
                       saved.test_fraction, token_cache(saved.token_cache))["test"]
    rows = table_rows(model, test, saved, device, name)
    write_results(out, rows, test.coverage(saved.eval_windows, saved.eval_per_document), f"{tag}.json")
    return 0


# ----------------------------------------------------------------------------------------------------------
# The demo (`python train.py`): a small Qwen2-shaped decoder pretrained from scratch on the standard library's
# source (demo.py, with this file's training loop), then two ordinary runs of the method on it, and one table of both.

def demo(args) -> int:
    """The demo: its base model (pretrained once, then read from the cache), the two arms, one table."""
    check_flags(args)
    device = pick_device(args.device)
    args.precision = resolve_precision(args.precision, device, args.allow_slow_bf16)
    t0 = time.time()
    # Without --out, the first free runs/demo-N: a second demo never overwrites the first.
    out = Path(args.out) if args.out else next(Path("runs") / f"demo-{i}" for i in range(1, 10**6)
                                               if not (Path("runs") / f"demo-{i}").exists())
    if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise RunError(f"{out} already holds files; pass --resume to continue that run or --overwrite to replace it")
    check_writable(out, "--out")
    check_writable(token_cache(args.token_cache), "--token-cache")
    base = demo_base(args, token_cache(args.token_cache), device, train)  # pretrained with this file's loop
    print(f"base model ready in {base} ({fmt_time(time.time() - t0)} so far)")
    arms = [out / controller for controller in ("none", "dynamic")]
    for arm in arms[:1] if args.steps == 0 else arms:  # --steps 0: the reference rows, once
        # With --resume, an arm that never reached its first checkpoint starts again.
        run(argparse.Namespace(**{**vars(args), "model": str(base), "controller": arm.name, "out": str(arm),
                                  "resume": args.resume and (arm / CHECKPOINT).is_file(),
                                  "overwrite": args.resume or args.overwrite}))
    if args.steps:  # one table: the full and cut rows once, then both arms
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
            # The demo's defaults replace the paper's GPU ones; flags given on the command line still win.
            parser.set_defaults(**DEMO_ARM)
            return demo(parser.parse_args(argv))
        if args.data is None and not (args.sample is not None or args.eval_only):  # (the demo's arms: its corpus)
            raise RunError("--data is required with --model; pass a text file, a directory or a .jsonl")
        return run(args)
    except (RunError, DataError, CheckpointError, ConfigError) as e:
        print(f"error: {flag_names(str(e)) if isinstance(e, ConfigError) else e}", file=sys.stderr)
        return 2
    except OSError as e:  # the demo's file system errors (run() words its own)
        print(f"error: {e}; fix that, then run again (--resume continues)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the checkpoint is saved already (guard.TrainingRun); 130 = 128 + SIGINT
        return 130


if __name__ == "__main__":
    sys.exit(main())
