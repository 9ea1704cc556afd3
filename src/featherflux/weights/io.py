"""Safetensors checkpoints: lazy reading, strict loading onto a meta-built model, and writing in diffusers layout.

Design:
- `open_checkpoint` memory-maps one `.safetensors` file, or a folder holding one such file or shards listed in a
  `*.safetensors.index.json`. Headers are read up front (so a truncated file fails at once, naming itself);
  tensor data is read only when `get` asks for it.
- Key maps (`featherflux.weights.transformer`, `.autoencoder`) turn a checkpoint into `{native name: LazyTensor}`:
  a shape, a dtype and a thunk. Renames and fused-projection concats stay lazy, so shapes are checked before any
  data is read.
- `safetensors_header` and `mmap_safetensors` read a file without safetensors' reader: the header alone (shapes and
  dtypes for detecting a file's kind and architecture), or every tensor as a view of a private memory map (nothing
  is read until touched, and the kernel can drop clean pages under memory pressure).
- `materialize` checks every key and shape against a model built on the meta device, reports all problems in one
  `WeightsError`, then loads tensor by tensor straight to the target device and dtype. RAM holds at most one
  checkpoint tensor beyond the model itself.
- `save_safetensors` writes `config.json` plus one file, or shards plus an index, the way diffusers'
  `save_pretrained` does; every file is written to a temporary name and moved into place.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from featherflux.atomic import atomic_write
from featherflux.errors import MissingWeightsError, WeightsError
from featherflux.model.swap import assign_tensor

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

DEFAULT_MAX_SHARD_BYTES = 10 * 10**9  # diffusers' default "10GB"
_LIST_LIMIT = 10  # keys shown per kind of problem in a loading error
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a larger "length" means the file is not safetensors


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file (with `__metadata__`), and the offset where tensor data starts."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER_BYTES:
                raise ValueError("header too large")
            header = json.loads(f.read(size))
            file_bytes = os.fstat(f.fileno()).st_size
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        data_bytes = max((v["data_offsets"][1] for v in entries.values()), default=0)
    except (OSError, struct.error, ValueError, AttributeError, KeyError, TypeError, IndexError) as e:
        raise WeightsError(f"{path} is not a readable .safetensors file ({e})") from None
    if 8 + size + data_bytes > file_bytes:
        raise WeightsError(
            f"{path} is truncated: its header describes {8 + size + data_bytes} bytes but the file has {file_bytes}; "
            "download it again"
        )
    return header, 8 + size


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """`{name: {"dtype", "shape", "data_offsets"}}` of a .safetensors file, from its header alone."""
    header, _ = _read_header(Path(path))
    header.pop("__metadata__", None)
    return header


def safetensors_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v["shape"]) for k, v in safetensors_header(path).items()}


def mmap_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file as views of a private (copy-on-write) memory map: nothing is read until touched,
    and the kernel can drop clean pages under memory pressure (they are re-read from disk when needed again)."""
    path = Path(path)
    header, start = _read_header(path)
    header.pop("__metadata__", None)
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    out = {}
    for key, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise WeightsError(f"{path}: tensor {key} has dtype {info['dtype']}, which featherflux cannot map")
        lo, hi = info["data_offsets"]
        count = (hi - lo) // dtype.itemsize
        if not count:  # frombuffer refuses empty tensors
            out[key] = torch.empty(info["shape"], dtype=dtype)
            continue
        out[key] = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + lo).reshape(info["shape"])
    return out


@dataclass(frozen=True)
class LazyTensor:
    """A tensor not read yet: its shape and dtype are known, `load()` reads (and transforms) it."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def read_tensor(t: torch.Tensor | LazyTensor) -> torch.Tensor:
    return t.load() if isinstance(t, LazyTensor) else t


class Checkpoint:
    """Memory-mapped safetensors file(s). Keys are the names stored in the files, untranslated."""

    def __init__(self, files: list[Path], key_to_file: dict[str, Path], handles: dict[Path, object]):
        self.files = files
        self._key_to_file = key_to_file
        self._handles = handles

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def __contains__(self, key: str) -> bool:
        return key in self._key_to_file

    def __len__(self) -> int:
        return len(self._key_to_file)

    def __iter__(self):
        return iter(self._key_to_file)

    def _slice(self, key: str):
        if key not in self._key_to_file:
            raise KeyError(f"{key!r} is not in the checkpoint {self.files[0]}")
        return self._handles[self._key_to_file[key]].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._slice(key).get_dtype()
        if name not in _SAFETENSORS_DTYPES:
            raise WeightsError(f"{self._key_to_file[key]}: tensor {key!r} has unsupported dtype {name}")
        return _SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> torch.Tensor:
        self._slice(key)  # a clear KeyError for unknown names
        path = self._key_to_file[key]
        try:
            return self._handles[path].get_tensor(key)
        except Exception as e:  # the data region can be damaged even when the header is intact
            raise WeightsError(f"cannot read {key!r} from {path} ({e}); the file is damaged, download it again") from e

    def lazy(self) -> dict[str, LazyTensor]:
        """`{stored name: LazyTensor}` for every tensor, the input of key maps and `materialize`."""
        return {k: LazyTensor(self.shape(k), self.dtype(k), lambda k=k: self.get(k)) for k in self._key_to_file}

    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of the first file (e.g. `{"format": "pt"}`), or `{}`."""
        return self._handles[self.files[0]].metadata() or {}


def _open_file(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError for a truncated or non-safetensors file, OSError for unreadable ones
        raise WeightsError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt, download it again"
        ) from e


def _single_file(path: Path) -> Checkpoint:
    handle = _open_file(path)
    return Checkpoint([path], {k: path for k in handle.keys()}, {path: handle})  # noqa: SIM118 (not a dict)


def _sharded(index_path: Path) -> Checkpoint:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{index_path} is not a safetensors index with a 'weight_map' ({e})") from e
    files = sorted({index_path.parent / name for name in weight_map.values()})
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise WeightsError(f"{index_path} lists shard files that are missing: {', '.join(absent)}")
    handles = {f: _open_file(f) for f in files}
    key_to_file: dict[str, Path] = {}
    for f, handle in handles.items():
        for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
            key_to_file[key] = f
    listed_absent = [k for k, name in weight_map.items() if key_to_file.get(k) != index_path.parent / name]
    if listed_absent:
        raise WeightsError(
            f"{index_path} maps {len(listed_absent)} tensor(s) to shards that do not hold them, "
            f"e.g. {', '.join(listed_absent[:_LIST_LIMIT])}; the download is incomplete or mixed"
        )
    return Checkpoint(files, key_to_file, handles)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a `.safetensors` file, or a folder with one such file or with shards and a `*.safetensors.index.json`."""
    path = Path(path)
    expected = "a .safetensors file, or a folder with one .safetensors file or shards and a *.safetensors.index.json"
    if not path.exists():
        raise MissingWeightsError(f"{path} does not exist; expected {expected}")
    if path.is_file():
        if path.name.endswith(".safetensors.index.json"):
            return _sharded(path)
        return _single_file(path)
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _sharded(indexes[0])
    singles = sorted(path.glob("*.safetensors"))
    if not indexes and len(singles) == 1:
        return _single_file(singles[0])
    if not indexes and not singles:
        raise WeightsError(f"{path} holds no weights; expected {expected}")
    found = ", ".join(p.name for p in (indexes or singles))
    raise WeightsError(f"{path} holds several checkpoints ({found}); pass the path of the one to load")


def _message(title: str, problems: list[tuple[str, list[str]]]) -> str:
    lines = [title]
    for kind, items in problems:
        if items:
            shown = "\n    ".join(items[:_LIST_LIMIT])
            more = f"\n    ... and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
            lines.append(f"  {len(items)} {kind}:\n    {shown}{more}")
    return "\n".join(lines)


def _default_dtype(tensors: Mapping[str, torch.Tensor | LazyTensor]) -> torch.dtype | None:
    """The floating dtype holding most elements: a mixed checkpoint still gives a model of one dtype."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.dtype.is_floating_point:
            counts[t.dtype] = counts.get(t.dtype, 0) + _numel(t.shape)
    return max(counts, key=counts.get) if counts else None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_keys(model: torch.nn.Module, shapes: Mapping[str, tuple[int, ...]], source: str | os.PathLike) -> None:
    """One `WeightsError` listing every missing, unexpected and mis-shaped key of `shapes` against `model`'s state."""
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(shape)}, model {tuple(expected[k].shape)}"
        for k, shape in shapes.items()
        if k in expected and tuple(shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        raise WeightsError(
            _message(
                f"{source} does not fit the {type(model).__name__} being loaded:",
                [("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped)],
            )
        )


def materialize(
    model: torch.nn.Module,
    named_tensors: Mapping[str, torch.Tensor | LazyTensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp32: Collection[str] = (),
    source: str | os.PathLike = "checkpoint",
) -> torch.nn.Module:
    """Fill a meta-device `model` from `{native name: tensor}` and return it (in eval mode).

    Every key of `model.state_dict()` must be given with its exact shape, and nothing else; otherwise one
    `WeightsError` lists all missing, unexpected and mis-shaped keys. Floating tensors are cast to `dtype`
    (None: the checkpoint's dominant floating dtype), except names in `keep_fp32`, which load as fp32 (for
    statistics whose precision matters more than parity with a down-cast reference). Integer tensors keep their
    dtype. Tensors are read, converted and assigned one at a time. The model must have no non-persistent
    buffers: there would be nothing to fill them from.
    """
    expected = model.state_dict(keep_vars=True)
    check_keys(model, {k: tuple(t.shape) for k, t in named_tensors.items()}, source)
    dtype = dtype or _default_dtype(named_tensors)
    for name in tqdm(list(expected), desc=f"loading {Path(source).name}", unit="tensor", disable=None, leave=False):
        source_tensor = named_tensors[name]
        tensor = read_tensor(source_tensor)
        if tensor.dtype.is_floating_point:
            tensor = tensor.to(device=device, dtype=torch.float32 if name in keep_fp32 else dtype)
        else:
            tensor = tensor.to(device=device)
        assign_tensor(model, name, tensor, requires_grad=expected[name].requires_grad)
        del tensor, source_tensor
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise RuntimeError(f"{type(model).__name__} has tensors outside its state dict: {left_on_meta[:_LIST_LIMIT]}")
    return model.eval()


def write_json(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n"))


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share storage (e.g. q/k/v views of one fused qkv weight)
    t = t.detach().to("cpu").contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    folder: str | os.PathLike,
    *,
    weights_name: str = "diffusion_pytorch_model.safetensors",
    config: dict | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[Path]:
    """Write `tensors` to `folder` in diffusers layout and return the weight files written.

    Up to `max_shard_bytes` goes to one `weights_name`; more is split into `<stem>-0000i-of-0000n.safetensors`
    plus `<weights_name>.index.json`. `config` (if given) becomes `config.json`. Weight files of an earlier save
    under the same name are removed, so the folder never holds two layouts.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    stem = weights_name.removesuffix(".safetensors")
    names = (
        [weights_name]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for file_name, keys in zip(names, shards):
        shard = {k: _own_storage(tensors[k]) for k in keys}
        atomic_write(folder / file_name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
        del shard
    index_path = folder / f"{weights_name}.index.json"
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: file_name for file_name, keys in zip(names, shards) for k in keys}
        write_json(index_path, {"metadata": {"total_size": total}, "weight_map": weight_map})
    else:
        index_path.unlink(missing_ok=True)
    for stale in [folder / weights_name, *folder.glob(f"{stem}-*-of-*.safetensors")]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    if config is not None:
        write_json(folder / "config.json", config)
    return [folder / n for n in names]
