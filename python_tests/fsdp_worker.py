"""Worker for test_fsdp.py: a small LM with DeFINE inside, trained a few steps under FSDP2
(`fully_shard`) over gloo on CPU, or in one process (`--single`) on the whole batch.

Each rank trains on its half of every batch; FSDP2 averages the gradients, so with a mean loss the
update equals the single process's on the whole batch. Dropout masks are keyed by token id and
the seed is drawn from torch's generator, reseeded identically everywhere, so dropout stays on.
"""
import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from define_kernels import DeFINE

VOCAB, BATCH, LENGTH, STEPS = 60, 8, 6, 4


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = DeFINE(VOCAB, 16, map_dim=8, expand_dim=32, depth=2, max_groups=2,
                            padding_idx=0, dropout=0.1)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, LENGTH + 1), generator=generator) for _ in range(STEPS)]


def train(model, rows):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step, batch in enumerate(batches()):
        batch = batch[rows]
        torch.manual_seed(100 + step)
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def full_state(model):
    state = {}
    for name, value in model.state_dict().items():
        state[name] = value.full_tensor() if hasattr(value, "full_tensor") else value
    return state


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--single", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyLM()
    if args.single:
        losses = train(model, slice(None))
        torch.save({"state": full_state(model), "losses": losses}, os.path.join(args.out, "single.pt"))
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.embed, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())
    per_rank = BATCH // world
    losses = train(model, slice(rank * per_rank, (rank + 1) * per_rank))
    state = full_state(model)  # collective: every rank takes part
    torch.save({"state": state, "losses": losses, "sharded": sharded},
               os.path.join(args.out, f"fsdp_rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
