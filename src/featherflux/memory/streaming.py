"""Weight streaming: modules whose weights live on the host and are copied to the device one step ahead of use.

Notable features:
- Explicit module swaps, no forward hooks: `stream_modules` replaces entries of a `ModuleList` (DiT blocks,
  text-encoder layers) or individual leaves (`nn.Linear`s, for sequential offload) with a `StreamedModule`.
- A `StreamedModule` shares its block's submodules, so parameter names, `state_dict()` and LoRA swaps inside the
  block are unchanged; only `.to()` / `.cuda()` skip it, because its weights are meant to stay on the host.
- Host side: each streamed module's tensors are packed into one host buffer of exactly their size (each tensor
  aligned as the device allocator aligns it) and the module's parameters become views of it. On CUDA that buffer
  is pinned once, with `cudaHostRegister`, because torch's pinned allocator rounds every block up to a power of two (a dev single
  block would take 1.6 GB of pinned RAM instead of 0.98) and keeps freed pinned blocks cached. Memory-mapped
  weights are not packed (that would read them all into RAM): they are copied through two pinned staging buffers.
- Device side: two buffers of the largest module, allocated when the streamer first loads and freed by `close()`.
  One copy per module, on a side stream, into the buffer the module before the previous one used; the copy
  waits (on the device, `wait_event`) for that module's compute, and the compute waits for its copy. The host never
  waits for the device, except to refill a staging buffer whose previous copy is still running (mapped weights).
- One `Streamer` per network knows the execution order. When module i starts, the copy of the next one is queued,
  so it overlaps module i's compute. At most two streamed modules are on the device: the running one and the
  prefetched one. `close()` at the end of a phase drops both, so nothing streamed stays on the device after it.
- On CPU (and on the meta device) the "device" equals the host: nothing is copied, but the same code runs (packing
  included) and a `DeviceLedger` counts the bytes that would be on the device, so tests can check peaks against a
  budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Bytes: each tensor of a packed buffer starts where the CUDA caching allocator would start it, so kernels see the
# same alignment as for resident weights (cuBLAS picks kernels by alignment; the padding is < 0.01% of a block).
ALIGN = 512


def module_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


class DeviceLedger:
    """Bytes of weights on the compute device, counted logically: exact on CPU where no copy happens."""

    def __init__(self):
        self.current = 0
        self.peak = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def sub(self, nbytes: int) -> None:
        self.current -= nbytes


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    return named


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _span(t: Tensor) -> int:
    """Elements between a tensor's first and last element, whatever its strides."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0


@dataclass(frozen=True)
class Layout:
    """Where each tensor of a module lives inside its packed buffer. Strides are kept (a transposed weight stays
    transposed), because the matmul kernel, and so the last bits of its result, depend on them."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    shapes: tuple[torch.Size, ...]
    strides: tuple[tuple[int, ...], ...]
    spans: tuple[int, ...]
    nbytes: int  # the buffer's size: the tensors' bytes, each rounded up to ALIGN

    @staticmethod
    def of(tensors: dict[str, Tensor]) -> Layout:
        offsets, offset = [], 0
        for t in tensors.values():
            offsets.append(offset)
            offset += aligned(_span(t) * t.element_size())
        values = tensors.values()
        return Layout(
            names=tuple(tensors),
            offsets=tuple(offsets),
            dtypes=tuple(t.dtype for t in values),
            shapes=tuple(t.shape for t in values),
            strides=tuple(t.stride() for t in values),
            spans=tuple(_span(t) for t in values),
            nbytes=offset,
        )

    def views(self, buffer: Tensor) -> dict[str, Tensor]:
        out = {}
        fields = zip(self.names, self.offsets, self.dtypes, self.shapes, self.strides, self.spans, strict=True)
        for name, offset, dtype, shape, stride, span in fields:
            flat = buffer[offset : offset + span * dtype.itemsize].view(dtype)
            out[name] = flat.as_strided(shape, stride)
        return out


def _host_register(buffer: Tensor) -> None:
    error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0))
    if error:
        raise RuntimeError(f"pinning {buffer.numel()} bytes of host memory failed (CUDA error {error})")


def _host_unregister(buffer: Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def _rebind(module: nn.Module, views: dict[str, Tensor]) -> None:
    """Make the module's parameters and buffers the given views (shared parameters are one object: set once)."""
    for prefix, m in module.named_modules():
        prefix = f"{prefix}." if prefix else ""
        for key, p in m._parameters.items():
            if p is not None and prefix + key in views:
                p.data = views[prefix + key]
        for key, b in m._buffers.items():
            if b is not None and prefix + key in views:
                m._buffers[key] = views[prefix + key]


def _places(module: nn.Module, tensors: dict[str, Tensor]) -> list[tuple[dict, str, str]]:
    """Every place that holds one of the module's tensors, as (its module's parameter or buffer dict, key, name):
    a tensor shared by two submodules is held in two places under one name."""
    name_of = {id(t): name for name, t in tensors.items()}
    return [
        (store, key, name_of[id(t)])
        for m in module.modules()
        for store in (m._parameters, m._buffers)
        for key, t in store.items()
        if t is not None and id(t) in name_of
    ]


@dataclass
class _HostSide:
    """A streamed module's host weights: its layout, its packed buffer (None when left in place, e.g. mapped) and
    the places its forward reads them from."""

    layout: Layout
    packed: Tensor | None
    signature: tuple  # what `_signature` said when laid out: a LoRA swap or a reload changes it
    places: list[tuple[dict, str, str]]


def _signature(module: nn.Module, tensors: dict[str, Tensor]) -> tuple:
    """The module's tensors (name, data pointer, dtype, shape) and its submodules: a change to either is a new
    layout and new places."""
    return (
        tuple((name, t.data_ptr(), t.dtype, t.shape) for name, t in tensors.items()),
        tuple(id(m) for m in module.modules()),
    )


class Streamer:
    """Owns the execution order of one network's streamed modules, their host buffers and the copies in flight.

    `pack=False` leaves the host tensors where they are (memory-mapped weights) and copies them through two pinned
    staging buffers."""

    def __init__(self, device: torch.device | str, ledger: DeviceLedger | None = None, pack: bool = True):
        self.device = torch.device(device)
        self.ledger = ledger or DeviceLedger()
        self.pack = pack
        self.cuda = self.device.type == "cuda"
        self.modules: list[StreamedModule] = []
        self.host: list[_HostSide] = []
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._slots: list[Tensor] = []  # two device buffers of the largest module, while open
        self._slot_free: list[torch.cuda.Event | None] = [None, None]  # compute of the slot's last module done
        self._staging: list[Tensor] = []  # two pinned host buffers, for modules that are not packed
        self._staged: list[torch.cuda.Event | None] = [None, None]  # the copy out of that staging buffer done
        self._loaded: dict[int, tuple[dict[str, Tensor], int, torch.cuda.Event | None, int]] = {}

    def register(self, module: StreamedModule) -> int:
        self.modules.append(module)
        self.host.append(self._lay_out(module.block))
        return len(self.modules) - 1

    @property
    def host_bytes(self) -> int:
        """Bytes of host memory the streamer holds for copies: packed buffers and staging buffers (pinned on CUDA)."""
        packed = sum(h.layout.nbytes for h in self.host if h.packed is not None)
        return packed + sum(b.numel() for b in self._staging)

    def _lay_out(self, block: nn.Module) -> _HostSide:
        tensors = _tensors(block)
        layout = Layout.of(tensors)
        on_host = all(t.device.type == "cpu" for t in tensors.values())
        if not (self.pack and on_host):
            return _HostSide(layout, None, _signature(block, tensors), _places(block, tensors))
        packed = torch.empty(layout.nbytes, dtype=torch.uint8)
        views = layout.views(packed)
        for name, t in tensors.items():
            views[name].copy_(t)
        _rebind(block, views)
        if self.cuda:
            _host_register(packed)
        tensors = _tensors(block)  # the same parameters, now views of the buffer
        return _HostSide(layout, packed, _signature(block, tensors), _places(block, tensors))

    def _current(self, i: int) -> tuple[_HostSide, dict[str, Tensor]]:
        """Module i's host side, laid out again if its tensors changed since (a LoRA was added, weights reloaded)."""
        block = self.modules[i].block
        tensors = _tensors(block)
        if _signature(block, tensors) != self.host[i].signature:
            if self.cuda:  # a copy out of the old buffer may still be running; this happens once per LoRA change
                self.copy_stream.synchronize()
            self._unpin(self.host[i])
            self.host[i] = self._lay_out(block)
            tensors = _tensors(block)
        return self.host[i], tensors

    def _device_slot(self, nbytes: int) -> int:
        if self._slots and self._slots[0].numel() < nbytes:  # a module grew (a LoRA): larger buffers
            # What is loaded keeps the old buffers alive through its views; they are freed on the compute stream
            # once it is dropped, after the compute stream has waited for the copies into them.
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._slots = []
        if not self._slots:
            size = max(max(h.layout.nbytes for h in self.host), nbytes)
            self._slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        used = {slot for _, _, _, slot in self._loaded.values()}
        return next(slot for slot in (0, 1) if slot not in used)

    def _stage(self, slot: int, layout: Layout, tensors: dict[str, Tensor]) -> Tensor:
        """Copy a module that is not packed into a pinned staging buffer (the host memcpy reads mapped pages)."""
        if not self._staging or self._staging[0].numel() < layout.nbytes:
            for buffer in self._staging:
                _host_unregister(buffer)
            size = max(h.layout.nbytes for h in self.host)
            self._staging = [torch.empty(size, dtype=torch.uint8) for _ in range(2)]
            for buffer in self._staging:
                _host_register(buffer)
            self._staged = [None, None]
        if self._staged[slot] is not None:
            self._staged[slot].synchronize()  # the copy out of this buffer, queued two modules ago
        views = layout.views(self._staging[slot])
        for name, t in tensors.items():
            views[name].copy_(t)
        return self._staging[slot]

    def _load(self, i: int) -> None:
        host, tensors = self._current(i)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        self.ledger.add(nbytes)
        if not self.cuda:
            self._loaded[i] = ({k: t.to(self.device) for k, t in tensors.items()}, nbytes, None, -1)
            return
        slot = self._device_slot(host.layout.nbytes)
        source = host.packed if host.packed is not None else self._stage(slot, host.layout, tensors)
        if self._slot_free[slot] is not None:
            self.copy_stream.wait_event(self._slot_free[slot])
        with torch.cuda.stream(self.copy_stream):
            self._slots[slot][: host.layout.nbytes].copy_(source[: host.layout.nbytes], non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self.copy_stream)
        if host.packed is None:
            self._staged[slot] = copied
        self._loaded[i] = (host.layout.views(self._slots[slot]), nbytes, copied, slot)

    def _drop(self, i: int) -> None:
        _, nbytes, _, _ = self._loaded.pop(i)
        self.ledger.sub(nbytes)

    def acquire(self, i: int) -> tuple[dict[str, Tensor], list[tuple[dict, str, str]]]:
        """Device tensors of module i (the compute stream waiting for its copy) and the places its forward reads
        them from, after queueing the next copy."""
        nxt = (i + 1) % len(self.modules)
        for j in [j for j in self._loaded if j not in (i, nxt)]:  # called out of order: drop the stale prefetch
            self._drop(j)
        if i not in self._loaded:
            self._load(i)
        if nxt != i and nxt not in self._loaded:
            self._load(nxt)
        tensors, _, copied, _ = self._loaded[i]
        if copied is not None:
            torch.cuda.current_stream(self.device).wait_event(copied)
        return tensors, self.host[i].places

    def release(self, i: int) -> None:
        if i not in self._loaded:
            return
        slot = self._loaded[i][3]
        if self.cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._slot_free[slot] = done
        self._drop(i)

    def close(self) -> None:
        """Drop every module on the device and free the device buffers (end of a phase)."""
        for i in list(self._loaded):
            self._drop(i)
        if self._slots:
            # A prefetch nobody used may still be copying: the compute stream, on which the buffers are freed, waits.
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
            self._slots = []
            self._slot_free = [None, None]

    def _unpin(self, host: _HostSide) -> None:
        if self.cuda and host.packed is not None:
            _host_unregister(host.packed)

    def detach(self) -> None:
        """The streamer is no longer used: close it and unpin its host buffers (the modules keep their weights)."""
        self.close()
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()  # no copy may still read what is unpinned
            for host in self.host:
                self._unpin(host)
            for buffer in self._staging:
                _host_unregister(buffer)
        for host in self.host:
            host.packed = None
        self._staging = []


class StreamedModule(nn.Module):
    """Runs `block` with its weights copied in from the host just in time.

    The block's submodules, parameters and buffers are shared (not wrapped), so names are those of the block.
    Plain attributes (e.g. transformers' `attention_type`) are read through from the block.
    """

    def __init__(self, block: nn.Module, streamer: Streamer):
        nn.Module.__init__(self)  # not the block class's __init__: the state is the block's
        self.__dict__["block"] = block
        self.__dict__["streamer"] = streamer
        self._modules = block._modules
        self._parameters = block._parameters
        self._buffers = block._buffers
        self.index = streamer.register(self)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["block"], name)

    def _apply(self, fn, recurse=True):
        return self  # weights stay on the host; the streamer moves copies

    def forward(self, *args, **kwargs):
        # The block runs as itself, its parameters swapped for the device copies and back: about half the host time
        # of going through torch.func.functional_call, which pays for generality (name lookups, checks) on every
        # block of every step (benchmarks/streaming_cpu.py)
        tensors, places = self.streamer.acquire(self.index)
        on_host = [store[key] for store, key, _ in places]
        try:
            for store, key, name in places:
                store[key] = tensors[name]
            return self.block(*args, **kwargs)
        finally:
            for (store, key, _), original in zip(places, on_host, strict=True):
                store[key] = original
            self.streamer.release(self.index)


_STREAMED_CLASSES: dict[type, type] = {}


def streamed(block: nn.Module, streamer: Streamer) -> StreamedModule:
    """A `StreamedModule` that is also an instance of the block's class, so code that finds layers by class
    (transformers records `hidden_states` from its decoder-layer class) still finds them."""
    cls = type(block)
    if cls not in _STREAMED_CLASSES:
        _STREAMED_CLASSES[cls] = type(f"Streamed{cls.__name__}", (StreamedModule, cls), {})
    return _STREAMED_CLASSES[cls](block, streamer)


def stream_modules(
    entries: Iterable[tuple[nn.Module, str]],
    device: torch.device | str,
    resident: Iterable[int] = (),
    ledger: DeviceLedger | None = None,
    pack: bool = True,
) -> Streamer:
    """Stream the modules named by `entries` = [(parent, child_name), ...] in execution order.

    Entries whose position is in `resident` are moved to the device and stay there; the others are swapped for
    `StreamedModule`s, their host weights packed into one buffer each (pinned when the device is CUDA), or with
    `pack=False` left where they are (memory-mapped) and copied through staging buffers. The ledger counts only
    what the streamer copies; resident weights are the caller's to count.
    """
    device = torch.device(device)
    streamer = Streamer(device, ledger, pack)
    resident = set(resident)
    for position, (parent, name) in enumerate(entries):
        module = parent._modules[name]
        if isinstance(module, StreamedModule):
            raise TypeError(f"{name} is already streamed")
        if position in resident:
            module.to(device)
            continue
        if device.type == "cuda":
            module.to("cpu")
        parent._modules[name] = streamed(module, streamer)
    return streamer


def block_entries(module_lists: Iterable[nn.ModuleList]) -> list[tuple[nn.Module, str]]:
    """[(list, "0"), (list, "1"), ...] for each ModuleList in turn: the blocks in execution order."""
    return [(ml, name) for ml in module_lists for name in ml._modules]


def leaf_entries(module: nn.Module, kinds: tuple[type, ...] = (nn.Linear,)) -> list[tuple[nn.Module, str]]:
    """Every `kinds` leaf in registration order (which is execution order for our networks; if a model runs
    them in another order, a module is loaded when called instead of prefetched, which is slower but correct)."""
    return [
        (parent, name)
        for parent in module.modules()
        for name, child in parent._modules.items()
        if isinstance(child, kinds)
    ]


def streamed_bytes(streamer: Streamer) -> int:
    return sum(module_bytes(m.block) for m in streamer.modules)


def unstream(entries: Iterable[tuple[nn.Module, str]]) -> None:
    """Put the original modules back (on the host)."""
    for parent, name in entries:
        module = parent._modules[name]
        if isinstance(module, StreamedModule):
            module.streamer.detach()
            parent._modules[name] = module.block
