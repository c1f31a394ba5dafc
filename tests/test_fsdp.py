"""FSDP2 (`torch.distributed.fsdp.fully_shard`), two CPU processes (gloo), against one process with the same global
batch: the weight-noise methods act on the weight as each layer's forward gathers it (row norms included, no extra
gather), RM-LoRA's regularizer and masks work on sharded LoRA factors, LoRA Dropout on the activations; the adapter
matches up to reduction order and the frozen shards stay bit-identical. LoRASC refuses sharded LoRA parameters."""

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))

STEPS = 5


def make_methods():
    import genlora

    return [genlora.FlatLoRA(sigma=0.2, schedule="linear"), genlora.RMLoRA(k=2, reg_lambda=0.1),
            genlora.LoRADropout(p=0.2)]


def global_batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 64, (4, 10), generator=g) for _ in range(STEPS)]


def full(t):
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def train(rank, world, init_file, out_dir):
    import genlora
    from conftest import make_llama_peft
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = make_llama_peft(seed=0)
    handle = genlora.attach(model, *make_methods(), total_steps=STEPS)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    if world > 1:
        mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert type(handle.slots[0].base_layer.weight).__name__ == "DTensor"
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    handle.bind_optimizer(opt)
    model.train()
    for ids in global_batches():
        local = ids.chunk(world)[rank]
        handle.begin_step()
        model(input_ids=local, labels=local).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        handle.optimizer_step(opt)
        opt.zero_grad()
    adapter = {n: full(p.detach()).clone() for n, p in model.named_parameters() if "lora_" in n}
    unchanged = all(torch.equal(full(p.detach()), frozen[n]) for n, p in model.named_parameters()
                    if not p.requires_grad)
    stds = {k: v.clone() for k, v in handle.method("flat_lora")._stds.items()}
    torch.save({"adapter": adapter, "unchanged": unchanged, "stds": stds}, os.path.join(out_dir, f"r{rank}_{world}.pt"))
    if world > 1:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(tmp_path):
    mp.spawn(train, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    train(0, 1, None, str(tmp_path))
    r0, r1, single = (torch.load(tmp_path / f) for f in ("r0_2.pt", "r1_2.pt", "r0_1.pt"))
    assert r0["unchanged"] and r1["unchanged"] and single["unchanged"]
    # the sharded run computed every layer's row norms inside the forward, from the gathered weight
    assert set(r0["stds"]) == set(single["stds"])
    for k in single["stds"]:
        torch.testing.assert_close(r0["stds"][k], single["stds"][k], rtol=1e-4, atol=1e-6)
    for k in single["adapter"]:
        assert torch.equal(r0["adapter"][k], r1["adapter"][k]), k
        torch.testing.assert_close(r0["adapter"][k], single["adapter"][k], rtol=1e-4, atol=1e-5)


def _lorasc_refusal(rank, world, init_file, out_dir):
    import genlora
    from conftest import make_llama_peft
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = make_llama_peft(seed=0)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (world,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        genlora.attach(model, genlora.LoRASC(stage_steps=2))
        message = "attached"
    except ValueError as e:
        message = str(e)
    with open(os.path.join(out_dir, f"lorasc{rank}.txt"), "w") as f:
        f.write(message)
    dist.destroy_process_group()


@pytest.mark.slow
def test_lorasc_refuses_sharded_lora_parameters(tmp_path):
    mp.spawn(_lorasc_refusal, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert "train LoRASC with DDP" in (tmp_path / "lorasc0.txt").read_text()
