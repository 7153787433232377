"""study.py: the whole chain at --quick sizes (base, ladder, pilots on dev, grid, RESULTS.md, figures), resuming,
and the statistics against hand computations."""
import json
import re
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


def runs_of(out: Path) -> dict:
    protocol = json.loads((out / "results" / "protocol.json").read_text())
    lrs = study.chosen_lr(out / "results" / "runs", study.rates(True))
    return protocol, study.pilot_runs(protocol, study.rates(True)) | study.grid(protocol, lrs, True)


def test_quick_study_writes_every_run_results_and_figures(quick):
    out, _ = quick
    protocol, runs = runs_of(out)
    for name, (_, evals) in runs.items():
        assert study.finished(out / "results" / "runs" / name, evals), name
    text = (out / "RESULTS.md").read_text()
    for section in ("## Verdicts", "## Protocol", "## Every arm", "## Comparisons", "## The paper's table beside ours",
                    "## The leak", "## Depth", "## Figures"):
        assert section in text
    for claim, *_ in study.CLAIMS:
        assert claim in text
    for png in ("loss_per_arm.png", "dev_loss.png", "depth.png", "paired_differences.png"):
        assert (out / "results" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"({len(runs)} of {len(runs)} runs finished)" in text


def test_pilots_read_dev_and_the_grid_uses_their_best_learning_rate(quick):
    out, _ = quick
    protocol, runs = runs_of(out)
    for family, arm in study.PILOTS.items():
        losses = {}
        for lr in study.rates(True):
            rows = json.loads((out / "results" / "runs" / f"pilot-{arm}-lr{lr:g}-s0" / "results.json").read_text())
            assert {r["split"] for r in rows} == {"dev"}  # never the test split
            losses[lr] = rows[2]["loss"]
        best = min(losses, key=losses.get)
        for name, (flags, _) in runs.items():
            if not name.startswith("pilot") and study.ARMS[re.sub(r"(-depth1|-long)?-s\d+$", "", name)][1] == family:
                config = json.loads((out / "results" / "runs" / name / "config.json").read_text())
                assert config["lr"] == pytest.approx(best), name
    for name in runs:
        if not name.startswith("pilot"):
            rows = json.loads((out / "results" / "runs" / name / "results.json").read_text())
            assert {r["split"] for r in rows} == {"test"}, name


def test_paired_differences_are_the_differences_of_the_tables_losses(quick):
    # An independent path: results.json's losses (train.score over every scored token) against the comparisons,
    # built from per-document losses weighted by the protocol's token counts.
    out, _ = quick
    protocol, runs = runs_of(out)
    groups = study.collect(out / "results" / "runs", runs)
    results = study.compare_groups(groups, protocol, gap=1.0)
    loss = lambda group, row=2: groups[group][0]["rows"][row]["loss"]  # noqa: E731
    assert results[("dynamic", "static")]["per_seed"][0] == pytest.approx(loss("dynamic") - loss("static"), abs=1e-9)
    assert results[("dynamic", "cut")]["per_seed"][0] == pytest.approx(loss("dynamic") - loss("dynamic", 1), abs=1e-9)
    assert results[("nogate", "cut")]["per_seed"][0] == pytest.approx(loss("nogate") - loss("nogate", 1), abs=1e-9)


def test_lora_arms_are_matched_to_the_parameters_the_dynamic_arm_uses(quick):
    out, _ = quick
    protocol, _ = runs_of(out)
    rows = lambda name: json.loads((out / "results" / "runs" / name / "results.json").read_text())  # noqa: E731
    used = rows("dynamic-s0")[2]["trainable_used"]
    assert protocol["ranks"]["dynamic_used"] == used
    for arm in ("lora-cut", "lora-coda"):
        rank, trainable = protocol["ranks"][arm], rows(f"{arm}-s0")[2]["trainable"]
        per_rank = trainable // rank
        assert abs(trainable - used) <= per_rank / 2, arm  # the nearest rank


def test_a_finished_study_trains_nothing_and_report_rebuilds_from_run_outputs(quick, monkeypatch):
    out, argv = quick
    before = (out / "RESULTS.md").read_text()
    monkeypatch.setattr(train, "run", lambda args: pytest.fail(f"trained {args.out} again"))
    assert study.main(argv) == 0
    # a fresh clone: run outputs without checkpoints; --report needs neither a model nor data
    for checkpoint in (out / "results" / "runs").glob("*/checkpoint.safetensors"):
        checkpoint.unlink()
    (out / "RESULTS.md").unlink()
    assert study.main(["--quick", "--report", "--out", str(out)]) == 0
    assert (out / "RESULTS.md").read_text() == before


def test_a_missing_run_is_trained_again_to_the_same_numbers(quick):
    out, argv = quick
    run = out / "results" / "runs" / "static-s0"
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
