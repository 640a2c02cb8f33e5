"""Run by test_vla_train.py under torchrun (2 CPU processes, gloo): DDP keeps gradients and weights in sync,
then the real training entry point runs distributed. Argument: path of a training YAML."""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vla_stack.policy.vla.modeling_vla import VlaModel
from vla_stack.policy.vla.train import setup_distributed, train

from vla_helpers import tiny_batch, tiny_config

rank, world, _ = setup_distributed()
assert world == 2 and dist.get_backend() == "gloo"
torch.manual_seed(0)  # same initial weights on both ranks (DDP also broadcasts them)
model = VlaModel(tiny_config())
ddp = DistributedDataParallel(model)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(2):
    batch = tiny_batch(model)
    batch["actions"] = batch["actions"] + rank  # different data on each rank
    loss, _ = ddp(batch, noise_samples=2)
    opt.zero_grad()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    gathered = [torch.zeros_like(grads) for _ in range(world)]
    dist.all_gather(gathered, grads)
    torch.testing.assert_close(gathered[0], gathered[1])
    opt.step()
params = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(params) for _ in range(world)]
dist.all_gather(gathered, params)
torch.testing.assert_close(gathered[0], gathered[1])
result = train(sys.argv[1], progress=False)
assert result["world_size"] == 2
print(f"rank {rank} in sync")
dist.destroy_process_group()
