"""The protocol's arithmetic: the minimum detectable difference on a synthetic case (checked by simulation), paired
statistics, no intervals from too few seeds, and the tuning search (every listed value tried, ties toward plain
LoRA)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from genlora.experiments.compare_config import TuningConfig, Variant
from genlora.experiments.stats import describe, minimum_detectable_difference, paired
from genlora.experiments.tuning import Axis, Scored, axes_of, reference_point, search, select


def test_mde_has_80_percent_power_on_a_synthetic_case():
    """At the MDE, a two-sided paired t-test at 5% rejects in 80% of simulated runs; at half the MDE far less."""
    from scipy import stats

    n, sd = 10, 1.5
    mde = minimum_detectable_difference(sd, n)
    # bounds: the normal approximation (z_.975 + z_.8) sd / sqrt(n) is a lower bound; t quantiles add ~10% at n=10
    assert 2.8016 * sd / math.sqrt(n) < mde < 1.15 * 2.8016 * sd / math.sqrt(n)
    rng = np.random.default_rng(0)

    def rejection_rate(delta: float) -> float:
        d = rng.normal(delta, sd, size=(40000, n))
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
        return float(np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)))

    assert rejection_rate(mde) == pytest.approx(0.80, abs=0.01)
    assert rejection_rate(mde / 2) < 0.35
    assert minimum_detectable_difference(2 * sd, n) == pytest.approx(2 * mde)  # linear in the spread
    assert minimum_detectable_difference(sd, 40) < mde  # more seeds detect smaller effects
    assert minimum_detectable_difference(0.0, n) == 0.0 and math.isnan(minimum_detectable_difference(sd, 1))


def test_paired_statistics_from_the_observed_spread():
    base = {s: 0.70 + 0.01 * s for s in range(5)}
    method = {s: base[s] + d for s, d in enumerate([0.02, 0.01, 0.03, 0.02, 0.02])}
    pr = paired(method, base)
    diffs = np.array([0.02, 0.01, 0.03, 0.02, 0.02])
    assert pr["n"] == 5 and pr["diff_mean"] == pytest.approx(0.02)
    assert pr["diff_std"] == pytest.approx(diffs.std(ddof=1))
    assert pr["diff_ci95_low"] > 0 and pr["p_value"] < 0.01
    assert pr["mde80"] == pytest.approx(minimum_detectable_difference(diffs.std(ddof=1), 5))


def test_no_intervals_or_tests_below_three_seeds():
    d = describe([0.5, 0.9])
    assert d["mean"] == pytest.approx(0.7) and math.isnan(d["ci95_low"])
    pr = paired({0: 0.6, 1: 0.8}, {0: 0.5, 1: 0.9})
    assert math.isnan(pr["p_value"]) and math.isnan(pr["mde80"]) and pr["diff_mean"] == pytest.approx(0.0)
    assert not math.isnan(describe([0.5, 0.9, 0.7])["ci95_low"])


def test_ties_go_toward_the_baseline_settings():
    tried = [Scored({"training.lr": 4e-3, "flat_lora.sigma": 0.05}, [], 0.801),
             Scored({"training.lr": 2e-3, "flat_lora.sigma": 0.10}, [], 0.802),
             Scored({"training.lr": 2e-3, "flat_lora.sigma": 0.05}, [], 0.800),
             Scored({"training.lr": 1e-3, "flat_lora.sigma": 0.05}, [], 0.790)]
    reference = {"training.lr": 2e-3, "flat_lora.sigma": 0.05}  # the baseline's lr, the weakest sigma
    assert select(tried, "accuracy", 0.0025, reference).point == reference  # a tie: nearest plain LoRA wins
    assert select(tried, "accuracy", 0.0, reference).point == {"training.lr": 2e-3, "flat_lora.sigma": 0.10}
    losses = [Scored({"training.lr": 1e-3}, [], 0.500), Scored({"training.lr": 2e-3}, [], 0.501)]
    assert select(losses, "loss", 0.002, {"training.lr": 2e-3}).point == {"training.lr": 2e-3}
    assert select(losses, "loss", 0.0, {"training.lr": 2e-3}).point == {"training.lr": 1e-3}


def _fake(score_of):
    calls = []

    def evaluate(point):
        calls.append(dict(point))
        return [{"validation_acc": score_of(point) + 0.001 * k, "validation_loss": 1.0} for k in range(2)]

    return evaluate, calls


def test_coordinate_search_tries_every_value_and_keeps_the_best():
    axes = [Axis("lorasc.alpha", [0.5, 0.8, 1.0]), Axis("lorasc.noise_lambda", [0.0, 0.05, 0.15]),
            Axis("training.lr", [1e-3, 2e-3, 4e-3])]
    best = {"lorasc.alpha": 0.8, "lorasc.noise_lambda": 0.15, "training.lr": 4e-3}

    def score(p):  # separable, peaked at `best`
        return 0.9 - sum(abs(p[k] - v) / (1 + abs(v)) for k, v in best.items())

    evaluate, calls = _fake(score)
    ref = reference_point(axes, {"training.lr": 2e-3})
    result = search(axes, TuningConfig(tie_tolerance=0.0), "accuracy", ref, evaluate)
    assert result.chosen == best
    for axis in axes:  # every listed value was tried
        assert {c[axis.key] for c in calls} == set(axis.values)
    assert len(calls) == 7 and calls[0] == {"lorasc.alpha": 0.5, "lorasc.noise_lambda": 0.0, "training.lr": 2e-3}

    evaluate, calls = _fake(score)
    grid = search(axes, TuningConfig(search="grid", tie_tolerance=0.0), "accuracy", ref, evaluate)
    assert grid.chosen == best and len(calls) == 27


def test_axes_put_the_learning_rate_last():
    v = Variant("f", methods=[{"method": "flat_lora"}], grid={"flat_lora.sigma": [0.05, 0.1]})
    axes = axes_of(v, TuningConfig(lr=[1e-3, 2e-3]))
    assert [a.key for a in axes] == ["flat_lora.sigma", "training.lr"] and axes[1].values == [1e-3, 2e-3]
    own = Variant("g", grid={"training.lr": [5e-3]})
    assert axes_of(own, TuningConfig())[-1].values == [5e-3]
    with pytest.raises(ValueError, match="at least 2 tuning seeds"):
        TuningConfig(seeds=[0])


def test_runs_that_did_not_learn_are_named():
    """A seed whose training accuracy stays at the majority-class rate (a stalled fine-tuning) is named in the
    report, with its accuracy; runs that learned are not; runs without the recorded rate are not judged."""
    from genlora.experiments.report import stalled_lines, stalled_runs

    def variant(train_accs, majority=0.52):
        return {"per_seed": {str(seed): {"train_acc": a, "train_majority_acc": majority}
                             for seed, a in enumerate(train_accs)}}

    setting = {"variants": {"lora": variant([0.99, 0.503, 0.98]), "flat_lora": variant([0.97, 0.96, 0.571]),
                            "rm_lora": variant([0.99, 0.99, 0.99])}}
    assert stalled_runs(setting) == {"lora": [(1, 0.503)]}  # 0.571 is more than 5 points above 0.52
    (line, _) = stalled_lines(setting)
    assert "`lora` seed 1 (50.3%)" in line and "flat_lora" not in line and "rm_lora" not in line
    setting["variants"]["flat_lora"]["per_seed"]["2"]["train_acc"] = 0.569
    assert stalled_runs(setting) == {"lora": [(1, 0.503)], "flat_lora": [(2, 0.569)]}
    setting["variants"] = {"lora": variant([0.99, 0.98, 0.97])}
    assert stalled_lines(setting)[0].startswith("Every run learned")
    for summary in setting["variants"]["lora"]["per_seed"].values():
        del summary["train_majority_acc"]  # cells from before the rate was recorded
    assert stalled_lines(setting) == []


def test_verdicts_are_repeated_without_the_seeds_that_stalled():
    """A method that 'beats' plain LoRA only because one LoRA seed stalled at 50% wins in the verdicts over all
    seeds, and shows no detectable difference once that seed is left out of the pair; pairs no stall touches are
    not repeated."""
    from genlora.experiments.report import add_statistics, learned_only_lines, regime_lines

    def variant(test_accs, stalled=(), methods=()):
        return {"methods": list(methods), "per_seed": {
            str(seed): {"train_acc": 0.51 if seed in stalled else 0.99, "train_majority_acc": 0.51, "test_acc": a}
            for seed, a in enumerate(test_accs)}}

    lora = 0.80 + np.array([0.004, -0.006, 0.002, 0.0, 0.005, -0.003, 0.001, -0.002])
    method = lora + np.array([0.004, -0.004, 0.003, 0.0, -0.003, 0.002, -0.002, 0.001])  # the same model up to noise
    lora[3] = 0.50  # seed 3 of plain LoRA did not learn
    setting = {"variants": {"lora": variant(lora, stalled=[3]), "lora_weight_decay": variant(lora + 0.001, [3]),
                            "flat_lora": variant(method, methods=[{"method": "flat_lora"}])}}
    add_statistics({"baseline": "lora", "settings": [setting]})
    flat = setting["variants"]["flat_lora"]
    assert flat["versus"]["lora"]["diff_mean"] > 0.03 and flat["versus"]["lora"]["n"] == 8
    again = flat["versus_learned"]["lora"]
    assert again["left_out"] == [3] and again["n"] == 7 and abs(again["diff_mean"]) < 0.01
    assert again["diff_ci95_low"] < 0 < again["diff_ci95_high"]
    # lora_weight_decay stalled on the same seed as lora: that pair is repeated too, and no other
    assert set(setting["variants"]["lora_weight_decay"]["versus_learned"]) == {"lora"}
    lines = learned_only_lines(setting, "lora")
    text = "\n".join(lines)
    assert "- `flat_lora`: no difference from lora detectable" in text and "left out: seed 3" in text
    assert "`lora_weight_decay`: " in text and "`lora`: " not in text  # the baseline is not judged against itself
    (regime, _) = regime_lines(setting, "lora")  # the stall hides that the other 7 runs overfit
    assert "train accuracy 93.0% (< 98%), 99.0% (≥ 98%) over the 7 runs that learned" in regime
    for v in setting["variants"].values():  # nothing stalled: nothing repeated
        for summary in v["per_seed"].values():
            summary["train_acc"] = 0.99
    add_statistics({"baseline": "lora", "settings": [setting]})
    assert learned_only_lines(setting, "lora") == []
    assert "runs that learned" not in regime_lines(setting, "lora")[0]
