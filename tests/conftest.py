"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

torch.set_num_threads(2)

# --- optional installs ---------------------------------------------------------------------------------------------
# A test that needs something outside the package's own dependencies (the offline model and data, a GPU) says so with
# `needs_install(...)`. The README's test command (`bash scripts/test.sh`) installs all of it and sets
# GENLORA_REQUIRE_INSTALLS=1, under which such a skip fails the run: a green CI cannot hide a skipped suite. Skips for
# hardware (no CUDA device) are not install skips and stay skips.
MISSING_INSTALL = "missing install"


def needs_install(available: bool, what: str, command: str):
    """`skipif` marker for a test that needs `what`, which `command` installs."""
    return pytest.mark.skipif(not available, reason=f"{MISSING_INSTALL}: {what} (run `{command}`)")


def _install_skips(terminalreporter) -> list[str]:
    found = []
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        if MISSING_INSTALL in reason:
            found.append(f"{report.nodeid}: {reason}")
    return found


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("GENLORA_REQUIRE_INSTALLS") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = _install_skips(reporter) if reporter is not None else []
    if skipped:
        session.config.genlora_install_skips = skipped
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = getattr(config, "genlora_install_skips", None)
    if skipped:
        terminalreporter.section("tests skipped for a missing install (GENLORA_REQUIRE_INSTALLS=1: a failure)", red=True)
        for line in skipped:
            terminalreporter.line(line, red=True)


class MLP(nn.Module):
    """Regression/classification toy: two LoRA-able linears."""

    def __init__(self, n_in=16, hidden=32, n_out=4, dtype=torch.float32):
        super().__init__()
        self.lin0 = nn.Linear(n_in, hidden, dtype=dtype)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, n_out, dtype=dtype)

    def forward(self, x):
        return self.lin1(self.act(self.lin0(x)))


def make_mlp_peft(seed=0, r=4, dtype=torch.float32, **lora_kwargs):
    torch.manual_seed(seed)
    model = MLP(dtype=dtype)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin0", "lin1"], init_lora_weights="gaussian", **lora_kwargs)
    return get_peft_model(model, config)


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )


def make_llama_peft(seed=0, r=4, dtype=torch.float32, task="CAUSAL_LM", num_labels=2):
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_llama_config()
    if task == "SEQ_CLS":
        cfg.num_labels = num_labels
        model = LlamaForSequenceClassification(cfg)
    else:
        model = LlamaForCausalLM(cfg)
    model = model.to(dtype)
    lcfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type=task,
    )
    peft_model = get_peft_model(model, lcfg)
    # PEFT initializes B = 0; give B small values so the merged weight differs from W in tests.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g).to(p.dtype))
    return peft_model


class ListDataset(torch.utils.data.Dataset):
    """A Trainer dataset over a list of example dicts."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@pytest.fixture
def llama():
    return make_llama_peft()
