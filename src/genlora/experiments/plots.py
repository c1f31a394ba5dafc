"""Figures of a comparison (PNG, matplotlib's Agg backend): accuracy vs training size per variant, reliability
diagrams, singular-value spectra of the learned updates, and the loss along random directions of the merged
weights. Each reads the per-cell metrics.json files listed in results.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _cell_metrics(out: Path, variant: dict[str, Any]) -> list[dict[str, Any]]:
    runs = []
    for rel in variant["cells"].values():
        path = out / rel / "metrics.json"
        if path.is_file():
            with open(path) as f:
                runs.append(json.load(f))
    return runs


def make_plots(results: dict[str, Any], out: str | Path) -> list[str]:
    """Write every figure under `out/plots/`; returns their paths relative to `out`."""
    out = Path(out)
    folder = out / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    written += accuracy_vs_train_size(results, folder)
    for s in results["settings"]:
        runs = {name: _cell_metrics(out, v) for name, v in s["variants"].items()}
        for fn in (reliability_diagrams, singular_value_spectra, loss_along_directions):
            path = fn(runs, folder, s["setting"])
            if path is not None:
                written.append(path)
    return [str(Path(p).relative_to(out)) for p in written]


def accuracy_vs_train_size(results: dict[str, Any], folder: Path) -> list[Path]:
    plt = _pyplot()
    settings = results["settings"]
    ranks = sorted({s["rank"] for s in settings})
    paths = []
    for rank in ranks:
        rows = sorted((s for s in settings if s["rank"] == rank), key=lambda s: s["train_size"])
        metrics = ["test_acc"] + sorted({m for s in rows for v in s["variants"].values() for m in v["stats"]
                                         if m.startswith("ood_") and m.endswith("_acc")})
        metrics = [m for m in metrics if any(m in v["stats"] for s in rows for v in s["variants"].values())]
        if not metrics:
            continue
        fig, axes = plt.subplots(1, len(metrics), figsize=(max(4.2 * len(metrics), 5.5), 3.8), squeeze=False)
        variants = list(rows[0]["variants"])
        for ax, metric in zip(axes[0], metrics):
            for name in variants:
                xs, ys, lo, hi = [], [], [], []
                for s in rows:
                    st = s["variants"].get(name, {}).get("stats", {}).get(metric)
                    if st is None or st["mean"] is None:
                        continue
                    xs.append(s["train_size"])
                    ys.append(100 * st["mean"])
                    half = 0.0 if st["ci95_low"] is None or st["n"] < 2 else 100 * (st["ci95_high"] - st["mean"])
                    lo.append(half)
                    hi.append(half)
                if xs:
                    style = {"color": "black", "linestyle": "--", "zorder": 3} if name == results["baseline"] else {}
                    ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name, **style)
            ax.set_xlabel("training examples")
            ax.set_ylabel("accuracy (%)")
            ax.set_title("in-domain test" if metric == "test_acc" else f"OOD: {metric[4:-4]}")
            sizes = sorted({s["train_size"] for s in rows})
            if len(sizes) > 1:
                ax.set_xscale("log")
                ax.set_xticks(sizes, [str(n) for n in sizes])  # the sizes that ran, not powers of ten
                ax.minorticks_off()
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"Accuracy vs training size\n(LoRA rank {rank}; mean and 95% CI over seeds)", fontsize=10)
        fig.tight_layout()
        path = folder / ("accuracy_vs_train_size.png" if len(ranks) == 1 else f"accuracy_vs_train_size_r{rank}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def reliability_diagrams(runs: dict[str, list[dict]], folder: Path, setting: str) -> Path | None:
    """Test-set reliability per variant, bins pooled over seeds."""
    plt = _pyplot()
    panels = {}
    for name, metrics in runs.items():
        bins = [m["eval"]["test"]["reliability"] for m in metrics if "test" in m.get("eval", {})]
        if not bins:
            continue
        count = np.sum([b["count"] for b in bins], axis=0).astype(float)
        acc = np.sum([[0 if a is None else a * c for a, c in zip(b["accuracy"], b["count"])] for b in bins], axis=0)
        conf = np.sum([[0 if a is None else a * c for a, c in zip(b["confidence"], b["count"])] for b in bins], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            panels[name] = (np.asarray(bins[0]["edges"]), count, acc / count, conf / count,
                            float(np.mean([m["eval"]["test"]["ece"] for m in metrics if "test" in m["eval"]])))
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


def singular_value_spectra(runs: dict[str, list[dict]], folder: Path, setting: str) -> Path | None:
    """Singular values of s*B*A normalised by the largest, averaged over layers and seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for name, metrics in runs.items():
        curves = []
        ranks = []
        for m in metrics:
            spectra = m.get("spectra")
            if not spectra:
                continue
            ranks.append(spectra["effective_rank"])
            for sv in spectra["singular_values"].values():
                sv = np.asarray(sv, dtype=float)
                if sv.size and sv[0] > 0:
                    curves.append(sv / sv[0])
        if not curves:
            continue
        k = max(len(c) for c in curves)
        padded = np.full((len(curves), k), np.nan)
        for i, c in enumerate(curves):
            padded[i, : len(c)] = c
        mean = np.nanmean(padded, axis=0)
        ax.plot(np.arange(1, k + 1), mean, marker="o", ms=3, label=f"{name} (eff. rank {np.mean(ranks):.2f})")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_yscale("log")
    ax.set_xlabel("index i")
    ax.set_ylabel("σ_i / σ_1 of s·B·A")
    ax.set_title(f"Singular-value spectra of the learned updates ({setting})\nmean over layers and seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / f"spectra_{setting}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_along_directions(runs: dict[str, list[dict]], folder: Path, setting: str) -> Path | None:
    """Training loss at W' + t·d for random filter-wise directions d, mean over directions and seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn = False
    for name, metrics in runs.items():
        rows, scales = [], None
        for m in metrics:
            land = m.get("landscape")
            if not land:
                continue
            scales = land["scales"]
            rows += [r for r in land["losses"] if len(r) == len(scales)]
        if not rows:
            continue
        ax.plot(scales, np.mean(rows, axis=0), marker="o", ms=3, label=name)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("t (relative perturbation scale, filter-wise)")
    ax.set_ylabel("training loss")
    ax.set_title(f"Loss along random directions of the merged weights ({setting})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / f"landscape_{setting}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
