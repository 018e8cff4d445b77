"""The fused LoRA layer computes what PEFT's LoRA layer computes, gradients included."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tailor.train.fused_lora import FusedLoraLinear


def _pair(dropout: float = 0.0, bias: bool = True):
    """The same small model with PEFT's LoRA Linear and with the fused one, same weights."""
    models = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 20, bias=bias), nn.ReLU(), nn.Linear(20, 7, bias=bias))
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"])
        if fused:
            config._register_custom_module({nn.Linear: FusedLoraLinear})
        model = get_peft_model(model, config)
        with torch.no_grad():  # B starts at zero: give it values, so its gradients and A's are not trivial
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn_like(p))
        models.append(model)
    assert isinstance(models[1].base_model.model[0], FusedLoraLinear)
    assert not isinstance(models[0].base_model.model[0], FusedLoraLinear)
    return models


def _step(model, x, autocast: bool):
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    (y.float() ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.float(), x.grad, grads


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_lora_equals_peft_with_gradients(autocast):
    plain, fused = _pair()
    x = torch.randn(3, 5, 12)
    # bf16 rounds to 3 significant digits (products of values of different sizes cancel); float32
    # differs only in the order of summation
    tol = 2e-2 if autocast else 1e-5

    def close(got, want):
        assert (got - want).abs().max() <= tol * want.abs().max()

    y1, gx1, g1 = _step(plain, x, autocast)
    y2, gx2, g2 = _step(fused, x, autocast)
    close(y2, y1)
    close(gx2, gx1)
    assert g1.keys() == g2.keys() and any("lora_A" in n for n in g1) and any("lora_B" in n for n in g1)
    for name in g1:
        assert g2[name].dtype == g1[name].dtype == torch.float32
        close(g2[name], g1[name])


def test_fused_lora_falls_back_to_peft_where_it_does_not_apply():
    """With dropout, merged weights or the adapter disabled, the layer runs PEFT's own forward."""
    plain, fused = _pair(dropout=0.5)
    x = torch.randn(4, 12)
    torch.manual_seed(1)
    y1 = plain(x)
    torch.manual_seed(1)
    y2 = fused(x)
    torch.testing.assert_close(y2, y1)  # the same dropout mask: PEFT's path in both
    plain, fused = _pair()
    with fused.disable_adapter(), plain.disable_adapter():
        torch.testing.assert_close(fused(x), plain(x))
    fused.merge_adapter()
    plain.merge_adapter()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


def test_fused_lora_saves_a_plain_peft_adapter(tmp_path):
    from peft import PeftModel

    _, fused = _pair()
    fused.save_pretrained(tmp_path)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 7))
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert not isinstance(loaded.base_model.model[0], FusedLoraLinear)
    x = torch.randn(4, 12)
    torch.testing.assert_close(loaded(x), fused(x))
