"""The experiment runner behind the `genlora` command: one runner for every task (text classification, few-shot image
classification, causal LM), with one training loop, one evaluator, one report writer and one config parser.

Files, one concept each:
    config.py           the run config (TrainConfig and its sections), validated in __post_init__
    method_entries.py   typed method entries ({method: flat_lora, sigma: 0.1}); method seeds derived from the run seed
    compare_config.py   the comparison config (variants, tuning)
    parsing.py          YAML + --key=value overrides through jsonargparse
    tasks/              what differs per task: splits, base model and LoRA targets, encoding, metrics
    data.py             VADER sentences and the fixed splits; local_files.py: your CSV/JSONL, read verbatim
    vision_data.py      Fashion-MNIST and MNIST-5k; vit.py: the ViT base, pretrained once and cached
    models.py           local Hugging Face folders, the packaged all-MiniLM-L6-v2; smollm.py: SmolLM2 from its GGUF
    loop.py             the training loop (curves, early stopping)
    evaluate.py         the evaluator (plain PEFT reload, LoRA Dropout's ensemble)
    run.py              one run end to end (`genlora train`); adapter_eval.py: `genlora eval`
    tuning.py           the search on validation; compare.py: the comparison (`genlora compare`)
    stats.py            intervals, paired tests, minimum detectable difference; report.py: tables; plots.py: figures
    metrics.py          accuracy, NLL, ECE, effective rank, sharpness, memory; files.py: atomic writes;
    progress.py         progress bars / plain progress lines

Needs the `experiments` extra (`pip install 'genlora[experiments]'`). The core library never imports this package.
"""
