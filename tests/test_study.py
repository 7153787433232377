"""study.py: the whole chain at --quick sizes (base, ladder, untrained rows, pilots on dev extended until the best is
inside, the length rule, the grid, RESULTS.md, figures), resuming, and the statistics against hand computations."""
import json
from pathlib import Path

import numpy as np
import pytest

import tiny  # (also puts the project on sys.path)
import study
import train
from runs import RunError



@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    corpus = tiny.stdlib_corpus(root / "corpus")
    argv = ["--quick", "--data", str(corpus), "--out", str(root / "out"), "--device", "cpu"]
    assert study.main(argv) == 0
    return root / "out", argv


def base_of(out: Path) -> dict:
    """The quick study's base as study_base returns it, read back from its outputs (--report trains nothing)."""
    opts = study.argparse.Namespace(quick=True, model=None, base="small", out=str(out), report=True, data=None,
                                    ladder=None, device="cpu", pretrain_steps=3)
    return study.study_base(opts, study.pick_device("cpu"))


def runs_dir(out: Path) -> Path:
    return out / "results" / "small" / "runs"


def config(out: Path, name: str) -> dict:
    return json.loads((runs_dir(out) / name / "config.json").read_text())


def test_quick_study_writes_every_run_results_and_figures(quick):
    out, _ = quick
    base = base_of(out)
    for name, (_, evals) in (base["runs"] | base["pilots"]).items():
        assert study.finished(runs_dir(out) / name, evals), name
    text = (out / "RESULTS.md").read_text()
    for section in ("## Verdicts", "### Protocol", "### Every arm", "### Comparisons", "### Depth", "### The leak",
                    "### Figures"):
        assert section in text
    for claim, *_ in study.CLAIMS:
        assert claim in text
    for question, _ in study.QUESTIONS:  # every open question is answered: none is left "not measured"
        assert question in text
    assert "not measured on this base" not in text.split("| question (A vs B)")[1].split("\n\n")[0]
    for png in ("gap_recovered.png", "dev_loss.png", "depth.png", "paired_differences.png"):
        assert (out / "results" / "small" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{len(base['runs'])} of {len(base['runs'])} grid runs finished" in text


def test_every_arm_gets_its_own_pilot_and_the_grid_uses_its_best_learning_rate(quick):
    out, _ = quick
    base = base_of(out)
    chosen = {}
    for group in study.pilot_groups(base["spec"], base["protocol"]):
        losses = {}
        for run in runs_dir(out).glob(f"pilot-{group}-lr*-s0"):
            rows = json.loads((run / "results.json").read_text())
            assert {r["split"] for r in rows} == {"dev"}  # never the test split
            losses[config(out, run.name)["lr"]] = rows[0]["loss"]
        best = min(losses, key=losses.get)
        tried = sorted(losses)
        # the best is inside what was tried, or at an end of the grid
        assert tried[0] < best < tried[-1] or best in (study.LR_GRID[0], study.LR_GRID[-1]), (group, losses)
        chosen[group] = best
    for name in base["runs"]:
        group = name.rsplit("-s", 1)[0]
        arm, suffix = study.arm_of(group)
        cfg = config(out, name)
        assert cfg["lr"] == pytest.approx(chosen[study.BORROWS.get(arm, arm) + suffix]), name
        if arm == "dynamic-coda":  # its adapters at LoRA on the coda's lr and rank
            assert cfg["lora_lr"] == pytest.approx(chosen["lora-coda"])
            assert cfg["lora_rank"] == base["protocol"]["ranks"]["lora-coda"]
        rows = json.loads((runs_dir(out) / name / "results.json").read_text())
        assert {r["split"] for r in rows} == {"test"}, name


def test_pilots_extend_towards_the_best_until_it_is_inside():
    first = list(study.FIRST_RATES["gated"])  # 3e-4, 1e-3, 3e-3
    assert study.pilot_rates("dynamic", {}) == first
    assert study.pilot_rates("dynamic", {3e-4: 5.0}) == first  # not all finished: nothing new yet
    assert study.pilot_rates("dynamic", {3e-4: 5.0, 1e-3: 4.0, 3e-3: 4.5}) == first  # interior: done
    assert study.pilot_rates("dynamic", {3e-4: 5.0, 1e-3: 4.6, 3e-3: 4.5}) == first + [1e-2]
    assert study.pilot_rates("dynamic", {3e-4: 4.0, 1e-3: 4.6, 3e-3: 4.5}) == [1e-4] + first
    assert study.pilot_rates("lora-cut", {1e-3: 5.0, 3e-3: 4.6, 1e-2: 4.5, 3e-2: 4.4, 1e-1: 4.3}) == [
        1e-3, 3e-3, 1e-2, 3e-2, 1e-1]  # the grid's end: no further


def test_the_length_rule_takes_the_first_length_whose_last_quarter_gains_little(tmp_path):
    run = tmp_path / "length"
    run.mkdir()
    # dev loss every 10 steps of 100: falls 0.1 per 10 steps to step 60, then 0.001 per 10 steps
    curve = {s: (5.0 - 0.01 * s if s <= 60 else 4.4 - 0.0001 * (s - 60)) for s in range(10, 100, 10)}
    (run / "metrics.jsonl").write_text("\n".join(json.dumps({"step": s, "dev_loss": v}) for s, v in curve.items()))
    (run / "results.json").write_text(json.dumps([{"loss": 4.4 - 0.0001 * 40}]))
    # gap 1.0: T = 40 gains 0.1 over 30-40, T = 60 0.2 over 40-60 (45: the nearest scored step), T = 80 0.002: picked
    got = study.chosen_length(run, 100, dev_gap=1.0)
    assert (got["steps"], got["budget_bound"]) == (80, False)
    got = study.chosen_length(run, 100, dev_gap=0.05)  # 2% of a small gap: 0.001, never met
    assert (got["steps"], got["budget_bound"]) == (100, True)


def test_paired_differences_are_the_differences_of_the_tables_losses(quick):
    # An independent path: results.json's losses (evaluate.score over every scored token) against the comparisons,
    # built from per-document losses weighted by the protocol's token counts.
    out, _ = quick
    base = base_of(out)
    results = study.summarise(base)["results"]
    loss = lambda name: json.loads((runs_dir(out) / name / "results.json").read_text())[0]["loss"]  # noqa: E731
    untrained = json.loads((out / "results" / "small" / "untrained.json").read_text())
    cut = untrained["/".join(map(str, base["protocol"]["split"]))]["test"][1]["loss"]
    assert results[("dynamic", "static")]["per_seed"][0] == pytest.approx(loss("dynamic-s0") - loss("static-s0"), abs=1e-9)
    assert results[("dynamic", "cut")]["per_seed"][0] == pytest.approx(loss("dynamic-s0") - cut, abs=1e-9)
    assert results[("lora-cut", "lora-full")]["per_seed"][0] == pytest.approx(
        loss("lora-cut-s0") - loss("lora-full-s0"), abs=1e-9)
    # Two rows without training (the untrained loop against the cut): their two scored losses, one "seed".
    split = untrained["/".join(map(str, base["protocol"]["split"]))]
    loop = next(r for r in split["loops"]["loop-gate"] if r["depth"] == 4)["loss"]
    assert results[("loop-gate-depth4", "cut")]["per_seed"] == [pytest.approx(loop - cut, abs=1e-9)]


def test_the_untrained_plain_loop_at_depth_one_is_the_cut_baseline(quick):
    out, _ = quick
    base = base_of(out)
    fixed = study.fixed_rows(base["untrained"], base["protocol"]["split"])
    assert fixed["loop-plain-depth1"]["loss"] == pytest.approx(fixed["cut"]["loss"], abs=1e-5)
    assert fixed["loop-gate-depth1"]["loss"] != pytest.approx(fixed["cut"]["loss"], abs=1e-4)  # damped: another model
    assert fixed["loop-plain-depth4"]["loss"] != pytest.approx(fixed["cut"]["loss"], abs=1e-4)


def test_lora_arms_are_matched_to_the_parameters_the_dynamic_arm_uses(quick):
    out, _ = quick
    protocol = base_of(out)["protocol"]
    rows = lambda name: json.loads((runs_dir(out) / name / "results.json").read_text())  # noqa: E731
    used = rows("dynamic-s0")[0]["trainable_used"]
    assert protocol["ranks"]["dynamic_used"] == used
    for arm in ("lora-cut", "lora-coda", "lora-full"):
        rank, trainable = protocol["ranks"][arm], rows(f"{arm}-s0")[0]["trainable"]
        per_rank = trainable // rank
        assert abs(trainable - used) <= per_rank / 2, arm  # the nearest rank
    assert config(out, "lora-full-s0")["n_prelude"] + 1 + config(out, "lora-full-s0")["n_coda"] == 8  # no layer cut
    flops = lambda name: json.loads((runs_dir(out) / name / "stats.json").read_text())  # noqa: E731
    # FLOP-matched: as many training FLOPs as the dynamic arm, within one step's worth
    matched, dynamic = flops("lora-cut-flops-s0"), flops("dynamic-s0")
    total = lambda s: s["flops_per_token"] * s["tokens_seen"]  # noqa: E731
    step = matched["flops_per_token"] * matched["tokens_seen"] / config(out, "lora-cut-flops-s0")["steps"]
    assert abs(total(matched) - total(dynamic)) <= step


def test_a_finished_study_trains_nothing_and_report_rebuilds_from_run_outputs(quick, monkeypatch, capsys):
    out, argv = quick
    before = (out / "RESULTS.md").read_text()
    monkeypatch.setattr(train, "run", lambda args: pytest.fail(f"trained {args.out} again"))
    # a fresh clone: run outputs without checkpoints; neither the study nor --report trains anything again
    for checkpoint in runs_dir(out).glob("*/checkpoint.safetensors"):
        checkpoint.unlink()
    (out / "RESULTS.md").unlink()
    assert study.main(argv) == 0
    assert "nothing left to train" in capsys.readouterr().out
    assert (out / "RESULTS.md").read_text() == before
    (out / "RESULTS.md").unlink()
    assert study.main(["--quick", "--report", "--out", str(out)]) == 0
    assert (out / "RESULTS.md").read_text() == before


def test_a_missing_run_is_trained_again_to_the_same_numbers(quick):
    out, argv = quick
    run = runs_dir(out) / "static-s0"
    before = json.loads((run / "results.json").read_text())
    for f in run.iterdir():
        if f.name != "config.json":
            f.unlink()
    assert study.main(argv) == 0
    after = json.loads((run / "results.json").read_text())
    assert [r["loss"] for r in after] == [r["loss"] for r in before]


def test_the_cut_rule_takes_the_first_rung_over_the_bar_that_is_still_a_language_model():
    rung = lambda gap, cut: dict(split=[0, 0, 0], gap=gap, cut=cut)  # noqa: E731
    rungs = [rung(0.3, 4.0), rung(0.6, 6.5), rung(0.7, 4.5), rung(0.9, 4.6)]
    assert study.choose_cut(rungs, unigram=6.0, bar=0.5) is rungs[2]  # 0.6 qualifies on gap, but 6.5 > unigram
    with pytest.raises(RunError, match="pretrain the base longer"):
        study.choose_cut(rungs[:2], unigram=6.0, bar=0.5)
    assert study.choose_cut(rungs[:2], unigram=6.0, bar=0.5, enforce=False) is rungs[0]


def test_paired_weights_documents_by_their_tokens_and_resamples_them():
    tokens = np.array([10, 0, 30, 60])
    a = np.array([[1.0, np.nan, 2.0, 3.0], [1.5, np.nan, 2.0, 2.0]])
    b = np.array([[2.0, np.nan, 2.0, 4.0], [2.0, np.nan, 2.5, 2.5]])
    r = study.paired(a, b, tokens, gap=1.0)
    # by hand: seed 0: (10 * -1 + 30 * 0 + 60 * -1) / 100; seed 1: (10 * -0.5 + 30 * -0.5 + 60 * -0.5) / 100
    assert r["per_seed"] == pytest.approx([-0.7, -0.5])
    assert r["mean"] == pytest.approx(-0.6)
    assert r["lo"] <= r["mean"] <= r["hi"] < 0
    assert r["verdict"] == "A"
    same = study.paired(a, a, tokens, gap=1.0)
    assert (same["lo"], same["hi"], same["verdict"]) == (0.0, 0.0, "same")


def test_the_interval_resamples_seeds_as_well_as_documents():
    # Every document differs by the same amount within a seed, -1 on seed 0 and -0.2 on seed 1: resampling
    # documents alone gives an interval of width 0 at -0.6; resampling the two seeds gives means of -1, -0.6 and
    # -0.2 with chances 1/4, 1/2, 1/4, so the 95% interval is [-1, -0.2].
    tokens = np.full(50, 10)
    b = np.zeros((2, 50))
    a = np.stack([np.full(50, -1.0), np.full(50, -0.2)])
    r = study.paired(a, b, tokens, gap=1.0)
    assert r["mean"] == pytest.approx(-0.6)
    assert (r["lo"], r["hi"]) == (pytest.approx(-1.0), pytest.approx(-0.2))


def test_a_comparison_on_fewer_seeds_than_the_protocol_says_which():
    row = dict(mean=-0.05, lo=-0.06, hi=-0.04)
    assert study.interval(row | {"seeds": [0, 1, 2]}) == "-0.0500 [-0.0600, -0.0400]"  # all of SEEDS: nothing said
    assert study.interval(row | {"seeds": [0, 1]}) == "-0.0500 [-0.0600, -0.0400] (seeds 0, 1 only)"
    assert study.interval(row | {"seeds": [0]}) == "-0.0500 [-0.0600, -0.0400] (seed 0 only)"
    assert study.interval(row | {"seeds": None}) == "-0.0500 [-0.0600, -0.0400]"  # rows without training: no seeds
    assert study.interval(None) == "not measured"


def test_verdicts_follow_the_rule():
    v = study.verdict
    assert v(np.array([-0.2, -0.3]), -0.4, -0.1, gap=1.0) == "A"
    assert v(np.array([0.2, 0.3]), 0.1, 0.4, gap=1.0) == "B"
    assert v(np.array([-0.2, 0.1]), -0.4, -0.01, gap=1.0) == "cannot tell"  # the seeds disagree in sign
    assert v(np.array([-0.2, -0.3]), -0.4, 0.1, gap=1.0) == "cannot tell"  # the interval includes 0
    assert v(np.array([-0.03, -0.04]), -0.045, -0.02, gap=1.0) == "same"  # real but under 5% of the gap
    assert v(np.array([-0.045, -0.04]), -0.07, -0.02, gap=1.0) == "cannot tell"  # the interval crosses -5%
    for expect, holds, fails in (("A", "A", "B"), ("B", "B", "same"), ("same", "same", "A"), ("not A", "B", "A")):
        assert study.claim_verdict(expect, {"verdict": holds}) == "holds"
        assert study.claim_verdict(expect, {"verdict": fails}) == "does not hold"
        assert study.claim_verdict(expect, {"verdict": "cannot tell"}) == "cannot tell"
    assert study.claim_verdict("not A", {"verdict": "same"}) == "holds"


def test_bad_study_flags_are_one_line(capsys):
    assert study.main(["--model", "somewhere"]) == 2
    assert "--model needs --data" in capsys.readouterr().err
    assert study.main(["--ladder", "2/4"]) == 2
    assert "--ladder '2/4'" in capsys.readouterr().err
    assert study.main(["--base", "large"]) == 2
    assert "--base" in capsys.readouterr().err
