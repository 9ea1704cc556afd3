"""Finding a FLUX.2 pipeline on disk and working out what it is, before any weight is read.

- `resolve_model_path`: a folder, "demo" (the packaged demo model) or a hub repo id already in the local
  Hugging Face cache (never downloads; says how to get the weights when they are absent).
- `variant_of`: dev, klein, klein-base or klein-kv, from model_index.json (`_class_name`, `is_distilled`).
- `build_family`: the FamilyConfig from the component configs: a named family from FAMILIES when the shapes match,
  else a custom one with the variant's defaults.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from featherflux.errors import UserError, WeightsError
from featherflux.model.config import FAMILIES, DiTConfig, FamilyConfig, TextEncoderConfig

# diffusers pipeline class (+ is_distilled) -> our variant name
PIPELINE_CLASSES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline")

# What a checkpoint of each variant implies beyond its shapes: stacked text layers, steps, guidance, CFG.
VARIANT_DEFAULTS = {
    "dev": dict(out_layers=(10, 20, 30), default_steps=50, default_guidance=4.0, guidance_distilled=True),
    "klein": dict(out_layers=(9, 18, 27), default_steps=4, default_guidance=1.0, guidance_distilled=True),
    "klein-base": dict(out_layers=(9, 18, 27), default_steps=50, default_guidance=4.0, guidance_distilled=False),
    "klein-kv": dict(out_layers=(9, 18, 27), default_steps=4, default_guidance=1.0, guidance_distilled=True),
}


def demo_folder() -> Path:
    return Path(__file__).parent.parent / "demo" / "weights"


def resolve_model_path(path_or_repo_id: str | Path) -> tuple[Path, str]:
    """(local pipeline folder, model id to report) for a folder, "demo" or a cached hub repo id."""
    name = str(path_or_repo_id)
    if name == "demo":
        folder = demo_folder()
        if not (folder / "model_index.json").is_file():
            raise UserError(
                f"the demo model is not installed at {folder}; train it with `python -m featherflux.demo.train`"
            )
        return folder, "demo"
    path = Path(name).expanduser()
    if path.is_dir():
        return path, name
    if path.exists():
        raise UserError(
            f"{path} is a file; load_pipeline needs a diffusers pipeline folder (model_index.json, transformer/, "
            "vae/, text_encoder/, tokenizer/)"
        )
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return Path(_cached_snapshot(name)), name
    raise UserError(
        f"{name} does not exist; pass a diffusers pipeline folder (with model_index.json), a Hugging Face repo id "
        "(owner/name) in the local cache, or 'demo'"
    )


def _cached_snapshot(repo_id: str) -> str:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise UserError(
            f"{repo_id} is not a folder and not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); "
            f"download it once where there is network access with `hf download {repo_id}` (accept the model's "
            "licence on huggingface.co first if it is gated), or pass the path of a local pipeline folder"
        ) from None


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path.parent} has no {path.name}; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e})") from None


def variant_of(folder: Path) -> str:
    index = _read_json(
        folder / "model_index.json", "expected a diffusers FLUX.2 pipeline folder (save_pretrained layout)"
    )
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise WeightsError(f"{folder} holds a {cls} pipeline; featherflux loads {', '.join(PIPELINE_CLASSES)}")
    if cls == "Flux2Pipeline":
        return "dev"
    if cls == "Flux2KleinKVPipeline":
        return "klein-kv"
    return "klein" if index.get("is_distilled", False) else "klein-base"


def component(folder: Path, name: str) -> Path:
    """The folder of pipeline component `name`, or a WeightsError naming the missing component."""
    path = folder / name
    if not path.is_dir():
        raise WeightsError(f"{folder} is missing the pipeline component `{name}/`; re-download or re-save the pipeline")
    return path


def text_encoder_config(folder: Path, out_layers: tuple[int, ...]) -> TextEncoderConfig:
    from featherflux.text_encoder import text_config_from_folder

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


def build_family(folder: Path, variant: str, out_layers: tuple[int, ...] | None = None,
                 with_text_encoder: bool = True, dit: DiTConfig | None = None) -> FamilyConfig:
    """The FamilyConfig of the pipeline in `folder`: a named family when every shape matches, else a custom one.
    `dit` (MEM: from a transformer file that overrides the folder's) replaces `transformer/config.json`."""
    from featherflux.weights.autoencoder import config_from_diffusers as ae_config
    from featherflux.weights.transformer import config_from_diffusers as dit_config

    if dit is None:
        transformer_json = component(folder, "transformer") / "config.json"
        dit = dit_config(_read_json(transformer_json, "expected a diffusers config"), transformer_json)
    ae = ae_config(_read_json(component(folder, "vae") / "config.json", "expected a diffusers VAE config"))
    defaults = VARIANT_DEFAULTS[variant]
    text = None
    if with_text_encoder:
        text = text_encoder_config(component(folder, "text_encoder"), out_layers or defaults["out_layers"])
    named = next(
        (f for f in FAMILIES.values()
         if f.dit == dit and f.autoencoder == ae and (text is None or _same_text_shapes(f.text_encoder, text))),
        None,
    )
    if named is not None:
        family = named
        if out_layers:
            family = dataclasses.replace(family, text_encoder=dataclasses.replace(family.text_encoder,
                                                                                  out_layers=tuple(out_layers)))
        if variant == "klein-base" and family.guidance_distilled:  # a distilled family's undistilled sibling
            family = dataclasses.replace(family, name=family.name.replace("klein", "klein-base"),
                                         **{k: v for k, v in defaults.items() if k != "out_layers"})
        elif variant == "klein-kv":
            family = dataclasses.replace(family, name=f"{family.name}-kv")
        return family
    if text is None:  # a remote encoder stands in: only the context width is known
        layers = out_layers or defaults["out_layers"]
        hidden = dit.context_in_dim // len(layers)
        text = TextEncoderConfig(arch="mistral3" if variant == "dev" else "qwen3", hidden_size=hidden,
                                 num_layers=max(layers), intermediate_size=0, num_heads=0, num_kv_heads=0, head_dim=0,
                                 vocab_size=0, out_layers=tuple(layers))
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
