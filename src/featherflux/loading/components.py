"""Everything `load_pipeline` needs, read in the right order: the folder, its family, then the weights.

Order matters for the user: a missing folder, a wrong family or an unreachable remote encoder fails before any
weight is read, and on a host too small for the weights the memory plan decides first whether they stay mapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from featherflux.loading.dit import dit_config_from_file, load_dit
from featherflux.loading.family import build_family
from featherflux.loading.locate import component, resolve_model_path, variant_of
from featherflux.memory import mmap_planned, needs_placement, require_device
from featherflux.model.config import FamilyConfig
from featherflux.text_encoder import connect_text_encoder, load_prompt_encoder
from featherflux.weights.autoencoder import load_autoencoder


@dataclass
class Components:
    transformer: nn.Module  # featherflux.model.dit.Flux2 (possibly with quantized or memory-mapped weights)
    autoencoder: nn.Module  # featherflux.model.autoencoder.AutoEncoder
    prompt_encoder: object  # anything with encode(prompts, max_sequence_length) -> (B, L, ctx); None: embeds only
    family: FamilyConfig
    variant: str  # dev, klein, klein-base or klein-kv
    model_id: str
    mmap: bool  # the DiT's weights are views of its memory-mapped file


def load_components(
    path_or_repo_id: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    prompt_encoder=None,
    text_encoder_out_layers: tuple[int, ...] | None = None,
    vram: str | int | None = None,
    ram: str | int | None = None,
    offload: str | None = None,
    quantize: str | None = None,
    text_encoder: str | None = None,
    text_encoder_token: str | None = None,
    transformer: str | Path | None = None,
    mmap: bool | None = None,
    download: bool = False,
    revision: str | None = None,
) -> Components:
    """The components of a pipeline folder, hub id or "demo" (see `featherflux.pipeline.load_pipeline` for the
    arguments). When the pipeline is to be placed by the memory planner, they are loaded on the host."""
    require_device(device)
    placed = needs_placement(device, vram=vram, offload=offload, quantize=quantize)
    load_device = "cpu" if placed else device
    local_encoder = prompt_encoder is None and text_encoder is None  # a remote encoder needs no text_encoder/
    skip = ({"text_encoder", "tokenizer"} if not local_encoder else set()) | ({"transformer"} if transformer else set())
    folder, model_id = resolve_model_path(path_or_repo_id, download_missing=download, revision=revision, skip=skip)
    variant = variant_of(folder)
    file_dit = None  # a transformer file overrides transformer/, which the folder may then lack
    if transformer is not None and not (folder / "transformer" / "config.json").is_file():
        file_dit = dit_config_from_file(transformer)
    family = build_family(folder, variant, text_encoder_out_layers, with_text_encoder=local_encoder, dit=file_dit)
    if text_encoder is not None:  # connected and checked before any weight loads
        prompt_encoder = connect_text_encoder(text_encoder, text_encoder_token, family, prompt_encoder)
    if mmap is None:
        mmap = placed and mmap_planned(family, device, vram=vram, ram=ram, offload=offload, quantize=quantize)
    dit = load_dit(
        transformer if transformer is not None else component(folder, "transformer"),
        family,
        device=load_device,
        dtype=dtype,
        mmap=mmap,
        override=transformer is not None,
    )
    autoencoder = load_autoencoder(component(folder, "vae"), device=load_device, dtype=dtype)
    if prompt_encoder is None:
        prompt_encoder = load_prompt_encoder(
            component(folder, "text_encoder"),
            component(folder, "tokenizer"),
            out_layers=family.text_encoder.out_layers,
            family=family.name,
            model_id=model_id,
            device=load_device,
            dtype=dtype,
        )
    return Components(dit, autoencoder, prompt_encoder, family, variant, model_id, mmap)
