"""The demo model: a small FLUX.2-family model trained here on procedural scenes (see `scenes`), its evaluator
and its training recipe. The trained weights ship in `weights/` in diffusers layout."""
