"""The `genlora` command (the experiment runner; the library itself never imports this module).

    genlora train CONFIG.yaml [--section.key=value ...]          one run: train, save the adapter, evaluate it
    genlora compare CONFIG.yaml [--quick] [--section.key=value ...]
                                                                 variants x seeds (x training sizes), each variant
                                                                 tuned on validation; tables, statistics, plots
    genlora eval ADAPTER DATA [--ensemble [N]] [...]             a saved adapter (plain PEFT load) on a data set

`genlora train --help` (or compare --help) lists every key with its default and meaning. Overrides use the YAML keys
with dots: --training.lr=1e-3, --data.ood=[vader_tweets], --base.training.epochs=2. Every config error (unknown key,
wrong type, value out of range, missing model or data) is reported, naming the key, before any output folder exists.
Needs the `experiments` extra: pip install 'genlora[experiments]'.
"""

from __future__ import annotations

import json
import os
import sys

USAGE = __doc__
EXTRA_MODULES = ("jsonargparse", "yaml", "scipy", "matplotlib", "docstring_parser")


def _missing_extra() -> str | None:
    import importlib.util

    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (f"genlora: the `genlora` command needs the `experiments` extra, which is not installed (missing: "
            f"{', '.join(missing)}): pip install 'genlora[experiments]'")


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(CONFIG.yaml given first, the rest): the positional config file of train/compare."""
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def cmd_train(argv: list[str]) -> int:
    from .experiments.parsing import parse_args
    from .experiments.metrics import did_not_learn
    from .experiments.run import not_learned_message, train

    path, rest = _split_config(argv)
    cfg, flags = parse_args("train", path, rest)
    out, metrics = train(cfg, progress=not flags["no_progress"])
    print(json.dumps(metrics["summary"], indent=1))
    if did_not_learn(metrics["summary"]):
        print(f"genlora train: warning: {not_learned_message(metrics['summary'])}", file=sys.stderr)
    print(f"genlora train: wrote {out}", file=sys.stderr)
    return 0


def cmd_compare(argv: list[str]) -> int:
    from .experiments.compare import compare
    from .experiments.parsing import parse_compare

    path, rest = _split_config(argv)
    cfg, flags = parse_compare(path, rest)
    results = compare(cfg, progress=not flags["no_progress"])
    with open(os.path.join(cfg.output_dir, "results.md")) as f:
        print(f.read())
    return 0 if results else 1


def eval_parser():
    from jsonargparse import ArgumentParser

    p = ArgumentParser(prog="genlora eval", exit_on_error=False,
                       description="Evaluate a saved adapter (plain PEFT load) on a data set.")
    p.add_argument("adapter", type=str, help="A `genlora train` run folder, or an adapter folder inside one.")
    p.add_argument("data", type=str, help="vader_movie, vader_tweets, vader_amazon, vader_nyt, or a local "
                   ".csv/.tsv/.jsonl/.json file.")
    p.add_argument("--ensemble", type=int, nargs="?", const=0, default=None,
                   help="LoRA Dropout's test-time ensemble with N members (bare flag: the saved n_test).")
    p.add_argument("--task", type=str, default=None, help="text or lm (default: the run's task).")
    p.add_argument("--base_model", type=str, default=None, help="Local base model folder (default: the run's).")
    p.add_argument("--num_labels", type=int, default=None)
    p.add_argument("--max_length", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--size", type=int, default=None, help="Evaluate a fixed random subset of this many examples.")
    p.add_argument("--text_column", type=str, default=None)
    p.add_argument("--label_column", type=str, default=None)
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--output", type=str, default=None, help="Also write the metrics to this JSON file.")
    p.add_argument("--no-progress", "--no_progress", dest="no_progress", action="store_true")
    return p


def cmd_eval(argv: list[str]) -> int:
    from jsonargparse import ArgumentError

    from .experiments.adapter_eval import evaluate_adapter
    from .experiments.config import ConfigError
    from .experiments.files import write_json

    try:
        args = eval_parser().parse_args(argv)
    except ArgumentError as e:
        raise ConfigError(" ".join(str(e).split())) from None
    res = evaluate_adapter(args.adapter, args.data, task=args.task, base_model=args.base_model,
                           num_labels=args.num_labels, max_length=args.max_length, batch_size=args.batch_size,
                           size=args.size, text_column=args.text_column, label_column=args.label_column,
                           ensemble=args.ensemble, device=args.device, progress=not args.no_progress)
    if args.output:
        write_json(args.output, res)
    print(json.dumps({k: v for k, v in res.items() if k != "reliability"}, indent=1))
    return 0


COMMANDS = {"train": cmd_train, "compare": cmd_compare, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:
        # `genlora ... --help | head`: the reader left; end quietly, and keep Python's exit-time flush from
        # printing a second traceback into the closed pipe.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"genlora: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    missing = _missing_extra()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    from .experiments.progress import quiet_libraries

    quiet_libraries()
    from .experiments.config import ConfigError

    if argv[0] in ("train", "compare") and any(a in ("-h", "--help") for a in argv[1:]):
        from .experiments.parsing import command_parser

        command_parser(argv[0]).print_help()
        return 0
    try:
        return command(argv[1:])
    except ConfigError as e:
        print(f"genlora {argv[0]}: config error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help of eval
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
