"""From a path, a hub id or "demo" to loaded components: where the pipeline is, what family it is, its weights.

- `locate`: the folder (a path, "demo", or a hub repo id in the local Hugging Face cache) and its variant.
- `family`: the FamilyConfig of a folder, a DiT file or a name, from configs and headers only.
- `dit`: the DiT from a file of any kind (diffusers folder, BFL file, GGUF, BFL fp8), optionally memory-mapped.
- `components`: all of it in order, for `featherflux.pipeline.load_pipeline`.
"""

from featherflux.loading.components import Components, load_components
from featherflux.loading.dit import dit_file_kind, load_dit
from featherflux.loading.family import build_family, resolve_family
from featherflux.loading.locate import component, demo_folder, resolve_model_path, variant_of

__all__ = [
    "Components",
    "build_family",
    "component",
    "demo_folder",
    "dit_file_kind",
    "load_components",
    "load_dit",
    "resolve_family",
    "resolve_model_path",
    "variant_of",
]
