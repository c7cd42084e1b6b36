"""Watch a DistributedDataParallel LSTM on every rank and diagnose the merged recording.

Run with two processes on CPU (gloo) or one per GPU (NCCL)::

    torchrun --standalone --nproc_per_node 2 -m gradscope.examples.ddp --steps 20 --out merged.npz

Every rank trains its share of the same global batch; ``scope.gather(dst=0)`` merges the
per-timestep norms on rank 0 (``sqrt(Σ_r n_r²)/R``: the norm over the global batch of the gradient
of the rank-averaged loss that DDP applies) and rank 0 prints the diagnosis. The numbers equal a
single process training on the whole global batch (tests/capture/test_distributed.py checks it).
"""
from __future__ import annotations

import argparse
import os
from typing import Optional

import torch
from torch import nn

T, GLOBAL_BATCH, INPUT, HIDDEN = 30, 8, 4, 16


class Model(nn.Module):
    """A two-layer LSTM regressor (the example's model)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(INPUT, HIDDEN, num_layers=2)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[-1]).squeeze(-1)


def make_model(seed: int = 0, dtype=torch.float32, device="cpu") -> Model:
    """The same initial weights on every rank (DDP would broadcast rank 0's anyway)."""
    torch.manual_seed(seed)
    return Model().to(device=device, dtype=dtype)


def global_batch(step: int, dtype=torch.float32, device="cpu"):
    """The global batch of one step, identical on every rank: ``x [T, B, I]``, ``y [B]``."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(T, GLOBAL_BATCH, INPUT, generator=g, dtype=torch.float64)
    y = x[:3].sum(dim=(0, 2))  # the target depends on the first steps: a long-range task
    return x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)


def train(model: nn.Module, steps: int, rank: int = 0, world: int = 1, dtype=torch.float32,
          device="cpu", every: int = 1):
    """Train ``model`` (DDP-wrapped or not) on this rank's share of every global batch under
    ``gradscope.watch``; returns the closed scope."""
    import gradscope

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    per = GLOBAL_BATCH // world
    with gradscope.watch(model, every=every) as scope:
        for step in range(steps):
            x, y = global_batch(step, dtype, device)
            x, y = x[:, rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
            opt.zero_grad()
            loss = (model(x) - y).pow(2).mean()
            loss.backward()
            opt.step()
    return scope


def spawn_worker(rank: int, world: int, init_file: str, out: str, steps: int, dtype_name: str = "float64") -> None:
    """One rank of a CPU (gloo) DDP run started with ``torch.multiprocessing.spawn``: trains, gathers
    on rank 0, which saves the merged recording to ``out``; every rank writes ``out.rank<r>`` with
    what gather() returned there (``merged`` or ``None``). Used by tests/capture/test_distributed.py."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dtype = getattr(torch, dtype_name)
        model = DistributedDataParallel(make_model(dtype=dtype))
        scope = train(model, steps, rank, world, dtype=dtype)
        merged = scope.gather(dst=0)
        if merged is not None:
            merged.save(out)
        with open(f"{out}.rank{rank}", "w") as f:
            f.write("merged" if merged is not None else "None")
        dist.barrier()  # leave together: a rank tearing down gloo while another still works can abort
    finally:
        dist.destroy_process_group()


def main(argv: Optional[list] = None) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import gradscope

    ap = argparse.ArgumentParser(description="DDP + gradscope.watch example (run it with torchrun)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="save the merged recording here (rank 0)")
    args = ap.parse_args(argv)
    if "RANK" not in os.environ:
        print("run me with torchrun, e.g.: torchrun --nproc_per_node 2 -m gradscope.examples.ddp")
        return 2
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ["WORLD_SIZE"])
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        model = DistributedDataParallel(make_model(device=device),
                                        device_ids=[device.index] if cuda else None)
        scope = train(model, args.steps, rank, world, device=device)
        merged = scope.gather(dst=0)
        if rank == 0:
            print(f"merged {merged.meta['merged_ranks']} ranks, {len(merged)} steps, sites {list(merged.sites)}")
            print(gradscope.diagnose(merged))
            if args.out:
                merged.save(args.out)
                print(f"saved {args.out}")
        dist.barrier()  # leave together: a rank tearing down gloo while another still works can abort
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
