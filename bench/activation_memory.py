#!/usr/bin/env python
"""Activation memory each method adds: the bytes autograd saves for the backward in one training forward.

Deterministic (no timing), so it runs on a CPU and predicts the activation part of the GPU peak-memory ratios:
every tensor packed by autograd during one training forward of bench.py's model is recorded once per storage;
parameters (the frozen weights, the LoRA factors) are excluded, so what remains is activations (and the per-step
tensors methods keep for the backward). LoRASC setups first go through 4 stage boundaries (short steps on a
4-token batch), so the slow experts of 4 stages are in place. Transient buffers freed within the forward (e.g. a
perturbed weight) are not counted: they raise the peak by at most one layer's worth.

    python bench/activation_memory.py --preset 150m --seq-len 128 [--methods flat_lora,lora_dropout]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _bench():
    spec = importlib.util.spec_from_file_location("genlora_bench_am", os.path.join(HERE, "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved_bytes(model, ids) -> tuple[int, int, torch.Tensor]:
    """(bytes, number of storages, loss) of what autograd saves in one training forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    return sum(seen.values()), len(seen), loss


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="150m")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--methods", default=None, help="comma-separated setup names (default: every bf16 training setup)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = _bench()
    bargs = bench.parse_args(["--preset", args.preset, "--device", "cpu", "--seq-len", str(args.seq_len),
                              "--batch-size", str(args.batch_size), "--steps", "1", "--warmup", "0"])
    bargs.phase_steps = 0
    wanted = args.methods.split(",") if args.methods else None
    setups = [s for s in bench.DEFAULT_SETUPS if s.get("kind") != "inference" and s.get("base") != "4bit"
              and (wanted is None or s["name"] in wanted or s["name"] == "plain")]
    runner = bench.Runner(bargs, torch.device("cpu"), torch.bfloat16)
    ids = runner.batches[0]
    short = ids[:, :4]
    rows = []
    for setup in setups:
        runner.reset_lora()
        stages = 4 if bench._uses(setup, "lorasc") else 0
        plan = {"stage_length": 1 if stages else None}
        methods = bench.make_methods(setup, plan)
        handle = runner._attach(setup, methods, total_steps=100) if methods else None
        opt = torch.optim.AdamW(runner.trainable, lr=1e-4)
        if handle is not None:
            handle.bind_optimizer(opt)
        runner.model.train()
        with warnings.catch_warnings(), bench.setup_env(setup):
            warnings.simplefilter("ignore")
            for _ in range(stages + 1 if stages else 0):  # stage_steps=1: a boundary at every step
                runner._step(handle, opt, short)
            if handle is not None:
                handle.begin_step()
            nbytes, n, loss = saved_bytes(runner.model, ids)
            loss.backward()  # close the step the handle opened
            if handle is not None:
                handle.optimizer_step(opt)
            opt.zero_grad(set_to_none=True)
            slow_rank = handle.method("lorasc").slow_rank(handle.slots[0]) if stages else None
            if handle is not None:
                handle.detach()
        runner.reset_lora()
        rows.append({"name": setup["name"], "saved_bytes": nbytes, "storages": n, "slow_rank": slow_rank})
        print(f"{setup['name']:<18} {nbytes / 2**20:9.1f} MiB saved in {n} storages", file=sys.stderr, flush=True)
    plain = next(r for r in rows if r["name"] == "plain")["saved_bytes"]
    tokens = args.batch_size * args.seq_len
    print(f"\n| setup | saved for backward, MiB ({tokens} tokens) | per token, KiB | x plain | extra per token, KiB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['saved_bytes'] / 2**20:.1f} | {r['saved_bytes'] / tokens / 1024:.1f} | "
              f"{r['saved_bytes'] / plain:.3f} | {(r['saved_bytes'] - plain) / tokens / 1024:+.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"preset": args.preset, "tokens": tokens, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
