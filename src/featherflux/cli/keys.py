"""`featherflux keys add NAME --file FILE`: make an API key for the image server, print it once, store its hash."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from featherflux.serve.auth import add_key


def register(subparsers) -> None:
    p = subparsers.add_parser("keys", help="manage API keys for `featherflux serve`")
    actions = p.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="make a key, print it once, append its sha256 to the keys file")
    add.add_argument("name", help="who the key is for (letters, digits, _ . @ -); shown in logs and used for fairness")
    add.add_argument("--file", type=Path, required=True, help="keys file (one name:sha256-hex line per key)")
    add.set_defaults(func=run_add)


def run_add(args: argparse.Namespace) -> int:
    key = add_key(args.file, args.name)
    print(key)
    print(f"# key for {args.name!r} added to {args.file}; it is shown only now, so store it safely", file=sys.stderr)
    return 0
