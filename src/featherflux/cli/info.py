"""`featherflux info MODEL`: what a checkpoint is, from its configs and safetensors headers only (no weights read).

For each component: parameter count, bytes on disk per dtype, and for the text encoder the part featherflux
actually loads (decoder layers up to the last stacked one; no vision tower, no LM head).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from featherflux.errors import UserError, WeightsError
from featherflux.loading import build_family, resolve_model_path, variant_of
from featherflux.loading.dit import dit_config_from_file
from featherflux.memory.hardware import Hardware, detect_hardware, host_ram_bytes
from featherflux.model.attention import report as attention_report
from featherflux.model.attention import select as select_attention
from featherflux.weights.io import safetensors_header
from featherflux.weights.transformer import family_of

COMPONENTS = ("transformer", "vae", "text_encoder")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NOT_TEXT = ("vision_tower.", "multi_modal_projector.", "lm_head.")


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="family, parameter counts, dtypes and sizes of a model, without loading it")
    p.add_argument(
        "model", nargs="?", help="pipeline folder, hub repo id in the local HF cache, 'demo', or a .safetensors file"
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--backends",
        action="store_true",
        help="print this machine's GPU, the speeds the memory planner assumes of it and the attention backends it can run",
    )
    p.set_defaults(func=run)


@dataclass
class Tally:
    params: int = 0
    bytes: int = 0
    dtypes: Counter = field(default_factory=Counter)  # dtype -> bytes

    def add(self, shape: list[int], dtype: str, nbytes: int) -> None:
        n = 1
        for d in shape:
            n *= d
        self.params += n
        self.bytes += nbytes
        self.dtypes[dtype] += nbytes

    def as_dict(self) -> dict:
        return {"params": self.params, "bytes": self.bytes, "dtypes": dict(self.dtypes)}


def tally(files: list[Path], keep=lambda name: True) -> Tally:
    t = Tally()
    for path in files:
        for name, entry in safetensors_header(path).items():
            if keep(name):
                begin, end = entry["data_offsets"]
                t.add(entry["shape"], entry["dtype"], end - begin)
    return t


def _single_file_family(path: Path) -> str | None:
    """The named family of a BFL transformer file, from its tensor shapes (None if it is not one we know)."""
    try:
        return family_of(dit_config_from_file(path))
    except WeightsError:
        return None


def summarize(model: str) -> dict:
    if Path(model).is_file():
        out = {"model": model, "components": {"file": tally([Path(model)]).as_dict()}}
        family = _single_file_family(Path(model))
        if family:
            out["family"], out["variant"] = family, "transformer file"
        return out
    folder, model_id = resolve_model_path(model)
    variant = variant_of(folder)
    family = build_family(folder, variant)
    out = {"model": model_id, "variant": variant, "family": family.name, "components": {}}
    for name in COMPONENTS:
        files = sorted((folder / name).glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{folder / name} has no .safetensors files")
        out["components"][name] = tally(files).as_dict()
    used = max(family.text_encoder.out_layers)

    def loaded(key: str) -> bool:
        m = _LAYER.search(key)
        return not key.startswith(_NOT_TEXT) and (m is None or int(m.group(1)) < used)

    files = sorted((folder / "text_encoder").glob("*.safetensors"))
    out["components"]["text_encoder"]["loaded"] = tally(files, loaded).as_dict()
    out["text_encoder_layers"] = {"stacked": list(family.text_encoder.out_layers),
                                  "total": family.text_encoder.num_layers}
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def backends() -> list[str]:
    """The lines of `info --backends`: the device, and each attention backend usable on it in bf16, or why not."""
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        lines = [f"device: {torch.cuda.get_device_name()} (compute capability {major}.{minor}), torch {torch.__version__}"]
        device = "cuda"
    else:
        lines = [f"device: cpu (no CUDA device), torch {torch.__version__}"]
        device = "cpu"
    hardware = detect_hardware()
    if hardware is None:
        assumed = Hardware(vram_bytes=0, ram_bytes=host_ram_bytes())
        lines.append(
            f"memory planner: no CUDA device; `featherflux plan --vram N` assumes an {assumed.name} "
            f"({assumed.tflops:.0f} bf16 TFLOP/s, {assumed.h2d_gbps:.0f} GB/s host-to-device) and "
            f"{assumed.ram_bytes / 2**30:.0f} GiB of RAM"
        )
    else:
        lines.append(f"memory planner: {hardware.describe()}")
    lines.append(f"attention backends in bf16 (auto takes: {select_attention('auto', device, torch.bfloat16).name}):")
    return lines + ["  " + line for line in attention_report(device, torch.bfloat16)]


def run(args: argparse.Namespace) -> int:
    if args.backends:
        print("\n".join(backends()))
        if args.model is None:
            return 0
    elif args.model is None:
        raise UserError("name a model (a folder, a hub repo id or 'demo'), or pass --backends")
    info = summarize(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model:   {info['model']}")
    if "family" in info:
        print(f"family:  {info['family']} ({info['variant']})")
    for name, c in info["components"].items():
        dtypes = ", ".join(f"{d} {_size(b)}" for d, b in c["dtypes"].items())
        print(f"{name:12} {c['params']:>16,} params  {_size(c['bytes']):>11}  [{dtypes}]")
        if "loaded" in c:
            layers = info["text_encoder_layers"]
            print(f"{'  loaded':12} {c['loaded']['params']:>16,} params  {_size(c['loaded']['bytes']):>11}  "
                  f"(layers 1-{max(layers['stacked'])} of {layers['total']}; stacks {layers['stacked']})")
    return 0

