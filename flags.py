"""Every flag of train.py, with its default and help (build_parser), and the checks on their values that argparse
cannot make (check_flags): each is told in one line, before anything is loaded or written.

The defaults are the paper's GPU setup; `python train.py` with no --model replaces the training ones with the
demo's (demo.DEMO_ARM), sized for a 2-core CPU.
"""
from __future__ import annotations

import argparse
import math
import re

from data import check_data_path
from demo import DEMO_ARM
from runs import RunError


def build_parser() -> argparse.ArgumentParser:
    # The demo's defaults are read from DEMO_ARM itself, so --help cannot disagree with what the demo runs.
    p = Parser(description="Train Ouroboros (a looped decoder layer with input-conditioned LoRA) on a Qwen2 / Qwen2.5, "
                           "Llama or Qwen3 checkpoint. "
                           "Without --model: the offline CPU demo, whose defaults are sized for a 2-core CPU ("
                           + " ".join(f"--{k.replace('_', '-')} {DEMO_ARM[k]}" for k in ("steps", "seq_len", "batch_size",
                                                                                        "grad_accum", "depth")) + " ...).")
    a = p.add_argument
    # No --model (and no --sample, --eval-only): train.main runs the offline demo, with DEMO_ARM's values as defaults.
    a("--model", help="a Qwen2/Qwen2.5, Llama or Qwen3 checkpoint: a directory (Hugging Face layout) or a hub id such "
                      "as Qwen/Qwen3-0.6B (fetched once into the Hugging Face cache; HF_HUB_OFFLINE=1 reads only the "
                      "cache). Omit for the offline CPU demo.")
    a("--data", help="a text file (documents split at blank lines), a directory (a document per file), a .jsonl "
                     "('text', optional 'id'), a .parquet (its 'text' column, optional 'id'; needs pyarrow), or a .gz "
                     "of a text file or .jsonl; stdlib: the standard library's source, the demo's corpus and its default")
    a("--out", help="run directory: config, checkpoint, metrics.jsonl, results.json")
    a("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    a("--overwrite", action="store_true", help="replace an existing run in --out")
    # the variant. Flags named like OuroborosConfig's fields reach the config as they are (train.ouroboros_config);
    # it checks choices, ranks, the split and the depths, and its ConfigError names fields, which flag_names turns
    # back into flags.
    a("--controller", default="dynamic", choices=["dynamic", "static", "none"],
      help="dynamic: the Ouroboros Controller; static: learned c per step, ignores input; none: no LoRA")
    a("--no-gate", action="store_true", help="ablation: h = h_new each step instead of the gated mix")
    a("--no-step-norm", action="store_true", help="ablation: no per-step RMSNorm")
    # causal by default, not the paper's whole-sequence mean, which reads future tokens and so cannot generate
    # (Ouroboros.pool refuses to): position t's weights would depend on tokens after t.
    a("--pool", default="causal", choices=["causal", "mean"],
      help="Controller input: causal running mean, or the paper's whole-sequence mean, which leaks future tokens")
    # the paper's r = 32 and alpha = 16: the delta is scaled by alpha / r = 0.5
    a("--rank", type=int, default=32, help="LoRA rank r")
    a("--alpha", type=number, default=16.0, help="LoRA alpha; the delta is scaled by alpha / r")
    # --depth and every depth of --depths are checked against --max-depth by OuroborosConfig.check_depth
    a("--depth", type=int, default=8, help="recurrent steps per forward")
    # a string, parsed by parse_depths where it is used; unset: every optimizer step uses --depth
    a("--depths", help="e.g. 4,8,16: a depth drawn per optimizer step (seeded); evaluated at each")
    # 64: the paper's step embedding, Embedding(64, 128); rows beyond the deepest depth used are never read
    a("--max-depth", type=int, default=64, help="the largest depth a run can use: the rows of the Controller's step "
                                             "embedding and of the per-step norms (--steps is the run's length)")
    # unset: the paper's proportions for the checkpoint's layer count (controller.paper_split), set by
    # train.ouroboros_config once config.json is read
    a("--n-prelude", type=int, help="frozen layers before the loop (default round(8L/36), 8 on Qwen2.5-3B)")
    a("--recurrent-layer", type=int, help="the looped layer (default L // 2, 18 on Qwen2.5-3B)")
    a("--n-coda", type=int, help="frozen layers after the loop (default round(8L/36))")
    a("--controller-input", default="pooled", choices=["pooled", "none"], help="none: the input-blind control")
    a("--lora-layers", default="none", choices=["none", "coda", "recurrent", "all"], help="LoRA-heal these layers")
    # the adapters' own rank and scale, independent of the Controller's --rank and --alpha
    a("--lora-rank", type=int, default=8, help="the adapters' rank")
    a("--lora-alpha", type=number, default=16.0, help="the adapters' delta is scaled by alpha / rank")
    a("--checkpoint-steps", action="store_true", help="recompute each recurrent step in backward (less memory)")
    a("--compile", action="store_true", help="torch.compile each decoder layer (compiled once, reused at every depth)")
    training_flags(a)
    # using finished runs
    a("--eval-only", action="store_true", help="recompute the comparison table of the run in --out")
    # dest score_depths, the text as typed: train.ouroboros_config writes the parsed list to args.eval_depths
    # (default: the trained depths)
    a("--eval-depths", dest="score_depths", help="the table's depths, e.g. 1,2,4,8 (default: --depths or --depth)")
    # unset: score with the pool the run was trained with
    a("--eval-pool", choices=["causal", "mean"], help="with --eval-only: score with this pool, not the training one")
    a("--compare", nargs="+", metavar="RUN", help="print one table of these finished runs (full and cut rows once)")
    a("--sample", metavar="PROMPT", help="generate text from PROMPT with the trained run in --out")
    a("--max-new-tokens", type=int, default=100, help="with --sample")
    a("--temperature", type=number, default=0.8, help="with --sample; 0 is greedy")
    a("--top-k", type=int, default=50, help="with --sample")
    return p


def training_flags(a) -> None:
    # the defaults are the paper's GPU setup: seq 2048, micro-batch 2 x 16 accumulation, AdamW lr 3e-4, clip 1.0,
    # weight decay 0.01
    a("--steps", type=int, default=1000, help="optimizer steps")
    a("--seq-len", type=int, default=2048, help="tokens per window")
    # per process: a step sees batch_size x grad_accum x processes windows
    a("--batch-size", type=int, default=2, help="windows per micro-batch (per process)")
    a("--grad-accum", type=int, default=16, help="micro-batches per optimizer step")
    a("--lr", type=number, default=3e-4, help="peak learning rate")
    # unset: one lr for every trainable (train.build_optimizer makes groups of their own only for another value)
    a("--lora-lr", type=number, help="peak lr of the LoRA adapters of --lora-layers (default: --lr)")
    a("--min-lr-ratio", type=number, default=0.1, help="final learning rate as a fraction of --lr")
    a("--warmup", type=int, default=50, help="linear warmup, in optimizer steps")
    # never on norms, step embeddings, the static c or biases: a norm row no step reaches would shrink towards 0
    a("--weight-decay", type=number, default=0.01, help="AdamW's, on the Controller's and gate's matrices only")
    a("--clip", type=number, default=1.0, help="gradient norm clip")
    a("--seed", type=int, default=0, help="seed for data order, depth draws and initialisation")
    # shares of documents, not of tokens: each document goes to a split by a hash of its text or id (data.split_of)
    a("--dev-fraction", type=number, default=0.01, help="share of documents in the dev split, read by --eval-every")
    a("--test-fraction", type=number, default=0.01, help="share of documents in the test split, read by the table")
    # spread evenly and deterministically over the split (data.Windows.spread): every row scores the same windows
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
    # part of the key of the demo base's cache (demo.demo_base): another value pretrains another base
    a("--pretrain-steps", type=int, default=400, help="demo only: optimizer steps pretraining its base model")
    a("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    # auto is resolved (devices.resolve_precision) before config.json is written, which records bf16 or fp32;
    # --eval-only and --sample reuse it
    a("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="compute and frozen-base dtype "
      "(trainables stay fp32); auto: bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), else fp32. "
      "On CUDA, fp32 matmuls use TF32 tensor cores")
    a("--allow-slow-bf16", action="store_true", help="accept --precision bf16 on a CPU without native bf16 "
      "(about 100x slower than fp32 there; refused without this flag)")


class Parser(argparse.ArgumentParser):
    """Flags with no abbreviations ("--step 40" must not silently mean --steps), and errors in one line."""

    def __init__(self, **kwargs):
        # ArgumentDefaultsHelpFormatter: --help shows each flag's default after its help
        super().__init__(allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    # one line, not argparse's usage block: train.main prints a RunError as "error: ..." and exits with 2
    def error(self, message):
        raise RunError(f"{message}; see python train.py --help")


def number(text: str) -> float:
    """A float flag: nan and inf are refused here, so no run starts with them."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)  # argparse reports it as, e.g., "argument --lr: invalid number value: 'nan'"
    return value


def parse_depths(text: str, flag: str = "--depths") -> list[int]:
    # for --depths and --eval-depths, so the message names the flag that held the text; the range is check_depth's
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise RunError(f"{flag} {text!r} is not a comma list of integers, e.g. 4,8,16") from None


def check_flags(args) -> None:
    """Values that pass argparse's type check but would fail mid-run (a division by zero, an optimizer error)
    or silently do something other than asked."""
    # >= 1: values that divide (loss / grad_accum, step % log_every, step % save_every, alpha / lora_rank) or whose
    # 0 would leave nothing to do (an empty window or batch, no token generated, top-k of none)
    checks = [(f, getattr(args, f) >= 1, ">= 1") for f in ("seq_len", "batch_size", "grad_accum", "lora_rank",
                                                           "log_every", "save_every", "max_new_tokens", "top_k",
                                                           "pretrain_steps")]
    # >= 0, where 0 means something: --steps 0 the reference rows alone, --warmup 0 none, --eval-every 0 never,
    # --eval-windows 0 every window, --eval-per-document 0 no cap, --temperature 0 greedy
    checks += [(f, getattr(args, f) >= 0, ">= 0") for f in ("steps", "warmup", "eval_every", "eval_windows", "eval_per_document",
                                                            "weight_decay", "temperature")]
    # Positive: an alpha of 0 would switch a delta off without a word, a clip of 0 would zero every gradient. A
    # min_lr_ratio above 1 would make the lr rise after warmup. A split fraction of 0 leaves that split empty, which
    # data.tokenize would refuse only after the whole corpus was read.
    checks += [("stop_after", args.stop_after is None or args.stop_after >= 1, ">= 1"), ("lr", args.lr > 0, "> 0"),
               ("lora_lr", args.lora_lr is None or args.lora_lr > 0, "> 0"),
               ("alpha", args.alpha > 0, "> 0"), ("lora_alpha", args.lora_alpha > 0, "> 0"), ("clip", args.clip > 0, "> 0"),
               ("min_lr_ratio", 0 <= args.min_lr_ratio <= 1, "in 0..1"),
               ("dev_fraction", 0 < args.dev_fraction < 1, "strictly between 0 and 1"),
               ("test_fraction", 0 < args.test_fraction < 1 - args.dev_fraction,
                "above 0 and below 1 - --dev-fraction (the rest is for training)")]
    for name, ok, rule in checks:  # the first check that fails is told, with the flag as it is typed
        if not ok:
            raise RunError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid; pass a value {rule}")
    if args.warmup > args.steps > 0:  # (--steps 0 trains nothing: it prints the reference rows)
        raise RunError(f"--warmup {args.warmup} is longer than the run (--steps {args.steps}), so the learning rate "
                       f"would never reach its peak; pass a --warmup of at most {args.steps}")
    if args.eval_pool and not args.eval_only:  # it would be ignored: only --eval-only rescores a run
        raise RunError("--eval-pool scores a finished run: use it with --eval-only --out RUN")
    check_data_path(args.data)  # here too, so that it is told before an existing --out


def flag_names(message: str) -> str:
    """ConfigError speaks of OuroborosConfig's fields; on the command line they are flags (rank -> --rank)."""
    # \b: whole words, so lora_rank is not read as rank; pool='mean' becomes --pool mean, as it is typed
    fields = r"\b(n_prelude|recurrent_layer|n_coda|max_depth|rank|alpha|pool|lora_rank|lora_layers|controller_input)\b"
    return re.sub(fields, lambda m: "--" + m.group(1).replace("_", "-"), message).replace("--pool='mean'", "--pool mean")
