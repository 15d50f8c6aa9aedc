"""torch.compile on adapted models: one graph (fullgraph=True, no breaks), outputs and gradients equal to eager.

dynamo traces the real binding (FusedDelta's forward and backward included); float64 so that eager and compiled
agree to rounding. ``aot_eager`` runs AOTAutograd's traced forward and backward without inductor's C++ build.
"""

from __future__ import annotations

import os


import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from tucker_peft.backends.torch import AdapterConfig, adapted_layers, inject, merge, set_adapter, unmerge  # noqa: E402

KINDS = ["tucker", "tucker2", "cp", "lora"]
FORWARDS = ["rebuild", "factorized"]


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2, padding=1,
                                                                           padding_mode="reflect"),
                         nn.ReLU(), nn.Identity(), nn.Flatten(),
                         nn.Linear(8 * 36, 4)).double()


def _randomise(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, h in adapted_layers(model):
        for d in h.adapters.values():
            for p in d.params.values():
                p.data.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _grads(model: nn.Module, out: torch.Tensor, x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    cot = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * cot).sum().backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if x is not None and x.grad is not None:
        g["<input>"] = x.grad.clone()
        x.grad = None
    model.zero_grad(set_to_none=True)
    return g


def _compare(model: nn.Module, call, x: torch.Tensor | None, backend: str = "aot_eager") -> None:
    """Eager vs ``torch.compile(model, fullgraph=True)``: equal outputs and gradients, no graph break, one graph."""
    eager = call(model)
    g_eager = _grads(model, eager, x)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y = call(compiled)
    g = _grads(model, y, x)
    torch.testing.assert_close(y, eager, rtol=1e-10, atol=1e-10)
    assert g.keys() == g_eager.keys() and len(g) > 1
    for k in g:
        torch.testing.assert_close(g[k], g_eager[k], rtol=1e-9, atol=1e-10, msg=lambda m: f"{k}: {m}")
    y2 = call(compiled)  # same shapes again: no recompile
    torch.testing.assert_close(y2, eager, rtol=1e-10, atol=1e-10)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


@pytest.mark.parametrize("forward", FORWARDS)
@pytest.mark.parametrize("kind", KINDS)
def test_cnn_fullgraph_matches_eager(kind, forward):
    model = inject(_cnn(), AdapterConfig(kind=kind, ranks=3, target_modules=["0", "2", "6"], forward=forward))
    _randomise(model)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    _compare(model, lambda m: m(x), x)
    if (kind, forward) == ("tucker", "rebuild"):  # fullgraph=True already refuses any break; explain says so too
        explain = torch._dynamo.explain(model)(x)
        assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons


def _bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).double().eval()


BERT_TARGETS = {"tucker": ["query", "word_embeddings"], "tucker2": ["key"], "cp": ["value"], "lora": ["dense"]}


@pytest.mark.parametrize("forward", FORWARDS)
def test_bert_fullgraph_matches_eager(forward):
    """Every kind in one model (one adapter per kind on its own layers, all active): one trace per forward."""
    model = _bert()
    for kind, targets in BERT_TARGETS.items():
        inject(model, AdapterConfig(kind=kind, ranks=2, forward=forward, target_modules=targets), kind)
    set_adapter(model, list(BERT_TARGETS))
    _randomise(model)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    _compare(model, lambda m: m(input_ids=ids).last_hidden_state, None, backend="eager")


def test_one_graph_per_layer_geometry():
    """Layers compiled one by one: layers of equal geometry share one graph (dynamo's recompile limit is 8)."""
    layers = [nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3),
              nn.Linear(8, 4)]
    model = inject(nn.Sequential(*layers).double(), AdapterConfig(kind="tucker", ranks=2,
                                                                 target_modules=[str(i) for i in range(6)]))
    torch._dynamo.reset()
    counters.clear()
    for m in model:
        m.compile(backend="aot_eager", fullgraph=True)
    for m in model:
        shape = (2, 4, 5, 5) if isinstance(m.base_layer, nn.Conv2d) else (3, 8)
        m(torch.randn(*shape, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])


def test_several_adapters_and_merge_under_compile():
    model = inject(_cnn(), AdapterConfig(kind="tucker", ranks=3, target_modules=["0", "2", "6"]), "a")
    inject(model, AdapterConfig(kind="cp", ranks=2, target_modules=["0", "6"]), "b")
    _randomise(model)
    set_adapter(model, ["a", "b"])
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    _compare(model, lambda m: m(x), x)
    ref = model(x).detach()
    merge(model)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend="aot_eager", fullgraph=True)(x), ref)
    unmerge(model)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TUCKER_PEFT_SLOW"), reason="inductor's C++ build takes ~150 s on 2 cores; "
                    "set TUCKER_PEFT_SLOW=1")
def test_inductor_cnn_step():
    """One real inductor compile (C++ codegen): forward and backward equal eager."""
    pytest.importorskip("torch._inductor")
    model = inject(_cnn().float(), AdapterConfig(kind="tucker", ranks=3, target_modules=["0", "2", "6"]))
    _randomise(model)
    x = torch.randn(2, 3, 6, 6)
    eager = model(x)
    g_eager = _grads(model, eager)
    torch._dynamo.reset()
    y = torch.compile(model, fullgraph=True)(x)
    g = _grads(model, y)
    torch.testing.assert_close(y, eager, rtol=1e-4, atol=1e-5)
    for k in g:
        torch.testing.assert_close(g[k], g_eager[k], rtol=1e-3, atol=1e-4)


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 5, 4, dtype=torch.float64))

    def forward(self, x):  # (E, n, in) -> (E, n, out)
        return torch.einsum("eoi,eni->eno", self.w, x)


@pytest.mark.parametrize("forward", FORWARDS)
def test_parameter_adapter_and_conv1d_fullgraph(forward):
    """A bare 3-D parameter (parametrization hook) and a transformers Conv1D in one compiled graph."""
    pu = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(_Experts(), pu.Conv1D(6, 5).double())
    inject(model, AdapterConfig(kind="tucker", ranks=2, target_parameters=["0.w"]), "p")
    inject(model, AdapterConfig(kind="cp", ranks=2, target_modules=["1"], forward=forward), "c")
    set_adapter(model, ["p", "c"])
    _randomise(model)
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    _compare(model, lambda m: m(x), x)
