"""The `featherflux` command line: one module per command group, each a thin layer over one library call.

Each module in `COMMAND_MODULES` exposes `register(subparsers)`, which adds its subcommands and sets
`func` on the parser to a function taking the parsed args and returning an exit code. Errors a user can fix
are raised as `featherflux.errors.UserError` and printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from featherflux.errors import UserError

COMMAND_MODULES = [
    "generate",
    "info",
    "train_lora",
    "plan",
    "batch",
    "serve",
    "keys",
    "eval_demo",
    "encode_server",
    "pull",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featherflux", description="Run, serve and fine-tune FLUX.2 models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"featherflux.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except UserError as e:
        print(f"featherflux: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featherflux: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
