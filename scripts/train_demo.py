"""Reproduce the shipped demo model: `python scripts/train_demo.py` (stages and settings: featherflux.demo.train)."""

from featherflux.demo.train import cli

if __name__ == "__main__":
    cli()
