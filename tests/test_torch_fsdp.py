"""save_adapter / load_adapter under FSDP2 (torch.distributed.fsdp.fully_shard), 2 CPU processes with gloo:
the sharded adapter is gathered and written once by rank 0, reloads into a single-process model with equal
outputs, and loads back into the sharded model. The model has an in-place residual after an adapted Linear."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from tucker_peft import _format  # noqa: E402
from tucker_peft.backends.torch import AdapterConfig, adapted_layers, inject, load_adapter, save_adapter  # noqa: E402

CONFIG = dict(kind="tucker", ranks=3, target_modules=["fc1", "fc2"], alpha=2.0, trainable=["head.bias"])


class _Res(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h += x  # in place on an adapted Linear's output: it must not be a view
        h = torch.relu(self.fc2(h))
        return self.head(h)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return _Res()


def _x() -> torch.Tensor:
    return torch.randn(5, 8, generator=torch.Generator().manual_seed(42))


def _worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'rendezvous')}", rank=rank,
                            world_size=world)
    try:
        model = inject(_model(), AdapterConfig(**CONFIG))
        mesh = init_device_mesh("cpu", (world,))
        fully_shard(model.fc1, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert any(type(p).__name__ == "DTensor" for p in model.parameters())
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(3):
            loss = model(torch.randn(4, 8, generator=g)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            y = model(_x())
        save_adapter(model, os.path.join(out, "ad"))  # a collective: every rank calls it, rank 0 writes
        assert os.path.isfile(os.path.join(out, "ad", _format.ADAPTER_FILE))  # in place when it returns
        # Load back into the sharded model: values are scattered into the existing DTensor shards.
        with torch.no_grad():
            for _, h in adapted_layers(model):
                for p in h.adapters["default"].params.values():
                    p.zero_()
        load_adapter(model, os.path.join(out, "ad"))
        with torch.no_grad():
            y2 = model(_x())
        torch.save({"y": y, "y2": y2}, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_fsdp2_save_gathers_and_load_reshards(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    torch.testing.assert_close(r0["y"], r1["y"])  # one model, sharded over both ranks
    torch.testing.assert_close(r0["y2"], r0["y"])  # reloading into the sharded model restored it
    fresh = _model()
    with torch.no_grad():
        y_base = fresh(_x())
    load_adapter(fresh, tmp_path / "ad")
    with torch.no_grad():
        y = fresh(_x())
    assert not torch.allclose(y, y_base)  # training moved the adapter (and the trainable head bias)
    torch.testing.assert_close(y, r0["y"])
    assert sorted(os.listdir(tmp_path / "ad")) == [_format.ADAPTER_FILE]
