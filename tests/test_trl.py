"""TRL's trainers with genlora (`GenLoRATrainerMixin` + TRL's trainer class): SFT with and without completion-only
loss and with packing, and DPO, whose loss TRL computes itself. The regularizer reaches every micro-step's
backpropagated objective exactly once (from the model's loss for SFT, added by the mixin for DPO), and the adapter
TRL saves is the deployed model (reloaded with plain PEFT)."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_install, tiny_llama_config

import genlora

try:
    import trl
except ImportError:  # pragma: no cover - the test setup installs it
    trl = None

pytestmark = needs_install(trl is not None, "trl", "bash scripts/setup.sh")

WORDS = [f"w{i}" for i in range(58)]


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, "[UNK]": 2, "[BOS]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]",
                                   bos_token="[BOS]")


def sentence(g, n):
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))


def peft_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_llama_config())
    base.config.pad_token_id = 0
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            task_type="CAUSAL_LM"))
    return model


def methods():
    return [genlora.RMLoRA(k=2, reg_lambda=0.1), genlora.FlatLoRA(sigma=0.05),
            genlora.LoRASC(stage_steps=2, alpha=0.7, noise_lambda=0.1)]


def spy_backprops(handle):
    """Per optimizer step: (regularizer terms backpropagated from the model's loss, from handle.loss)."""
    seen = []
    original = handle.pre_optimizer_step

    def spy():
        seen.append((handle.objective.backprops["outputs"], handle.objective.backprops["hand"]))
        original()

    handle.pre_optimizer_step = spy
    return seen


def reload_matches(model, folder):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_llama_config())
    loaded = PeftModel.from_pretrained(base, folder).eval()
    ids = torch.randint(4, 60, (2, 7), generator=torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("completion_only_loss, packing", [(False, False), (True, False), (False, True)])
def test_sft_trainer(completion_only_loss, packing, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    class GenLoRASFTTrainer(genlora.GenLoRATrainerMixin, SFTTrainer):
        pass

    g = torch.Generator().manual_seed(0)
    if packing:
        data = Dataset.from_list([{"text": sentence(g, 5)} for _ in range(24)])
    else:
        data = Dataset.from_list([{"prompt": sentence(g, 4) + " ", "completion": sentence(g, 3)} for _ in range(16)])
    model = peft_model()
    handle = genlora.attach(model, *methods())
    seen = spy_backprops(handle)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                     save_strategy="no", bf16=False, completion_only_loss=completion_only_loss, packing=packing, max_length=12,
                     disable_tqdm=True)
    trainer = GenLoRASFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer(),
                                genlora_handle=handle)
    trainer.train()
    assert handle.global_step == 4
    # TRL computes the SFT loss itself (fused LM head, per-token log-probs / num_items_in_batch): the model's returned
    # loss is not backpropagated, the mixin adds the regularizer once per micro-step
    assert seen == [(0, 2)] * 4
    trainer.save_model(str(tmp_path / "adapter"))
    assert reload_matches(model, tmp_path / "adapter") < 1e-5  # the deployed model (LoRASC: slow experts + alpha)


def test_dpo_trainer_adds_the_regularizer_to_its_own_loss(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class GenLoRADPOTrainer(genlora.GenLoRATrainerMixin, DPOTrainer):
        pass

    g = torch.Generator().manual_seed(1)
    data = Dataset.from_list([{"prompt": sentence(g, 4) + " ", "chosen": sentence(g, 3), "rejected": sentence(g, 3)}
                              for _ in range(16)])
    model = peft_model()
    handle = genlora.attach(model, *methods())
    seen = spy_backprops(handle)
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], use_cpu=True,
                     save_strategy="no", bf16=False, max_length=16, disable_tqdm=True)
    trainer = GenLoRADPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer(),
                                genlora_handle=handle)
    trainer.train()
    assert handle.global_step == 4
    # DPO's loss is built from log-probabilities, not the model's returned loss: the mixin adds the regularizer,
    # once per micro-step; the reference forward (adapter disabled, no grad) adds nothing
    assert seen == [(0, 2)] * 4
    trainer.save_model(str(tmp_path / "adapter"))
    assert reload_matches(model, tmp_path / "adapter") < 1e-5


def test_plain_trainer_with_a_loss_that_ignores_the_models_raises_clearly(tmp_path):
    """Without the mixin, DPO backpropagates a loss without the regularizer: refused, not silently dropped."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    g = torch.Generator().manual_seed(1)
    data = Dataset.from_list([{"prompt": sentence(g, 4) + " ", "chosen": sentence(g, 3), "rejected": sentence(g, 3)}
                              for _ in range(4)])
    model = peft_model()
    handle = genlora.attach(model, genlora.RMLoRA(k=2))
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                     learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", max_length=16,
                     disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer(),
                         callbacks=[genlora.GenLoRACallback(handle)])
    with pytest.raises(RuntimeError, match="GenLoRATrainerMixin"):
        trainer.train()
