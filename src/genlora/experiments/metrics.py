"""What a run is measured by: accuracy, NLL, calibration (ECE), effective rank of the learned update, sharpness and
loss along random directions of the merged weights, wall time and peak memory.

Sharpness never writes into the model: the perturbed merged weights are fresh tensors passed through
`torch.func.functional_call`, so the live base weights stay bit-identical.
"""

from __future__ import annotations

import math
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..core.seeding import derive_seed


# --- classification and calibration ---------------------------------------------------------------------------------
def calibration_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """Equal-width confidence bins over (0, 1] (bin b holds confidences in (b/n, (b+1)/n]) of the top-class
    probability: per bin the count, accuracy and mean confidence (None for empty bins)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = acc_sum / counts
        mean_conf = conf_sum / counts
    return {
        "edges": [b / n_bins for b in range(n_bins + 1)],
        "count": counts.tolist(),
        "accuracy": [None if c == 0 else float(a) for c, a in zip(counts, acc)],
        "confidence": [None if c == 0 else float(m) for c, m in zip(counts, mean_conf)],
    }


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)| over equal-width confidence bins."""
    bins = calibration_bins(probs, labels, n_bins)
    n = sum(bins["count"])
    return float(
        sum(c / n * abs(a - m) for c, a, m in zip(bins["count"], bins["accuracy"], bins["confidence"]) if c)
    )


def classification_metrics(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict:
    """accuracy, NLL (mean -log p(y)), ECE and the reliability bins of predicted probabilities (n, C), and the
    accuracy of always predicting the most frequent label (what a run that learned nothing reaches)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    p_true = probs[np.arange(len(labels)), labels]
    bins = calibration_bins(probs, labels, n_bins)
    return {
        "n": int(len(labels)),
        "accuracy": float((probs.argmax(1) == labels).mean()),
        "majority_acc": float(np.bincount(labels).max() / len(labels)) if len(labels) else float("nan"),
        "nll": float(-np.log(np.clip(p_true, 1e-12, None)).mean()),
        "ece": expected_calibration_error(probs, labels, n_bins),
        "reliability": bins,
    }


STALL_MARGIN = 0.05  # training accuracy within 5 points of the majority-class rate: the run learned nothing


def did_not_learn(summary: dict[str, float]) -> bool:
    """Whether a run's training accuracy stayed within STALL_MARGIN of always predicting the majority label: a
    fine-tuning that never left its start (Mosbach et al. 2021: more frequent at larger learning rates). False when
    the run records no training accuracy or majority rate."""
    acc, floor = summary.get("train_acc"), summary.get("train_majority_acc")
    return acc is not None and floor is not None and acc <= floor + STALL_MARGIN


# --- effective rank -------------------------------------------------------------------------------------------------
def effective_rank(singular_values) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007): k equal values -> k; 0 for a zero
    matrix."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


@torch.no_grad()
def lowrank_singular_values(factors) -> np.ndarray:
    """Singular values (descending) of sum_j U_j V_j (U (m, k), V (k, n)) without forming the m x n product:
    U = Q_u R_u, V^T = Q_v R_v, so U V = Q_u (R_u R_v^T) Q_v^T has the singular values of the small core."""
    u = torch.cat([f[0].detach() for f in factors], dim=1).double().cpu()
    v = torch.cat([f[1].detach() for f in factors], dim=0).double().cpu()
    _, ru = torch.linalg.qr(u)
    _, rv = torch.linalg.qr(v.T)
    return torch.linalg.svdvals(ru @ rv.T).numpy()


def lora_factors(model) -> dict[str, list]:
    """Per LoRA linear layer of a PEFT model (qualified name) the low-rank term [(s*B, A)] its active adapter adds to
    the base weight (PEFT's own layer attributes: the deployed adapter, reloaded with plain PEFT)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or not isinstance(module.get_base_layer(), torch.nn.Linear):
            continue
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                b, a = module.lora_B[adapter].weight, module.lora_A[adapter].weight
                out[name] = [(module.scaling[adapter] * b.detach(), a.detach())]
    return out


def update_spectra(model) -> dict:
    """Singular values and effective rank of each layer's learned update s*B*A, and their mean over layers."""
    per_layer_sv, per_layer_er = {}, {}
    for name, factors in lora_factors(model).items():
        sv = lowrank_singular_values(factors)
        per_layer_sv[name] = [float(x) for x in sv]
        per_layer_er[name] = effective_rank(sv)
    mean = float(np.mean(list(per_layer_er.values()))) if per_layer_er else float("nan")
    return {"effective_rank": mean, "effective_rank_per_layer": per_layer_er, "singular_values": per_layer_sv}


# --- sharpness and loss along random directions ---------------------------------------------------------------------
@dataclass
class PerturbTarget:
    """One adapted linear layer: the name of its base weight parameter, that weight, and the row norms of the merged
    weight W' = W + sum U V (fp32, (n_out,))."""

    param_name: str
    weight: torch.Tensor
    row_norms: torch.Tensor


@torch.no_grad()
def perturb_targets(model) -> list[PerturbTarget]:
    names = {id(p): n for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    targets = []
    for name, factors in lora_factors(model).items():
        w = modules[name].get_base_layer().weight
        merged = w.detach().float().clone()
        for u, v in factors:
            merged.addmm_(u.float(), v.float())
        targets.append(PerturbTarget(names[id(w)], w, merged.norm(dim=1)))
    return targets


def _direction(target: PerturbTarget, seed: int, index: int, layer: int) -> torch.Tensor:
    """Filter-wise Gaussian direction: row i has std ||W'_i|| / sqrt(n_in), so ||d_i|| ~ ||W'_i|| (relative
    scale 1)."""
    w = target.weight
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "experiments.sharpness", index, layer))
    z = torch.randn(w.shape, generator=gen, dtype=torch.float32)
    return (z * (target.row_norms.cpu() / math.sqrt(w.shape[1]))[:, None]).to(w.device)


@torch.no_grad()
def _perturbed(targets: list[PerturbTarget], scale: float, seed: int, index: int, sign: float = 1.0):
    """New tensors W + sign * scale * d_index (the model's own weights are not touched); at scale 0 exactly W."""
    out = {}
    for layer, t in enumerate(targets):
        if scale == 0.0:
            out[t.param_name] = t.weight.detach().clone()
        else:
            d = _direction(t, seed, index, layer)
            out[t.param_name] = (t.weight.float() + (sign * scale) * d).to(t.weight.dtype)
    return out


@torch.no_grad()
def mean_loss(model, batches, loss_fn, overrides: dict[str, torch.Tensor] | None = None) -> float:
    """Mean loss over `batches` (`loss_fn(logits, batch) -> (sum, count)`), optionally with parameters replaced."""
    total, count = 0.0, 0
    for b in batches:
        inputs = {k: v for k, v in b.items() if k != "labels"}
        if overrides is None:
            out = model(**inputs)
        else:
            out = torch.func.functional_call(model, overrides, args=(), kwargs=inputs, strict=False)
        s, c = loss_fn(out["logits"] if isinstance(out, dict) else out.logits, b)
        total += s
        count += c
    return total / max(count, 1)


def sharpness(model, batches, loss_fn, scale: float, draws: int, seed: int = 0) -> dict:
    """Mean increase of the loss under `draws` random Gaussian perturbations of the merged weights of the adapted
    layers, at relative (filter-wise) scale `scale`: E_d[L(W' + scale d)] - L(W'). Exactly 0 at scale 0.

    Draws come in antithetic pairs (+d, -d): the same expectation, but the first-order term (the gradient, nonzero
    away from an exact minimum) cancels within each pair, so the estimate measures curvature with less noise."""
    was_training = model.training
    model.eval()
    try:
        targets = perturb_targets(model)
        base = mean_loss(model, batches, loss_fn, _perturbed(targets, 0.0, seed, 0))
        increases = [
            mean_loss(model, batches, loss_fn, _perturbed(targets, scale, seed, k // 2, -1.0 if k % 2 else 1.0))
            - base
            for k in range(draws)
        ]
    finally:
        model.train(was_training)
    return {"scale": scale, "draws": draws, "base_loss": base, "increases": increases,
            "mean_increase": float(np.mean(increases))}


def loss_landscape(model, batches, loss_fn, scales, directions: int = 1, seed: int = 0) -> dict:
    """Loss at W' + t d along `directions` random filter-wise directions d, for t in `scales` (0 added)."""
    was_training = model.training
    model.eval()
    grid = sorted(set(float(t) for t in scales) | {0.0})
    try:
        targets = perturb_targets(model)
        base = mean_loss(model, batches, loss_fn, _perturbed(targets, 0.0, seed, 0))
        losses = []
        for d in range(directions):
            # a stream of directions of its own (seed + 7919), apart from the sharpness draws
            losses.append([base if t == 0.0 else mean_loss(model, batches, loss_fn,
                                                           _perturbed(targets, t, seed + 7919, d)) for t in grid])
    finally:
        model.train(was_training)
    return {"scales": grid, "losses": losses}


# --- time and memory ------------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a block, in MiB: CUDA max allocated on a GPU, else the process's peak RSS (Linux: VmHWM reset
    through /proc/self/clear_refs; elsewhere a 20 Hz sampling thread)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "rss"
        self.peak_mib: float | None = None
        self._thread = None
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._hwm = True
        except OSError:
            self._hwm = False
            self._sampled = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.05):
            self._sampled = max(self._sampled, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._hwm:
            self.peak_mib = _status_kib("VmHWM") / 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self._sampled, _rss_bytes()) / 2**20


def _status_kib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    return float("nan")


def _rss_bytes() -> int:
    try:
        return int(_status_kib("VmRSS") * 1024)
    except (OSError, ValueError):
        import resource

        scale = 1 if os.uname().sysname == "Darwin" else 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class Timer:
    """Wall seconds and process CPU seconds (all threads) of a block; on a shared machine the CPU time is the
    steadier measure of the work done."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.seconds = self.cpu_seconds = None
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start
