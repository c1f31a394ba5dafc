"""One fine-tuning run (`genlora train`): a PEFT LoRA sequence classifier trained by a plain PyTorch loop that drives
the genlora handle, then evaluated as deployed (the saved adapter reloaded with plain PEFT).

The loop, per optimizer step::

    handle.begin_step()
    for inst in lora_dropout.train_instances():   # just one plain pass without LoRA Dropout
        inst.backward(model(**batch).loss)         # the model's loss already holds RM-LoRA's regularizer
    clip_grad_norm_(trainable, max_grad_norm)
    handle.optimizer_step(optimizer)               # RM-LoRA's mask, optimizer.step(), bookkeeping
    scheduler.step(); optimizer.zero_grad()

Output folder (written under a temporary name and renamed when complete)::

    adapter/            PEFT adapter (handle.save_pretrained) + genlora_config.json
    methods.json        the attached methods and their options
    config.yaml         the resolved run config
    metrics.json        everything measured (see `summary` inside for the headline numbers)
    train.log           human-readable training log; train_log.jsonl: the same as JSON lines
    data_split.json     ids of the training / validation examples, in training-subset order
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.handle import attach
from ..registry import METHODS, method_from_dict
from .config import ConfigError, TrainConfig, dump_yaml, write_json
from .data import check_source, collate, encode, eval_batches, make_splits, train_batches
from .evaluate import ensemble_forward, evaluate_sets, load_adapter
from .metrics import PeakMemory, Timer, loss_landscape, sharpness, update_spectra
from .models import check_model, load_base, resolve_device


# --- validation (nothing written) -----------------------------------------------------------------------------------
def build_methods(entries: list[dict[str, Any]], key: str = "methods"):
    """Fresh method objects for `{method: name, **options}` entries; errors name the entry."""
    methods = []
    for i, entry in enumerate(entries):
        name = entry.get("method")
        if name not in METHODS:
            raise ConfigError(f"{key}[{i}].method must be one of {sorted(METHODS)}, got {name!r}")
        try:
            methods.append(method_from_dict(entry))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{key}[{i}] ({name}): {e}") from None
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: each method may appear once, got {names}")
    return methods


def validate(cfg: TrainConfig, prefix: str = "") -> None:
    """Everything that can be checked before training: method names and options, data sources, the model folder
    (and the pinned sha256 of the packaged model), the device. Raises ConfigError; writes nothing."""
    build_methods(cfg.methods, f"{prefix}methods")
    for m in cfg.methods:
        k = m.get("k")
        if m.get("method") == "rm_lora" and isinstance(k, int) and k > cfg.lora.r:
            raise ConfigError(f"{prefix}methods: rm_lora k={k} exceeds lora.r={cfg.lora.r}")
    check_source(cfg.data.dataset, f"{prefix}data.dataset")
    if cfg.data.test is not None:
        check_source(cfg.data.test, f"{prefix}data.test")
    for i, s in enumerate(cfg.data.ood):
        check_source(s, f"{prefix}data.ood[{i}]")
    check_model(cfg.model)
    resolve_device(cfg.training.device)
    try:  # sizes against the data (the sources are cached in-process, so the run does not read them again)
        make_splits(cfg.data, cfg.training.seed, cfg.model.num_labels)
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{prefix}data: {e}") from None


# --- the run ----------------------------------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """transformers' schedules: linear warmup from 0, then linear / cosine decay to 0, or constant."""
    if warmup > 0 and step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
    return max(0.0, 1.0 - progress)


def _dropout_method(handle):
    if handle is None:
        return None
    return next((m for m in handle.methods if hasattr(m, "train_instances")), None)


class _Log:
    def __init__(self, folder: Path):
        self.text = open(folder / "train.log", "w")
        self.jsonl = open(folder / "train_log.jsonl", "w")

    def write(self, record: dict[str, Any], line: str) -> None:
        self.jsonl.write(json.dumps(record) + "\n")
        self.text.write(line + "\n")
        self.text.flush()
        self.jsonl.flush()

    def close(self):
        self.text.close()
        self.jsonl.close()


def run(cfg: TrainConfig, out_dir: str | os.PathLike, *, progress: bool = True, keep_adapter: bool = True,
        tqdm_position: int = 0) -> dict[str, Any]:
    """Train and evaluate; write everything into `out_dir` (created if needed). Returns metrics.json's content."""
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    tc, dc = cfg.training, cfg.data
    if tc.num_threads is not None:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    seed = tc.seed

    splits = make_splits(dc, seed, cfg.model.num_labels)
    torch.manual_seed(seed)
    base, tokenizer, new_params = load_base(cfg.model, seed)
    torch.manual_seed(seed)  # LoRA's A init draws from the global RNG: the same for every method
    lcfg = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.lora_alpha,
        target_modules=list(cfg.lora.target_modules),
        lora_dropout=cfg.lora.lora_dropout,
        task_type="SEQ_CLS",
    )
    model = get_peft_model(base, lcfg).to(device)

    train_enc = encode(tokenizer, splits["train"], dc.max_length)
    steps_per_epoch = math.ceil(len(train_enc) / tc.batch_size)
    epochs = tc.epochs_for(steps_per_epoch)
    total_steps = steps_per_epoch * epochs
    warmup = int(round(tc.warmup_ratio * total_steps))
    methods = build_methods(cfg.methods)
    handle = attach(model, *methods, total_steps=total_steps) if methods else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, tc.lr_schedule)
    )
    if handle is not None:
        handle.bind_optimizer(optimizer)
        handle.steps_per_epoch = steps_per_epoch  # LoRASC's default stage: one epoch
    dropout = _dropout_method(handle)

    dump_yaml(cfg, out / "config.yaml")
    write_json(out / "methods.json", handle.config_dict() if handle else {"methods": []})
    write_json(
        out / "data_split.json",
        {k: list(v.ids) for k, v in splits.items() if k in ("train", "validation")},
    )
    log = _Log(out)
    log.write(
        {"event": "start", "total_steps": total_steps, "n_train": len(train_enc), "device": str(device)},
        f"training {len(train_enc)} examples, {epochs} epochs, {total_steps} steps on {device}; methods: "
        f"{[m['method'] for m in cfg.methods] or 'plain LoRA'}; new parameters: {new_params}",
    )

    model.train()
    step, window, window_n = 0, 0.0, 0
    epoch_losses = []
    bar = tqdm(total=total_steps, desc="train", leave=False, disable=not progress, position=tqdm_position,
               dynamic_ncols=True)
    with Timer() as train_timer, PeakMemory(device) as mem:
        for epoch in range(epochs):
            epoch_sum, epoch_n = 0.0, 0
            for index in train_batches(train_enc, tc.batch_size, seed, epoch, tc.group_by_length):
                batch = {k: v.to(device) for k, v in collate(train_enc, index, tokenizer.pad_token_id).items()}
                if handle is not None:
                    handle.begin_step()
                step_loss = 0.0
                if dropout is not None:
                    for inst in dropout.train_instances():
                        loss = model(**batch).loss
                        inst.backward(loss)
                        step_loss += loss.item() / inst.n
                else:
                    loss = model(**batch).loss
                    loss.backward()
                    step_loss = loss.item()
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"training loss became {step_loss} at step {step}; lower training.lr")
                if tc.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
                if handle is not None:
                    handle.optimizer_step(optimizer)
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window += step_loss
                window_n += 1
                epoch_sum += step_loss * len(index)
                epoch_n += len(index)
                bar.update(1)
                if step % tc.log_every == 0 or step == total_steps:
                    lr = scheduler.get_last_lr()[0]
                    mean = window / window_n
                    log.write(
                        {"step": step, "epoch": epoch + 1, "loss": mean, "lr": lr,
                         "elapsed_s": time.perf_counter() - t_start},
                        f"step {step}/{total_steps} epoch {epoch + 1} loss {mean:.4f} lr {lr:.3g}",
                    )
                    bar.set_postfix(loss=f"{mean:.3f}")
                    window, window_n = 0.0, 0
            epoch_losses.append(epoch_sum / max(epoch_n, 1))
            log.write({"event": "epoch", "epoch": epoch + 1, "train_loss": epoch_losses[-1]},
                      f"epoch {epoch + 1} mean training loss {epoch_losses[-1]:.4f}")
    bar.close()

    adapter_dir = out / "adapter"
    if handle is not None:
        handle.save_pretrained(adapter_dir)
        methods_config = handle.config_dict()
        with warnings.catch_warnings():  # LoRASC warns that detaching drops its slow experts: they are saved above
            warnings.simplefilter("ignore", UserWarning)
            handle.detach()
    else:
        model.save_pretrained(adapter_dir)
        methods_config = {"methods": []}
    del model, handle, optimizer, scheduler, trainable, methods, dropout

    metrics = evaluate_run(cfg, adapter_dir, splits, device)
    metrics.update(
        {
            "train_time_s": train_timer.seconds,
            "train_cpu_time_s": train_timer.cpu_seconds,
            "peak_memory_mib": mem.peak_mib,
            "memory_kind": mem.kind,
            "steps": total_steps,
            "epochs": epochs,
            "epoch_train_loss": epoch_losses,
            "methods": methods_config["methods"],
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "data": {
                k: {"n": len(v), "ids_sha256": v.ids_sha256()} for k, v in splits.items()
            },
        }
    )
    metrics["wall_time_s"] = time.perf_counter() - t_start
    metrics["summary"] = summarize(metrics)
    write_json(out / "metrics.json", metrics)
    log.write({"event": "done", "summary": metrics["summary"]}, "done: " + json.dumps(metrics["summary"]))
    log.close()
    if not keep_adapter:
        shutil.rmtree(adapter_dir)
    return metrics


def evaluate_run(cfg: TrainConfig, adapter_dir: Path, splits: dict, device: torch.device) -> dict[str, Any]:
    """Metrics of the saved adapter on the configured splits, OOD sets, spectra and sharpness."""
    ev = cfg.evaluation
    model, tokenizer = load_adapter(adapter_dir, cfg.model, device, seed=cfg.training.seed)
    forward, ens_handle, ensemble_info = None, None, None
    names = {m.get("method") for m in cfg.methods}
    if ev.ensemble and "lora_dropout" in names and "lorasc" in names:
        # The exported adapter concatenates LoRASC's slow experts with the last fast LoRA; masking it all would also
        # drop parts of the merged experts, which the method never does (spec 5.2): evaluate the plain adapter.
        ensemble_info = {"used": False, "reason": "LoRASC's slow experts are part of the exported adapter"}
    elif ev.ensemble and "lora_dropout" in names:
        forward, ens_handle = ensemble_forward(model, adapter_dir)
        if forward is None:
            ensemble_info = {"used": False, "reason": ens_handle}
            ens_handle = None
            print(f"genlora: evaluating without the test-time ensemble: {ensemble_info['reason']}", file=sys.stderr)
        else:
            ensemble_info = {"used": True, "n_test": forward.n_test}
    sets = {name: splits[name] for name in ev.splits if name in splits}
    if "train" in sets and ev.train_eval_size is not None and ev.train_eval_size < len(sets["train"]):
        sets["train"] = sets["train"].subset(np.arange(ev.train_eval_size))  # the subset is in random order
    sets.update({k: v for k, v in splits.items() if k.startswith("ood:")})
    with Timer() as eval_timer:
        results = evaluate_sets(model, tokenizer, sets, cfg.data.max_length, cfg.training.eval_batch_size, device,
                                ev.ece_bins, forward)
    metrics: dict[str, Any] = {"eval": results, "eval_time_s": eval_timer.seconds, "ensemble": ensemble_info}
    if ens_handle is not None:
        ens_handle.detach()
    if ev.spectra:
        metrics["spectra"] = update_spectra(model)
    if ev.sharpness or ev.landscape_scales:
        train = splits["train"]
        n = min(ev.sharpness_examples, len(train))
        enc = encode(tokenizer, train.subset(np.arange(n)), cfg.data.max_length)
        batches = [  # small length-sorted batches: little padding
            {k: v.to(device) for k, v in collate(enc, idx, tokenizer.pad_token_id).items()}
            for idx in eval_batches(enc, min(16, cfg.training.eval_batch_size))
        ]
        with Timer() as sharp_timer:
            if ev.sharpness:
                metrics["sharpness"] = sharpness(
                    model, batches, ev.sharpness_scale, ev.sharpness_draws, seed=cfg.training.seed
                )
            if ev.landscape_scales:
                metrics["landscape"] = loss_landscape(
                    model, batches, ev.landscape_scales, ev.landscape_directions, seed=cfg.training.seed
                )
        metrics["sharpness_time_s"] = sharp_timer.seconds
    return metrics


def summarize(metrics: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a run, flat (the columns of the comparison table)."""
    s: dict[str, float] = {}
    ev = metrics.get("eval", {})
    for split in ("train", "validation", "test"):
        if split in ev:
            s[f"{split}_acc"] = ev[split]["accuracy"]
    if "validation" in ev:
        s["validation_nll"] = ev["validation"]["nll"]
    for name, r in ev.items():
        if name.startswith("ood:"):
            s[f"ood_{name[4:]}_acc"] = r["accuracy"]
    if "train" in ev and "test" in ev:
        s["gap"] = ev["train"]["accuracy"] - ev["test"]["accuracy"]
    if "test" in ev:
        s["test_nll"] = ev["test"]["nll"]
        s["test_ece"] = ev["test"]["ece"]
    if "spectra" in metrics:
        s["eff_rank"] = metrics["spectra"]["effective_rank"]
    if "sharpness" in metrics:
        s["sharpness"] = metrics["sharpness"]["mean_increase"]
    for key in ("train_time_s", "train_cpu_time_s", "peak_memory_mib", "wall_time_s"):
        if metrics.get(key) is not None:
            s[key] = float(metrics[key])
    return s


# --- the CLI's entry: validation first, then an atomic output folder ------------------------------------------------
def train(cfg: TrainConfig, *, progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Validate, train into `<output_dir>.tmp-<pid>`, then rename it to `output_dir`. An existing `output_dir` is an
    error unless `overwrite: true` (then it is replaced only once the new run is complete)."""
    validate(cfg)
    final = Path(cfg.output_dir)
    if final.exists() and not cfg.overwrite:
        raise ConfigError(f"output_dir {os.fspath(final)!r} already exists; set overwrite: true or choose another")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        metrics = run(cfg, tmp, progress=progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final, metrics

