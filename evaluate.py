"""The next-token loss, defined once, and everything that measures with it: scoring a split, the comparison table
(full model, cut baseline, the trained arm at each depth), results.json, --compare, and FLOP counting.

train.py's loop calls loss_from_states; evaluation calls score, which shares the same windows out between the
processes; the table's rows are what results.json holds and what study.py reads.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from controller import Ouroboros
from data import Windows
from devices import BASE_DTYPE, all_sum, autocast, rank_world
from load_qwen import atomic_write, load_model
from flags import parse_depths
from runs import RunError



# ----------------------------------------------------------------------------------------------------------
# The label shift, defined once: a window of T + 1 tokens gives inputs t_0..t_{T-1} and targets t_1..t_T, so
# the logit at position i is scored against the token at i + 1.

def inputs_and_targets(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return windows[:, :-1], windows[:, 1:]  # (B, T + 1) -> inputs (B, T), targets (B, T): views, no copy


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # logits (B, T, V) at the input positions, targets (B, T) already shifted: cross-entropy in nats.
    # (B, T, V) -> (B*T, V) against (B*T,). .float(): the log-softmax over V runs in fp32 whatever dtype autocast
    # gave the logits (bf16 keeps 2 to 3 significant digits), stated here rather than left to autocast's op lists;
    # a no-op under fp32. "mean" averages over all B*T positions: every window is full, no target is ignored.
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


# A chunk's backward holds up to four (n, V) tensors at once (the logits, their fp32 copy, the log-softmax, its
# gradient): about 600 MB at n = 256, V = 151,936, against some 10 GB for a whole micro-batch of 2 x 2048 tokens.
LOSS_CHUNK = 256  # positions whose logits exist at once: 156 MB of fp32 logits for a 151,936-token vocabulary


def loss_from_states(h: torch.Tensor, targets: torch.Tensor, head, reduction: str = "mean") -> torch.Tensor:
    """next_token_loss(head(h), targets), LOSS_CHUNK positions at a time. The logits are the largest tensors of a
    step (the vocabulary per token: their fp32 copy, the log-softmax kept for backward, its gradient); here they
    exist for one chunk at a time and are recomputed in backward, never for the whole batch. h (B, T, d)."""
    # Every window's positions in one row, (B*T, d) and (B*T,). A chunk may span two windows, which changes nothing:
    # the head (final norm, lm_head) and the loss act on each position alone.
    h, targets = h.flatten(0, 1), targets.flatten()

    def chunk(h_part, t_part):  # (n, d), (n,) -> (n,) losses
        # [None]: the batch axis next_token_loss expects, (1, n, V) logits against (1, n) targets
        return next_token_loss(head(h_part)[None], t_part[None], reduction="none")

    # With gradients (training), checkpoint keeps only each chunk's inputs and its n losses, and runs the head and
    # the loss again in backward: the logits never outlive their chunk, in forward or in backward. use_reentrant=False
    # is the variant PyTorch's documentation recommends. Without gradients (evaluation) there is no backward, so the
    # chunks run plainly.

    grad = torch.is_grad_enabled()
    losses = torch.cat([checkpoint(chunk, h[i:i + LOSS_CHUNK], targets[i:i + LOSS_CHUNK], use_reentrant=False)
                        if grad else chunk(h[i:i + LOSS_CHUNK], targets[i:i + LOSS_CHUNK])
                        for i in range(0, len(targets), LOSS_CHUNK)])
    # Every position counts once, so this mean equals next_token_loss of all the logits at once, value and gradient.
    return losses.mean() if reduction == "mean" else losses  # (B*T,) with reduction "none"




# ----------------------------------------------------------------------------------------------------------
# Evaluation: the same windows, spread over the whole split, for every model; shared out between processes.

# no_grad: evaluation never calls backward, so no graph is kept and loss_from_states skips its recomputation.
def print_counter(what: str, done: int, total: int, unit: str) -> None:
    # one line, rewritten in place on stderr, ended when done reaches total
    print(f"\r{what}: {done}/{total} {unit}", end="\n" if done == total else "", file=sys.stderr, flush=True)


@torch.no_grad()
def score(forward, keys, head, split: Windows, args, device, what: str | None = None) -> dict:
    """Next-token loss of each output of forward(x), a dict of states before the head under `keys` (one per depth,
    say; the logits are made from one key's states at a time, a chunk at a time), over
    --eval-windows windows spread over the whole split: {key: (mean loss, per-document mean losses)}. Under torchrun
    each process scores its share of the windows and the sums are taken over all; with `what`, a progress line."""
    rank, world = rank_world()
    indices = split.spread(args.eval_windows, args.eval_per_document)  # the same window indices on every process
    # Documents are numbered in stream order and spread's indices ascend, so the last window's targets reach the
    # highest document number scored: one slot per document up to it.
    n_docs = int(split.target_documents(indices[-1:]).max()) + 1
    # float64: a sum of hundreds of thousands of per-token losses (256 windows of 2048 tokens by default) would lose
    # digits of the mean in fp32.
    count = torch.zeros(n_docs, dtype=torch.float64, device=device)  # tokens scored, per document
    # all_sum below is a collective: every process must join it, with tensors of the same shape.
    sums = {key: torch.zeros_like(count) for key in keys}  # on every process, even one with no windows to score
    # This process's batches: the one at position rank * batch_size of indices, then every world-th batch after it.
    mine = list(range(rank * args.batch_size, len(indices), world * args.batch_size))
    for n, start in enumerate(mine):
        chunk = indices[start:start + args.batch_size]  # b <= batch_size windows: the last batch may be short
        # x, y (b, T); doc (b*T,): the document of each target token, flattened in the order of the losses
        (x, y), doc = inputs_and_targets(split.rows(chunk).to(device)), split.target_documents(chunk).to(device).flatten()
        with autocast(device, args.precision):
            for key, states in forward(x).items():  # states (b, T, d); the logits of one key at a time
                loss = loss_from_states(states, y, head, reduction="none").double()  # (b*T,) per-token losses
                sums[key].index_add_(0, doc, loss)  # sums[key][doc[i]] += loss[i]: a loss sum per document
        count.index_add_(0, doc, torch.ones_like(doc, dtype=count.dtype))
        if what and rank == 0:  # one process prints
            print_counter(f"evaluating {what}", n + 1, len(mine), "batches")
    # Summed over the processes: each then holds the whole evaluation's totals and returns the same numbers.
    count = all_sum(count, world)
    sums = {key: all_sum(s, world) for key, s in sums.items()}
    # Each document's mean over its scored tokens; None (null in documents.json) where no scored window reached it.
    # Kept beside the split's loss so that arms can be compared document by document, and documents resampled.
    per_doc = lambda s: [None if n == 0 else v for v, n in zip((s / count).tolist(), count.tolist())]  # noqa: E731
    # The split's loss is the mean over all scored tokens, not over documents: each weighs by its scored tokens.
    return {key: ((s.sum() / count.sum()).item(), per_doc(s)) for key, s in sums.items()}


# ----------------------------------------------------------------------------------------------------------
# The comparison table: its rows, printed, written to results.json; --compare joins finished runs'.

def arm_name(args) -> str:
    # The rows' name, from the flags alone: under --eval-only, a run's config.json names it as its training did.
    if args.controller == "none" and args.no_gate and args.no_step_norm:  # nothing of the method left: the cut
        adapters = f", LoRA {args.lora_layers} r{args.lora_rank}" if args.lora_layers != "none" else ""
        # At depth 1 this is the cut model; at more steps its recurrent layer runs several times, nothing between.
        return f"cut model{adapters}" + (", recurrent layer looped" if (args.depths or args.depth != 1) else "")
    name = {"dynamic": "Ouroboros", "static": "static per-step LoRA", "none": "gate + norm only"}[args.controller]
    # Every departure from the default arm, listed in parentheses after the name.
    ablations = [f for f, on in (("no gate", args.no_gate), ("no step norm", args.no_step_norm),
                                 ("mean pool", args.pool == "mean"), ("input-blind", args.controller_input == "none"),
                                 (f"LoRA {args.lora_layers} r{args.lora_rank}", args.lora_layers != "none")) if on]
    return name + (f" ({', '.join(ablations)})" if ablations else "")


def count(params) -> int:
    # Each tensor once, by identity: a weight two modules share (a tied embedding and head) is counted once.
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def table_rows(model: Ouroboros, test: Windows, args, device, name: str | None = None, arms=True) -> list[dict]:
    """The table's rows, on the same windows: full model, cut baseline, and (with `arms`) the arm at each depth."""
    # control: the gate + norm only arm (gate and step norm, no Controller), which the table calls the control.
    name, control = name or arm_name(args), model.controller is None and model.gate is not None and model.step_norm is not None
    if arms:  # every evaluation depth in one pass (Ouroboros.hidden_at: the coda runs after each depth asked for)
        scores = score(lambda x: model.eval().hidden_at(x, args.eval_depths), args.eval_depths, model.base.head, test,
                       args, device, name)
    # --no-reference-rows: the full and cut rows are scored once elsewhere (study.py); arms=False (--steps 0) wants
    # them alone.
    rows = [] if arms and args.no_reference_rows else reference_rows(model, test, args, device)
    if not arms:
        return rows
    # trainable_used: what the largest training depth reads; the per-step rows beyond it are allocated, never read.
    used = model.parameters_used(max(parse_depths(args.depths) if args.depths else [args.depth]))  # in training
    return rows + [dict(name=f"{name}, depth {d}", kept=count(model.base.parameters()), control=control,
                        trainable=count(model.trainable_parameters().values()), trainable_used=used,
                        loss=scores[d][0], per_document=scores[d][1]) for d in args.eval_depths]


def reference_rows(model: Ouroboros, test: Windows, args, device) -> list[dict]:
    """The full model's and the cut baseline's rows. They are the same in every run of a checkpoint and split
    (--compare checks it to the last digit), so they never run --compile's kernels, whose rounding depends on what
    was compiled before."""
    # model.base is the cut baseline itself, whose layers --compile compiled in place (train.compile_by_region):
    # force_eager runs them uncompiled here, and the freshly loaded full model too.
    with torch.compiler.set_stance("force_eager"):
        cut = reference_row("cut baseline", model.base, test, args, device)
        if device.type == "cuda":  # the full model is never on the GPU beside the trained one, which waits on the CPU
            model.to("cpu")
        # Loaded in the cut's dtype, so both reference rows are at the run's precision; dropped once its row is made.
        full = reference_row("full model", load_model(args.model, BASE_DTYPE[args.precision], device), test, args, device)
    model.to(device)  # back on the device, the full model gone (a no-op on the CPU)
    return [full, cut]


def reference_row(what: str, m, test: Windows, args, device) -> dict:
    row = dict(name=f"{what} ({len(m.layer_ids)} layers)", kept=count(m.parameters()), trainable=0)
    # m.hidden: the states before the head, (B, T, d), scored under one key, 0: a plain decoder has no depth.
    row["loss"], row["per_document"] = score(lambda x: {0: m.hidden(x)}, [0], m.head, test, args, device, row["name"])[0]
    return row


def comparison_table(rows: list[dict]) -> str:
    """rows: name, kept (base parameters), trainable, loss and what was scored. The first two are the full
    model and the cut baseline, or (--no-reference-rows) no row has a gap recovered; gap recovered =
    (cut - loss) / (cut - full)."""
    # rows[0] carries what was scored (write_results copies it into every row); tokens // windows is --seq-len.
    s, gaps = rows[0], "gap_recovered" in rows[0]
    lines = [f"{s['split']} split: {s['windows']:,} of its {s['split_windows']:,} windows of {s['tokens'] // s['windows']} "
             f"tokens, spread over all of it: {s['tokens']:,} tokens scored, from {s['documents']:,} of its "
             f"{s['split_documents']:,} documents",
             f"{'model':<34} {'params kept':>12} {'trainable':>11} {s['split'] + ' loss':>10} {'ppl':>9}"
             + (f" {'gap recovered':>14}" if gaps else "")]
    for r in rows:  # min(loss, 50): math.exp overflows above 709, so a diverged loss prints a huge ppl, not an error
        lines.append(f"{r['name']:<34} {r['kept']:>12,} {r['trainable']:>11,} {r['loss']:>10.4f} "
                     f"{math.exp(min(r['loss'], 50)):>9.2f}" + (f" {100 * r['gap_recovered']:>13.1f}%" if gaps else ""))
    if not gaps:
        return "\n".join(lines + ["(the full model and the cut baseline are scored apart: --no-reference-rows)"])
    cut = rows[1]["loss"]  # rows[1]: the cut baseline
    lines.append("gap recovered = (cut - loss) / (cut - full): the share of the loss the cut costs that a model wins "
                 "back (100%: the full model, 0%: the cut baseline).")
    for r in rows:
        if r.get("control"):  # get: the reference rows have no "control" key
            lines.append(f"'{r['name']}' is the control: the same gate and per-step norms, no LoRA modulation.")
    if any(r["loss"] > cut for r in rows[2:]):  # the rows after the full model and the cut baseline
        lines.append("A negative share is a loss above the cut baseline: at initialisation the looped arms start "
                     "above it (each step keeps 88% of a state the step norm has rescaled), so a short run can end there.")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict], scored: dict, name: str = "results.json") -> None:
    """The comparison table: printed, and written to results.json with what was scored (`scored`: the split's
    windows and documents, and how many of them and how many tokens every row was scored on)."""
    scored = {"split": "test"} | scored  # "test" unless scored names its split: | keeps the right-hand value
    references = rows[0]["name"].startswith("full model")  # else --no-reference-rows: the arm's rows alone
    for r in rows:
        r.update(scored)  # every row says what it was scored on: --compare checks it across runs
        if references:
            full, cut = rows[0]["loss"], rows[1]["loss"]
            # nan where the cut costs nothing: there is no gap to recover, and no division by zero
            r["gap_recovered"] = (cut - r["loss"]) / (cut - full) if cut != full else float("nan")
    print(f"\nnext-token loss on the {scored['split']} split" + (f", {out}:" if out else ":") + f"\n{comparison_table(rows)}")
    if out is None:  # --steps 0: the table is printed, nothing written
        return
    # Each row's loss per test document (null: not scored), for statistics paired by document, in a file of its own.
    # pop: results.json stays a small table. results.json -> documents.json, results-pool-causal.json ->
    # documents-pool-causal.json.
    documents = {r["name"]: r.pop("per_document") for r in rows if "per_document" in r}
    # Written first: once a results.json is on disk, the documents.json written with it is there too.
    if documents:
        atomic_write(out / name.replace("results", "documents"), lambda f: f.write_text(json.dumps(documents)))
    atomic_write(out / name, lambda f: f.write_text(json.dumps(rows, indent=2)))


def compare(runs: list[Path], out: Path | None = None) -> list[dict]:
    """One table of several finished runs: the full and cut rows once, then every run's own rows. The runs must
    have scored the same test windows (the same data, split, tokenizer and --eval-windows)."""
    tables = []
    for run in runs:
        try:
            tables.append(json.loads((Path(run) / "results.json").read_text()))
        except (OSError, ValueError) as e:
            raise RunError(f"{run}: no readable results.json ({e}); finish the run (or --eval-only) first") from None
    scored = ("windows", "tokens", "documents", "split_windows", "split_documents")  # what the runs must share
    for run, table in zip(runs[1:], tables[1:]):
        # The full and cut rows must be equal to the last digit: reference_rows never runs compiled kernels, so
        # they are the same in every run of one checkpoint and split.
        if table[:2] != tables[0][:2] or any(table[0].get(k) != tables[0][0].get(k) for k in scored):
            raise RunError(f"{run} and {runs[0]} were not scored on the same test windows (or with the same base); "
                           "compare runs of one checkpoint, one data set and one --eval-windows")
    rows = tables[0][:2] + [r for table in tables for r in table[2:]]  # full and cut once, then every run's rows
    if out is None:
        print(comparison_table(rows))
        return rows
    if (out / "config.json").is_file():  # every run directory holds a config.json
        raise RunError(f"--out {out} holds a run, whose results.json this would replace; pass another directory")
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, rows, {k: rows[0][k] for k in scored})
    return rows


# ----------------------------------------------------------------------------------------------------------
# FLOPs.


# torch's FLOP counter knows the GPU attention kernels; count the CPU one the same way (unmasked, as torch does).
CPU_ATTENTION_FLOPS = {
    # FlopCounterMode calls each formula with the op's argument shapes (q, k, v are torch.Size) and out_shape=.
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def count_flops(fn) -> int:
    """Matmul and attention FLOPs that one call of fn executes, forward and backward."""
    # A multiply-add counts as 2 FLOPs; elementwise work (norms, activations, the softmax of the loss) is not counted.
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()  # train.training_flops passes a forward and its .backward()
    return counter.get_total_flops()  # the whole call's; the caller divides by the tokens
