"""Shared pieces for the LoRA tests (fixtures are re-exported by conftest.py): a tiny diffusers transformer (the oracle), its native-named twin, and LoRA files
written in each format the way the tools that make them do."""

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from featherflux.lora.formats import SWAPPED_HALVES, native_linear_shapes, native_to_diffusers
from featherflux.model.config import DiTConfig

DIFFUSERS_KW = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=16,
    timestep_guidance_channels=256,
    axes_dims_rope=[4, 4, 4, 4],
)
CONFIG = DiTConfig(
    in_channels=4, context_in_dim=16, hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 4, 4, 4)
)
TARGETS = (
    r".*(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv_mlp_proj|"
    r"single_transformer_blocks\.\d+\.attn\.to_out|linear_in|linear_out|norm_out\.linear|proj_out|x_embedder)$"
)


def diffusers_transformer(seed=0):
    warnings.filterwarnings("ignore")
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**DIFFUSERS_KW)


def to_native_weights(diffusers_sd: dict[str, torch.Tensor], config=CONFIG) -> dict[str, torch.Tensor]:
    """diffusers Linear weights -> native `<module>` -> weight (q/k/v concatenated, norm_out halves swapped)."""
    sd = {k.replace(".base_layer", ""): v for k, v in diffusers_sd.items()}
    out = {}
    for native, targets in native_to_diffusers(config).items():
        # after diffusers fuses q/k/v for a LoKr, the fused projection is the one in use
        fused = targets[0][0].replace("to_q", "to_qkv").replace("add_q_proj", "to_added_qkv")
        if len(targets) == 3 and f"{fused}.weight" in sd:
            targets = [(fused, None)]
        w = torch.cat([sd[f"{name}.weight"] for name, _ in targets])
        out[native] = w.roll(w.shape[0] // 2, 0) if native in SWAPPED_HALVES else w
    return out


class NativeStub(nn.Module):
    """Every native FLUX.2 Linear at its BFL path, without the forward: enough to test loading and fusing."""

    def __init__(self, config=CONFIG, weights=None):
        super().__init__()
        self.config = config
        for name, (out, inp) in native_linear_shapes(config).items():
            parent = self
            *path, leaf = name.split(".")
            for p in path:
                if not hasattr(parent, p):
                    parent.add_module(p, nn.Module())
                parent = getattr(parent, p)
            linear = nn.Linear(inp, out, bias=False)
            if weights is not None:
                linear.weight.data.copy_(weights[name])
            parent.add_module(leaf, linear)

    def linear_weights(self) -> dict[str, torch.Tensor]:
        modules = {n: self.get_submodule(n) for n in native_linear_shapes(self.config)}
        return {n: getattr(m, "base", m).weight.detach().clone() for n, m in modules.items()}


def save_peft_lora(transformer, folder, seed=1, r=4, alpha=8):
    """Add a random LoRA on most layers to a diffusers transformer and save it the way diffusers' training scripts
    do (`save_lora_weights` with the PEFT config as metadata); returns the file."""
    from diffusers import Flux2Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=TARGETS))
    with torch.no_grad():  # small deltas, as trained LoRAs have
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    Flux2Pipeline.save_lora_weights(
        folder,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    transformer.delete_adapters("default")
    return Path(folder) / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="session")
def peft_lora_file(tmp_path_factory):
    return save_peft_lora(diffusers_transformer(), tmp_path_factory.mktemp("peft_lora"))


def native_lora_pairs(peft_file, config=CONFIG):
    """Read a diffusers LoRA file and regroup it per native module: (down, up * scale), q/k/v block-diagonal."""
    import json

    from safetensors import safe_open

    with safe_open(str(peft_file), "pt") as f:
        sd = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    scale = meta["transformer.lora_alpha"] / meta["transformer.r"]
    pairs = {}
    for native, targets in native_to_diffusers(config).items():
        present = [(n, c) for n, c in targets if f"{n}.lora_A.weight" in sd]
        if not present:
            continue
        downs = [sd[f"{n}.lora_A.weight"] for n, _ in present]
        ups = [sd[f"{n}.lora_B.weight"] * scale for n, _ in present]
        down = torch.cat(downs)
        up = torch.block_diag(*ups)
        if native in SWAPPED_HALVES:
            up = up.roll(up.shape[0] // 2, 0)
        pairs[native] = (down, up)
    return pairs
