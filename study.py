"""The study: every claim of the paper re-measured on held-out text, with seeds, through train.py's own code, on two
bases: SmolLM2-135M-Instruct (a real pretrained Llama, 30 layers) and the demo's small Qwen2 pretrained here.

    python study.py                                      both bases (resumable): the real one first; RESULTS.md
    python study.py --base smollm2                       one base (smollm2 or small)
    python study.py --report                             RESULTS.md and its figures from the finished runs alone
    python study.py --model DIR --data PATH --out DIR    the same protocol on another checkpoint (a hub id works)
    python study.py --quick --data PATH --out DIR        tiny sizes, one seed, a few steps: the whole chain

Read top to bottom: the protocol (fixed before any arm trains), the bases and the rule that picks a cut, the
reference rows and the untrained loops, the learning-rate pilots (one per arm, extended until the best is inside
the grid), the length rule, the grid, running it, then the statistics, the verdicts, and RESULTS.md with figures.
Every run is an ordinary train.py run in results/<base>/runs/<name>; a finished one (its results files exist) is
never trained again, an interrupted one resumes from its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

import evaluate
import train
from controller import ConfigError, Ouroboros
from data import DataError, splits as data_splits, token_cache
from demo import DEMO_ARM, DEMO_BASE, DEMO_PRETRAIN, demo_base
from devices import pick_device
from flags import Parser, build_parser
from guard import fmt_time
from load_qwen import CheckpointError, atomic_write, load_config, load_model, load_tokenizer, resolve_model
from model import PROJECTIONS, Decoder
from runs import CHECKPOINT, RunError, read_checkpoint

try:  # a study-only requirement (requirements-dev.txt), like transformers is test-only
    import matplotlib
    matplotlib.use("Agg")  # no display: the figures are only written to files
    import matplotlib.pyplot as plt
except ImportError:
    plt = None  # training needs none of it; figures() says what to install

# ----------------------------------------------------------------------------------------------------------
# The protocol. Fixed here, before any arm trains; changing it means a new study, not a re-run.

SEEDS = (0, 1, 2)  # a seed fixes data order, depth draws and initialisation, the same for every arm: paired
# The arms are measured in shares of the gap the cut opens, so the cut must open a real one. The chosen cut's
# dev gap also scales the length rule (LENGTH_RULE), and its test gap the verdicts' margin (PRACTICAL).
GAP_BAR = 0.5  # nats: the rule's cut must cost at least this much on dev. Never lowered: pretrain longer instead
# A share of each base's own test gap (cut - full), so the margin means the same on both bases.
PRACTICAL = 0.05  # differences under 5% of the full-to-cut gap are no practical difference
# The split of the corpus (by a hash of each file): a test split of >= MIN_DOCUMENTS files, none of which may hold
# more than MAX_SHARE of the scored tokens: every evaluation scores at most the base's `per_document` windows of
# each file, spaced evenly over it (the same cap on dev); a cap that leaves a file above MAX_SHARE is refused.
# Why both limits: the intervals resample documents, which needs many of them, and no one file may decide a mean.
DEV_FRACTION, TEST_FRACTION, MIN_DOCUMENTS, MAX_SHARE = 0.1, 0.2, 100, 0.05  # shares of files, not of tokens
# Learning rates: a pilot per arm (seed 0, the base's pilot length, scored on dev) over these first candidates,
# extended by one grid step (x3 or /3) towards the best until the best is an interior point.
# Half-decade steps (x3, then x3.33); a pilot never goes beyond its ends (pilot_rates).
LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
# Keyed by an arm's family (ARMS' second field): the gated arms' candidates start at the paper's lr, 3e-4; the
# LoRA arms' one grid step higher.
FIRST_RATES = {"gated": (3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2)}
# The length rule: the dynamic arm at its chosen lr is trained for the base's max_steps with dev scored every
# max_steps / 10 steps; the grid's length is the smallest T in (2/5, 3/5, 4/5, 1) x max_steps whose dev loss
# improved by less than LENGTH_RULE of the dev gap over the last quarter (3T/4 to T, each the nearest
# scored step); none: max_steps, the budget.
LENGTH_RULE = 0.02  # a smaller gain over the last quarter: training longer buys little
# 2000: each end of a 95% interval lies beyond 50 of the resamples.
RESAMPLES = 2000  # bootstrap resamples (seeds and test documents) for every interval
DEPTH_CURVE = (1, 2, 4, 8, 16)  # the depth table: seed 0 of some arms, re-scored at these depths (grid)
# (one pass of the deepest loop: Ouroboros.hidden_at runs the coda after each of these steps)
LOOP_DEPTHS = (1, 2, 4, 8)  # the untrained loops are scored at these depths
PRETRAIN_STEPS = 2880  # the small base: the demo's recipe, 2,880 steps in fp32, on an 8-layer sibling of its base
STUDY_BASE = {**DEMO_BASE, "num_hidden_layers": 8}  # the demo's shape with 8 layers instead of 6
QUICK_PRETRAIN_STEPS = 3  # --quick checks the chain: any base will do

# The arms: label, its pilot's family (the key of its first lr candidates), train.py flags. Ranks and splits are
# filled in later.
# No Controller, no gate, no step norm, depth 1: the model is exactly the cut model (evaluate.arm_name names it so),
# which the LoRA arms below adapt.
NO_METHOD = ["--controller", "none", "--no-gate", "--no-step-norm", "--depth", "1"]
ARMS = {
    # The method's parts, at depth 4 unless -depth1 (arm_flags): the gate and step norms alone; c learned per step,
    # blind to the input; c from the input (Ouroboros); the same Controller reading zeros, so that c follows the step
    # alone.
    "none": ("gate + norm only", "gated", ["--controller", "none"]),
    "static": ("static per-step LoRA", "gated", ["--controller", "static"]),
    "dynamic": ("dynamic Controller", "gated", ["--controller", "dynamic"]),
    "blind": ("input-blind Controller", "gated", ["--controller-input", "none"]),
    # The LoRA references, at ranks matched to the dynamic arm's parameters (matched_ranks): on every kept layer of
    # the cut; the same for as many training FLOPs as the dynamic arm (arm_flags scales its steps); on the coda alone;
    # on every layer of the uncut model (arm_flags swaps in uncut()), the adapted full model.
    "lora-cut": ("LoRA on the cut, no recurrence", "lora", NO_METHOD + ["--lora-layers", "all"]),
    "lora-cut-flops": ("LoRA on the cut, FLOP-matched", "lora", NO_METHOD + ["--lora-layers", "all"]),
    "lora-coda": ("LoRA on the coda, no recurrence", "lora", NO_METHOD + ["--lora-layers", "coda"]),
    "lora-full": ("LoRA on the full model (no cut)", "lora", NO_METHOD + ["--lora-layers", "all"]),
    # The authors' proposed fix (adapt the coda) on top of the method; the paper's no-gate ablation; the paper's
    # whole-sequence pool, which reads later tokens (the grid also scores it with the causal pool).
    "dynamic-coda": ("dynamic Controller + LoRA on the coda", "gated", ["--lora-layers", "coda"]),
    "nogate": ("dynamic Controller, no gate", "gated", ["--no-gate"]),
    "meanpool": ("dynamic Controller, whole-sequence mean pool", "gated", ["--pool", "mean"]),
}
# Arms without a pilot of their own: the FLOP-matched LoRA takes plain LoRA's lr; the combined arm takes the
# dynamic arm's lr for its Controller and LoRA on the coda's lr and rank for its adapters (--lora-lr).
# arm -> the arm whose pilot's lr it takes.
BORROWS = {"lora-cut-flops": "lora-cut", "dynamic-coda": "dynamic"}

# Per base: its sizes (train.py flags), the pilots' length and the length rule's budget, the arms. "-depth1"
# is an arm at depth 1; "-paper" an arm at the paper's proportions of the base (when the rule picks another cut).
BASES = {
    # SmolLM2: a ladder of its own, one layer fewer on each side per rung, from a single layer removed (14/15/14) to
    # the paper's proportions of its 30 layers (7/15/7). No depth-1 arms: the depth-1 claim is not measured on it.
    # per_document: windows scored per file (check_test_split); max_steps: the length rule's budget.
    "smollm2": dict(
        title="SmolLM2-135M-Instruct", ladder=[(k, 15, k) for k in (14, 13, 12, 11, 10, 9, 8, 7)], paper=(7, 15, 7),
        sizes=dict(seq_len=256, batch_size=2, grad_accum=1), pilot_steps=40, max_steps=120, per_document=2,
        core=["none", "static", "dynamic", "blind", "lora-cut", "lora-coda", "dynamic-coda", "lora-full",
              "lora-cut-flops"], depth_one=[], exploratory=[], paper_arms=["lora-cut", "static", "dynamic"]),
    # The small base: ladder() of its 8 layers (2/4/2 first), the depth-1 arms, the exploratory arms (seed 0 only),
    # and no paper cut beside the rule's.
    "small": dict(
        title="Small base (pretrained here)", ladder=None, paper=None,
        sizes=dict(seq_len=256, batch_size=4, grad_accum=1), pilot_steps=100, max_steps=400, per_document=4,
        core=["none", "static", "dynamic", "blind", "lora-cut", "lora-coda", "dynamic-coda", "lora-full",
              "lora-cut-flops"], depth_one=["none", "static", "dynamic"], exploratory=["nogate", "meanpool"],
        paper_arms=[]),
}
# --quick (the tests run it): tiny sizes, one seed, no bar on the cut; it checks the chain, not the numbers.
QUICK = dict(sizes=dict(seq_len=32, batch_size=2, grad_accum=1), pilot_steps=4, max_steps=10, per_document=1,
             core=["none", "static", "dynamic", "blind", "lora-cut", "lora-coda", "dynamic-coda", "lora-full",
                   "lora-cut-flops"], depth_one=["dynamic"], exploratory=["nogate", "meanpool"], paper_arms=["dynamic"])


def ladder(n_layers: int) -> list[tuple[int, int, int]]:
    """(prelude, recurrent layer, coda) from the mildest cut to the harshest: the paper's split, then a shorter
    prelude, a shorter coda, both. For 8 layers: 2/4/2, 1/4/2, 2/4/1, 1/4/1."""
    p, rec, c = train.paper_split(n_layers)
    # dict.fromkeys drops repeats (a prelude or coda of 1 cannot be halved) and keeps the order.
    return list(dict.fromkeys([(p, rec, c), (max(p // 2, 1), rec, c), (p, rec, max(c // 2, 1)),
                               (max(p // 2, 1), rec, max(c // 2, 1))]))


def uncut(n_layers: int) -> tuple[int, int, int]:
    """The split that keeps every layer (prelude, the recurrent layer, coda), for LoRA on the full model."""
    return n_layers // 2, n_layers // 2, n_layers - n_layers // 2 - 1  # every layer kept


# ----------------------------------------------------------------------------------------------------------
# The bases and their cuts.

def base_spec(opts) -> dict:
    # --model takes the sizes and arms of --base (SmolLM2's without it); --quick replaces them with QUICK's.
    spec = {**BASES[opts.base if opts.base in BASES else "smollm2"], **(QUICK if opts.quick else {})}
    if opts.model or opts.quick:
        # Its own title and ladder (--ladder, else ladder() of its layers), and no paper cut beside the rule's.
        spec.update(title=opts.model or "the tiny quick base", ladder=opts.ladder, paper=None)
    return spec


def base_model(opts, device) -> Path:
    """--model (a directory or a hub id), SmolLM2-135M (converted once from its registry package), or the small
    base pretrained PRETRAIN_STEPS steps in fp32 (cached like the demo's: pretrained once)."""
    if opts.model:
        return resolve_model(opts.model)
    if opts.base == "smollm2" and not opts.quick:
        from smollm2 import smollm2
        return smollm2()
    # The study's split fractions: the small base's tokenizer and pretraining see only the study's training files,
    # never its dev or test files.
    args = run_args([], opts)
    # The demo's recipe, pretrained in fp32, which every CPU of the pool runs at full speed, so that a deleted run
    # retrains to its committed numbers anywhere; its weights are saved in fp32 and every row is scored in fp32.
    args.pretrain_steps, args.precision = opts.pretrain_steps, "fp32"
    return demo_base(args, token_cache(None), device, train.train, STUDY_BASE)


def measure_ladder(opts, device, model_dir: Path, spec: dict) -> dict:
    """Full and cut loss of every rung of the ladder on the dev split, the uniform and unigram losses, the
    rule's choice (the first rung whose cut costs >= GAP_BAR nats on dev while the cut still beats the unigram
    model), and the per-document cap of every evaluation (chosen on the test split's files)."""
    rungs, n_layers = [], load_config(model_dir).num_hidden_layers
    rule_ladder = spec["ladder"] or ladder(n_layers)  # None: the small base, --model without --ladder
    # The paper's cut, when not a rung, is scored after the ladder for the report; the rule never sees it.
    cuts = rule_ladder + ([spec["paper"]] if spec["paper"] and spec["paper"] not in rule_ladder else [])
    # Read here only for the data: the base's seq_len and the split fractions, so the windows are every run's.
    args = run_args(["--model", str(model_dir), "--steps", "0"], opts)
    qcfg = load_config(model_dir)
    # Tokenised once (or read from the token cache): every rung is scored on the same dev windows.
    windows = data_splits(args.data, load_tokenizer(model_dir), qcfg.vocab_size, args.seq_len, args.seed,
                          args.dev_fraction, args.test_fraction, token_cache(None))
    cap = spec["per_document"]
    # The cap is checked on the test split now: a cap that fails stops the study before any rung is scored.
    tokens, scored = check_test_split(windows["test"], cap, opts.quick)
    print(f"test split: {scored['documents']} documents, {scored['tokens']:,} tokens scored (at most {cap} windows of "
          f"each), the largest document {scored['max_share']:.1%} of them; {scored['effective_documents']:.0f} "
          "effective documents", flush=True)
    full = None  # the full model is the same for every rung: scored once
    for p, rec, c in cuts:
        args = run_args(["--model", str(model_dir), "--n-prelude", str(p), "--recurrent-layer", str(rec),
                         "--n-coda", str(c), "--steps", "0", f"--eval-per-document={cap}"], opts)
        _, model = train.prepare_arm(args, device)  # model.base: the cut decoder, nothing added
        cut = evaluate.reference_row("cut baseline", model.base, windows["dev"], args, device)["loss"]
        if full is None:  # loaded in fp32, like every row of the study
            full = evaluate.reference_row("full model", load_model(str(model_dir), torch.float32, device),
                                       windows["dev"], args, device)["loss"]
        rungs.append(dict(split=[p, rec, c], full=full, cut=cut, gap=cut - full))
        print(f"ladder {p}/{rec}/{c}: dev loss full {full:.4f}, cut {cut:.4f}, gap {cut - full:.4f}", flush=True)
    # The unigram model of the training split: each dev token predicted by its training frequency. A cut that loses
    # to it predicts worse than token counts alone: too broken to ask whether a method repairs it.
    train_ids, dev_ids = windows["train"].tokens, windows["dev"].tokens[1:]  # [1:]: the tokens that are targets
    counts = np.bincount(train_ids, minlength=qcfg.vocab_size) + 1.0  # add-one: every token possible
    unigram = float(-np.log(counts[dev_ids] / counts.sum()).mean())  # mean nats per dev token
    bar = 0.0 if opts.quick else GAP_BAR  # --quick checks the chain, not the numbers
    chosen = choose_cut(rungs[:len(rule_ladder)], unigram, bar, enforce=not opts.quick)
    # protocol.json: every rung's dev numbers, the rule's references, the chosen split, the paper's cut when it is
    # another (else None: no -paper arms), and the test tokens per document, the bootstrap's weights.
    return dict(ladder=rungs, uniform=math.log(qcfg.vocab_size), unigram=unigram, split=chosen["split"],
                paper=list(spec["paper"]) if spec["paper"] and list(spec["paper"]) != chosen["split"] else None,
                gap_bar=bar, per_document=cap, test_tokens_per_document=tokens.tolist(), test_scored=scored,
                vocab_size=qcfg.vocab_size, n_layers=n_layers)


def check_test_split(test, cap: int, quick: bool) -> tuple[np.ndarray, dict]:
    """Checks the base's cap of windows per document on the test split: at least MIN_DOCUMENTS documents scored,
    none above MAX_SHARE of the scored tokens. Returns the tokens scored per document and a summary."""
    # Every test window the cap keeps (spread(0, cap): no limit on their number), and the document of each of their
    # target tokens: tokens[d] = how many tokens of document d every evaluation scores.
    tokens = np.bincount(test.target_documents(test.spread(0, cap)).flatten().numpy())
    shares = tokens[tokens > 0] / tokens.sum()
    scored = dict(documents=len(shares), tokens=int(tokens.sum()), max_share=float(shares.max()),
                  effective_documents=float(1 / (shares ** 2).sum()))  # Kish: 1 / sum of squared shares
    if not quick and scored["documents"] < MIN_DOCUMENTS:  # --quick's tiny split cannot meet it
        raise RunError(f"the test split scores {scored['documents']} documents, fewer than {MIN_DOCUMENTS}; pass --data "
                       "with more documents")
    if not quick and scored["max_share"] > MAX_SHARE:
        raise RunError(f"a test document holds {scored['max_share']:.1%} of the scored tokens, above {MAX_SHARE:.0%}")
    return tokens, scored


def choose_cut(rungs: list[dict], unigram: float, bar: float, enforce: bool = True) -> dict:
    """The rule: the first rung (mildest first) whose cut costs >= bar nats on dev and still beats the unigram
    loss; with enforce False (--quick) the first rung whatever its numbers."""
    # Mildest first, so the study keeps as much of the base as the bar allows.
    chosen = next((r for r in rungs if r["gap"] >= bar and r["cut"] < unigram), None if enforce else rungs[0])
    if chosen is None:
        raise RunError(f"no cut of the ladder costs >= {bar} nats on dev while the cut still beats the unigram loss "
                       f"({unigram:.3f}); pretrain the base longer (--pretrain-steps), never lower the bar")
    return chosen


def matched_ranks(model_dir: Path, split) -> dict:
    """LoRA ranks whose adapters have as many trainable parameters as the dynamic arm uses at depth 4 (counted
    on the meta device: no weights read): on every kept layer of the cut, on its coda, on every layer uncut."""
    qcfg = load_config(model_dir)
    # train.py's defaults (the Controller's r = 32, as the arms use it), the split, and depth 4 as the arms train.
    args = build_parser().parse_args(["--n-prelude", str(split[0]), "--recurrent-layer", str(split[1]),
                                            "--n-coda", str(split[2]), "--depth", "4"])
    cfg = train.ouroboros_config(args, qcfg.num_hidden_layers)
    prelude, rec, coda, _ = cfg.split(qcfg.num_hidden_layers)
    with torch.device("meta"):
        # Placeholder bases: they are buffers, not trainable parameters, so their shapes do not change the count.
        dynamic = Ouroboros(Decoder(qcfg, prelude + [rec] + coda), cfg, {k: (torch.empty(1), torch.empty(1))
                                                                      for k in PROJECTIONS})
        # What a depth-4 forward reads: the per-step rows beyond 4 (of 64) are allocated, never read.
        used = dynamic.parameters_used(4)
        # one rank of LoRA on every projection of a layer: in + out parameters each (every layer has the same shapes)
        per_layer = sum(sum(dynamic.base.get_parameter(f"model.layers.{rec}.{p}.weight").shape) for p in PROJECTIONS.values())
    # Layers adapted per arm: every kept layer of the cut, the coda, every layer of the uncut model.
    per_rank = {"lora-cut": per_layer * (len(prelude) + 1 + len(coda)), "lora-coda": per_layer * len(coda),
                "lora-full": per_layer * qcfg.num_hidden_layers}
    # rank = budget / (parameters per rank and layer x layers), at least 1; dynamic_used for the report.
    return {name: max(1, round(used / k)) for name, k in per_rank.items()} | {"dynamic_used": used}


# ----------------------------------------------------------------------------------------------------------
# Rows that need no training: the full model and the cut baseline (scored once per cut and split, not once per
# run), and the cut with its recurrent layer looped N times untrained (plain: h <- f(h); with the paper's gate at
# its initialisation: h <- h + sigmoid(-2) (f(h) - h), no step norm).

# loop -> (label, train.py flags). Untrained, they show what looping the layer does by itself, before anything
# is trained; the dynamic arm is compared with both at depth 4.
LOOPS = {"loop-plain": ("untrained loop, plain", ["--controller", "none", "--no-gate", "--no-step-norm"]),
         "loop-gate": ("untrained loop, the paper's gate at init", ["--controller", "none", "--no-step-norm"])}


def untrained_rows(opts, device, model_dir: Path, protocol: dict) -> dict:
    """{cut: {"dev"|"test": [full, cut] rows, "loops": {loop: rows per depth on test}}}, rows with per-document losses."""
    out = {}
    # The rule's cut, and the paper's beside it.
    for split in [protocol["split"]] + ([protocol["paper"]] if protocol["paper"] else []):
        p, rec, c = split
        args = run_args(["--model", str(model_dir), "--n-prelude", str(p), "--recurrent-layer", str(rec),
                         "--n-coda", str(c), "--steps", "0"] + cut_flags(protocol), opts)
        qcfg, model = train.prepare_arm(args, device)
        windows = data_splits(args.data, load_tokenizer(model_dir), qcfg.vocab_size, args.seq_len, args.seed,
                              args.dev_fraction, args.test_fraction, token_cache(None))
        key = "/".join(map(str, split))  # '12/15/12': JSON keys are strings
        # [full, cut] on dev and test, scored once here so that no run repeats them (--no-reference-rows).
        out[key] = {s: evaluate.reference_rows(model, windows[s], args, device) for s in ("dev", "test")}
        out[key]["loops"] = {}
        for loop, (what, flags) in LOOPS.items():
            # At the deepest loop depth, which the config checks; hidden_at gives the shallower depths on the way.
            largs = run_args(["--model", str(model_dir), "--n-prelude", str(p), "--recurrent-layer", str(rec),
                              "--n-coda", str(c), "--depth", str(max(LOOP_DEPTHS))] + flags + cut_flags(protocol), opts)
            _, looped = train.prepare_arm(largs, device)
            # On test only: the loops are rows of the report, never inputs to a rule.
            scores = evaluate.score(lambda x: looped.eval().hidden_at(x, list(LOOP_DEPTHS)), list(LOOP_DEPTHS),
                                 looped.base.head, windows["test"], largs, device, what)
            out[key]["loops"][loop] = [dict(name=f"{what}, depth {d}", depth=d, loss=scores[d][0],
                                            per_document=scores[d][1]) for d in LOOP_DEPTHS]
            print(f"{key} {what}: " + ", ".join(f"depth {d} {scores[d][0]:.4f}" for d in LOOP_DEPTHS), flush=True)
    return out


# ----------------------------------------------------------------------------------------------------------
# The runs: every run's name, train.py flags, and the evaluations of the finished run it needs.

def run_args(argv: list[str], opts) -> argparse.Namespace:
    """train.py's flags for one run: the base's sizes, then argv; --data None is the demo's corpus."""
    parser = build_parser()
    parser.set_defaults(**DEMO_ARM)  # flags no run sets: the demo's CPU-sized values
    # eval_windows 0: every window the per-document cap keeps, so an evaluation covers the whole split.
    sizes = base_spec(opts)["sizes"] | dict(dev_fraction=DEV_FRACTION, test_fraction=TEST_FRACTION, eval_windows=0)
    # fp32 for every run: auto would pick bf16 on some machines and fp32 on others, and the numbers would differ.
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()] + ["--precision", "fp32"]
    # argv last: argparse keeps the last value of a flag, so a run's own flags win over the base's sizes.
    args = parser.parse_args(flags + (["--device", opts.device] if opts.device else []) + argv)
    args.data = opts.data  # set directly: None, the demo's corpus, is no flag value
    return args


def cut_flags(protocol: dict) -> list[str]:
    return [f"--eval-per-document={protocol['per_document']}"]  # the cap, in every evaluation of every run


def arm_of(group: str) -> tuple[str, str]:
    """'dynamic-depth1' -> ('dynamic', '-depth1'); 'lora-cut-paper' -> ('lora-cut', '-paper')."""
    for suffix in ("-depth1", "-paper"):
        if group.endswith(suffix):
            return group[:-len(suffix)], suffix
    return group, ""


def arm_flags(group: str, protocol: dict, seed: int, lrs: dict, steps: int, table: str = "test",
              curve: bool = False) -> list[str]:
    """train.py flags of one run of `group` (an arm, maybe with -depth1 or -paper) at seed, length `steps`."""
    arm, suffix = arm_of(group)
    flags = list(ARMS[arm][2])  # a copy: the += below must not grow ARMS
    split = protocol["paper"] if suffix == "-paper" else protocol["split"]
    ranks = protocol["ranks_paper"] if suffix == "-paper" else protocol["ranks"]
    # Its own pilot's lr, else the lr of the arm it borrows from, at the same cut and depth (the suffix).
    lr = lrs[group if group in lrs else BORROWS.get(arm, arm) + suffix]
    # LoRA ranks matched to the dynamic arm's parameters on the same cut; the FLOP-matched arm keeps plain LoRA's.
    if arm.startswith("lora-"):
        flags += ["--lora-rank", str(ranks["lora-cut" if arm == "lora-cut-flops" else arm])]
    else:
        # Depth 4 for the method's arms: the paper's depth-4 claim, and the depth matched_ranks counts.
        flags += ["--depth", "1" if suffix == "-depth1" else "4"]
    # The combined arm: its adapters take lora-coda's rank and lr (--lora-lr), its Controller the dynamic arm's lr.
    if arm == "dynamic-coda":
        flags += ["--lora-rank", str(ranks["lora-coda"]), "--lora-lr", f"{lrs['lora-coda' + suffix]:g}"]
    if arm == "lora-full":
        split = uncut(protocol["n_layers"])  # every layer kept: the adapted full model
    if arm == "lora-cut-flops":
        steps = round(steps * protocol["flop_ratio"])  # as many training FLOPs as the dynamic arm
    p, rec, c = split
    # Warmup a tenth of the run, a checkpoint every quarter (resumable), dev scored every fifth only with `curve`,
    # the final table on `table` without the full and cut rows, which untrained_rows scored once.
    flags += ["--n-prelude", str(p), "--recurrent-layer", str(rec), "--n-coda", str(c), "--seed", str(seed),
              "--lr", f"{lr:g}", f"--steps={steps}", f"--warmup={max(1, steps // 10)}", f"--save-every={max(1, steps // 4)}",
              f"--log-every={max(1, steps // 10)}", f"--eval-every={max(1, steps // 5) if curve else 0}",
              "--table-split", table, "--no-reference-rows"] + cut_flags(protocol)
    return flags


def pilot_groups(spec: dict, protocol: dict) -> list[str]:
    """Every arm that gets its own learning-rate pilot."""
    groups = [a for a in spec["core"] + spec["exploratory"] if a not in BORROWS]  # the borrowers have no pilot
    groups += [f"{a}-depth1" for a in spec["depth_one"]]  # an arm at depth 1 tunes its own lr
    groups += [f"{a}-paper" for a in spec["paper_arms"] if protocol["paper"]]  # only when the paper's cut is another
    return groups


def pilot_name(group: str, lr: float) -> str:
    return f"pilot-{group}-lr{lr:g}-s0"  # -s0: collect() splits it like any run's name


def pilot_rates(group: str, losses: dict) -> list[float]:
    """The candidates a pilot needs now: the first ones, then one grid step beyond the best while the best is at
    an end of what was tried (and not at an end of LR_GRID). losses: {lr: dev loss} of the finished pilots."""
    # The family's first candidates, and every lr that already has a finished pilot.
    tried = sorted(set(FIRST_RATES[ARMS[arm_of(group)[0]][1]]) | set(losses))
    if any(lr not in losses for lr in tried):
        return tried  # some candidates are not finished yet
    best = min(losses, key=losses.get)
    k = LR_GRID.index(best)  # every candidate is a point of LR_GRID
    # A best at an end of what was tried may not be the best: one more grid step beyond it, unless LR_GRID ends there.
    if best == tried[0] and k > 0:
        return [LR_GRID[k - 1]] + tried
    if best == tried[-1] and k < len(LR_GRID) - 1:
        return tried + [LR_GRID[k + 1]]
    return tried  # the best is interior (or at LR_GRID's end): final


def pilot_state(spec: dict, protocol: dict, runs_dir: Path) -> tuple[dict, dict]:
    """(the pilot runs needed now, {group: chosen lr} for the groups whose pilots are complete)."""
    needed, chosen = {}, {}
    for group in pilot_groups(spec, protocol):
        losses = {}
        while True:  # the candidates grow with the finished pilots' losses, until they are all finished
            # {lr: dev loss} of the candidates whose pilot finished (their table is on dev: --table-split dev)
            found = {lr: rows[0]["loss"] for lr in pilot_rates(group, losses)
                     if (rows := read_results(runs_dir / pilot_name(group, lr)))}
            if found == losses:  # nothing new finished: the candidates are final for now
                break
            losses = found
        rates = pilot_rates(group, losses)
        # Every candidate, finished or not: run_grid skips the finished ones, and the report reads them all.
        for lr in rates:
            needed[pilot_name(group, lr)] = (arm_flags(group, protocol, 0, {group: lr}, spec["pilot_steps"], "dev"), [])
        if set(rates) <= set(losses):  # all finished, and none at an end that asks for one more
            chosen[group] = min(losses, key=losses.get)
    return needed, chosen


def length_run(protocol: dict, spec: dict, lrs: dict) -> dict:
    """The length rule's run: the dynamic arm at its chosen lr for max_steps, dev scored every max_steps / 10."""
    flags = arm_flags("dynamic", protocol, 0, lrs, spec["max_steps"], "dev")
    # arm_flags scores no dev curve here (curve False); the length rule needs one: dev every tenth of the run.
    flags[flags.index("--eval-every=0")] = f"--eval-every={max(1, spec['max_steps'] // 10)}"
    return {"length-dynamic-s0": (flags, [])}  # no extra evaluation: its final table is on dev


def chosen_length(run_dir: Path, max_steps: int, dev_gap: float) -> dict:
    """The length rule on the length run's dev curve (metrics.jsonl) and final dev loss (results.json)."""
    curve = {r["step"]: r["dev_loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "dev_loss" in r}
    # train.py scores no dev loss at the last step (the final table does): results.json, on dev, is that point.
    curve[max_steps] = read_results(run_dir)[0]["loss"]
    checks = []
    # T = 2/5, 3/5, 4/5 and 1 of the budget, shortest first: the grid trains no longer than the dynamic arm needs.
    for k in (2, 3, 4, 5):
        t = max_steps * k // 5
        gain = nearest(curve, 3 * t // 4) - nearest(curve, t)  # positive: dev loss fell from 3T/4 to T
        checks.append(dict(steps=t, gain=gain, share=gain / dev_gap))
        if gain < LENGTH_RULE * dev_gap:  # flat enough: T is long enough
            return dict(steps=t, checks=checks, budget_bound=False, curve=curve)
    return dict(steps=max_steps, checks=checks, budget_bound=True, curve=curve)  # never flat: the budget, said so


def nearest(curve: dict, step: int) -> float:
    return curve[min(curve, key=lambda s: abs(s - step))]  # a tie: the earlier step


def grid(spec: dict, protocol: dict, lrs: dict, steps: int, quick: bool) -> dict:
    """name -> (train.py flags, [(results file, its --eval-only flags)]). A run's group is its name without the
    seed. Seed-major, so that a grid stopped half-way has every arm of the first seed."""
    runs = {}
    depths = ",".join(str(d) for d in DEPTH_CURVE if not quick or d <= 4)
    # An extra evaluation: (its results file, named as --eval-only names it; the --eval-only flags).
    curve = [(f"results-depths-{depths.replace(',', '-')}.json", ["--eval-depths", depths])]
    # One run: its flags (a dev curve for seed 0: the dev-loss figure) and its extra evaluations.
    one = lambda group, seed, evals=(): (arm_flags(group, protocol, seed, lrs, steps, curve=seed == 0), list(evals))  # noqa: E731

    for seed in SEEDS[:1] if quick else SEEDS:
        for arm in spec["core"]:
            # The depth table: the three method arms trained at depth 4 (seed 0), scored at the other depths too.
            runs[f"{arm}-s{seed}"] = one(arm, seed, curve if seed == 0 and arm in ("none", "static", "dynamic") else [])
        for arm in spec["depth_one"]:
            # Every depth-1 arm too (seed 0).
            runs[f"{arm}-depth1-s{seed}"] = one(f"{arm}-depth1", seed, curve if seed == 0 else [])
    # The exploratory arms: seed 0 only; the mean-pooled one also scored with the causal pool, to show its leak.
    for arm in spec["exploratory"]:
        leak = [("results-pool-causal.json", ["--eval-pool", "causal"])] if arm == "meanpool" else []
        runs[f"{arm}-s0"] = one(arm, 0, leak)
    # The paper's cut, when it is not the chosen one: seed 0 only, beside the rule's.
    if protocol["paper"]:
        for arm in spec["paper_arms"]:
            runs[f"{arm}-paper-s0"] = one(f"{arm}-paper", 0)
    return runs


# ----------------------------------------------------------------------------------------------------------
# Running: resumable, with an ETA for all of it.

def train_py(argv: list[str], opts) -> None:
    """One train.py run in this process (its own checks, messages, checkpoints)."""
    args = run_args(argv, opts)
    if args.eval_only:
        args.data = None  # read from the run's own config.json
    if train.run(args):  # nonzero: train.py printed what went wrong
        raise RunError(f"train.py {' '.join(argv)} failed")


def cost(flags: list[str], evals: list) -> float:
    """A run's work in layer passes per window, for the ETA: training (forward and backward), then its tables."""
    get = lambda flag, default: int(flags[flags.index(flag) + 1]) if flag in flags else default  # noqa: E731
    steps = next(int(f.split("=")[1]) for f in flags if f.startswith("--steps="))
    layers = get("--n-prelude", 1) + get("--depth", 4) + get("--n-coda", 1)  # the layers a forward runs
    # Rough units, for the ETA alone: a training step's forward and backward count 3 passes of its layers, the
    # final table 20, each extra evaluation 5 per depth it scores.
    return 3 * steps * layers + 20 * layers + sum(5 * layers * len(extra[-1].split(",")) for _, extra in evals)


def run_grid(runs: dict, opts, out: Path, model_dir: Path, timing: dict) -> None:
    """Trains (or resumes) every unfinished run in out/<name>, then its evaluations; each run's wall time goes to
    timing.json beside out."""
    # Finished runs (their results files exist) are never run again.
    todo = [name for name, (_, evals) in runs.items() if not finished(out / name, evals)]
    work = {name: cost(flags, evals) for name, (flags, evals) in runs.items()}
    done_work, spent, t0 = 0.0, 0.0, time.time()  # ETA: this invocation's seconds per unit of cost()
    for k, name in enumerate(todo):
        flags, evals = runs[name]
        print(f"\n[{k + 1}/{len(todo)} to run] {name}", flush=True)
        t = time.time()
        run_dir = out / name
        if not (run_dir / "results.json").is_file() or not (run_dir / CHECKPOINT).is_file():
            # No results, or results without the checkpoint an evaluation needs (a fresh clone): (re)train.
            # A checkpoint and config.json: resume; else --overwrite replaces what is there and trains from step 0.
            resume = (run_dir / CHECKPOINT).is_file() and (run_dir / "config.json").is_file()
            train_py(["--model", str(model_dir), "--out", str(run_dir), "--resume" if resume else "--overwrite"]
                     + flags, opts)
        # The extra evaluations rescore the saved checkpoint (--eval-only); each file is made once.
        for file, extra in evals:
            if not (run_dir / file).is_file():
                train_py(["--out", str(run_dir), "--eval-only"] + extra, opts)
        timing[name] = timing.get(name, 0.0) + time.time() - t  # summed over invocations
        atomic_write(out.parent / "timing.json", lambda f: f.write_text(json.dumps(timing, indent=1)))
        done_work, spent = done_work + work[name], time.time() - t0
        left = sum(work[n] for n in todo[k + 1:])
        print(f"[{k + 1}/{len(todo)} to run] {name} done in {fmt_time(time.time() - t)}; this invocation "
              f"{fmt_time(spent)}, eta of this stage {fmt_time(spent / done_work * left)}", flush=True)


def finished(run_dir: Path, evals: list) -> bool:
    # The results files, not the checkpoint: a run committed without its checkpoint counts as finished.
    return all((run_dir / f).is_file() for f in ["results.json"] + [f for f, _ in evals])


def read_results(run_dir: Path, file: str = "results.json") -> list | dict | None:
    try:
        return json.loads((run_dir / file).read_text())
    except (OSError, ValueError):  # missing or unreadable: not finished
        return None



# ----------------------------------------------------------------------------------------------------------
# Statistics. A group is the runs of one arm (one per seed). Losses are token-weighted means over test
# documents, so a per-document loss vector and the documents' token counts give back every loss exactly.

def collect(runs_dir: Path, runs: dict) -> dict:
    """group -> {seed: run}, each run: its results rows, per-document losses, stats and extra evaluations."""
    groups = {}
    for name, (_, evals) in runs.items():
        rows = read_results(runs_dir / name)
        if rows is None:
            continue  # not run yet: the report shows what exists
        group, seed = name.rsplit("-s", 1)  # 'dynamic-depth1-s2' -> 'dynamic-depth1', '2'
        # documents.json: {row name: loss per test document}; stats.json: tokens seen, FLOPs per token, seconds.
        documents = json.loads((runs_dir / name / "documents.json").read_text())
        stats = json.loads((runs_dir / name / "stats.json").read_text())
        # extra: {results file: (its rows, its per-document losses)}, for the extra evaluations already made.
        extra = {file: (read_results(runs_dir / name, file), json.loads(
            (runs_dir / name / file.replace("results", "documents")).read_text())) for file, _ in evals
            if (runs_dir / name / file).is_file()}
        groups.setdefault(group, {})[int(seed)] = dict(rows=rows, documents=documents, stats=stats, extra=extra,
                                                       metrics=runs_dir / name / "metrics.jsonl")
    return groups


def arm_loss(run: dict) -> float:
    return run["rows"][0]["loss"]  # --no-reference-rows: the arm's row (at its training depth) comes first


def doc_losses(run: dict) -> np.ndarray:
    """Per-document test losses of a run's arm (nan where a document had no scored token)."""
    return nan_for_none(run["documents"][run["rows"][0]["name"]])


def nan_for_none(losses: list) -> np.ndarray:
    # null in documents.json: a document no scored window reached
    return np.array([np.nan if v is None else v for v in losses])


def fixed_rows(untrained: dict, split: list) -> dict:
    """The rows that need no training, on test, by group name: cut, full, and the untrained loops at each depth."""
    cut = untrained["/".join(map(str, split))]
    rows = {"full": cut["test"][0], "cut": cut["test"][1]}  # reference_rows' order: full, cut
    for loop, per_depth in cut["loops"].items():
        rows |= {f"{loop}-depth{r['depth']}": r for r in per_depth}
    return rows


def paired(a: np.ndarray, b: np.ndarray, tokens: np.ndarray, gap: float, seed: int = 0) -> dict:
    """A minus B, per seed and as a mean over seeds, with a 95% interval that resamples the seeds and the test
    documents (each resample: seeds drawn with replacement, documents drawn with replacement, the same documents
    for every seed drawn, so the pairing by seed and by document is kept). a, b: (seeds, documents)."""
    keep = tokens > 0  # unscored documents: no weight, nan losses
    diff, w = (a - b)[:, keep], tokens[keep].astype(float)  # (seeds, documents) and their tokens
    per_seed = diff @ w / w.sum()  # each seed's loss(A) - loss(B), weighted by tokens like the losses
    rng = np.random.default_rng(seed)  # fixed: the same runs give the same report
    # Both vary in a repeat of the study: the seeds (training noise) and the documents (which text is tested).
    # One document draw serves every seed of a resample, which keeps the pairing by document.
    docs = rng.integers(len(w), size=(RESAMPLES, len(w)))  # document indices, with replacement
    seeds = rng.integers(len(diff), size=(RESAMPLES, len(diff)))  # seed indices, likewise
    per_doc = (diff[:, docs] * w[docs]).sum(2) / w[docs].sum(1)  # (seeds, resamples): each seed on each resample
    # Each resample: its drawn seeds' losses on its drawn documents, averaged over the seeds. (RESAMPLES,)
    boot = np.take_along_axis(per_doc.T, seeds, axis=1).mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])  # the percentile interval
    return dict(per_seed=per_seed.tolist(), mean=float(per_seed.mean()), lo=float(lo), hi=float(hi),
                verdict=verdict(per_seed, lo, hi, gap))


def verdict(per_seed: np.ndarray, lo: float, hi: float, gap: float) -> str:
    """'A' (A beats B: every seed lower, the interval below 0, by at least PRACTICAL of the gap), 'B' (the
    mirror), 'same' (no practical difference: the interval within +-PRACTICAL of the gap), else 'cannot tell'."""
    margin = PRACTICAL * gap
    # All three for a win: every seed, the interval and the size; a difference that is sure but tiny is no win.
    if (per_seed < 0).all() and hi < 0 and -per_seed.mean() >= margin:
        return "A"
    if (per_seed > 0).all() and lo > 0 and per_seed.mean() >= margin:
        return "B"
    # 'same' needs the whole interval inside the margin: a wide interval around 0 is 'cannot tell'.
    return "same" if -margin < lo and hi < margin else "cannot tell"


# (A, B): A's loss minus B's. cut, full and the untrained loops (loop-plain-depthN, loop-gate-depthN) are rows
# scored once per base; a comparison runs when both sides exist on the base.
COMPARISONS = [
    # The method's parts: the Controller against static c (depth 1 and 4) and the control; the input-blind
    # Controller tells whether the Controller's gain needs its input.
    ("dynamic-depth1", "static-depth1"), ("dynamic", "static"), ("dynamic", "none"), ("static", "none"),
    ("dynamic", "blind"), ("static", "blind"), ("blind", "none"),
    # Against plain LoRA on the cut (matched in parameters, then in FLOPs) and on the coda; the combined arm; the
    # adapted full model, which shows what the same budget does without the cut.
    ("dynamic", "lora-cut"), ("dynamic", "lora-cut-flops"), ("lora-cut-flops", "lora-cut"), ("dynamic", "lora-coda"),
    ("dynamic-coda", "dynamic"), ("dynamic-coda", "lora-coda"), ("dynamic-coda", "lora-cut"),
    ("lora-cut", "lora-full"), ("dynamic", "lora-full"), ("lora-full", "full"),
    # Depth 4 against 1; the arms against the cut; the no-gate ablation; the trained loop against itself untrained
    # (what training adds to the loop); the paper's cut.
    ("dynamic", "dynamic-depth1"), ("dynamic", "cut"), ("none", "cut"), ("dynamic-depth1", "cut"), ("lora-cut", "cut"),
    ("nogate", "cut"), ("nogate", "dynamic"), ("dynamic", "loop-plain-depth4"), ("dynamic", "loop-gate-depth4"),
    ("loop-gate-depth4", "cut"), ("dynamic-paper", "static-paper"), ("dynamic-paper", "lora-cut-paper"),
]


def compare_groups(groups: dict, fixed: dict, tokens: np.ndarray, gap: float) -> dict:
    results = {}
    for a, b in COMPARISONS:
        if (a not in groups and a not in fixed) or (b not in groups and b not in fixed):  # not run on this base
            continue
        if a in fixed:  # two rows without training (an untrained loop against the cut): one vector each, no seeds
            results[(a, b)] = paired(nan_for_none(fixed[a]["per_document"])[None],
                                     nan_for_none(fixed[b]["per_document"])[None], tokens, gap) | {"seeds": None}
            continue
        # The seeds both sides have; a fixed row (no training) pairs with every seed of A.
        seeds = sorted(set(groups[a]) & (set(groups[a]) if b in fixed else set(groups[b])))
        A = np.stack([doc_losses(groups[a][s]) for s in seeds])
        # A fixed row is one vector, repeated for every seed: it has no seed-to-seed spread.
        B = np.stack([nan_for_none(fixed[b]["per_document"]) if b in fixed else doc_losses(groups[b][s]) for s in seeds])
        results[(a, b)] = paired(A, B, tokens, gap) | {"seeds": seeds}
    return results


def label(group: str) -> str:
    fixed = {"cut": "cut baseline", "full": "full model"}
    if group in fixed:
        return fixed[group]
    if group.startswith("loop-"):
        loop, depth = group.rsplit("-depth", 1)
        return f"{LOOPS[loop][0]}, depth {depth}"
    arm, suffix = arm_of(group)
    # The method's arms say their depth (4 unless -depth1); the LoRA arms always run at depth 1, left unsaid.
    words = {"-depth1": ", depth 1", "-paper": ", depth 4, the paper's cut"}.get(suffix, "")
    if suffix == "-paper" and arm.startswith("lora-"):
        words = ", the paper's cut"
    return ARMS[arm][0] + (words or ("" if arm.startswith("lora-") else ", depth 4"))


def said(comparison: tuple, result: dict) -> str:
    a, b = (label(g) for g in comparison)
    return {"A": f"{a} beats {b}", "B": f"{b} beats {a}", "same": "no practical difference"}.get(
        result["verdict"], "cannot tell")


# The paper's claims: (claim, the paper's number, the comparison, what the claim expects of it).
CLAIMS = [
    ("The Controller beats static per-step LoRA at depth 1", "5.082 vs 6.519 (-1.44)",
     ("dynamic-depth1", "static-depth1"), "A"),
    ("The Controller beats static per-step LoRA at depth 4", "5.075 vs 5.246 (-0.17)", ("dynamic", "static"), "A"),
    ("Without the gate, recursion is worse than the cut baseline", "+0.20 above the cut", ("nogate", "cut"), "B"),
    # The paper's 'all configurations converge', tested on one pair: the Controller trained at depth 4 and at 1.
    ("All configurations converge to the same loss (depth 1 and 4 alike)", "5.073-5.082, 8 configurations",
     ("dynamic", "dynamic-depth1"), "same"),
    # The paper says only that the Controller does not win: the cut winning or no practical difference both hold.
    ("On held-out text the Controller does not beat the cut baseline", "stated, no number", ("dynamic", "cut"),
     "not A"),
    ("Adapting the coda is the fix for the held-out gap (the authors' proposal)", "proposed, not measured",
     ("dynamic-coda", "dynamic"), "A"),
]
# The questions the paper left open, each one comparison of COMPARISONS (A, B), answered by its verdict.
QUESTIONS = [
    ("Does the Controller beat plain LoRA of the cut at matched parameters?", ("dynamic", "lora-cut")),
    ("... and at matched training FLOPs?", ("dynamic", "lora-cut-flops")),
    ("Does the Controller need its input (against the input-blind Controller)?", ("dynamic", "blind")),
    ("Does static per-step LoRA beat the input-blind Controller (the audit's missing row)?", ("static", "blind")),
    ("Does the Controller add anything to LoRA on the coda?", ("dynamic-coda", "lora-coda")),
    ("Does the trained loop beat the same loop untrained (the paper's gate at init, zero parameters)?",
     ("dynamic", "loop-gate-depth4")),
    ("Does the zero-parameter loop beat the cut baseline?", ("loop-gate-depth4", "cut")),
]
# What the claim expects -> the verdicts that confirm it.
HOLDS = {"A": {"A"}, "B": {"B"}, "same": {"same"}, "not A": {"B", "same"}}


def claim_verdict(expect: str, result: dict | None) -> str:
    if result is None:
        return "not measured on this base"
    if result["verdict"] in HOLDS[expect]:
        return "holds"
    return "cannot tell" if result["verdict"] == "cannot tell" else "does not hold"


# ----------------------------------------------------------------------------------------------------------
# RESULTS.md and its figures, from the run directories alone.

def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                            for r in rows]


def interval(r: dict | None) -> str:
    if not r:
        return "not measured"
    # Fewer seeds than the protocol's (a grid half-way, a seed-0-only arm) are said; rows without training have none.
    seeds = "" if r["seeds"] is None or len(r["seeds"]) == len(SEEDS) else \
        f" (seed{'s' if len(r['seeds']) > 1 else ''} {', '.join(map(str, r['seeds']))} only)"
    return f"{r['mean']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]{seeds}"


def summarise(base: dict) -> dict:
    """Everything a base's part of RESULTS.md needs, from its outputs alone."""
    protocol, untrained = base["protocol"], base["untrained"]
    runs_dir = base["res"] / "runs"
    groups = collect(runs_dir, base["runs"])
    pilots = collect(runs_dir, base["pilots"])
    fixed = fixed_rows(untrained, protocol["split"])
    full, cut = fixed["full"]["loss"], fixed["cut"]["loss"]  # on test, for the rule's cut
    # The adapted full model (LoRA on every layer, no cut), its mean over seeds; None until one of its runs finished.
    adapted = np.mean([arm_loss(r) for r in groups["lora-full"].values()]) if "lora-full" in groups else None
    tokens = np.array(protocol["test_tokens_per_document"])  # the bootstrap's document weights
    results = compare_groups(groups, fixed, tokens, cut - full)  # the margin: a share of the test gap
    return dict(groups=groups, pilot_groups=pilots, fixed=fixed, full=full, cut=cut, gap=cut - full, adapted=adapted,
                results=results)


def write_report(out: Path, bases: list[dict], command: str) -> None:
    """RESULTS.md and its figures, from the run directories alone (no model, no data needed)."""
    for base in bases:
        base |= summarise(base) if base["protocol"] else dict(results={})  # in place: base_lines reads these
    done = {b["name"]: sum(finished(b["res"] / "runs" / n, e) for n, (_, e) in b["runs"].items()) for b in bases}
    state = lambda b: (f"{done[b['name']]} of {len(b['runs'])} grid runs finished" if b["runs"] else  # noqa: E731
                       "the grid has not started" if b["protocol"] else "not started")
    lines = ["# Results: the paper's claims, re-measured on held-out text", "",
             f"Written by `{command}` from the run directories in `results/<base>/runs/` ("
             + ", ".join(f"{b['spec']['title']}: {state(b)}" for b in bases)
             + "). Every loss is the next-token loss on the **test** split, in fp32, at the final step of each run; "
             "the full model, the cut baseline and the untrained loops are scored once per base on the same tokens.", "",
             "## Verdicts", ""]
    header = ["claim of the paper", "paper"] + [f"{b['spec']['title']}: A - B [95% interval]; verdict" for b in bases]
    lines += table(header, [[claim, number] + [
        f"{interval(b['results'].get(c))}; **{claim_verdict(expect, b['results'].get(c))}**" for b in bases]
        for claim, number, c, expect in CLAIMS])
    lines += ["", "A - B: test loss of A minus B in nats, mean over seeds (negative: A is better), with a 95% interval "
              "that resamples seeds and test documents. The paper's numbers are training losses on FineWeb-Edu with "
              "Qwen2.5-3B; only the directions of the claims compare.", "",
              "The questions the paper left open, each answered by one comparison of the tables below (its verdict, "
              "by the rule stated there):", ""]
    lines += table(["question (A vs B)"] + [f"{b['spec']['title']}: A - B [95% interval]; verdict" for b in bases],
                   [[f"{question} ({label(c[0])} vs {label(c[1])})"] + [
                       f"{interval(b['results'].get(c))}; **{said(c, b['results'][c]) if c in b['results'] else 'not measured on this base'}**"
                       for b in bases] for question, c in QUESTIONS])
    lines += [""]
    for base in bases:
        lines += base_lines(base, out)
    atomic_write(out / "RESULTS.md", lambda f: f.write_text("\n".join(lines) + "\n"))
    print(f"wrote {out / 'RESULTS.md'}")


def base_lines(b: dict, out: Path) -> list[str]:
    lines = [f"## {b['spec']['title']}", ""]
    if not b["protocol"]:
        return lines + [f"Not started yet: `python study.py --base {b['name']}` runs it.", ""]
    lines += protocol_lines(b)
    if not b["groups"]:  # no grid run finished yet
        return lines + ["The grid starts once every pilot and the length rule's run are finished; `python study.py` "
                        "continues it.", ""]
    groups, gap = b["groups"], b["gap"]
    adapted = (f"; LoRA on the full model (the adapted full model, same parameter budget, trained the same way): "
               f"{b['adapted']:.4f}" if b["adapted"] is not None else "")
    lines += ["### Every arm", "", f"Full model {b['full']:.4f}, cut baseline {b['cut']:.4f}: the cut costs "
              f"{gap:.4f} nats on test{adapted}. **gap recovered** = (cut - arm) / (cut - full); **of the adapted "
              "gap** = (cut - arm) / (cut - adapted full model): on a pretrained model every trained adapter also "
              "learns the study's corpus, so the first can pass 100%; the second says how far an arm gets towards what "
              "the same budget does without the cut. The verdicts' practical margin is 5% of the untouched gap (cut - "
              "full), fixed before anything trained. trainable: parameters allocated; used: those a forward at the "
              "training depth reads. Training FLOPs: matmul and attention FLOPs of forward and backward "
              "(torch.utils.flop_counter) times the tokens seen.", ""]
    lines += arm_table(b) + [""]
    lines += ["### Comparisons", "", f"A - B per seed, their mean, and a 95% interval from {RESAMPLES} resamples of "
              "seeds and test documents. Verdict rule: *A beats B* when every seed agrees in sign, the interval "
              f"excludes 0 and the mean is at least {PRACTICAL:.0%} of the gap ({PRACTICAL * gap:.4f} nats); *no "
              f"practical difference* when the interval lies within +-{PRACTICAL:.0%} of the gap; otherwise *cannot "
              "tell*. Rows without training (cut, full, untrained loops) are one fixed vector for every seed.", ""]
    lines += comparison_table(b["results"], gap) + [""]
    lines += depth_lines(b) + leak_lines(groups)
    pictures = figures(b, b["res"])  # written beside the base's results
    lines += ["### Figures", ""] + [f"![{p}]({(b['res'] / p).relative_to(out)})" for p in pictures] + [""]
    return lines


def protocol_lines(b: dict) -> list[str]:
    protocol, spec, length = b["protocol"], b["spec"], b["length"]
    sizes, scored = spec["sizes"], protocol["test_scored"]
    lines = ["### Protocol", "", f"- **Base**: {protocol['base']['what']}.",
             f"- **The cut**, chosen by a rule fixed before any arm trained: the first split of the ladder whose "
             f"full-to-cut gap on the dev split is at least {protocol['gap_bar']} nats while the cut still beats the "
             f"unigram model of the training split ({protocol['unigram']:.3f} nats on dev; uniform: "
             f"{protocol['uniform']:.3f}). Chosen: **{'/'.join(map(str, protocol['split']))}** (prelude / recurrent "
             "layer / coda)" + (f"; the paper's proportions, **{'/'.join(map(str, protocol['paper']))}**, are "
                                "reported beside it, outside the rule" if protocol["paper"] else "") + ". On dev:", ""]
    lines += table(["split", "full", "cut", "gap", "qualifies"],
                   [["/".join(map(str, r["split"])), f"{r['full']:.4f}", f"{r['cut']:.4f}", f"{r['gap']:.4f}",
                     "yes" if r["gap"] >= protocol["gap_bar"] and r["cut"] < protocol["unigram"] else "no"]
                    for r in protocol["ladder"]])
    lines += ["", f"- **Test split**: {DEV_FRACTION:.0%} of the files are dev, {TEST_FRACTION:.0%} test (by a hash of "
              f"each file). Every evaluation scores at most {protocol['per_document']} windows of {sizes['seq_len']} "
              f"tokens of each file, spaced evenly over it: {scored['tokens']:,} test tokens from {scored['documents']} "
              f"documents, the largest {scored['max_share']:.1%} of them, **{scored['effective_documents']:.0f} "
              "effective documents** (1 / sum of squared token shares).",
              f"- **Learning rates**, one pilot per arm on the dev split (seed 0, {spec['pilot_steps']} steps), over "
              f"{', '.join(f'{lr:g}' for lr in FIRST_RATES['gated'])} (arms with the gate) or "
              f"{', '.join(f'{lr:g}' for lr in FIRST_RATES['lora'])} (LoRA arms), extended by x3 towards the best "
              "until the best is inside what was tried. The FLOP-matched LoRA takes plain LoRA's; the combined arm "
              "takes the dynamic arm's for its Controller and LoRA on the coda's lr and rank for its adapters. Dev loss "
              "(**best**):", ""]
    rows = []
    for group in pilot_groups(spec, protocol):
        lr = protocol["lrs"].get(group)  # None: its pilots are not finished
        # The lrs with a finished seed-0 pilot, in grid order; the chosen one in bold.
        tried = sorted(x for x in LR_GRID if 0 in b["pilot_groups"].get(f"pilot-{group}-lr{x:g}", {}))
        cells = {x: arm_loss(b["pilot_groups"][f"pilot-{group}-lr{x:g}"][0]) for x in tried}
        rows.append([label(group), " ".join(("**" if x == lr else "") + f"{x:g}: {cells[x]:.4f}" + ("**" if x == lr else "")
                                            for x in tried) + ("" if lr else " (pilots not finished)")])
    lines += table(["arm", "lr: dev loss"], rows)
    if length is None:
        return lines + ["", "- **Training length**: the length rule's run is not finished yet.", ""]
    checks = ", ".join(f"T = {c['steps']}: {c['gain']:+.4f} ({c['share']:.1%})" for c in length["checks"])
    lines += ["", f"- **Training length**, by the rule fixed first: the dynamic arm at its lr trained {spec['max_steps']} "
              f"steps with dev scored every {max(1, spec['max_steps'] // 10)}; the grid's length is the smallest T of "
              f"2/5, 3/5, 4/5, 1 x {spec['max_steps']} whose dev loss fell by less than {LENGTH_RULE:.0%} of the dev gap "
              f"from 3T/4 to T. Dev-loss gains: {checks}. **{length['steps']} steps**"
              + (f": the rule was not met within the budget ({spec['max_steps']} steps is the most this base's grid "
                 "can afford here), so the runs are shorter than the rule asks" if length["budget_bound"] else "") + ".",
              f"- **Every run**: {length['steps']} optimizer steps of {sizes['batch_size']} windows of {sizes['seq_len']} "
              f"tokens ({length['steps'] * sizes['batch_size'] * sizes['seq_len']:,} tokens), warmup 10%, cosine to 10%, "
              "AdamW (0.9, 0.95), weight decay 0.01, clip 1.0, fp32; the FLOP-matched LoRA "
              f"{round(length['steps'] * protocol['flop_ratio'])} steps ({protocol['flop_ratio']:.2f}x, the dynamic "
              "arm's training FLOPs per token over plain LoRA's). Seeds " + ", ".join(
                  map(str, SEEDS if not protocol["quick"] else SEEDS[:1])) + ": a seed fixes the data order, depth "
              f"draws and initialisation, the same for every arm. LoRA ranks matched to the "
              f"{protocol['ranks']['dynamic_used']:,} parameters the dynamic arm uses at depth 4: rank "
              f"{protocol['ranks']['lora-cut']} on every kept layer, {protocol['ranks']['lora-coda']} on the coda, "
              f"{protocol['ranks']['lora-full']} on every layer of the full model.",
              f"- **Wall time**: {fmt_time(sum(b['timing'].values()) + protocol['base'].get('seconds', 0.0))}, summed "
              "from timing.json" + (" and the base's pretraining" if "seconds" in protocol["base"] else "") + " over "
              "the sittings that ran it, on 2-core CPUs that other work sometimes shared: what the study cost, not a "
              "speed.", ""]
    return lines


def arm_table(b: dict) -> list[str]:
    full, cut, adapted = b["full"], b["cut"], b["adapted"]
    rows = []
    for group, seeds in b["groups"].items():
        losses = np.array([arm_loss(run) for run in seeds.values()])
        first = next(iter(seeds.values()))
        stats, row = first["stats"], first["rows"][0]
        spread = f" +- {losses.std(ddof=1):.4f}" if len(losses) > 1 else ""
        # A -paper arm is measured against the full and cut rows of its own cut, not the rule's.
        ref = b["untrained"]["/".join(map(str, b["protocol"]["paper"]))]["test"] if group.endswith("-paper") else None
        c, f = (ref[1]["loss"], ref[0]["loss"]) if ref else (cut, full)
        # Two references. Gap recovered (towards the full model) can pass 100%: an adapter also learns the study's
        # corpus. Of the adapted gap (towards LoRA on the full model, the same budget): how much of what the budget does
        # without the cut an arm reaches. '-' for a -paper arm: the formula's cut is the rule's.
        rows.append([label(group), len(losses), f"{row['trainable']:,}", f"{row['trainable_used']:,}",
                     f"{stats['tokens_seen']:,}", f"{stats['flops_per_token'] * stats['tokens_seen']:.2e}",
                     f"{losses.mean():.4f}{spread}", " ".join(f"{v:.4f}" for v in losses),
                     f"{100 * (c - losses.mean()) / (c - f):.1f}%",
                     f"{100 * (cut - losses.mean()) / (cut - adapted):.1f}%" if adapted is not None and not ref else "-"])
    # The untrained loops only at depth 4, the trained arms' depth; the other depths are in the depth table.
    for group, row in b["fixed"].items():
        if group.startswith("loop") and not group.endswith("depth4"):
            continue
        rows.append([label(group), "-", "0", "0", "0", "0", f"{row['loss']:.4f}", "-",
                     f"{100 * (cut - row['loss']) / (cut - full):.1f}%",
                     f"{100 * (cut - row['loss']) / (cut - adapted):.1f}%" if adapted is not None else "-"])
    return table(["arm", "seeds", "trainable", "used", "tokens", "training FLOPs", "test loss mean +- std", "per seed",
                  "gap recovered", "of the adapted gap"], rows)


def comparison_table(results: dict, gap: float) -> list[str]:
    rows = [[f"{label(a)} - {label(b)}", " ".join(f"{d:+.4f}" for d in r["per_seed"]), f"{r['mean']:+.4f}",
             f"[{r['lo']:+.4f}, {r['hi']:+.4f}]", f"{100 * r['mean'] / gap:+.1f}%", said((a, b), r)]
            for (a, b), r in results.items()]
    return table(["A - B", "per seed", "mean", "95% interval (seeds and documents resampled)", "of the gap", "verdict"],
                 rows)


def depth_curves(b: dict) -> dict:
    """{name: {depth: test loss}}: runs trained at depth 1 or 4 scored at other depths (seed 0), and the untrained loops."""
    curves = {}
    for group, seeds in b["groups"].items():
        # Seed 0's extra evaluations: the depth-curve files only, not the causal rescore.
        for file, (rows, _) in seeds.get(0, {}).get("extra", {}).items():
            if file.startswith("results-depths"):
                # a row's name ends in its depth: '..., depth 8' -> 8
                curves[label(group)] = {int(r["name"].rsplit(" ", 1)[1]): r["loss"] for r in rows}
    for loop, (what, _) in LOOPS.items():
        # the loops' fixed rows: loop-plain-depth1, loop-plain-depth2, ...
        curves[what] = {int(g.rsplit("depth", 1)[1]): r["loss"] for g, r in b["fixed"].items() if g.startswith(loop)}
    return curves


def depth_lines(b: dict) -> list[str]:
    curves = depth_curves(b)
    depths = sorted({d for c in curves.values() for d in c})
    return ["### Depth: trained runs (seed 0) and the untrained loops scored at other depths", ""] + table(
        ["run", *[f"depth {d}" for d in depths]],
        [[name, *[f"{c[d]:.4f}" if d in c else "-" for d in depths]] for name, c in curves.items()]) + [""]


def leak_lines(groups: dict) -> list[str]:
    run = groups.get("meanpool", {}).get(0)
    if run is None or "results-pool-causal.json" not in run["extra"]:  # not run, or not rescored yet
        return []
    # extra: (rows, per-document losses); rows[0]: the arm at its training depth
    causal = run["extra"]["results-pool-causal.json"][0][0]["loss"]
    mean = arm_loss(run)
    lines = ["### The leak: the whole-sequence mean pool", "",
             f"Trained with the whole-sequence mean pool (seed 0), scored with it: **{mean:.4f}**; the same weights "
             f"scored with the causal pool, which cannot see later tokens: **{causal:.4f}** ({causal - mean:+.4f})."]
    if 0 in groups.get("dynamic", {}):
        lines.append(f"The dynamic Controller trained with the causal pool (seed 0): {arm_loss(groups['dynamic'][0]):.4f}.")
    lines.append("A score with the mean pool reads each window's later tokens through the Controller, so its loss is "
                 "not a next-token loss; the causal score is the honest one.")
    return lines + [""]


# Colours by family: the method's arms in blues, plain LoRA in oranges, the combined arm purple, rows without
# training in greys.
FAMILY = {"none": "#9ecae1", "static": "#4292c6", "dynamic": "#08306b", "blind": "#6baed6", "nogate": "#c6dbef",
          "meanpool": "#2171b5", "lora-cut": "#e6550d", "lora-cut-flops": "#fd8d3c", "lora-coda": "#fdae6b",
          "lora-full": "#a63603", "dynamic-coda": "#756bb1"}


def colour(group: str) -> str:
    return FAMILY.get(arm_of(group)[0], "#969696")  # grey: the rows without training


def line_style(group: str) -> dict:
    """matplotlib keywords of a group's curve: its family's colour; an arm trained at depth 1 dotted, open markers."""
    if arm_of(group)[1] == "-depth1":
        return dict(color=colour(group), ls=":", mfc="white")
    return dict(color=colour(group), ls="-")


def off_scale(ax, xy: tuple, marker: str, colour: str, text: str, offset: tuple, **text_style) -> None:
    """A point beyond the frame: a marker on its edge at xy, labelled with its value(s) (offset in points)."""
    ax.plot(*xy, marker, color=colour, ms=7, clip_on=False)
    ax.annotate(text, xy, textcoords="offset points", xytext=offset, fontsize=7, **text_style)


def figures(b: dict, where: Path) -> list[str]:
    if plt is None:
        raise RunError("the study's figures need matplotlib: pip install -r requirements-dev.txt")
    where.mkdir(parents=True, exist_ok=True)
    full, cut, gap, plots = b["full"], b["cut"], b["gap"], {}
    share = lambda loss: 100 * (cut - loss) / gap  # noqa: E731
    # 1. gap recovered per arm, one dot per seed, on a scale set by the bulk of the arms; outliers at the edge
    entries = [(label(g), [share(arm_loss(r)) for r in s.values()], colour(g)) for g, s in b["groups"].items()
               if not g.endswith("-paper")]  # another cut: another gap
    entries += [(label(g), [share(r["loss"])], "#969696") for g, r in b["fixed"].items()
                if g.startswith("loop") and g.endswith("depth4")]  # the untrained loops, in grey
    values = sorted(v for _, vs, _ in entries for v in vs)
    # The middle 80% of the dots plus a margin, never narrower than -10..110% and always wide enough for the adapted
    # full model: every reference shows, and an arm far off (a divergence) does not squash the rest into a line.
    adapted = share(b["adapted"]) if b["adapted"] is not None else 100.0
    lo = min(-10.0, np.percentile(values, 10) - 10) if values else -10.0
    hi = max(110.0, adapted + 10, np.percentile(values, 90) + 10) if values else 110.0
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(entries) + 1.4))
    for y, (name, vs, c) in enumerate(entries):
        inside = [v for v in vs if lo <= v <= hi]
        ax.plot(inside, [y] * len(inside), "o", color=c, ms=5, alpha=0.8)
        for side, off in ((-1, [v for v in vs if v < lo]), (1, [v for v in vs if v > hi])):
            if off:  # off the scale: one marker at the edge, labelled with the values (one per seed)
                off_scale(ax, (lo if side < 0 else hi, y), "<" if side < 0 else ">", c,
                          " ".join(f"{v:.0f}%" for v in off), (8 * -side, 4), ha="left" if side < 0 else "right")
        if inside:
            ax.plot(np.mean(vs), y, "|", color="black", ms=12)  # the mean over seeds
    ax.axvline(0, color="red", ls="--", lw=1, label="cut baseline")
    ax.axvline(100, color="green", ls="--", lw=1, label="full model")
    if b["adapted"] is not None:  # a lora-full run has finished
        ax.axvline(adapted, color="#a63603", ls=":", lw=1, label="LoRA on the full model (mean)")
    ax.set_xlim(lo, hi)
    ax.set_yticks(range(len(entries)), [e[0] for e in entries], fontsize=7)
    ax.invert_yaxis()  # the first entry at the top
    ax.set_xlabel("gap recovered on test (%): (cut - arm) / (cut - full)", fontsize=8)
    ax.set_title(f"{b['spec']['title']}: gap recovered (dots: seeds, bar: mean)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    plots["gap_recovered.png"] = fig
    # 2. dev loss during training (seed 0), by family colour, scaled to the full-to-cut range
    fig, ax = plt.subplots(figsize=(10, 4.5))
    curves = {}  # group -> [(step, dev loss)]
    # The chosen cut's references on dev, from the ladder: the curves are dev losses too.
    dev = next(r for r in b["protocol"]["ladder"] if r["split"] == b["protocol"]["split"])
    lowest = dev["full"]  # the lowest dev loss drawn: the bottom of the frame
    for g, seeds in b["groups"].items():
        run = seeds.get(0)  # only seed 0 has a dev curve (arm_flags' curve)
        if run is None or g.endswith("-paper"):
            continue
        # metrics.jsonl: a record per logged step; those with dev_loss are the --eval-every points.
        log = [json.loads(line) for line in run["metrics"].read_text().splitlines()]
        points = [(p["step"], p["dev_loss"]) for p in log if "dev_loss" in p]
        if points:
            curves[g] = points
            lowest = min([lowest, *(loss for _, loss in points)])
    span = dev["cut"] - dev["full"]
    # From just below the lowest curve (adapters that learn the corpus pass the full model) to half a gap above the
    # cut, room for the looped arms' early points (they start above it).
    bottom, top = min(lowest, dev["full"]) - 0.15 * span, dev["cut"] + 0.5 * span
    for g, points in curves.items():
        line, = ax.plot(*zip(*points), marker="o", ms=3, label=label(g), lw=1.2, **line_style(g))
        if all(loss > top for _, loss in points):  # a curve wholly above the frame (a divergence): its last point
            last_step, last_loss = points[-1]
            off_scale(ax, (last_step, top), "^", line.get_color(), f"{label(g)}: {last_loss:.2f}", (-8, -12),
                      ha="right")
    ax.axhline(dev["full"], color="green", ls="--", lw=1, label="full model (dev)")
    ax.axhline(dev["cut"], color="red", ls="--", lw=1, label="cut baseline (dev)")
    ax.set_ylim(bottom, top)
    ax.set(xlabel="optimizer step (dev scored every fifth of the run, before its last step)", ylabel="dev loss (nats)")
    ax.set_title(f"{b['spec']['title']}: dev loss during training (seed 0)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the frame: it hides no curve
    plots["dev_loss.png"] = fig
    # 3. loss against the evaluation depth
    fig, ax = plt.subplots(figsize=(10, 4.5))
    # From half a gap below the full model to a gap above the cut; a point beyond the top (a loop that blows up) is
    # drawn at the edge with its value.
    bottom, top = full - 0.5 * gap, cut + gap
    # The trained arms as in the dev-loss plot, the untrained loops dashed in greys with square markers.
    styles = {label(g): dict(marker="o", **line_style(g)) for g in b["groups"]} | {
        what: dict(marker="s", ls="--", color=grey) for (what, _), grey in zip(LOOPS.values(), ("#969696", "#525252"))}
    for name, c in depth_curves(b).items():
        depths = sorted(c)
        line, = ax.plot(depths, [c[d] for d in depths], label=name, **styles[name])
        for d in depths:
            if c[d] > top:  # off the scale: a marker on the top edge, with the value
                off_scale(ax, (d, top), "^", line.get_color(), f"{c[d]:.2f}", (6, -12), color=line.get_color())
    ax.axhline(cut, color="red", ls="--", lw=1, label="cut baseline")
    ax.axhline(full, color="green", ls="--", lw=1, label="full model")
    ax.set_ylim(bottom, top)
    # log scale: the depths double
    ax.set(xscale="log", xlabel="evaluation depth", ylabel="test loss (nats)")
    ax.set_title(f"{b['spec']['title']}: test loss against evaluation depth", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the frame: it hides no point
    plots["depth.png"] = fig
    # 4. the paired differences, as shares of the gap
    results = b["results"]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(results) + 1.5))
    # The scale: -110..110% of the gap (every arm-vs-arm row of the study fits); a row beyond it (a comparison with
    # an untrained loop that blows up) is an arrow at the edge with its mean, so that it squashes nothing.
    lo, hi = -110.0, 110.0
    for y, ((a, c), r) in enumerate(results.items()):
        # In shares of the test gap, as the margin is; the bar: the 95% interval, the black dots: the seeds.
        mean, low, high = (100 * r[k] / gap for k in ("mean", "lo", "hi"))
        if lo <= mean <= hi:
            ax.errorbar(mean, y, xerr=[[mean - max(low, lo)], [min(high, hi) - mean]], fmt="o", capsize=3,
                        color=colour(a))
            ax.plot([100 * v / gap for v in r["per_seed"]], [y] * len(r["per_seed"]), "k.", ms=3)
        else:
            off_scale(ax, (lo if mean < lo else hi, y), "<" if mean < lo else ">", colour(a), f"{mean:.0f}%",
                      (8 if mean < lo else -8, 4), ha="left" if mean < lo else "right")
    ax.set_xlim(lo, hi)
    ax.axvline(0, color="gray")
    for m in (-100 * PRACTICAL, 100 * PRACTICAL):  # the verdicts' margin
        ax.axvline(m, color="gray", ls=":", lw=1)
    short = lambda g: label(g).replace(", depth 4", "")  # noqa: E731  (depth 4 unless the label says otherwise)
    ax.set_yticks(range(len(results)), [f"{short(a)} - {short(c)}" for a, c in results], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("A - B as a share of the gap (%), 95% interval; dotted: the practical margin", fontsize=8)
    ax.set_title(f"{b['spec']['title']}: A - B (negative: A is better)", fontsize=9)
    plots["paired_differences.png"] = fig
    for name, fig in plots.items():
        fig.tight_layout()
        if name == "paired_differences.png":  # its labels name two arms each: room for them on the left
            fig.subplots_adjust(left=0.42)
        atomic_write(where / name, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
    return list(plots)


# ----------------------------------------------------------------------------------------------------------
# One base, from its protocol to its last run.

def base_dir(opts) -> tuple[str, Path]:
    # results/<name>: 'model' for --model, 'small' for --quick (it pretrains a tiny small base), else the base.
    name = "model" if opts.model else "small" if opts.quick else opts.base
    return name, Path(opts.out) / "results" / name


def describe_base(opts, model_dir: Path) -> dict:
    cfg = load_config(model_dir)
    shape = f"{cfg.num_hidden_layers} layers, d = {cfg.hidden_size}, vocabulary {cfg.vocab_size:,}"
    if opts.model:
        return dict(what=f"the checkpoint {opts.model} ({shape}), data {opts.data}")
    if opts.base == "smollm2" and not opts.quick:
        return dict(what=f"SmolLM2-135M-Instruct, a Llama ({shape}), pretrained and instruction-tuned by its authors, "
                         "converted from its GGUF file by `python smollm2.py`; data: the standard library's source, "
                         "which it was not tuned on")
    state = read_checkpoint(model_dir.parent / "pretrain")[0]  # the pretraining's last state
    return dict(seconds=state.get("seconds", 0.0), what=(
        f"the demo's Qwen2 ({shape}) pretrained from scratch with the demo's recipe for **{state['step']} steps** of "
        f"{DEMO_PRETRAIN['batch_size']} x {DEMO_PRETRAIN['seq_len']} tokens "
        f"({state['step'] * DEMO_PRETRAIN['batch_size'] * DEMO_PRETRAIN['seq_len'] / 1e6:.2f}M tokens), "
        f"lr {DEMO_PRETRAIN['lr']:g}, in fp32, in {fmt_time(state.get('seconds', 0.0))}, on the training split of the "
        "standard library's source"))


def study_base(opts, device) -> dict:
    """Runs (or, with --report, only reads) one base's study; returns what its part of RESULTS.md needs."""
    name, res = base_dir(opts)
    spec, runs_dir = base_spec(opts), res / "runs"
    # Stages an earlier invocation finished are read back, never redone.
    protocol, untrained = read_results(res, "protocol.json"), read_results(res, "untrained.json")
    timing = read_results(res, "timing.json") or {}
    # A --quick study and a real one must not share a directory: their runs would mix under one protocol.
    if protocol is not None and protocol["quick"] != opts.quick:
        raise RunError(f"{res} holds a study {'with' if protocol['quick'] else 'without'} --quick; pass another --out")
    base = dict(name=name, spec=spec, protocol=protocol, untrained=untrained, timing=timing, res=res, pilots={},
                runs={}, length=None)
    if opts.report and (protocol is None or untrained is None):
        return base  # not started: RESULTS.md says so
    model_dir = None  # loaded (converted, pretrained) only when a stage needs it
    save = lambda file, value: atomic_write(res / file, lambda f: f.write_text(json.dumps(value, indent=1)))  # noqa: E731
    # The protocol (cut, cap, references, ranks), measured and saved before any arm trains.
    if protocol is None:
        t = time.time()
        model_dir = base_model(opts, device)
        protocol = measure_ladder(opts, device, model_dir, spec) | dict(quick=opts.quick, base=describe_base(opts, model_dir))
        protocol["ranks"] = matched_ranks(model_dir, protocol["split"])
        protocol["ranks_paper"] = matched_ranks(model_dir, protocol["paper"]) if protocol["paper"] else None
        timing["protocol"] = time.time() - t
        res.mkdir(parents=True, exist_ok=True)
        save("timing.json", timing)
        save("protocol.json", protocol)
    # The rows without training, saved once: every comparison with cut, full or a loop reads them.
    if untrained is None:
        t = time.time()
        model_dir = model_dir or base_model(opts, device)
        untrained = untrained_rows(opts, device, model_dir, protocol)
        timing["untrained rows"] = time.time() - t
        save("timing.json", timing)
        save("untrained.json", untrained)
    base.update(protocol=protocol, untrained=untrained)

    def stage(what: str, runs: dict) -> bool:
        """Runs what is unfinished; False when something is (only with --report, which trains nothing)."""
        nonlocal model_dir
        if all(finished(runs_dir / n, e) for n, (_, e) in runs.items()):
            return True
        if opts.report:
            return False
        model_dir = model_dir or base_model(opts, device)  # the base only when a run needs it
        print(f"\n{name}, {what}: {len(runs)} runs in {runs_dir}", flush=True)
        run_grid(runs, opts, runs_dir, model_dir, timing)
        return True

    while True:  # the pilots, extended until every arm's best learning rate is inside its candidates
        pilots, lrs = pilot_state(spec, protocol, runs_dir)  # read from the run directories each time
        base.update(pilots=pilots, protocol=protocol | dict(lrs=lrs))
        if len(lrs) == len(pilot_groups(spec, protocol)):  # every group's lr chosen
            break
        if not stage("learning-rate pilots", pilots):
            return base  # --report: the report shows the pilots so far
    stats = lambda group: read_results(runs_dir / pilot_name(group, lrs[group]), "stats.json")  # noqa: E731
    # The FLOP ratio from the chosen pilots' stats (FLOPs per token do not depend on the length); derived each
    # time from the runs, not saved in protocol.json.
    protocol = protocol | dict(lrs=lrs, flop_ratio=stats("dynamic")["flops_per_token"] / stats("lora-cut")["flops_per_token"])
    base["protocol"] = protocol
    # The length run needs the dynamic arm's lr, so it comes after the pilots; the grid needs its length.
    if not stage("length rule", length_run(protocol, spec, lrs)):
        return base
    # The rule's scale is the dev gap: no test loss chooses anything in the protocol.
    dev_gap = next(r["gap"] for r in protocol["ladder"] if r["split"] == protocol["split"])
    base["length"] = chosen_length(runs_dir / "length-dynamic-s0", spec["max_steps"], dev_gap)
    base["runs"] = grid(spec, protocol, lrs, base["length"]["steps"], opts.quick)
    if stage("grid", base["runs"]) and not opts.report:  # False under --report with runs unfinished
        print(f"{name}: all {len(base['runs'])} grid runs and their pilots are finished, nothing left to train",
              flush=True)
    return base


def study(opts) -> int:
    device = pick_device(opts.device)
    # One base if named (--model and --quick are one), else both in BASES' order: SmolLM2 first.
    names = [opts.base] if opts.base or opts.model or opts.quick else list(BASES)
    done = []
    for name in names:
        opts.base = name  # run_args and base_spec read the current base from opts
        done.append(study_base(opts, device))
    if not any(b["protocol"] for b in done):
        raise RunError(f"{Path(opts.out) / 'results'} holds no study yet; run python study.py first")
    write_report(Path(opts.out), done, "python study.py" + (" --quick" if opts.quick else ""))
    return 0


def parse_ladder(text: str) -> list[tuple[int, int, int]]:
    try:
        rungs = [tuple(int(x) for x in rung.split("/")) for rung in text.split(",")]
    except ValueError:
        rungs = []
    if not rungs or any(len(r) != 3 for r in rungs):
        raise RunError(f"--ladder {text!r}: pass cuts like 8/18/8,4/18/8 (prelude/recurrent layer/coda), mildest first")
    return rungs


def main(argv: list[str] | None = None) -> int:
    p = Parser(description="The study: the paper's claims re-measured on held-out text, with seeds, on two bases; "
                           "writes RESULTS.md and its figures. Resumable: run it again to continue.")
    p.add_argument("--base", choices=list(BASES), help="one base only (default: both, smollm2 first)")
    p.add_argument("--model", help="another checkpoint (a directory or a hub id) instead of the two bases")
    p.add_argument("--data", help="with --model: the data (as train.py's --data); default: the demo's corpus")
    p.add_argument("--out", default=".", help="RESULTS.md goes here, the runs and figures under results/")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed, a few steps: checks the whole chain")
    p.add_argument("--report", action="store_true", help="only rebuild RESULTS.md and the figures from finished runs")
    p.add_argument("--ladder", help="with --model: the cuts to try, mildest first, e.g. 8/18/8,4/18/8,8/18/4")
    p.add_argument("--pretrain-steps", type=int, help=f"the small base's pretraining (default {PRETRAIN_STEPS}; "
                                                       f"--quick: {QUICK_PRETRAIN_STEPS})")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    try:
        opts = p.parse_args(argv)
        if opts.model and (opts.data is None or opts.out == "."):
            raise RunError("--model needs --data (the text to train and score on) and --out (a directory of its own)")
        if opts.pretrain_steps is None:
            opts.pretrain_steps = QUICK_PRETRAIN_STEPS if opts.quick else PRETRAIN_STEPS
        if opts.pretrain_steps < 1:
            raise RunError(f"--pretrain-steps {opts.pretrain_steps} is invalid; pass a value >= 1")
        opts.ladder = parse_ladder(opts.ladder) if opts.ladder else None  # [(prelude, rec, coda)]
        return study(opts)
    except (RunError, DataError, CheckpointError, ConfigError) as e:  # the user's to fix: one line
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: python study.py again continues where it stopped", file=sys.stderr)
        return 130  # 128 + SIGINT


if __name__ == "__main__":
    sys.exit(main())
