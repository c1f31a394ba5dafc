"""The repository explains itself: comments and docs cite files inside it, and what the docs name exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITING = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "src").rglob("*.py"),
          *(ROOT / "scripts").glob("*.sh"), *(ROOT / "configs").glob("*.yaml"), *(ROOT / "bench").glob("*.*")]


def test_nothing_cites_a_file_outside_the_repository():
    outside = re.compile(r"(\.\./)?shared/spec|\.\./shared/")
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in CITING if p.is_file()
            for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not hits, f"cite docs/ instead of the spec outside the repository: {hits}"


def test_docs_links_in_the_readme_resolve():
    links = re.findall(r"\]\((docs/[^)#]+)", (ROOT / "README.md").read_text())
    assert "docs/data.md" in links and "docs/methods.md" in links
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_every_pin_docs_data_names_is_defined_in_the_code():
    """docs/data.md tells a maintainer where each sha256 and threshold lives: those names must exist there."""
    text = (ROOT / "docs" / "data.md").read_text()
    named = set(re.findall(r"`(models|data|smollm|vision_data)\.([A-Z][A-Z0-9_]+)`", text))
    assert {("models", "MINILM_SHA256"), ("data", "VADER_SDIST_SHA256"), ("smollm", "GGUF_SHA256"),
            ("vision_data", "FASHION_SHA256")} <= named
    for module, name in named:
        source = (ROOT / "src" / "genlora" / "experiments" / f"{module}.py").read_text()
        assert re.search(rf"^{name}\s*(:[^=]+)?=", source, re.M), f"docs/data.md names {module}.{name}, not defined"


def test_archived_cells_of_unfinished_runs_resume():
    """results/unfinished/<run>/ keeps the finished cells of a published comparison that did not finish in one sitting
    (copied back into its output_dir, the next run reuses them). Each must be a run the runner can still read: its
    config parses, it has metrics, and the folder is a published config's output_dir. No adapter weights. Cells of a
    base built per machine (the vision ViT) carry its weights fingerprint, so a resume elsewhere cannot mix bases."""
    import yaml

    from genlora.experiments.compare import _as_run
    from genlora.experiments.config import TrainConfig

    archive = ROOT / "results" / "unfinished"
    runs = sorted(p for p in archive.iterdir() if p.is_dir()) if archive.is_dir() else []
    published = (ROOT / "configs").glob("published_*.yaml")
    outputs = {Path(yaml.safe_load(p.read_text())["output_dir"]).name for p in published}
    for run in runs:
        assert run.name in outputs, f"{run.name} is no published config's output_dir ({sorted(outputs)})"
        configs = sorted(run.rglob("config.yaml"))
        assert configs, f"{run} holds no cells"
        for path in configs:
            assert (path.parent / "metrics.json").is_file(), f"{path.parent} is not a finished cell"
            cfg = TrainConfig.from_dict(yaml.safe_load(path.read_text()))
            _as_run(cfg)  # raises where a key was renamed
            if cfg.task == "vision" and cfg.model.path is None:  # the ViT is pretrained per machine: no pinned hash
                metrics = json.loads((path.parent / "metrics.json").read_text())
                assert "weights_sha256" in metrics.get("base_model", {}), f"{path.parent}: no base fingerprint"
        assert not list(run.rglob("*.safetensors")) and not list(run.rglob("*.tmp")), f"{run}: weights or partial cells"
