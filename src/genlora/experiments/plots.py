"""Figures of a comparison (PNG, matplotlib's Agg backend), read from the cells' metrics.json files:

- `curves_<setting>.png`: accuracy and loss on the train / validation / test splits at the evaluation points during
  training, mean over seeds, one line per variant: plain LoRA overfitting and what each method changes;
- `accuracy_vs_train_size.png` (several training sizes only): test (and out-of-domain) accuracy per variant;
- `reliability_<setting>.png`, `spectra_<setting>.png`, `landscape_<setting>.png`: calibration, singular values of
  the learned updates, and the loss along random directions of the merged weights.

Accuracy axes are clipped to [0, 100] %; error bars are 95% intervals and only drawn with enough seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .stats import MIN_SEEDS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _runs(out: Path, variant: dict[str, Any]) -> list[dict[str, Any]]:
    runs = []
    for rel in variant["cells"].values():
        path = out / rel / "metrics.json"
        if path.is_file():
            with open(path) as f:
                runs.append(json.load(f))
    return runs


def _style(name: str, baseline: str) -> dict[str, Any]:
    return {"color": "black", "linestyle": "--", "zorder": 3} if name == baseline else {}


def make_plots(results: dict[str, Any], out: str | Path) -> list[str]:
    """Write every figure under `out/plots/`; returns their paths relative to `out`."""
    out = Path(out)
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = accuracy_vs_train_size(results, folder)
    for s in results["settings"]:
        runs = {name: _runs(out, v) for name, v in s["variants"].items()}
        for fn in (curves, reliability_diagrams, singular_value_spectra, loss_along_directions):
            path = fn(runs, folder, s["setting"], results["baseline"])
            if path is not None:
                written.append(path)
    return [str(Path(p).relative_to(out)) for p in written]


def curves(runs: dict[str, list[dict]], folder: Path, setting: str, baseline: str) -> Path | None:
    plt = _pyplot()
    splits = [sp for sp in ("train", "validation", "test")
              if any(sp in p for ms in runs.values() for m in ms for p in m.get("curve", []))]
    if not splits:
        return None
    kinds = [k for k in ("accuracy", "loss")
             if any(k in p.get(sp, {}) for ms in runs.values() for m in ms for p in m.get("curve", [])
                    for sp in splits)]
    fig, axes = plt.subplots(len(kinds), len(splits), figsize=(4.2 * len(splits), 3.2 * len(kinds)), squeeze=False)
    for name, metrics in runs.items():
        for col, sp in enumerate(splits):
            for row, kind in enumerate(kinds):
                by_step: dict[int, list[float]] = {}
                for m in metrics:
                    for p in m.get("curve", []):
                        if kind in p.get(sp, {}):
                            by_step.setdefault(p["step"], []).append(p[sp][kind])
                if not by_step:
                    continue
                steps = sorted(by_step)
                ys = [np.mean(by_step[t]) * (100 if kind == "accuracy" else 1) for t in steps]
                axes[row][col].plot(steps, ys, marker="o", ms=3, label=name, **_style(name, baseline))
    for col, sp in enumerate(splits):
        for row, kind in enumerate(kinds):
            ax = axes[row][col]
            ax.set_title(f"{sp} {kind}", fontsize=9)
            ax.set_xlabel("optimizer step")
            if kind == "accuracy":
                ax.set_ylim(0, 100)
                ax.set_ylabel("%")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"During training ({setting}; live model, mean over seeds)", fontsize=10)
    fig.tight_layout()
    path = folder / f"curves_{setting}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_train_size(results: dict[str, Any], folder: Path) -> list[Path]:
    settings = sorted(results["settings"], key=lambda s: s["train_size"])
    if len(settings) < 2:
        return []  # one x position says nothing about size: the tables hold it
    metrics = [m for m in ["test_acc"] + sorted({m for s in settings for v in s["variants"].values()
                                                  for m in v["stats"] if m.startswith("ood_") and m.endswith("_acc")})
               if any(m in v["stats"] for s in settings for v in s["variants"].values())]
    if not metrics:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.2 * len(metrics), 5.5), 3.8), squeeze=False)
    sizes = [s["train_size"] for s in settings]
    for ax, metric in zip(axes[0], metrics):
        for name in settings[0]["variants"]:
            xs, ys, err = [], [], []
            for s in settings:
                st = s["variants"].get(name, {}).get("stats", {}).get(metric)
                if st is None or st["mean"] is None:
                    continue
                xs.append(s["train_size"])
                ys.append(100 * st["mean"])
                ok = st["n"] >= MIN_SEEDS and st["ci95_high"] is not None and not np.isnan(st["ci95_high"])
                err.append(100 * (st["ci95_high"] - st["mean"]) if ok else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=name, **_style(name, results["baseline"]))
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_ylim(0, 100)
        ax.set_xlabel("training examples")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("in-domain test" if metric == "test_acc" else f"OOD: {metric[4:-4]}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    n = len(results["seeds"])
    fig.suptitle(f"Accuracy vs training size (mean over {n} seeds" + (", 95% CI)" if n >= MIN_SEEDS else ")"),
                 fontsize=10)
    fig.tight_layout()
    path = folder / "accuracy_vs_train_size.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def reliability_diagrams(runs: dict[str, list[dict]], folder: Path, setting: str, baseline: str) -> Path | None:
    """Test-set reliability per variant, bins pooled over seeds."""
    plt = _pyplot()
    panels = {}
    for name, metrics in runs.items():
        tests = [m["eval"]["test"] for m in metrics if "reliability" in m.get("eval", {}).get("test", {})]
        if not tests:
            continue
        bins = [t["reliability"] for t in tests]
        count = np.sum([b["count"] for b in bins], axis=0).astype(float)
        acc = np.sum([[0 if a is None else a * c for a, c in zip(b["accuracy"], b["count"])] for b in bins], axis=0)
        conf = np.sum([[0 if a is None else a * c for a, c in zip(b["confidence"], b["count"])] for b in bins], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            panels[name] = (np.asarray(bins[0]["edges"]), count, acc / count, conf / count,
                            float(np.mean([t["ece"] for t in tests])))
    if not panels:
        return None
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.3 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (name, (edges, count, acc, conf, ece)) in zip(axes.flat, panels.items()):
        width = edges[1] - edges[0]
        mask = count > 0
        ax.bar(edges[:-1][mask], acc[mask], width=width, align="edge", edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot((edges[:-1] + width / 2)[mask], conf[mask], "o", color="red", ms=4, label="mean confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} (ECE {ece:.3f})", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Reliability on the in-domain test set ({setting}, seeds pooled)")
    fig.tight_layout()
    path = folder / f"reliability_{setting}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def singular_value_spectra(runs: dict[str, list[dict]], folder: Path, setting: str, baseline: str) -> Path | None:
    """Singular values of s*B*A normalised by the largest, averaged over layers and seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for name, metrics in runs.items():
        curves_, ranks = [], []
        for m in metrics:
            spectra = m.get("spectra")
            if not spectra:
                continue
            ranks.append(spectra["effective_rank"])
            for sv in spectra["singular_values"].values():
                sv = np.asarray(sv, dtype=float)
                if sv.size and sv[0] > 0:
                    curves_.append(sv / sv[0])
        if not curves_:
            continue
        k = max(len(c) for c in curves_)
        padded = np.full((len(curves_), k), np.nan)
        for i, c in enumerate(curves_):
            padded[i, : len(c)] = c
        ax.plot(np.arange(1, k + 1), np.nanmean(padded, axis=0), marker="o", ms=3,
                label=f"{name} (eff. rank {np.mean(ranks):.2f})", **_style(name, baseline))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1 of s·B·A")
    ax.set_title(f"Singular values of the learned updates ({setting})\nmean over layers and seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / f"spectra_{setting}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_along_directions(runs: dict[str, list[dict]], folder: Path, setting: str, baseline: str) -> Path | None:
    """Training loss at W' + t·d for random filter-wise directions d, mean over directions and seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for name, metrics in runs.items():
        rows, scales = [], None
        for m in metrics:
            land = m.get("landscape")
            if land:
                scales = land["scales"]
                rows += [r for r in land["losses"] if len(r) == len(scales)]
        if rows:
            ax.plot(scales, np.mean(rows, axis=0), marker="o", ms=3, label=name, **_style(name, baseline))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("t (relative perturbation scale, filter-wise)")
    ax.set_ylabel("training loss")
    ax.set_title(f"Loss along random directions of the merged weights ({setting})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = folder / f"landscape_{setting}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
