"""The report of a comparison: results.md (tables people read), results.csv (one row per setting, variant and
metric) and the statistics inside results.json.

Per setting: the overfitting-regime check of the baseline, the runs that did not learn (training accuracy at the
majority-class rate), the tuned values with every point's validation score, the metrics of every variant (mean +- 95%
half-width), the paired differences to the baseline (mean [95% CI], p, and the minimum detectable difference at 80%
power), and the verdicts: each genlora variant against each plain-LoRA variant (the baseline and the baselines a user
would pick instead: PEFT's lora_dropout, weight decay, early stopping), in words that use the detectable difference
("not detectable at +-x", never "no effect"); where runs did not learn, the verdicts again without their seeds.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from .files import write_text
from .metrics import STALL_MARGIN, did_not_learn
from .stats import MIN_SEEDS, NO_INTERVAL_REASON, describe, excludes_zero, paired

ORDER = ["train_acc", "validation_acc", "test_acc", "ood_*", "gap", "train_loss", "validation_loss", "test_loss",
         "test_ppl", "loss_gap", "test_ece", "eff_rank", "sharpness", "val_loss_rise", "steps", "train_time_s",
         "peak_memory_mib"]
LABELS = {"train_acc": "train acc %", "validation_acc": "val acc %", "test_acc": "test acc %",
          "gap": "gap % (train-test)",
          "train_loss": "train loss", "validation_loss": "val loss", "test_loss": "test loss (NLL)",
          "test_ppl": "test ppl", "loss_gap": "loss gap (test-train)", "test_ece": "test ECE", "eff_rank": "eff. rank",
          "sharpness": "sharpness", "val_loss_rise": "val-loss rise", "steps": "steps", "train_time_s": "train s",
          "peak_memory_mib": "peak MiB"}


def is_percent(metric: str) -> bool:
    return metric.endswith("_acc") or metric == "gap"


def fmt(x: float | None, metric: str, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    v = 100 * x if is_percent(metric) else x
    digits = 1 if is_percent(metric) or metric in ("train_time_s", "peak_memory_mib", "steps") else (
        4 if metric == "sharpness" else 3)
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def label(metric: str) -> str:
    if metric.startswith("ood_"):
        name, kind = metric[4:].rsplit("_", 1)
        return f"OOD {name} {'acc %' if kind == 'acc' else kind}"
    return LABELS.get(metric, metric)


def metric_names(setting: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for v in setting["variants"].values():
        for summary in v["per_seed"].values():
            seen += [k for k in summary if k not in seen]
    out = []
    for m in ORDER:
        if m == "ood_*":
            out += [k for k in seen if k.startswith("ood_") and k.endswith("_acc")]
            out += [k for k in seen if k.startswith("ood_") and k.endswith("_loss") and not any(
                x.startswith("ood_") and x.endswith("_acc") for x in seen)]
        elif m in seen:
            out.append(m)
    return out


def headline(setting: dict[str, Any]) -> str:
    names = metric_names(setting)
    return "test_acc" if "test_acc" in names else "test_loss"


def plain_variants(setting: dict[str, Any], baseline: str) -> list[str]:
    """The baseline first, then every other variant without genlora methods (the baselines a user would pick)."""
    names = [n for n, v in setting["variants"].items() if not v["methods"] and n != baseline]
    return [baseline] + names if baseline in setting["variants"] else names


def add_statistics(results: dict[str, Any]) -> None:
    """stats (describe) per variant and metric; paired differences to the baseline for every metric, and to every
    plain-LoRA variant for the headline metric."""
    base_name = results["baseline"]
    for s in results["settings"]:
        names = metric_names(s)
        head = headline(s)
        plain = plain_variants(s, base_name)
        stalled_seeds = {n: {seed for seed, _ in runs} for n, runs in stalled_runs(s).items()}
        for name, v in s["variants"].items():
            values = {m: {int(seed): summ.get(m) for seed, summ in v["per_seed"].items()} for m in names}
            v["stats"] = {m: describe(values[m].values()) for m in names}
            v["paired"], v["versus"], v["versus_learned"] = {}, {}, {}
            for other in plain:
                if other == name:
                    continue
                ov = s["variants"][other]["per_seed"]
                ref = {m: {int(seed): summ.get(m) for seed, summ in ov.items()} for m in names}
                if other == base_name:
                    v["paired"] = {m: paired(values[m], ref[m]) for m in names}
                v["versus"][other] = paired(values[head], ref[head])
                # The same comparison without the seeds where either run did not learn: shows whether a difference
                # is the other run's stall (a run at 50% moves a 10-seed mean by ~3 points) or the method.
                stalled = stalled_seeds.get(name, set()) | stalled_seeds.get(other, set())
                if stalled:
                    learned = {seed: x for seed, x in values[head].items() if seed not in stalled}
                    v["versus_learned"][other] = {**paired(learned, ref[head]), "left_out": sorted(stalled)}


def verdict(pr: dict[str, float], metric: str, other: str) -> str:
    """Words for a paired difference: better / worse (interval excludes 0) or the detectable size."""
    if pr["n"] < MIN_SEEDS or math.isnan(pr["diff_ci95_low"]):
        return f"{fmt(pr['diff_mean'], metric, True)} vs {other} ({pr['n']} seeds: no test)"
    lower_is_better = not metric.endswith("_acc")
    diff = f"{fmt(pr['diff_mean'], metric, True)} [{fmt(pr['diff_ci95_low'], metric, True)}, " \
           f"{fmt(pr['diff_ci95_high'], metric, True)}]"
    unit = " points" if is_percent(metric) else ""
    if excludes_zero(pr):
        good = (pr["diff_mean"] < 0) if lower_is_better else (pr["diff_mean"] > 0)
        return f"{'better' if good else 'worse'} than {other}: {diff}{unit} (p={pr['p_value']:.3f})"
    return (f"no difference from {other} detectable at ±{fmt(pr['mde80'], metric)}{unit} (80% power): {diff}{unit}")


def _abs(st: dict[str, float], metric: str) -> str:
    if st["n"] >= MIN_SEEDS and not math.isnan(st["ci95_low"]):
        return f"{fmt(st['mean'], metric)} ± {fmt((st['ci95_high'] - st['ci95_low']) / 2, metric)}"
    return fmt(st["mean"], metric)


def _diff(pr: dict[str, float], metric: str) -> str:
    text = fmt(pr["diff_mean"], metric, True)
    if not math.isnan(pr["diff_ci95_low"]):
        text += f" [{fmt(pr['diff_ci95_low'], metric, True)}, {fmt(pr['diff_ci95_high'], metric, True)}]"
        text += f" p={pr['p_value']:.3f}" + ("*" if excludes_zero(pr) else "")
    return text


def _describe_variant(v: dict[str, Any]) -> str:
    """`flat_lora(sigma=0.1) + lr=0.002, weight_decay=0.01`: the methods with every option set (fixed or tuned),
    then the run-config values."""
    settings = {**v.get("overrides", {}), **v.get("chosen", {})}
    parts = []
    for e in v["methods"]:
        opts = {k: x for k, x in e.items() if k != "method"}
        opts.update({k.split(".", 1)[1]: x for k, x in settings.items() if k.split(".", 1)[0] == e["method"]})
        parts.append(e["method"] + (f"({', '.join(f'{k}={x}' for k, x in opts.items())})" if opts else ""))
    run = [f"{k.split('.', 1)[1]}={x}" for k, x in settings.items()
           if k.split(".", 1)[0] in ("training", "lora", "evaluation")]
    return " + ".join(parts + ([", ".join(run)] if run else [])) or "plain LoRA"


def regime_lines(setting: dict[str, Any], baseline: str) -> list[str]:
    """Whether the baseline is in the overfitting regime: train accuracy >= 98% and the validation loss turned up."""
    v = setting["variants"].get(baseline)
    if not v:
        return []
    st = v["stats"]
    lines = []
    if "train_acc" in st:
        def against_bar(acc: float) -> str:
            return f"{fmt(acc, 'train_acc')}% ({'≥' if acc >= 0.98 else '<'} 98%)"

        lines.append(f"train accuracy {against_bar(st['train_acc']['mean'])}")
        learned = [s["train_acc"] for s in v["per_seed"].values()
                   if s.get("train_acc") is not None and not did_not_learn(s)]
        if 0 < len(learned) < st["train_acc"]["n"]:  # a stalled seed hides whether the others overfit
            lines[-1] += f", {against_bar(sum(learned) / len(learned))} over the {len(learned)} runs that learned"
    rises = [s.get("val_loss_rise") for s in v["per_seed"].values() if s.get("val_loss_rise") is not None]
    if rises:
        up = sum(r > 0 for r in rises)
        lines.append(f"validation loss above its minimum over the curve at the end in {up} of {len(rises)} seeds "
                     f"(mean rise {sum(rises) / len(rises):.3f})")
    return [f"Overfitting regime of `{baseline}`: " + "; ".join(lines) + ".", ""] if lines else []


def stalled_runs(setting: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """{variant: [(seed, training accuracy)] of the runs that did not learn (metrics.did_not_learn)}. Such a run moves
    a mean by tens of points, so the report names it rather than leaving it inside a mean. Runs that do not record
    the majority rate are skipped."""
    out = {}
    for name, v in setting["variants"].items():
        runs = sorted((int(seed), s["train_acc"]) for seed, s in v["per_seed"].items() if did_not_learn(s))
        if runs:
            out[name] = runs
    return out


def stalled_lines(setting: dict[str, Any]) -> list[str]:
    if not any(s.get("train_majority_acc") is not None for v in setting["variants"].values()
               for s in v["per_seed"].values()):
        return []
    stalled = stalled_runs(setting)
    if not stalled:
        return [f"Every run learned (training accuracy more than {fmt(STALL_MARGIN, 'gap')} points above the "
                "majority-class rate).", ""]
    per = "; ".join(f"`{name}` seed{'s' if len(runs) > 1 else ''} "
                    + ", ".join(f"{seed} ({fmt(acc, 'train_acc')}%)" for seed, acc in runs)
                    for name, runs in stalled.items())
    return [f"Runs that did not learn (training accuracy within {fmt(STALL_MARGIN, 'gap')} points of always "
            f"predicting the majority label; they stay in the means, paired tests and verdicts): {per}.", ""]


def learned_only_lines(setting: dict[str, Any], baseline: str) -> list[str]:
    """The verdicts again over the seeds where both runs learned, for every pair that a stall touches: each genlora
    variant against each plain-LoRA variant, and each plain-LoRA variant against the baseline."""
    plain = plain_variants(setting, baseline)
    pairs = [(name, other, pr) for name, v in setting["variants"].items()
             for other, pr in (v.get("versus_learned") or {}).items() if name not in plain or other == baseline]
    if not pairs:
        return []
    head = headline(setting)
    lines = [f"The same comparisons ({label(head)}) with each pair's stalled seeds left out, a check that a "
             "difference is not one run's stall:", ""]
    lines += [f"- `{name}`: {verdict(pr, head, other)}; left out: seed{'s' if len(pr['left_out']) > 1 else ''} "
              + ", ".join(map(str, pr["left_out"])) for name, other, pr in pairs]
    return lines + [""]


def tuning_lines(setting: dict[str, Any], info: dict[str, Any]) -> list[str]:
    rep = setting.get("tuning") or {}
    if not rep:
        return ["Tuning off: every variant ran the configured values.", ""]
    metric = info["metric"]
    lines = [f"Chosen on the validation split ({info['validation_size']} examples; tuning seeds {info['seeds']}, "
             f"{info['search']} search, validation {metric}; ties within {info['tie_tolerance']} go toward plain "
             "LoRA); test never seen:", "", "| variant | chosen | points tried (mean validation " +
             ("acc %" if metric == "accuracy" else "loss") + ") |", "|---|---|---|"]
    for name, r in rep.items():
        tried = "; ".join(f"{_point(t['point'])}: {fmt(t['score'], 'validation_acc' if metric == 'accuracy' else 'x')}"
                          for t in r["tried"]) or "single point"
        lines.append(f"| {name} | {_point(r['chosen'])} | {tried} |")
    return lines + [""]


def _point(p: dict[str, Any]) -> str:
    return ", ".join(f"{k.replace('training.', '')}={v}" for k, v in p.items()) or "–"


def write_report(results: dict[str, Any], out: Path, cfg) -> None:
    base = results["baseline"]
    n_seeds = len(results["seeds"])
    lines = ["# genlora comparison", "",
             f"Task `{results['task']}`; seeds {results['seeds']}. Mean ± half-width of the 95% t-interval over "
             "seeds. "
             f"Paired differences are per seed (same training subset, order, head and LoRA init) against `{base}`: "
             "mean [95% CI], paired t-test p (* the interval excludes 0), and MDE = the smallest true difference the "
             "run detects with 80% power (two-sided 5% paired t-test at the observed spread). Accuracies in %. ECE: "
             f"{cfg.base.evaluation.ece_bins} equal-width bins. Final metrics are on the saved adapter reloaded with "
             "plain PEFT; curves (plots/) on the live model during training.", ""]
    if n_seeds < MIN_SEEDS:
        lines += [f"Note: {NO_INTERVAL_REASON}.", ""]
    if len(results["settings"]) > 1:
        lines += summary_lines(results)
    for s in results["settings"]:
        names = metric_names(s)
        head = headline(s)
        lines += [f"## {s['train_size']} training examples", ""]
        lines += regime_lines(s, base)
        lines += stalled_lines(s)
        lines += tuning_lines(s, results["tuning"]) if results["tuning"]["enabled"] else []
        lines += ["| variant | run as | " + " | ".join(label(m) for m in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for name, v in s["variants"].items():
            lines.append(f"| {name} | {_describe_variant(v)} | " + " | ".join(_abs(v["stats"][m], m) for m in names)
                         + " |")
        lines.append("")
        shown = [m for m in names if m not in ("steps", "train_time_s", "peak_memory_mib")]
        if any(v["paired"] for v in s["variants"].values()):
            lines += [f"Paired difference to `{base}`:", "",
                      f"| variant | MDE ({label(head)}) | " + " | ".join(label(m) for m in shown) + " |",
                      "|---|---|" + "---|" * len(shown)]
            for name, v in s["variants"].items():
                if v["paired"]:
                    mde = v["paired"][head]["mde80"]
                    lines.append(f"| {name} | {'–' if math.isnan(mde) else '±' + fmt(mde, head)} | "
                                 + " | ".join(_diff(v["paired"][m], m) for m in shown) + " |")
            lines.append("")
        plain = plain_variants(s, base)
        methods = [n for n in s["variants"] if n not in plain]
        if methods and plain:
            lines += [f"Verdicts ({label(head)}), each genlora variant against each plain-LoRA variant:", ""]
            for name in methods:
                for other in plain:
                    pr = s["variants"][name]["versus"].get(other)
                    if pr:
                        lines.append(f"- `{name}`: {verdict(pr, head, other)}")
            lines.append("")
        lines += learned_only_lines(s, base)
    lines.append(f"Wall time {results['wall_time_s']:.0f} s, CPU time {results['cpu_time_s']:.0f} s (this process "
                 f"and its workers; {results['cells_run']} cells run, {results['cells_reused']} reused).")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    _write_csv(results, out / "results.csv")


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The headline metric over all settings: the baseline's mean ± half-width, every other variant's mean with its
    paired difference [95% CI] (* excludes 0) and the MDE."""
    settings = results["settings"]
    head = headline(settings[0])
    names = list(dict.fromkeys(n for s in settings for n in s["variants"]))
    lines = ["## Summary over training sizes", "",
             f"{label(head)}: mean; for the other variants the paired difference to `{results['baseline']}` [95% CI] "
             "and the minimum detectable difference (80% power).", "",
             "| variant | " + " | ".join(f"n={s['train_size']}" for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for name in names:
        cells = []
        for s in settings:
            v = s["variants"].get(name)
            if not v:
                cells.append("–")
            elif not v["paired"]:
                cells.append(_abs(v["stats"][head], head))
            else:
                pr = v["paired"][head]
                mde = "" if math.isnan(pr["mde80"]) else f", MDE ±{fmt(pr['mde80'], head)}"
                cells.append(f"{fmt(v['stats'][head]['mean'], head)} ({_diff(pr, head)}{mde})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _write_csv(results: dict[str, Any], path: Path) -> None:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["setting", "train_size", "variant", "run_as", "metric", "n", "mean", "std", "ci95_low", "ci95_high",
                "diff_mean", "diff_ci95_low", "diff_ci95_high", "p_value", "mde80"])
    for s in results["settings"]:
        for name, v in s["variants"].items():
            for m, st in v["stats"].items():
                pr = v["paired"].get(m, {})
                w.writerow([s["setting"], s["train_size"], name, _describe_variant(v), m, st["n"], st["mean"],
                            st["std"], st["ci95_low"], st["ci95_high"], pr.get("diff_mean", ""),
                            pr.get("diff_ci95_low", ""), pr.get("diff_ci95_high", ""), pr.get("p_value", ""),
                            pr.get("mde80", "")])
    write_text(path, buf.getvalue())


__all__ = ["add_statistics", "describe", "verdict", "write_report"]
