#!/usr/bin/env python
"""Where each method's overhead goes: compare the torch.profiler summaries of a bench run against plain LoRA.

Input: a results.json written by `bench.py --profile-dir DIR [--profile-stack]` (the summaries live in its rows).
Output (Markdown, stdout or --out): per setup the profiled step time and its extra over plain, the extra self time
per step of the ops that grew most, the extra leaf ATen ops per step (on a GPU about one kernel launch each), and,
with --profile-stack, the genlora functions the time was spent in (exclusive of nested genlora frames, inclusive of
the torch ops they call; the Python tracer inflates pure-Python time).

    python bench/profile_report.py bench/out/results.json [--top 8] [--out report.md]
"""

from __future__ import annotations

import argparse
import json
import sys


def op_table(profile: dict, key: str) -> dict[str, tuple[float, float]]:
    return {o["name"]: (o[key], o["count_per_step"]) for o in profile["ops"]}


def report(result: dict, top: int = 8) -> str:
    cuda = result["environment"]["device"].startswith("cuda")
    key = "self_device_ms_per_step" if cuda else "self_cpu_ms_per_step"
    rows = [r for r in result["rows"] if r.get("profile") and "error" not in r["profile"]]
    plain = next((r for r in rows if r["name"] == "plain"), None)
    if plain is None:
        return "no profile of the plain setup in these results\n"
    cfg = result["config"]
    p0 = plain["profile"]
    base_ops = op_table(p0, key)
    lines = [
        f"### Profile: preset `{cfg['preset']}`, batch {cfg['batch_size']} x {cfg['seq_len']}, "
        f"{result['environment'].get('gpu') or result['environment'].get('cpu')}, {cfg.get('profile_steps')} "
        f"profiled step(s) per setup{', Python stacks' if cfg.get('profile_stack') else ''}",
        "",
        "| setup | timed step ms (x plain) | profiled step ms | extra vs plain | op self-" + ("GPU" if cuda else "CPU")
        + " ms (extra) | leaf ATen ops / step (extra) | genlora Python ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        p = r["profile"]
        total = p.get("device_busy_ms_per_step") if cuda else p["op_self_cpu_ms_per_step"]
        total0 = p0.get("device_busy_ms_per_step") if cuda else p0["op_self_cpu_ms_per_step"]
        lines.append(
            f"| {r['name']} | {1e3 * r['step_s']:.1f} ({r['ratio_time']:.2f}x) | {p['wall_ms_per_step']:.1f} | "
            f"{p['wall_ms_per_step'] - p0['wall_ms_per_step']:+.1f} | {total:.1f} ({total - total0:+.1f}) | "
            f"{p['leaf_aten_ops_per_step']:.0f} ({p['leaf_aten_ops_per_step'] - p0['leaf_aten_ops_per_step']:+.0f}) | "
            f"{p.get('genlora_python_ms_per_step', 0) or 0:.1f} |")
    for r in rows:
        if r["name"] == "plain":
            continue
        p = r["profile"]
        ops = op_table(p, key)
        deltas = []
        for name in set(ops) | set(base_ops):
            ms, n = ops.get(name, (0.0, 0.0))
            ms0, n0 = base_ops.get(name, (0.0, 0.0))
            deltas.append((ms - ms0, n - n0, name))
        deltas.sort(reverse=True)
        lines += ["", f"**{r['name']}** ({' + '.join(r['methods'])}): ops whose self time grew most (ms/step, "
                  "calls/step "
                  "vs plain): " + "; ".join(f"`{name}` {d:+.2f} ms ({c:+.0f})" for d, c, name in deltas[:top]
                                            if d > 0)]
        if p.get("genlora_python"):
            lines.append("genlora functions (ms/step): " + "; ".join(
                f"`{name}` {ms:.2f}" for name, ms in p["genlora_python"][:top]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", help="results.json of a bench.py run with --profile-dir")
    p.add_argument("--top", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    with open(args.results) as f:
        text = report(json.load(f), args.top)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
