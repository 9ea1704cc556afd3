"""From a path, a hub id or "demo" to a pipeline folder and its family (`locate`)."""

from featherflux.loading.locate import build_family, component, demo_folder, resolve_model_path, variant_of

__all__ = ["build_family", "component", "demo_folder", "resolve_model_path", "variant_of"]
