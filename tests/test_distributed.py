"""Two CPU processes (gloo) under DDP: adapters, masks and noise agree across ranks and match one process."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

STEPS = 6


def make_methods():
    import genlora

    methods = [genlora.FlatLoRA(sigma=0.2, schedule="linear"), genlora.RMLoRA(k=2, reg_lambda=0.1)]
    if hasattr(genlora, "LoRASC"):
        methods.append(genlora.LoRASC(stage_steps=3, alpha=0.5))
    return methods


def global_batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 64, (4, 10), generator=g) for _ in range(STEPS)]


def train(rank, world, init_file, out_dir):
    import genlora
    from conftest import make_llama_peft
    from peft import get_peft_model_state_dict

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = make_llama_peft(seed=0)
    handle = genlora.attach(model, *make_methods(), total_steps=STEPS)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle.bind_optimizer(opt)
    wrapped.train()
    masks, noises = [], []
    per_rank = genlora.FlatLoRA(sigma=0.2, schedule="constant", noise_per_rank=True)
    genlora.attach(make_llama_peft(seed=0), per_rank).begin_step()
    own_noise = per_rank.noise(per_rank.ctx.slots[0])
    for ids in global_batches():
        local = ids.chunk(world)[rank]
        handle.begin_step()
        noises.append(handle.method("flat_lora").noise(handle.slots[0]))
        wrapped(input_ids=local, labels=local).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        handle.optimizer_step(opt)
        masks.append([ka.clone() for ka, _ in handle.method("rm_lora").last_keep])
        opt.zero_grad()
    torch.save(
        {"adapter": get_peft_model_state_dict(model), "masks": masks, "noise": [n for n in noises if n is not None],
         "own_noise": own_noise},
        os.path.join(out_dir, f"rank{rank}_of{world}.pt"),
    )
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_each_other_and_one_process(tmp_path):
    mp.spawn(train, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    train(0, 1, None, str(tmp_path))
    r0, r1, single = (torch.load(tmp_path / f) for f in ("rank0_of2.pt", "rank1_of2.pt", "rank0_of1.pt"))
    for k in r0["adapter"]:
        assert torch.equal(r0["adapter"][k], r1["adapter"][k]), k  # identical on all ranks
        torch.testing.assert_close(r0["adapter"][k], single["adapter"][k], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(a, b) for ma, mb in zip(r0["masks"], r1["masks"]) for a, b in zip(ma, mb))
    assert len(r0["noise"]) == STEPS - 1  # linear ramp: no noise at step 0
    assert all(torch.equal(a, b) for a, b in zip(r0["noise"], r1["noise"]))
    assert not torch.equal(r0["own_noise"], r1["own_noise"])  # noise_per_rank=True: independent per rank
    assert torch.equal(r0["own_noise"], single["own_noise"])
