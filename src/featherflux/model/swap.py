"""Replacing one submodule or one tensor of a model by its qualified name.

Loading, quantization and LoRA all change a model this way: a Linear becomes a quantized Linear or a LoRA wrapper,
a meta tensor becomes a loaded one. Doing it by name keeps state-dict names stable and needs no hooks.
"""

from __future__ import annotations

from torch import Tensor, nn


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `root.get_submodule(name)` is now."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def assign_tensor(root: nn.Module, name: str, value: Tensor, requires_grad: bool = False) -> None:
    """Make `value` the parameter or buffer `name` (e.g. "blocks.0.norm.scale") itself, without a copy."""
    module_name, _, attr = name.rpartition(".")
    module = root.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=requires_grad)
    else:
        module._buffers[attr] = value
