"""The Hugging Face workflow with the real transformers Trainer: save_model / save_pretrained of an adapted
model gives exactly the base model to from_pretrained, save_adapter shares the directory, and
from_pretrained + load_adapter reproduces the trained logits. Tiny config-built models, no downloads."""

from __future__ import annotations

import copy
import os

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch import nn  # noqa: E402

from tucker_peft import _format  # noqa: E402
from tucker_peft.backends.torch import (AdapterConfig, adapted_layers, inject, load_adapter, merge,  # noqa: E402
                                        save_adapter, set_adapter, unmerge)


class _Data(torch.utils.data.Dataset):
    def __init__(self, make, n=16):
        g = torch.Generator().manual_seed(3)
        self.items = [make(g) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    data = _Data(lambda g: {"input_ids": torch.randint(0, 64, (12,), generator=g),
                            "labels": torch.randint(0, 3, (), generator=g)})
    batch = {"input_ids": torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(9))}
    return model, data, batch, ["query", "value"]


def _vit():
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=37, num_labels=3)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg)
    data = _Data(lambda g: {"pixel_values": torch.randn(3, 16, 16, generator=g),
                            "labels": torch.randint(0, 3, (), generator=g)})
    batch = {"pixel_values": torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(9))}
    return model, data, batch, ["query", "value", "projection"]  # projection: the patch-embedding Conv2d


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _train(model, data, out):
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=5e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return trainer


@pytest.mark.parametrize("init", ["zero", "hosvd"])
@pytest.mark.parametrize("make", [_bert, _vit], ids=["bert", "vit"])
def test_trainer_save_model_then_from_pretrained_and_load_adapter(tmp_path, make, init):
    model, data, batch, targets = make()
    base = copy.deepcopy(model)
    y_base = _logits(base, batch)
    inject(model, AdapterConfig(kind="tucker", ranks=4, target_modules=targets, init=init))
    y_start = _logits(model, batch)
    trainer = _train(model, data, tmp_path / "run")
    y_trained = _logits(model, batch)
    assert not torch.allclose(y_trained, y_start)  # training moved the adapter

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    save_adapter(model, out)  # into the same directory: no collision, no adapter_config.json
    assert _format.ADAPTER_FILE in os.listdir(out) and "adapter_config.json" not in os.listdir(out)
    cls = type(base)
    plain, info = cls.from_pretrained(str(out), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info["missing_keys"]
    assert all(".adapters." in k for k in info["unexpected_keys"]), info["unexpected_keys"]
    exact = dict(rtol=0, atol=0) if init == "zero" else {}  # hosvd: W = residual + s·ΔW₀, one rounding
    for (k, v), (k0, v0) in zip(plain.state_dict().items(), base.state_dict().items()):
        assert k == k0
        torch.testing.assert_close(v, v0, **exact)
    torch.testing.assert_close(_logits(plain, batch), y_base, **exact)

    load_adapter(plain, out)
    torch.testing.assert_close(_logits(plain, batch), y_trained)


@pytest.mark.parametrize("setup", ["several", "hosvd"])
def test_state_dict_round_trip_and_merge(setup):
    model, _, batch, _ = _bert()
    base = copy.deepcopy(model)
    names = ["a", "b"] if setup == "several" else ["h"]

    def adapted(seed):
        m = copy.deepcopy(base)
        if setup == "several":
            inject(m, AdapterConfig(kind="tucker", ranks=3, target_modules=["query", "key"]), "a")
            inject(m, AdapterConfig(kind="lora", ranks=2, target_modules=["query"]), "b")
        else:
            inject(m, AdapterConfig(kind="cp", ranks=3, target_modules=["query", "value"], init="hosvd"), "h")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, h in adapted_layers(m):
                for d in h.adapters.values():
                    for p in d.params.values():
                        p.add_(0.05 * torch.randn(p.shape, generator=g))
        return m

    m, other = adapted(1), adapted(2)
    sd = m.state_dict()
    assert not any("base_layer" in k for k in sd)
    assert "bert.encoder.layer.0.attention.self.query.weight" in sd
    assert f"bert.encoder.layer.0.attention.self.query.adapters.{names[-1]}.params.factor_0" in sd \
        or f"bert.encoder.layer.0.attention.self.query.adapters.{names[-1]}.params.A" in sd
    exact = dict(rtol=0, atol=0) if setup == "several" else {}
    for k, v in base.state_dict().items():  # the plain keys hold the base model ('hosvd' residual added back)
        torch.testing.assert_close(sd[k], v, **exact)
    other.load_state_dict(sd, strict=True)
    for name in names:
        set_adapter(m, name)
        set_adapter(other, name)
        torch.testing.assert_close(_logits(other, batch), _logits(m, batch))
    # A merged adapter is taken out again: the plain keys still hold the base weights ...
    merge(m)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v)
    fresh = adapted(3)
    fresh.load_state_dict(m.state_dict(), strict=True)  # ... and loading them into an unmerged model is right too
    set_adapter(fresh, names[-1])
    torch.testing.assert_close(_logits(fresh, batch), _logits(m, batch))
    unmerge(m)


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 8, 6))  # stacked experts: a bare 3-D parameter
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.einsum("bi,eio->bo", x, self.w))


@pytest.mark.parametrize("init", ["zero", "hosvd"])
def test_parametrized_parameter_keeps_its_plain_key(init):
    base = nn.Sequential(_Experts())
    m = copy.deepcopy(base)
    inject(m, AdapterConfig(kind="tucker", ranks=2, target_parameters=["0.w"], init=init))
    with torch.no_grad():
        for _, h in adapted_layers(m):
            for p in h.adapters["default"].params.values():
                p.add_(0.1)
    sd = m.state_dict()
    assert "0.w" in sd and not any("parametrizations" in k and k.endswith("original") for k in sd)
    exact = dict(rtol=0, atol=0) if init == "zero" else {}
    torch.testing.assert_close(sd["0.w"], base.state_dict()["0.w"], **exact)
    plain = copy.deepcopy(base)
    with torch.no_grad():
        plain[0].w.zero_()
    res = plain.load_state_dict(sd, strict=False)  # a plain model takes the base value, ignores the adapter
    assert not res.missing_keys and all(".adapters." in k for k in res.unexpected_keys)
    torch.testing.assert_close(plain[0].w, base[0].w, **exact)
    other = copy.deepcopy(base)
    inject(other, AdapterConfig(kind="tucker", ranks=2, target_parameters=["0.w"], init=init))
    other.load_state_dict(sd, strict=True)
    x = torch.randn(5, 8)
    torch.testing.assert_close(other(x), m(x))
