"""`featherflux pull REPO_ID [--revision R] [--without COMPONENT]...`: fetch a FLUX.2 pipeline into the Hugging Face
cache (resumable; its token, its progress bars) and print the local folder."""

from __future__ import annotations

import argparse

from featherflux.loading.hub import COMPONENTS, download


def register(subparsers) -> None:
    p = subparsers.add_parser("pull", help="download a FLUX.2 pipeline from the Hugging Face hub into its cache")
    p.add_argument("repo_id", help="e.g. black-forest-labs/FLUX.2-klein-4B")
    p.add_argument("--revision", help="branch, tag or commit (default: main)")
    p.add_argument("--without", action="append", default=[], choices=COMPONENTS, metavar="COMPONENT",
                   help="skip a component's weights, e.g. text_encoder for a worker that uses an encode server, "
                        "transformer when a GGUF file replaces it (its config still comes); repeatable")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(download(args.repo_id, revision=args.revision, skip=args.without))
    return 0
