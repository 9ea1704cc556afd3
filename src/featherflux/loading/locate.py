"""Finding a FLUX.2 pipeline on disk and telling which variant it is, before any weight is read.

- `resolve_model_path`: a folder, "demo" (the packaged demo model) or a hub repo id: in the local Hugging Face
  cache, or fetched into it with `download=True` (`loading.hub`); without it, nothing is downloaded.
- `variant_of`: dev, klein, klein-base or klein-kv, from model_index.json (`_class_name`, `is_distilled`).
"""

from __future__ import annotations

import json
from pathlib import Path

from featherflux.errors import MissingFileError, UserError, WeightsError
from featherflux.loading.hub import PIPELINE_CLASSES, cached, download, is_repo_id


def demo_folder() -> Path:
    """The demo model's pipeline folder, shipped inside the package (`featherflux/demo/weights`)."""
    return Path(__file__).parent.parent / "demo" / "weights"


def resolve_model_path(
    path_or_repo_id: str | Path, *, download_missing: bool = False, revision: str | None = None, skip=()
) -> tuple[Path, str]:
    """(local pipeline folder, model id to report) for a folder, "demo" or a hub repo id. A repo id is looked up in
    the local Hugging Face cache, or with `download_missing` fetched into it (`skip`: components the run does not
    need, see `loading.hub.download`)."""
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
    if is_repo_id(name):
        if download_missing:
            return download(name, revision=revision, skip=skip), name
        return cached(name, revision=revision), name
    raise MissingFileError(
        f"{name} does not exist; pass a diffusers pipeline folder (with model_index.json), a Hugging Face repo id "
        "(owner/name), or 'demo'"
    )


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path.parent} has no {path.name}; {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e})") from None


def variant_of(folder: Path) -> str:
    index = read_json(
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
