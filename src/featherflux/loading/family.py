"""Which model family a pipeline folder, a DiT file, a hub id or a family name is, from configs and headers only.

- `build_family`: the FamilyConfig of a pipeline folder from its component configs: a named family from FAMILIES
  when every shape matches, else a custom one with the variant's defaults.
- `resolve_family`: anything `featherflux plan` accepts -> (family, the quantization of a quantized DiT file).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from featherflux.errors import UserError, WeightsError
from featherflux.loading.locate import component, read_json, resolve_model_path
from featherflux.model.config import FAMILIES, DiTConfig, FamilyConfig, TextEncoderConfig
from featherflux.text_encoder import text_config_from_folder
from featherflux.weights import autoencoder, transformer
from featherflux.weights.fp8 import is_bfl_fp8
from featherflux.weights.gguf import gguf_summary
from featherflux.weights.io import safetensors_header
from featherflux.weights.transformer import dit_outline, family_with_outline, strip_bfl_prefix

# What a checkpoint of each variant implies beyond its shapes: stacked text layers, steps, guidance, CFG.
VARIANT_DEFAULTS = {
    "dev": {"out_layers": (10, 20, 30), "default_steps": 50, "default_guidance": 4.0, "guidance_distilled": True},
    "klein": {"out_layers": (9, 18, 27), "default_steps": 4, "default_guidance": 1.0, "guidance_distilled": True},
    "klein-base": {
        "out_layers": (9, 18, 27),
        "default_steps": 50,
        "default_guidance": 4.0,
        "guidance_distilled": False,
    },
    "klein-kv": {"out_layers": (9, 18, 27), "default_steps": 4, "default_guidance": 1.0, "guidance_distilled": True},
}


def text_encoder_config(folder: Path, out_layers: tuple[int, ...]) -> TextEncoderConfig:
    cfg, arch = text_config_from_folder(folder)
    return TextEncoderConfig(
        arch=arch,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        intermediate_size=cfg.intermediate_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        vocab_size=cfg.vocab_size,
        out_layers=tuple(out_layers),
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


def _same_text_shapes(a: TextEncoderConfig, b: TextEncoderConfig) -> bool:
    ignore = {"out_layers", "max_length", "tie_embeddings"}
    return all(getattr(a, f.name) == getattr(b, f.name) for f in dataclasses.fields(a) if f.name not in ignore)


def build_family(
    folder: Path,
    variant: str,
    out_layers: tuple[int, ...] | None = None,
    with_text_encoder: bool = True,
    dit: DiTConfig | None = None,
) -> FamilyConfig:
    """The FamilyConfig of the pipeline in `folder`: a named family when every shape matches, else a custom one.
    `dit` (the architecture of a transformer file that overrides the folder's) replaces `transformer/config.json`."""
    if dit is None:
        transformer_json = component(folder, "transformer") / "config.json"
        dit = transformer.config_from_diffusers(
            read_json(transformer_json, "expected a diffusers config"), transformer_json
        )
    ae = autoencoder.config_from_diffusers(
        read_json(component(folder, "vae") / "config.json", "expected a diffusers VAE config")
    )
    defaults = VARIANT_DEFAULTS[variant]
    text = None
    if with_text_encoder:
        text = text_encoder_config(component(folder, "text_encoder"), out_layers or defaults["out_layers"])
    named = next(
        (
            f
            for f in FAMILIES.values()
            if f.dit == dit and f.autoencoder == ae and (text is None or _same_text_shapes(f.text_encoder, text))
        ),
        None,
    )
    if named is not None:
        family = named
        if out_layers:
            text_config = dataclasses.replace(family.text_encoder, out_layers=tuple(out_layers))
            family = dataclasses.replace(family, text_encoder=text_config)
        if variant == "klein-base" and family.guidance_distilled:  # a distilled family's undistilled sibling
            family = dataclasses.replace(
                family,
                name=family.name.replace("klein", "klein-base"),
                **{k: v for k, v in defaults.items() if k != "out_layers"},
            )
        elif variant == "klein-kv":
            family = dataclasses.replace(family, name=f"{family.name}-kv")
        return family
    if text is None:  # a remote encoder stands in: only the context width is known
        layers = out_layers or defaults["out_layers"]
        hidden = dit.context_in_dim // len(layers)
        text = TextEncoderConfig(
            arch="mistral3" if variant == "dev" else "qwen3",
            hidden_size=hidden,
            num_layers=max(layers),
            intermediate_size=0,
            num_heads=0,
            num_kv_heads=0,
            head_dim=0,
            vocab_size=0,
            out_layers=tuple(layers),
        )
    try:
        return FamilyConfig(
            name=f"custom-{variant}",
            dit=dit,
            autoencoder=ae,
            text_encoder=text,
            **{k: v for k, v in defaults.items() if k != "out_layers"},
        )
    except ValueError as e:
        raise WeightsError(
            f"{folder}: components do not fit together ({e}); if the text encoder stacks other layers than "
            f"{text.out_layers}, pass text_encoder_out_layers"
        ) from None


def resolve_family(model: str | os.PathLike | FamilyConfig) -> tuple[FamilyConfig, str | None]:
    """A family name, a hub id, a diffusers folder, a BFL .safetensors or a .gguf -> (family, quantization of the
    file: "fp8", a GGUF format such as "q4_k", or None). Only configs and headers are read."""
    if isinstance(model, FamilyConfig):
        return model, None
    text = str(model)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_dir():
            config = path / "transformer" / "config.json" if (path / "transformer").is_dir() else path / "config.json"
            if not config.is_file():
                raise UserError(
                    f"{path} has no transformer/config.json; give a diffusers folder, a file or a family name"
                )
            dit = transformer.config_from_diffusers(
                read_json(config, "expected a diffusers transformer config"), config
            )
            return family_with_outline((dit.hidden_size, dit.depth, dit.depth_single_blocks)), None
        if path.suffix == ".gguf":
            shapes, quantization = gguf_summary(path)
            return family_with_outline(dit_outline(shapes, path)), quantization
        if path.suffix == ".safetensors":
            header = safetensors_header(path)
            shapes = strip_bfl_prefix({k: tuple(v["shape"]) for k, v in header.items()})
            return family_with_outline(dit_outline(shapes, path)), ("fp8" if is_bfl_fp8(header) else None)
        raise UserError(f"cannot plan for {path}: expected a folder, a .safetensors or a .gguf file")
    key = text.lower().rsplit("/", 1)[-1].removeprefix("flux.2-")
    for name in FAMILIES:
        if key in (name, name.removeprefix("flux.2-")):
            return FAMILIES[name], None
    if text.count("/") == 1:  # another hub id: plan from its config if it is in the local cache
        return resolve_family(resolve_model_path(text)[0])
    raise UserError(f"{text!r} is neither an existing path nor a known model; known families: {', '.join(FAMILIES)}")
