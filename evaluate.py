"""The next-token loss, defined once, and everything that measures with it: scoring a split, the comparison table
(full model, cut baseline, the trained arm at each depth), results.json, --compare, and FLOP counting.

train.py's loop calls loss_from_states; evaluation calls score, which shares the same windows out between the
processes; the table's rows are what results.json holds and what study.py reads.
"""
from __future__ import annotations

import json
import math
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
from guard import print_counter
from runs import RunError



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


# ----------------------------------------------------------------------------------------------------------
# The comparison table: its rows, printed, written to results.json; --compare joins finished runs'.

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


def comparison_table(rows: list[dict]) -> str:
    """rows: name, kept (base parameters), trainable, loss and what was scored. The first two are the full
    model and the cut baseline, or (--no-reference-rows) no row has a gap recovered; gap recovered =
    (cut - loss) / (cut - full)."""
    s, gaps = rows[0], "gap_recovered" in rows[0]
    lines = [f"{s['split']} split: {s['windows']:,} of its {s['split_windows']:,} windows of {s['tokens'] // s['windows']} "
             f"tokens, spread over all of it: {s['tokens']:,} tokens scored, from {s['documents']:,} of its "
             f"{s['split_documents']:,} documents",
             f"{'model':<34} {'params kept':>12} {'trainable':>11} {s['split'] + ' loss':>10} {'ppl':>9}"
             + (f" {'gap recovered':>14}" if gaps else "")]
    for r in rows:
        lines.append(f"{r['name']:<34} {r['kept']:>12,} {r['trainable']:>11,} {r['loss']:>10.4f} "
                     f"{math.exp(min(r['loss'], 50)):>9.2f}" + (f" {100 * r['gap_recovered']:>13.1f}%" if gaps else ""))
    if not gaps:
        return "\n".join(lines + ["(the full model and the cut baseline are scored apart: --no-reference-rows)"])
    cut = rows[1]["loss"]
    lines.append("gap recovered = (cut - loss) / (cut - full): the share of the loss the cut costs that a model wins "
                 "back (100%: the full model, 0%: the cut baseline).")
    for r in rows:
        if r.get("control"):
            lines.append(f"'{r['name']}' is the control: the same gate and per-step norms, no LoRA modulation.")
    if any(r["loss"] > cut for r in rows[2:]):
        lines.append("A negative share is a loss above the cut baseline: at initialisation the looped arms start "
                     "above it (each step keeps 88% of a state the step norm has rescaled), so a short run can end there.")
    return "\n".join(lines)


def write_results(out: Path, rows: list[dict], scored: dict, name: str = "results.json") -> None:
    """The comparison table: printed, and written to results.json with what was scored (`scored`: the split's
    windows and documents, and how many of them and how many tokens every row was scored on)."""
    scored = {"split": "test"} | scored
    references = rows[0]["name"].startswith("full model")  # else --no-reference-rows: the arm's rows alone
    for r in rows:
        r.update(scored)
        if references:
            full, cut = rows[0]["loss"], rows[1]["loss"]
            r["gap_recovered"] = (cut - r["loss"]) / (cut - full) if cut != full else float("nan")
    print(f"\nnext-token loss on the {scored['split']} split" + (f", {out}:" if out else ":") + f"\n{comparison_table(rows)}")
    if out is None:
        return
    # Each row's loss per test document (null: not scored), for statistics paired by document, in a file of its own.
    documents = {r["name"]: r.pop("per_document") for r in rows if "per_document" in r}
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
    scored = ("windows", "tokens", "documents", "split_windows", "split_documents")
    for run, table in zip(runs[1:], tables[1:]):
        if table[:2] != tables[0][:2] or any(table[0].get(k) != tables[0][0].get(k) for k in scored):
            raise RunError(f"{run} and {runs[0]} were not scored on the same test windows (or with the same base); "
                           "compare runs of one checkpoint, one data set and one --eval-windows")
    rows = tables[0][:2] + [r for table in tables for r in table[2:]]
    if out is None:
        print(comparison_table(rows))
        return rows
    if (out / "config.json").is_file():
        raise RunError(f"--out {out} holds a run, whose results.json this would replace; pass another directory")
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, rows, {k: rows[0][k] for k in scored})
    return rows


# ----------------------------------------------------------------------------------------------------------
# FLOPs.


# torch's FLOP counter knows the GPU attention kernels; count the CPU one the same way (unmasked, as torch does).
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def count_flops(fn) -> int:
    """Matmul and attention FLOPs that one call of fn executes, forward and backward."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()
