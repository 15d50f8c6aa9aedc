"""Adapted models under DistributedDataParallel (2 CPU processes, gloo); torch.compile: test_torch_compile.py."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from tucker_peft.backends.torch import AdapterConfig, inject  # noqa: E402


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 4))


def _worker(rank: int, world: int, out: str, kind: str) -> None:
    torch.set_num_threads(1)
    # A file rendezvous: no TCP port to race for on a busy CI machine.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        model = inject(_model(), AdapterConfig(kind=kind, ranks=3, target_modules=["0", "2", "5"], alpha=2.0))
        base = {k: v.detach().clone() for k, v in model.state_dict().items() if ".adapters." not in k}
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.05)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(3):
            x = torch.randn(4, 3, 6, 6, generator=g)
            loss = ddp(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "base": base}, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["tucker"])
def test_ddp_gloo_two_processes(tmp_path, kind):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(2, str(tmp_path), kind), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    adapter_keys = [k for k in r0["state"] if ".adapters." in k and ".init_" not in k]
    assert adapter_keys
    start = {k: v for k, v in inject(_model(), AdapterConfig(kind=kind, ranks=3, target_modules=["0", "2", "5"],
                                                             alpha=2.0)).state_dict().items()}
    for k in adapter_keys:
        assert torch.equal(r0["state"][k], r1["state"][k]), k  # gradients were all-reduced
    assert any(not torch.equal(r0["state"][k], start[k]) for k in adapter_keys)  # and training moved them
    for k, v in r0["base"].items():
        assert torch.equal(r0["state"][k], v) and torch.equal(r1["state"][k], v), k  # base never changes
