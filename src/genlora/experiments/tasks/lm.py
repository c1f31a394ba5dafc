"""The lm task: generative fine-tuning of a causal LM (default: SmolLM2-135M-Instruct, a 30-layer Llama decoder,
smollm.py) on sentences, with LoRA on all linear layers; the setting most LoRA users are in.

Two formats (`data.lm_format`):
- prompt: `Sentence: <text>\\nSentiment:` followed by ` <label word>`; the loss is the label word's tokens only
  (the prompt is context, labels -100). Accuracy compares the next-token probabilities of the label words' first
  tokens at the answer position (renormalised over the label words), so calibration (ECE) is measured too.
- text: the sentence as plain text plus EOS; the loss is every token (perplexity only, no labels needed).

Metrics per split: `loss` (mean NLL per target token), `ppl` = exp(loss), and with prompts `accuracy`, `nll`
(of the renormalised label-word probabilities), `ece`. Evaluation with LoRA Dropout's ensemble averages the
next-token distributions (genlora.ensemble), so the same code scores it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ConfigError, TrainConfig
from ..data import TextData, check_data, make_splits
from ..metrics import classification_metrics
from ..models import load_model_and_tokenizer, local_folder
from .base import Encoded, Task

IGNORE = -100
PROMPT = "Sentence: {text}\nSentiment:"


class CausalLM(Task):
    name = "lm"
    peft_task_type = "CAUSAL_LM"

    def __init__(self):
        self.word_ids: list[int] | None = None  # first token of each label word (prompt format)

    def model_folder(self, cfg: TrainConfig, progress: bool = False) -> Path:
        if cfg.model.path is not None:
            return local_folder(cfg.model.path)
        from ..smollm import packaged_lm_path

        return packaged_lm_path(cfg.data.data_dir, verify=cfg.model.verify_sha256)

    def prompts(self, cfg: TrainConfig) -> bool:
        return cfg.data.lm_format == "prompt"

    def check(self, cfg: TrainConfig) -> None:
        if cfg.model.path is not None:
            local_folder(cfg.model.path)
        else:
            from ..smollm import gguf_path

            gguf_path()
        n = check_data(cfg.data, cfg.model.num_labels, labels=self.prompts(cfg))
        if self.prompts(cfg) and n > len(cfg.data.label_words):
            raise ConfigError(f"data.label_words has {len(cfg.data.label_words)} words but the data has {n} labels")

    def num_labels(self, cfg: TrainConfig) -> int | None:
        return len(cfg.data.label_words) if self.prompts(cfg) else None

    def splits(self, cfg: TrainConfig, seed: int, parts: tuple[str, ...]) -> dict[str, TextData]:
        return make_splits(cfg.data, seed, parts, labels=self.prompts(cfg))

    def load_base(self, cfg: TrainConfig, seed: int):
        from transformers import AutoModelForCausalLM

        return load_model_and_tokenizer(AutoModelForCausalLM, self.model_folder(cfg), cfg.model.dtype, seed)

    # --- examples -------------------------------------------------------------------------------------------------
    def _words(self, tokenizer, cfg: TrainConfig) -> list[list[int]]:
        words = [tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in cfg.data.label_words]
        first = [w[0] for w in words]
        if len(set(first)) != len(first):
            raise ConfigError(f"data.label_words {cfg.data.label_words} start with the same token; choose words whose "
                              "first tokens differ")
        self.word_ids = first
        return words

    def encode(self, tokenizer, data: TextData, cfg: TrainConfig) -> Encoded:
        max_len = cfg.data.max_length
        features: list[dict[str, Any]] = []
        if self.prompts(cfg):
            words = self._words(tokenizer, cfg)
            for text, y in zip(data.texts, data.labels):
                answer = words[int(y)]
                prompt = tokenizer(PROMPT.format(text=text))["input_ids"]
                keep = max(1, max_len - len(answer))
                if len(prompt) > keep:  # cut the sentence, keep the `Sentiment:` cue at the end
                    cue = tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
                    prompt = prompt[: max(1, keep - len(cue))] + cue
                ids = prompt + answer
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                                 "labels": [IGNORE] * len(prompt) + answer})
            labels = np.asarray(data.labels)
        else:
            eos = tokenizer.eos_token_id
            for text in data.texts:
                ids = tokenizer(text, truncation=True, max_length=max_len - 1)["input_ids"] + [eos]
                features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)})
            labels = None
        lengths = np.fromiter((len(f["input_ids"]) for f in features), np.int64, len(features))
        return Encoded(features, lengths, labels)

    def collator(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")

    # --- scoring --------------------------------------------------------------------------------------------------
    @staticmethod
    def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(batch, positions) NLL of each next token (0 where the label is ignored)."""
        target = labels[:, 1:].to(logits.device)
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target.clamp(min=0), reduction="none")
        return nll * (target != IGNORE)

    def records(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        labels = batch["labels"]
        nll = self._token_nll(logits, labels)
        out = {"nll_sum": nll.sum(1).double().cpu().numpy(),
               "tokens": (labels[:, 1:] != IGNORE).sum(1).cpu().numpy()}
        if self.word_ids is not None:
            first = (labels != IGNORE).float().argmax(1)  # position of the answer's first token
            rows = torch.arange(len(labels))
            at = logits[rows, (first - 1).clamp(min=0)].float()  # the distribution that predicts it
            out["probs"] = torch.softmax(at[:, self.word_ids], dim=-1).double().cpu().numpy()
        return out

    def metrics(self, records: dict[str, np.ndarray], enc: Encoded, cfg: TrainConfig) -> dict[str, Any]:
        tokens = max(int(records["tokens"].sum()), 1)
        loss = float(records["nll_sum"].sum() / tokens)
        m: dict[str, Any] = {"n": len(enc), "tokens": tokens, "loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if "probs" in records and enc.labels is not None:
            m.update(classification_metrics(records["probs"], enc.labels, cfg.evaluation.ece_bins))
            m["loss"] = loss  # the LM loss on the answer tokens (classification_metrics' nll is the 2-way one)
        return m

    def batch_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
        nll = self._token_nll(logits, batch["labels"])
        return nll.sum().item(), int((batch["labels"][:, 1:] != IGNORE).sum())
