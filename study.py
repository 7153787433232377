"""The study: every claim of the paper re-measured on held-out text, with seeds, through train.py's own code.

    python study.py                                      the whole grid on the demo's base (resumable), RESULTS.md
    python study.py --report                             RESULTS.md and its figures from the finished runs alone
    python study.py --model DIR --data PATH --out DIR    the same grid on a real checkpoint (a GPU)
    python study.py --quick --out DIR                    tiny sizes, one seed, a few steps: the whole chain

Read top to bottom: the protocol (fixed before any arm trains), the base and the rule that picks its cut, the
learning-rate pilots, the grid, running it, then the statistics, the verdicts, and RESULTS.md with its figures.
Every run is an ordinary train.py run in OUT/results/runs/<name>; a finished one (its results files exist) is never
trained again, an interrupted one resumes from its checkpoint.
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

import train
from controller import ConfigError, Ouroboros
from data import DataError, splits as data_splits, token_cache
from demo import DEMO_ARM, DEMO_BASE, DEMO_PRETRAIN, demo_base
from load_qwen import CheckpointError, atomic_write, load_config, load_tokenizer
from model import PROJECTIONS, Decoder
from runs import CHECKPOINT, Parser, RunError, fmt_time, pick_device, read_checkpoint

try:  # a study-only requirement (requirements-dev.txt), like transformers is test-only
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

# ----------------------------------------------------------------------------------------------------------
# The protocol. Fixed here, before any arm trains; changing it means a new study, not a re-run.

SEEDS = (0, 1, 2)  # a seed fixes data order, depth draws and initialisation, the same for every arm: paired
GAP_BAR = 0.5  # nats: the cut must cost at least this much on dev. Never lowered: pretrain longer instead
PRACTICAL = 0.05  # differences under 5% of the full-to-cut gap are no practical difference
LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)  # the pilots' candidates, the paper's 3e-4 first
RESAMPLES = 2000  # bootstrap resamples of test documents for every interval
PRETRAIN_STEPS = 2880  # the demo's recipe (demo.DEMO_PRETRAIN), 2,880 steps, on an 8-layer sibling of its base
STUDY_BASE = {**DEMO_BASE, "num_hidden_layers": 8}
DEPTH_CURVE = (1, 2, 4, 8, 16)
# train.py flags of every run of the grid; the 4x longer runs multiply steps (and warmup, eval and save every).
SIZES = {"study": dict(steps=200, batch_size=8, seq_len=256, grad_accum=1, warmup=20, eval_windows=512,
                       eval_every=50, log_every=25, save_every=50, dev_fraction=0.05, test_fraction=0.1),
         "quick": dict(steps=4, batch_size=2, seq_len=32, grad_accum=1, warmup=1, eval_windows=4, eval_every=2,
                       log_every=2, save_every=2, dev_fraction=0.15, test_fraction=0.2)}
QUICK_PRETRAIN_STEPS = 3

# The arms: label, learning-rate family, train.py flags. Matched LoRA ranks are filled in by the protocol.
ARMS = {
    "none": ("gate + norm only", "gated", ["--controller", "none"]),
    "static": ("static per-step LoRA", "gated", ["--controller", "static"]),
    "dynamic": ("dynamic Controller", "gated", ["--controller", "dynamic"]),
    "blind": ("input-blind Controller", "gated", ["--controller-input", "none"]),
    "lora-cut": ("LoRA on the cut, no recurrence", "lora", ["--controller", "none", "--no-gate", "--no-step-norm",
                                                            "--depth", "1", "--lora-layers", "all"]),
    "lora-coda": ("LoRA on the coda, no recurrence", "lora", ["--controller", "none", "--no-gate", "--no-step-norm",
                                                              "--depth", "1", "--lora-layers", "coda"]),
    "dynamic-coda": ("dynamic Controller + LoRA on the coda", "gated", ["--lora-layers", "coda"]),
    "nogate": ("dynamic Controller, no gate", "gated", ["--no-gate"]),
    "meanpool": ("dynamic Controller, whole-sequence mean pool", "gated", ["--pool", "mean"]),
}
CORE = ["none", "static", "dynamic", "blind", "lora-cut", "lora-coda", "dynamic-coda"]  # depth 4, every seed
DEPTH_ONE = ["none", "static", "dynamic"]  # the paper's headline depth, every seed
EXPLORATORY = ["nogate", "meanpool"]  # depth 4, seed 0
LONG = ["none", "static", "dynamic"]  # depth 4, seed 0, 4x the steps


def ladder(n_layers: int) -> list[tuple[int, int, int]]:
    """(prelude, recurrent layer, coda) from the mildest cut to the harshest: the paper's split, then a shorter
    prelude, a shorter coda, both. For 8 layers: 2/4/2, 1/4/2, 2/4/1, 1/4/1."""
    p, rec, c = train.paper_split(n_layers)
    return list(dict.fromkeys([(p, rec, c), (max(p // 2, 1), rec, c), (p, rec, max(c // 2, 1)),
                               (max(p // 2, 1), rec, max(c // 2, 1))]))


# ----------------------------------------------------------------------------------------------------------
# The base and its cut.

def base_model(opts, device) -> Path:
    """--model, or the demo's base pretrained PRETRAIN_STEPS steps (cached like the demo's: pretrained once)."""
    if opts.model:
        return Path(opts.model)
    args = run_args([], opts)
    # The base's recipe is the demo's, pretrained under bf16 autocast as the demo's is on this machine; its
    # weights are saved in fp32, and every row of the study (full, cut, arms) is trained and scored in fp32.
    args.pretrain_steps, args.precision = opts.pretrain_steps, "bf16"
    return demo_base(args, token_cache(None), device, train.train, STUDY_BASE)


def measure_ladder(opts, device, model_dir: Path) -> dict:
    """Full and cut loss of every rung of the ladder on the dev split, the uniform and unigram losses, and
    the rule's choice: the first rung whose cut costs >= GAP_BAR nats on dev while the cut still beats the
    unigram model (it still uses context). Also the test documents' token counts, for the intervals."""
    rungs, n_layers = [], load_config(model_dir).num_hidden_layers
    for p, rec, c in opts.ladder or ladder(n_layers):
        args = run_args(["--model", str(model_dir), "--n-prelude", str(p), "--recurrent-layer", str(rec),
                         "--n-coda", str(c), "--steps", "0"], opts)
        qcfg, model = train.prepare_arm(args, device)
        windows = data_splits(args.data, load_tokenizer(model_dir), qcfg.vocab_size, args.seq_len, args.seed,
                              args.dev_fraction, args.test_fraction, token_cache(None))
        full, cut = train.table_rows(model, windows["dev"], args, device, arms=False)
        rungs.append(dict(split=[p, rec, c], full=full["loss"], cut=cut["loss"], gap=cut["loss"] - full["loss"]))
        print(f"ladder {p}/{rec}/{c}: dev loss full {full['loss']:.4f}, cut {cut['loss']:.4f}, "
              f"gap {rungs[-1]['gap']:.4f}", flush=True)
    train_ids, dev_ids = windows["train"].tokens, windows["dev"].tokens[1:]
    counts = np.bincount(train_ids, minlength=qcfg.vocab_size) + 1.0  # add-one: every token possible
    unigram = float(-np.log(counts[dev_ids] / counts.sum()).mean())
    bar = 0.0 if opts.quick else GAP_BAR  # --quick checks the chain, not the numbers
    chosen = choose_cut(rungs, unigram, bar, enforce=not opts.quick)
    test = windows["test"]
    tokens = np.bincount(test.target_documents(test.spread(args.eval_windows)).flatten().numpy())
    return dict(ladder=rungs, uniform=math.log(qcfg.vocab_size), unigram=unigram, split=chosen["split"],
                gap_bar=bar, test_tokens_per_document=tokens.tolist(), vocab_size=qcfg.vocab_size)


def choose_cut(rungs: list[dict], unigram: float, bar: float, enforce: bool = True) -> dict:
    """The rule: the first rung (mildest first) whose cut costs >= bar nats on dev and still beats the unigram
    loss; with enforce False (--quick) the first rung whatever its numbers."""
    chosen = next((r for r in rungs if r["gap"] >= bar and r["cut"] < unigram), None if enforce else rungs[0])
    if chosen is None:
        raise RunError(f"no cut of the ladder costs >= {bar} nats on dev while the cut still beats the unigram loss "
                       f"({unigram:.3f}); pretrain the base longer (--pretrain-steps), never lower the bar")
    return chosen


def matched_ranks(model_dir: Path, split) -> dict:
    """LoRA ranks whose adapters have as many trainable parameters as the dynamic arm uses at depth 4 (counted
    on the meta device: no weights read)."""
    qcfg = load_config(model_dir)
    args = train.build_parser().parse_args(["--n-prelude", str(split[0]), "--recurrent-layer", str(split[1]),
                                            "--n-coda", str(split[2]), "--depth", "4"])
    cfg = train.ouroboros_config(args, qcfg.num_hidden_layers)
    prelude, rec, coda, _ = cfg.split(qcfg.num_hidden_layers)
    with torch.device("meta"):
        dynamic = Ouroboros(Decoder(qcfg, prelude + [rec] + coda), cfg, {k: (torch.empty(1), torch.empty(1))
                                                                      for k in PROJECTIONS})
        used = dynamic.parameters_used(4)
        per_rank = {}  # one rank of LoRA on every projection of a layer: in + out parameters each
        for layers, name in ((prelude + [rec] + coda, "lora-cut"), (coda, "lora-coda")):
            per_rank[name] = sum(sum(dynamic.base.get_parameter(f"model.layers.{i}.{p}.weight").shape)
                                 for i in layers for p in PROJECTIONS.values())
    return {name: max(1, round(used / n)) for name, n in per_rank.items()} | {"dynamic_used": used}


# ----------------------------------------------------------------------------------------------------------
# The grid: every run's name, train.py flags, and the evaluations of the finished run it needs.

def run_args(argv: list[str], opts) -> argparse.Namespace:
    """train.py's flags for one run: the study's sizes, then argv; --data None is the demo's corpus."""
    parser = train.build_parser()
    parser.set_defaults(**DEMO_ARM)
    sizes = SIZES["quick" if opts.quick else "study"]
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in sizes.items()] + ["--precision", "fp32"]
    args = parser.parse_args(flags + (["--device", opts.device] if opts.device else []) + argv)
    args.data = opts.data
    return args


PILOTS = {"gated": "dynamic", "lora": "lora-cut"}  # the arm each family's learning rate is chosen on


def pilot_runs(protocol: dict, rates) -> dict:
    """The learning-rate pilots: seed 0, depth 4, the core length, scored on dev (--table-split dev) only."""
    return {f"pilot-{arm}-lr{lr:g}-s0": (arm_flags(arm, protocol, 4, 0, lr) + ["--table-split", "dev"], [])
            for arm in PILOTS.values() for lr in rates}


def chosen_lr(runs_dir: Path, rates) -> dict:
    """Per family, the pilot learning rate with the lowest dev loss (every pilot must be finished)."""
    best = {}
    for family, arm in PILOTS.items():
        losses = {lr: arm_loss(read_results(runs_dir / f"pilot-{arm}-lr{lr:g}-s0")) for lr in rates}
        best[family] = min(losses, key=losses.get)
    return best


def arm_flags(arm: str, protocol: dict, depth: int, seed: int, lr: float, scale: int = 1) -> list[str]:
    flags = list(ARMS[arm][2])
    if arm in ("lora-cut", "lora-coda"):
        flags += ["--lora-rank", str(protocol["ranks"][arm])]
    elif "--depth" not in flags:
        flags += ["--depth", str(depth)]
    p, rec, c = protocol["split"]
    flags += ["--n-prelude", str(p), "--recurrent-layer", str(rec), "--n-coda", str(c), "--seed", str(seed),
              "--lr", f"{lr:g}"]
    if scale > 1:
        sizes = SIZES["quick" if protocol["quick"] else "study"]
        flags += [f"--{k.replace('_', '-')}={sizes[k] * scale}" for k in ("steps", "warmup", "eval_every", "save_every")]
    return flags


def grid(protocol: dict, lrs: dict, quick: bool) -> dict:
    """name -> (train.py flags, [(results file, its --eval-only flags)]). A run's group is its name without
    the seed. Seed-major, so that a grid stopped half-way has every arm of the first seed."""
    runs = {}
    lr = lambda arm: lrs[ARMS[arm][1]]  # noqa: E731
    depths = ",".join(str(d) for d in DEPTH_CURVE if not quick or d <= 4)
    curve = [(f"results-depths-{depths.replace(',', '-')}.json", ["--eval-depths", depths])]
    for seed in SEEDS[:1] if quick else SEEDS:
        for arm in CORE:  # depth 4 (the LoRA arms without recurrence: depth 1, their flags say so)
            runs[f"{arm}-s{seed}"] = (arm_flags(arm, protocol, 4, seed, lr(arm)),
                                      curve if seed == 0 and arm in DEPTH_ONE else [])
        for arm in DEPTH_ONE:
            runs[f"{arm}-depth1-s{seed}"] = (arm_flags(arm, protocol, 1, seed, lr(arm)), curve if seed == 0 else [])
    for arm in EXPLORATORY:
        leak = [("results-pool-causal.json", ["--eval-pool", "causal"])] if arm == "meanpool" else []
        runs[f"{arm}-s0"] = (arm_flags(arm, protocol, 4, 0, lr(arm)), leak)
    for arm in LONG:
        runs[f"{arm}-long-s0"] = (arm_flags(arm, protocol, 4, 0, lr(arm), scale=4), [])
    return runs


# ----------------------------------------------------------------------------------------------------------
# Running the grid: resumable, with an ETA for all of it.

def train_py(argv: list[str], opts) -> None:
    """One train.py run in this process (its own checks, messages, checkpoints)."""
    args = run_args(argv, opts)
    if args.eval_only:
        args.data = None  # read from the run's own config.json
    if train.run(args):
        raise RunError(f"train.py {' '.join(argv)} failed")


def cost(flags: list[str], evals: list, steps: int) -> float:
    """A run's work in layer passes per window, for the ETA: training (forward and backward), then its tables."""
    get = lambda flag, default: int(flags[flags.index(flag) + 1]) if flag in flags else default  # noqa: E731
    steps = next((int(f.split("=")[1]) for f in flags if f.startswith("--steps=")), steps)
    layers = get("--n-prelude", 1) + get("--depth", 4) + get("--n-coda", 1)
    return 3 * steps * layers + 20 * layers + sum(5 * layers * len(extra[-1].split(",")) for _, extra in evals)


def run_grid(runs: dict, opts, out: Path, model_dir: Path, timing: dict) -> None:
    """Trains (or resumes) every unfinished run in out/<name>, then its evaluations; each run's wall time goes to
    timing.json beside out."""
    todo = [name for name, (_, evals) in runs.items() if not finished(out / name, evals)]
    steps = SIZES["quick" if opts.quick else "study"]["steps"]
    work = {name: cost(flags, evals, steps) for name, (flags, evals) in runs.items()}
    done_work, spent, t0 = 0.0, 0.0, time.time()
    for k, name in enumerate(todo):
        flags, evals = runs[name]
        print(f"\n[{k + 1}/{len(todo)} to run] {name}", flush=True)
        t = time.time()
        run_dir = out / name
        if not (run_dir / "results.json").is_file() or not (run_dir / CHECKPOINT).is_file():
            # No results, or results without the checkpoint an evaluation needs (a fresh clone): (re)train.
            resume = (run_dir / CHECKPOINT).is_file() and (run_dir / "config.json").is_file()
            train_py(["--model", str(model_dir), "--out", str(run_dir), "--resume" if resume else "--overwrite"]
                     + flags, opts)
        for file, extra in evals:
            if not (run_dir / file).is_file():
                train_py(["--out", str(run_dir), "--eval-only"] + extra, opts)
        timing[name] = timing.get(name, 0.0) + time.time() - t
        atomic_write(out.parent / "timing.json", lambda f: f.write_text(json.dumps(timing, indent=1)))
        done_work, spent = done_work + work[name], time.time() - t0
        left = sum(work[n] for n in todo[k + 1:])
        print(f"[{k + 1}/{len(todo)} to run] {name} done in {fmt_time(time.time() - t)}; this invocation "
              f"{fmt_time(spent)}, eta {fmt_time(spent / done_work * left)}", flush=True)


def finished(run_dir: Path, evals: list) -> bool:
    return all((run_dir / f).is_file() for f in ["results.json"] + [f for f, _ in evals])


def read_results(run_dir: Path, file: str = "results.json") -> list | None:
    try:
        return json.loads((run_dir / file).read_text())
    except (OSError, ValueError):
        return None


def arm_loss(rows: list | None) -> float | None:
    return rows[2]["loss"] if rows else None


# ----------------------------------------------------------------------------------------------------------
# Statistics. A group is the runs of one arm (one per seed). Losses are token-weighted means over test
# documents, so a per-document loss vector and the documents' token counts give back every loss exactly.

def collect(runs_dir: Path, runs: dict) -> dict:
    """group -> {seed: run}, each run: its results rows, per-document losses, stats and extra evaluations."""
    groups = {}
    for name, (_, evals) in runs.items():
        rows = read_results(runs_dir / name)
        if rows is None:
            continue
        group, seed = name.rsplit("-s", 1)
        documents = json.loads((runs_dir / name / "documents.json").read_text())
        stats = json.loads((runs_dir / name / "stats.json").read_text())
        extra = {file: (read_results(runs_dir / name, file), json.loads(
            (runs_dir / name / file.replace("results", "documents")).read_text())) for file, _ in evals
            if (runs_dir / name / file).is_file()}
        groups.setdefault(group, {})[int(seed)] = dict(rows=rows, documents=documents, stats=stats, extra=extra,
                                                       metrics=runs_dir / name / "metrics.jsonl")
    return groups


def doc_losses(run: dict, row: int = 2) -> np.ndarray:
    """Per-document test losses of one row of a run (nan where a document had no scored token)."""
    return np.array([np.nan if v is None else v for v in run["documents"][run["rows"][row]["name"]]])


def paired(a: np.ndarray, b: np.ndarray, tokens: np.ndarray, gap: float) -> dict:
    """A minus B, per seed and as a mean over seeds, with a 95% interval from resampling test documents (the
    same resample for every seed, so the pairing by seed and by document is kept). a, b: (seeds, documents)."""
    keep = tokens > 0
    diff, w = (a - b)[:, keep], tokens[keep].astype(float)
    per_seed = diff @ w / w.sum()  # each seed's loss(A) - loss(B), weighted by tokens like the losses
    idx = np.random.default_rng(0).integers(len(w), size=(RESAMPLES, len(w)))
    boot = (diff.mean(0)[idx] * w[idx]).sum(1) / w[idx].sum(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return dict(per_seed=per_seed.tolist(), mean=float(per_seed.mean()), lo=float(lo), hi=float(hi),
                verdict=verdict(per_seed, lo, hi, gap))


def verdict(per_seed: np.ndarray, lo: float, hi: float, gap: float) -> str:
    """'A' (A beats B: every seed lower, the interval below 0, by at least PRACTICAL of the gap), 'B' (the
    mirror), 'same' (no practical difference: the interval within +-PRACTICAL of the gap), else 'cannot tell'."""
    margin = PRACTICAL * gap
    if (per_seed < 0).all() and hi < 0 and -per_seed.mean() >= margin:
        return "A"
    if (per_seed > 0).all() and lo > 0 and per_seed.mean() >= margin:
        return "B"
    return "same" if -margin < lo and hi < margin else "cannot tell"


# (A, B): A's loss minus B's; "cut" is the cut baseline scored in A's runs.
COMPARISONS = [
    ("dynamic-depth1", "static-depth1"), ("dynamic", "static"), ("dynamic", "none"), ("static", "none"),
    ("dynamic", "blind"), ("dynamic", "lora-cut"), ("dynamic", "lora-coda"), ("dynamic-coda", "dynamic"),
    ("dynamic-coda", "lora-coda"), ("dynamic", "dynamic-depth1"), ("dynamic", "cut"), ("none", "cut"),
    ("dynamic-depth1", "cut"), ("lora-cut", "cut"), ("nogate", "cut"), ("nogate", "dynamic"),
    ("dynamic-long", "static-long"), ("dynamic-long", "none-long"), ("static-long", "none-long"),
]


def compare_groups(groups: dict, protocol: dict, gap: float) -> dict:
    tokens, results = np.array(protocol["test_tokens_per_document"]), {}
    for a, b in COMPARISONS:
        seeds = sorted(set(groups.get(a, {})) & (set(groups.get(a, {})) if b == "cut" else set(groups.get(b, {}))))
        if not seeds:
            continue
        A = np.stack([doc_losses(groups[a][s]) for s in seeds])
        B = np.stack([doc_losses(groups[a][s], 1) if b == "cut" else doc_losses(groups[b][s]) for s in seeds])
        results[(a, b)] = paired(A, B, tokens, gap) | {"seeds": seeds}
    return results


def label(group: str) -> str:
    if group == "cut":
        return "cut baseline"
    for suffix, words in (("-depth1", ", depth 1"), ("-long", ", depth 4, 4x longer")):
        if group.endswith(suffix):
            return ARMS[group[:-len(suffix)]][0] + words
    return ARMS[group][0] + ("" if ARMS[group][1] == "lora" else ", depth 4")


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
    ("All configurations converge to the same loss (depth 1 and 4 alike)", "5.073-5.082, 8 configurations",
     ("dynamic", "dynamic-depth1"), "same"),
    ("On held-out text the Controller does not beat the cut baseline", "stated, no number", ("dynamic", "cut"),
     "not A"),
    ("Adapting the coda is the fix for the held-out gap (the authors' proposal)", "proposed, not measured",
     ("dynamic-coda", "dynamic"), "A"),
]
HOLDS = {"A": {"A"}, "B": {"B"}, "same": {"same"}, "not A": {"B", "same"}}


def claim_verdict(expect: str, result: dict | None) -> str:
    if result is None:
        return "not measured yet"
    if result["verdict"] in HOLDS[expect]:
        return "holds"
    return "cannot tell" if result["verdict"] == "cannot tell" else "does not hold"


# ----------------------------------------------------------------------------------------------------------
# RESULTS.md and its figures, from the run directories alone.

def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |"
                                                                            for r in rows]


def arm_table(groups: dict, full: float, cut: float) -> list[str]:
    rows = []
    for group, seeds in groups.items():
        if group.startswith("pilot"):
            continue
        losses = np.array([run["rows"][2]["loss"] for run in seeds.values()])
        first = next(iter(seeds.values()))
        stats = first["stats"]
        spread = f" +- {losses.std(ddof=1):.4f}" if len(losses) > 1 else ""
        rows.append([label(group), len(losses), f"{first['rows'][2]['trainable']:,}",
                     f"{first['rows'][2]['trainable_used']:,}", f"{stats['tokens_seen']:,}",
                     f"{stats['flops_per_token'] * stats['tokens_seen']:.2e}", f"{stats['tokens_per_s']:,.0f}",
                     f"{losses.mean():.4f}{spread}", f"{losses.min():.4f}-{losses.max():.4f}",
                     " ".join(f"{v:.4f}" for v in losses), f"{100 * (cut - losses.mean()) / (cut - full):.1f}%"])
    return table(["arm", "seeds", "trainable", "used", "tokens", "training FLOPs", "tokens/s", "test loss mean +- std",
                  "min-max", "per seed", "gap recovered"], rows)


def comparison_table(results: dict, gap: float) -> list[str]:
    rows = [[f"{label(a)} - {label(b)}", " ".join(f"{d:+.4f}" for d in r["per_seed"]), f"{r['mean']:+.4f}",
             f"[{r['lo']:+.4f}, {r['hi']:+.4f}]", f"{100 * r['mean'] / gap:+.1f}%", said((a, b), r)]
            for (a, b), r in results.items()]
    return table(["A - B", "per seed", "mean", "95% interval (documents resampled)", "of the gap", "verdict"], rows)


def depth_table(groups: dict) -> tuple[list[str], dict]:
    curves = {}
    for group, seeds in groups.items():
        for file, (rows, _) in seeds.get(0, {}).get("extra", {}).items():
            if file.startswith("results-depths"):
                curves[group] = {int(r["name"].rsplit(" ", 1)[1]): r["loss"] for r in rows[2:]}
    depths = sorted({d for c in curves.values() for d in c})
    lines = table(["run (seed 0)", *[f"depth {d}" for d in depths]],
                  [[label(g), *[f"{c[d]:.4f}" for d in depths]] for g, c in curves.items()])
    return lines, curves


def leak_lines(groups: dict, dynamic: dict | None) -> list[str]:
    run = groups.get("meanpool", {}).get(0)
    if run is None or "results-pool-causal.json" not in run["extra"]:
        return ["Not measured yet."]
    causal = run["extra"]["results-pool-causal.json"][0][2]["loss"]
    mean = run["rows"][2]["loss"]
    lines = [f"Trained with the whole-sequence mean pool (seed 0), scored with it: **{mean:.4f}**; the same weights "
             f"scored with the causal pool, which cannot see later tokens: **{causal:.4f}** "
             f"({causal - mean:+.4f})."]
    if dynamic:
        lines.append(f"The dynamic Controller trained with the causal pool (seed 0): {dynamic['rows'][2]['loss']:.4f}.")
    lines.append("A score with the mean pool reads each window's later tokens through the Controller, so its loss is "
                 "not a next-token loss; the causal score is the honest one.")
    return lines


def length_lines(groups: dict) -> list[str]:
    """The main arms' seed-0 losses at the grid's length and 4x it, ranked, so that a flipped ranking shows."""
    loss = lambda group: groups[group][0]["rows"][2]["loss"] if 0 in groups.get(group, {}) else None  # noqa: E731
    pairs = {arm: (loss(arm), loss(f"{arm}-long")) for arm in LONG}
    if any(None in p for p in pairs.values()):
        return ["Not measured yet.", ""]
    rank = lambda i: " < ".join(ARMS[a][0] for a in sorted(pairs, key=lambda a: pairs[a][i]))  # noqa: E731
    return table(["arm (depth 4, seed 0)", "1x", "4x"], [[ARMS[a][0], f"{x:.4f}", f"{y:.4f}"]
                                                       for a, (x, y) in pairs.items()]) + [
        "", f"Ranked by test loss, lowest first: at 1x {rank(0)}; at 4x {rank(1)}"
        f"{' (the same order)' if rank(0) == rank(1) else ' (the order changes with training length)'}.", ""]


def figures(groups: dict, results: dict, curves: dict, full: float, cut: float, where: Path) -> list[str]:
    if plt is None:
        raise RunError("the study's figures need matplotlib: pip install -r requirements-dev.txt")
    where.mkdir(parents=True, exist_ok=True)
    arms = [g for g in groups if not g.startswith("pilot")]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for x, g in enumerate(arms):
        ax.plot([x] * len(groups[g]), [r["rows"][2]["loss"] for r in groups[g].values()], "o", alpha=0.7)
    ax.axhline(full, color="green", ls="--", label=f"full model {full:.3f}")
    ax.axhline(cut, color="red", ls="--", label=f"cut baseline {cut:.3f}")
    ax.set_xticks(range(len(arms)), [label(g) for g in arms], rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="test loss (nats)", title="held-out loss per arm, one dot per seed")
    ax.legend(fontsize=8)
    plots = {"loss_per_arm.png": fig}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g in arms:
        run = groups[g].get(0)
        log = [json.loads(line) for line in run["metrics"].read_text().splitlines()] if run else []
        points = [(p["step"] * run["stats"]["tokens_seen"] / log[-1]["step"], p["dev_loss"]) for p in log
                  if "dev_loss" in p]
        if points:
            ax.plot(*zip(*points), ".-", label=label(g), lw=1)
    ax.set(xlabel="training tokens", ylabel="dev loss (nats)", title="dev loss during training (seed 0)")
    ax.legend(fontsize=6)
    plots["dev_loss.png"] = fig
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g, c in curves.items():
        ax.plot(sorted(c), [c[d] for d in sorted(c)], "o-", label=label(g))
    ax.axhline(cut, color="red", ls="--", label="cut baseline")
    ax.set(xscale="log", xlabel="evaluation depth", ylabel="test loss (nats)", title="loss against evaluation depth")
    ax.legend(fontsize=7)
    plots["depth.png"] = fig
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(results) + 1.5))
    for y, ((a, b), r) in enumerate(results.items()):
        ax.errorbar(r["mean"], y, xerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]], fmt="o", capsize=3)
        ax.plot(r["per_seed"], [y] * len(r["per_seed"]), "k.", ms=3)
    ax.axvline(0, color="gray")
    ax.set_yticks(range(len(results)), [f"{label(a)} - {label(b)}" for a, b in results], fontsize=6)
    ax.set(xlabel="paired difference in test loss (nats), 95% interval", title="A - B (negative: A is better)")
    plots["paired_differences.png"] = fig
    for name, fig in plots.items():
        fig.tight_layout()
        atomic_write(where / name, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
    return list(plots)


def mean_loss(groups: dict, group: str) -> str:
    seeds = groups.get(group)
    return f"{np.mean([r['rows'][2]['loss'] for r in seeds.values()]):.4f}" if seeds else "not run yet"


def write_report(out: Path, protocol: dict, runs: dict, timing: dict, command: str) -> None:
    """RESULTS.md and its figures, from the run directories alone (no model, no data needed)."""
    res = out / "results"
    groups = collect(res / "runs", runs)
    first = next((seeds[min(seeds)] for group, seeds in groups.items() if not group.startswith("pilot")), None)
    if first is None:
        raise RunError(f"{res / 'runs'} holds no finished run yet; run python study.py to train the grid")
    full, cut = first["rows"][0]["loss"], first["rows"][1]["loss"]
    gap = cut - full
    results = compare_groups(groups, protocol, gap)
    depth_lines, curves = depth_table(groups)
    pictures = figures(groups, results, curves, full, cut, res)
    done = sum(1 for name, (_, evals) in runs.items() if finished(res / "runs" / name, evals))
    scored = first["rows"][0]
    lines = ["# Results: the paper's claims, re-measured on held-out text", "",
             f"Written by `{command}` from the run directories in `results/runs/` ({done} of {len(runs)} runs "
             f"finished{'' if done == len(runs) else ': the grid is not complete, every number below is from the runs that are'}). "
             f"Every loss is the next-token loss on the **test** split, in fp32, at the final step of each run: "
             f"{scored['windows']:,} windows of {scored['tokens'] // scored['windows']} tokens spread over the whole "
             f"split, {scored['tokens']:,} tokens from {scored['documents']} documents, the same tokens for every row.", "",
             "## Verdicts", ""]
    lines += table(["claim of the paper", "paper", "ours (A - B, mean over seeds, 95% interval)", "verdict"],
                   [[claim, number, f"{label(c[0])} - {label(c[1])}: " + (f"{results[c]['mean']:+.4f} "
                     f"[{results[c]['lo']:+.4f}, {results[c]['hi']:+.4f}]" if c in results else "not run yet"),
                     f"**{claim_verdict(expect, results.get(c))}**"] for claim, number, c, expect in CLAIMS])
    lines += ["", "The paper's numbers are training losses on FineWeb-Edu with Qwen2.5-3B; ours are held-out losses "
              "of a small base on the standard library's source, so the numbers are not comparable, only the "
              "directions of the claims.", ""]
    lines += protocol_lines(protocol, groups, timing)
    lines += ["## Every arm", "", f"Full model {full:.4f}, cut baseline {cut:.4f}: the cut costs {gap:.4f} nats on "
              "test. gap recovered = (cut - arm) / (cut - full), on the same tokens. trainable: parameters allocated; "
              "used: those a forward at the training depth reads (unused step rows excluded). Training FLOPs: matmul "
              "and attention FLOPs of forward and backward (torch.utils.flop_counter) times the tokens seen. "
              "tokens/s: training only, on the machine that ran the study, which other work sometimes shared: "
              "it says what a run cost there, not how fast an arm is.", ""]
    lines += arm_table({g: s for g, s in groups.items()}, full, cut)
    lines += ["", "## Comparisons", "", f"A - B per seed (negative: A is better), their mean, and a 95% interval of the "
              f"mean from {RESAMPLES} resamples of test documents (each resample the same for every seed, keeping the "
              f"pairing). Verdict rule: *A beats B* when every seed agrees in sign, the interval excludes 0 and the "
              f"mean is at least {PRACTICAL:.0%} of the gap ({PRACTICAL * gap:.4f} nats); *no practical difference* when "
              f"the interval lies within +-{PRACTICAL:.0%} of the gap; otherwise *cannot tell*. The arm table's +- is "
              f"each arm's spread over seeds, which says little about a difference between arms trained on the same "
              f"data orders; the paired difference does.", ""]
    lines += comparison_table(results, gap)
    lines += ["", "## The paper's table beside ours", ""]
    lines += table(["depth", "paper: Controller", "paper: static", "ours: Controller", "ours: static"],
                   [["1", "5.082", "6.519", mean_loss(groups, "dynamic-depth1"), mean_loss(groups, "static-depth1")],
                    ["4", "5.075", "5.246", mean_loss(groups, "dynamic"), mean_loss(groups, "static")],
                    ["8", "5.080", "5.119", "not trained", "not trained"]])
    lines += ["", "## The leak: the whole-sequence mean pool", ""] + leak_lines(groups, groups.get("dynamic", {}).get(0))
    lines += ["", "## Depth: runs trained at depth 1 or 4, evaluated at other depths", "", *depth_lines, ""]
    lines += ["## Training length: the three main arms trained 4x longer (seed 0)", ""] + length_lines(groups)
    lines += ["## Figures", ""] + [f"![{p}](results/{p})" for p in pictures]
    atomic_write(out / "RESULTS.md", lambda f: f.write_text("\n".join(lines) + "\n"))
    print(f"wrote {out / 'RESULTS.md'} and {len(pictures)} figures in {res}")


def protocol_lines(protocol: dict, groups: dict, timing: dict) -> list[str]:
    base = protocol["base"]
    sizes = SIZES["quick" if protocol["quick"] else "study"]
    lines = ["## Protocol", "", f"- **Base**: {base['what']}.",
             f"- **The cut**, chosen by a rule fixed before any arm trained: the first split of the ladder whose "
             f"full-to-cut gap on the dev split is at least {protocol['gap_bar']} nats while the cut still beats the "
             f"unigram model of the training split ({protocol['unigram']:.3f} nats on dev; uniform: "
             f"{protocol['uniform']:.3f}). Chosen: **{'/'.join(map(str, protocol['split']))}** "
             "(prelude / recurrent layer / coda). The whole ladder, on dev:", ""]
    lines += table(["split", "full", "cut", "gap", "qualifies"],
                   [["/".join(map(str, r["split"])), f"{r['full']:.4f}", f"{r['cut']:.4f}", f"{r['gap']:.4f}",
                     "yes" if r["gap"] >= protocol["gap_bar"] and r["cut"] < protocol["unigram"] else "no"]
                    for r in protocol["ladder"]])
    pilot = lambda arm, lr: groups.get(f"pilot-{arm}-lr{lr:g}", {}).get(0)  # noqa: E731
    pilots = [[family, arm, *[f"{pilot(arm, lr)['rows'][2]['loss']:.4f}" if pilot(arm, lr) else "not run yet"
                              for lr in rates(protocol["quick"])]] for family, arm in PILOTS.items()]
    lines += ["", "- **Learning rates**, chosen on the dev split only: a pilot per family (seed 0, depth 4, the "
              "grid's length), the lowest dev loss wins. gated: every arm with the gate; lora: the LoRA arms "
              "without recurrence. Dev loss:", ""]
    lines += table(["family", "pilot arm", *[f"lr {lr:g}" for lr in rates(protocol["quick"])]], pilots)
    total = sum(timing.values()) + base.get("seconds", 0.0)
    lines += ["", f"- **Every run**: {sizes['steps']} optimizer steps of {sizes['batch_size']} windows of "
              f"{sizes['seq_len']} tokens ({sizes['steps'] * sizes['batch_size'] * sizes['seq_len']:,} tokens), "
              f"warmup {sizes['warmup']}, cosine to 10%, AdamW (0.9, 0.95), weight decay 0.01, clip 1.0, fp32; the "
              f"4x longer runs: 4x the steps. Seeds {', '.join(map(str, SEEDS if not protocol['quick'] else SEEDS[:1]))}: "
              "a seed fixes the data order, depth draws and initialisation, the same for every arm. LoRA arms "
              f"matched to the {protocol['ranks']['dynamic_used']:,} parameters the dynamic arm uses at depth 4: rank "
              f"{protocol['ranks']['lora-cut']} on every kept layer, rank {protocol['ranks']['lora-coda']} on the coda.",
              f"- **Wall time** of the whole study on the machine that ran it: {fmt_time(total)} (the base's "
              f"pretraining, the ladder, every run and evaluation, summed from `results/timing.json`).", ""]
    return lines


# ----------------------------------------------------------------------------------------------------------
# main

def rates(quick: bool) -> tuple:
    return LEARNING_RATES[:2] if quick else LEARNING_RATES


def describe_base(opts, model_dir: Path) -> dict:
    if opts.model:
        return dict(what=f"the checkpoint {opts.model}, data {opts.data}")
    state = read_checkpoint(model_dir.parent / "pretrain")[0]
    cfg = load_config(model_dir)
    return dict(seconds=state.get("seconds", 0.0), what=(
        f"the demo's Qwen2 ({cfg.num_hidden_layers} layers, d = {cfg.hidden_size}, vocabulary {cfg.vocab_size}) "
        f"pretrained from scratch with the demo's recipe for **{state['step']} steps** (the demo's 6-layer base: 400) of "
        f"{DEMO_PRETRAIN['batch_size']} x {DEMO_PRETRAIN['seq_len']} tokens ({state['step'] * DEMO_PRETRAIN['batch_size'] * DEMO_PRETRAIN['seq_len'] / 1e6:.2f}M tokens), "
        f"lr {DEMO_PRETRAIN['lr']:g}, under bf16 autocast, in {fmt_time(state.get('seconds', 0.0))}, on the "
        "training split of the standard library's source (train / dev / test split by a hash of each file)"))


def study(opts) -> int:
    out = Path(opts.out)
    res, command = out / "results", "python study.py" + (" --quick" if opts.quick else "")
    protocol = read_results(res, "protocol.json")
    timing = read_results(res, "timing.json") or {}
    if protocol is not None and protocol["quick"] != opts.quick:
        raise RunError(f"{out} holds a study {'with' if protocol['quick'] else 'without'} --quick; pass another --out")
    if opts.report:
        if protocol is None:
            raise RunError(f"{res / 'protocol.json'} is missing: nothing has run yet; run python study.py first")
    device, model_dir = pick_device(opts.device), None
    if protocol is None and not opts.report:
        t = time.time()
        model_dir = base_model(opts, device)
        protocol = measure_ladder(opts, device, model_dir) | dict(quick=opts.quick, base=describe_base(opts, model_dir))
        protocol["ranks"] = matched_ranks(model_dir, protocol["split"])
        timing["protocol"] = time.time() - t
        res.mkdir(parents=True, exist_ok=True)
        atomic_write(res / "timing.json", lambda f: f.write_text(json.dumps(timing, indent=1)))
        atomic_write(res / "protocol.json", lambda f: f.write_text(json.dumps(protocol, indent=1)))
    pilots = pilot_runs(protocol, rates(opts.quick))
    for stage in ("pilots", "grid"):
        runs = pilots if stage == "pilots" else grid(protocol, chosen_lr(res / "runs", rates(opts.quick)), opts.quick)
        if not opts.report and not all(finished(res / "runs" / n, e) for n, (_, e) in runs.items()):
            model_dir = model_dir or base_model(opts, device)
            print(f"\n{stage}: {len(runs)} runs in {res / 'runs'}", flush=True)
            run_grid(runs, opts, res / "runs", model_dir, timing)
        elif opts.report and stage == "pilots" and not all(finished(res / "runs" / n, []) for n in runs):
            raise RunError("the learning-rate pilots are not finished; run python study.py to finish them")
    write_report(out, protocol, pilots | runs, timing, command)
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
    p = Parser(description="The study: the paper's claims re-measured on held-out text, with seeds; writes "
                           "RESULTS.md and its figures. Resumable: run it again to continue.")
    p.add_argument("--model", help="a Qwen2/Qwen2.5 checkpoint directory; default: the demo's base, pretrained longer")
    p.add_argument("--data", help="with --model: the data (as train.py's --data); default: the demo's corpus")
    p.add_argument("--out", default=".", help="RESULTS.md goes here, the runs and figures under results/")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one seed, a few steps: checks the whole chain")
    p.add_argument("--report", action="store_true", help="only rebuild RESULTS.md and the figures from finished runs")
    p.add_argument("--ladder", help="with --model: the cuts to try, mildest first, e.g. 8/18/8,4/18/8,8/18/4")
    p.add_argument("--pretrain-steps", type=int, help=f"the demo base's pretraining (default {PRETRAIN_STEPS}; "
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
        opts.ladder = parse_ladder(opts.ladder) if opts.ladder else None
        return study(opts)
    except (RunError, DataError, CheckpointError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: python study.py again continues where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
