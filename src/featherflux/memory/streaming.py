"""Weight streaming: modules whose weights live on the host and are copied to the device one step ahead of use.

Notable features:
- Explicit module swaps, no forward hooks: `stream_modules` replaces entries of a `ModuleList` (DiT blocks,
  text-encoder layers) or individual leaves (`nn.Linear`s, for sequential offload) with a `StreamedModule`.
- A `StreamedModule` shares its block's submodules, so parameter names, `state_dict()` and LoRA swaps inside the
  block are unchanged; only `.to()` / `.cuda()` skip it, because its weights are meant to stay on the host.
- One `Streamer` per network knows the execution order. When module i starts, the copy of the next streamed module
  is queued on a side CUDA stream, so it overlaps module i's compute. At most two streamed modules are on the
  device at any time: the running one and the prefetched one. Device copies are fresh tensors (the caching
  allocator recycles them), tagged with `record_stream` so they are not reused before compute is done with them;
  the host waits for block i-1's compute before queueing block i+1's copy, so it cannot run ahead and make the
  allocator take fresh memory for every block.
- Host weights are pinned (page-locked) when the device is CUDA: only pinned memory copies asynchronously at full
  PCIe speed.
- On CPU (and on the meta device) the "device" equals the host: nothing is copied, but the same code runs and a
  `DeviceLedger` counts the bytes that would be on the device, so tests can check peaks against a budget.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call


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


class Streamer:
    """Owns the execution order of one network's streamed modules and the copies in flight."""

    def __init__(self, device: torch.device | str, ledger: DeviceLedger | None = None):
        self.device = torch.device(device)
        self.ledger = ledger or DeviceLedger()
        self.modules: list[StreamedModule] = []
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._loaded: dict[int, tuple[dict[str, Tensor], int, object]] = {}  # index -> (tensors, bytes, event)
        self._done: dict[int, torch.cuda.Event] = {}  # index -> compute of that module finished

    def register(self, module: StreamedModule) -> int:
        self.modules.append(module)
        return len(self.modules) - 1

    def _load(self, i: int) -> None:
        host = _tensors(self.modules[i].block)
        nbytes = sum(t.numel() * t.element_size() for t in host.values())
        self.ledger.add(nbytes)
        if self.copy_stream is None:
            self._loaded[i] = ({k: t.to(self.device) for k, t in host.items()}, nbytes, None)
            return
        # The host runs ahead of the GPU. Memory freed after use is reusable only once the GPU is done with it, so
        # without this wait the copies would run many blocks ahead and each would take fresh memory.
        done = self._done.pop((i - 2) % len(self.modules), None)
        if done is not None:
            done.synchronize()
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            tensors = {k: t.to(self.device, non_blocking=True) for k, t in host.items()}
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self._loaded[i] = (tensors, nbytes, event)

    def _drop(self, i: int) -> None:
        _, nbytes, _ = self._loaded.pop(i)
        self.ledger.sub(nbytes)

    def acquire(self, i: int) -> dict[str, Tensor]:
        """Device tensors of module i (waiting for its copy), after queueing the copy of the next one."""
        nxt = (i + 1) % len(self.modules)
        for j in [j for j in self._loaded if j not in (i, nxt)]:  # called out of order: drop the stale prefetch
            self._drop(j)
        if i not in self._loaded:
            self._load(i)
        if nxt != i and nxt not in self._loaded:
            self._load(nxt)
        tensors, _, event = self._loaded[i]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for t in tensors.values():
                t.record_stream(compute)
        return tensors

    def release(self, i: int) -> None:
        if i in self._loaded:
            if self.copy_stream is not None:
                self._done[i] = torch.cuda.Event()
                self._done[i].record(torch.cuda.current_stream(self.device))
            self._drop(i)

    def close(self) -> None:
        for i in list(self._loaded):
            self._drop(i)


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
        tensors = self.streamer.acquire(self.index)
        try:
            return functional_call(self.block, tensors, args, kwargs, strict=True)
        finally:
            self.streamer.release(self.index)


_STREAMED_CLASSES: dict[type, type] = {}


def streamed(block: nn.Module, streamer: Streamer) -> StreamedModule:
    """A `StreamedModule` that is also an instance of the block's class, so code that finds layers by class
    (transformers records `hidden_states` from its decoder-layer class) still finds them."""
    cls = type(block)
    if cls not in _STREAMED_CLASSES:
        _STREAMED_CLASSES[cls] = type(f"Streamed{cls.__name__}", (StreamedModule, cls), {})
    return _STREAMED_CLASSES[cls](block, streamer)


def _pin(module: nn.Module) -> None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "cpu" and not t.is_pinned():
            t.data = t.data.pin_memory()


def stream_modules(
    entries: Iterable[tuple[nn.Module, str]],
    device: torch.device | str,
    resident: Iterable[int] = (),
    ledger: DeviceLedger | None = None,
    pin: bool | None = None,
) -> Streamer:
    """Stream the modules named by `entries` = [(parent, child_name), ...] in execution order.

    Entries whose position is in `resident` are moved to the device and stay there; the others are swapped for
    `StreamedModule`s (host weights pinned when the device is CUDA, unless `pin=False`). The ledger counts only
    what the streamer copies; resident weights are the caller's to count.
    """
    device = torch.device(device)
    streamer = Streamer(device, ledger)
    resident = set(resident)
    pin = device.type == "cuda" if pin is None else pin
    for position, (parent, name) in enumerate(entries):
        module = parent._modules[name]
        if isinstance(module, StreamedModule):
            raise TypeError(f"{name} is already streamed")
        if position in resident:
            module.to(device)
            continue
        if device.type == "cuda":
            module.to("cpu")
        if pin:
            _pin(module)
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
            module.streamer.close()
            parent._modules[name] = module.block
