"""LoRALinear: adapters as side branches of a Linear."""

from __future__ import annotations

import torch
from torch import nn

from featherflux.lora.layers import LoRAAdapter, LoRALinear


def test_lora_linear_keeps_its_active_adapters_out_of_the_forward_pass():
    layer = LoRALinear(nn.Linear(4, 3, bias=False))
    layer.add_adapter("my style.v2", LoRAAdapter(torch.randn(2, 4), torch.randn(3, 2), 1.0), scale=0.5)
    x = torch.randn(5, 4)
    assert [s for _, s in layer.active] == [0.5]
    expected = layer.base(x) + 0.5 * layer.adapter("my style.v2")(x)
    torch.testing.assert_close(layer(x), expected)
    layer.set_scale("my style.v2", 0.0)
    assert layer.active == [] and torch.equal(layer(x), layer.base(x))
    layer.remove_adapter("my style.v2")
    assert layer.active == [] and layer.names == []
