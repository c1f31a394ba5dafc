"""The `genlora` command (experiments; the library itself never imports this module).

    genlora train CONFIG.yaml [--key=value ...]      one fine-tuning run (keys: genlora.experiments.config.TrainConfig)
    genlora compare CONFIG.yaml [--quick] [--key=value ...]
                                                     a resumable grid of runs with tables and plots (CompareConfig)
    genlora eval ADAPTER DATA [--ensemble[=N]] ...   evaluate a saved adapter (plain PEFT load) on a data set

Overrides use the YAML keys with dots: `--training.lr=1e-4`, `--data.ood=[vader_tweets]`, `--base.training.epochs=1`.
Every config error (unknown key, wrong type, value out of range, missing data) is reported, naming the key, before
any output folder is created.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

USAGE = __doc__


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _split_args(argv: list[str], n_positional: int, flags: tuple[str, ...] = ()) -> tuple[list[str], list[str], set]:
    positional, overrides, seen = [], [], set()
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in flags:
            seen.add(a)
        elif a.startswith("--"):
            if "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{a}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(a)
        elif len(positional) < n_positional:
            positional.append(a)
        else:
            raise SystemExit(f"genlora: unexpected argument {a!r}\n\n{USAGE}")
        i += 1
    if len(positional) != n_positional:
        raise SystemExit(f"genlora: missing argument(s)\n\n{USAGE}")
    return positional, overrides, seen


def cmd_train(argv: list[str]) -> int:
    from .experiments.config import TrainConfig, parse_config
    from .experiments.train import train

    (path,), overrides, _ = _split_args(argv, 1, ("--no-progress",))
    cfg = parse_config(TrainConfig, path, overrides)
    out, metrics = train(cfg, progress="--no-progress" not in argv)
    print(json.dumps(metrics["summary"], indent=1))
    print(f"genlora train: wrote {out}", file=sys.stderr)
    return 0


def cmd_compare(argv: list[str]) -> int:
    from .experiments.compare import compare
    from .experiments.config import CompareConfig, dotted_to_nested, parse_config

    (path,), overrides, flags = _split_args(argv, 1, ("--quick", "--no-progress"))
    cfg = parse_config(CompareConfig, path, overrides)
    if "--quick" in flags:
        if not cfg.quick:
            raise SystemExit("genlora compare: --quick needs a `quick:` section of dotted-key overrides in the config")
        cfg = parse_config(CompareConfig, path, overrides, extra_layers=[dotted_to_nested(cfg.quick)])
    results = compare(cfg, progress="--no-progress" not in flags)
    print(open(os.path.join(cfg.output_dir, "results.md")).read())
    return 0 if results else 1


def cmd_eval(argv: list[str]) -> int:
    from pathlib import Path

    import yaml

    from .experiments.config import ConfigError, DataConfig, ModelConfig, parse_config, TrainConfig
    from .experiments.data import check_source, load_source
    from .experiments.evaluate import ensemble_forward, evaluate_sets, load_adapter
    from .experiments.models import resolve_device

    p = argparse.ArgumentParser(prog="genlora eval", description="Evaluate a saved adapter on a data set.")
    p.add_argument("adapter", help="adapter folder (or a `genlora train` output folder holding adapter/)")
    p.add_argument("data", help="built-in name (vader_movie, vader_tweets, vader_amazon, vader_nyt) or a local file")
    p.add_argument("--base_model", default=None, help="local base model folder (default: from the run's config.yaml, "
                   "else the adapter's base_model_name_or_path, else the packaged all-MiniLM-L6-v2)")
    p.add_argument("--num_labels", type=int, default=None)
    p.add_argument("--max_length", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--size", type=int, default=None, help="evaluate on a fixed random subset of this many examples")
    p.add_argument("--text_column", default=None)
    p.add_argument("--label_column", default=None)
    p.add_argument("--ece_bins", type=int, default=15)
    p.add_argument("--ensemble", nargs="?", const=-1, type=int, default=None,
                   help="LoRA Dropout test-time ensemble with N members (default: the saved n_test)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    args = p.parse_args(argv)

    adapter = Path(args.adapter)
    run_cfg = None
    if (adapter / "adapter").is_dir():
        run_cfg_path, adapter = adapter / "config.yaml", adapter / "adapter"
    else:
        run_cfg_path = adapter.parent / "config.yaml"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{args.adapter!r} is not a PEFT adapter folder (no adapter_config.json)")
    if run_cfg_path.is_file():
        with open(run_cfg_path) as f:
            run_cfg = parse_config(TrainConfig, yaml.safe_load(f))
    model_cfg = run_cfg.model if run_cfg else ModelConfig()
    if args.base_model:
        model_cfg = ModelConfig(path=args.base_model, num_labels=model_cfg.num_labels, dtype=model_cfg.dtype)
    elif run_cfg is None:
        with open(adapter / "adapter_config.json") as f:
            base = json.load(f).get("base_model_name_or_path")
        if base and (Path(base) / "config.json").is_file():
            model_cfg = ModelConfig(path=base)
    if args.num_labels is not None:
        model_cfg = ModelConfig(path=model_cfg.path, num_labels=args.num_labels, dtype=model_cfg.dtype,
                                verify_sha256=model_cfg.verify_sha256)
    data_cfg = run_cfg.data if run_cfg else DataConfig()
    data_cfg = DataConfig(
        dataset=args.data,
        text_column=args.text_column or data_cfg.text_column,
        label_column=args.label_column or data_cfg.label_column,
        max_length=args.max_length or data_cfg.max_length,
        data_dir=data_cfg.data_dir,
        train_size=None,
        test_size=None,
    )
    check_source(args.data, "DATA")
    device = resolve_device(args.device)
    data = load_source(args.data, data_cfg, model_cfg.num_labels)
    if args.size is not None and args.size < len(data):
        import numpy as np

        data = data.subset(np.sort(np.random.default_rng(0).permutation(len(data))[: args.size]))
    model, tokenizer = load_adapter(adapter, model_cfg, device)
    forward, info = None, None
    if args.ensemble is not None:
        forward, handle_or_reason = ensemble_forward(model, adapter, None if args.ensemble < 1 else args.ensemble)
        if forward is None:
            print(f"genlora eval: --ensemble ignored: {handle_or_reason}", file=sys.stderr)
            info = {"used": False, "reason": handle_or_reason}
        else:
            info = {"used": True, "n_test": forward.n_test}
    res = evaluate_sets(model, tokenizer, {args.data: data}, data_cfg.max_length, args.batch_size, device,
                        args.ece_bins, forward)[args.data]
    res = {"adapter": os.fspath(adapter), "data": args.data, "ensemble": info, **res}
    if args.output:
        with open(args.output, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "reliability"}, indent=1))
    return 0


COMMANDS = {"train": cmd_train, "compare": cmd_compare, "eval": cmd_eval}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"genlora: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in argv[1:]) and argv[0] != "eval":
        return _help(argv[0])
    _quiet_libraries()
    try:
        from .experiments.config import ConfigError
    except ImportError as e:
        print(f"genlora: the experiment runner needs its extras: pip install 'genlora[experiments]' ({e})",
              file=sys.stderr)
        return 2
    try:
        return cmd(argv[1:])
    except ConfigError as e:
        print(f"genlora {argv[0]}: config error: {e}", file=sys.stderr)
        return 2


def _help(command: str) -> int:
    from .experiments import config as c

    cls = c.TrainConfig if command == "train" else c.CompareConfig
    print(USAGE)
    print(f"Keys of `genlora {command}` configs (defaults shown):\n")
    import yaml

    print(yaml.safe_dump(c.to_dict(cls()), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
