"""One pipeline split over several processes (`featherflux.parallel`) behind one server.

Rank 0 serves HTTP exactly as `featherflux serve` does, through a `LeaderPipeline`; every other rank runs
`follow`, a loop that waits for rank 0's next call. Each pipeline call of rank 0 (a generation, an inpainting, a
LoRA switch) is first sent to the followers, which make the same call, so every collective of the split DiT finds
all its ranks.

- Calls travel as JSON plus PNG bytes over a gloo group of their own (host memory, even when the DiT talks NCCL):
  generators as their seeds, pictures as PNGs, nothing pickled.
- The step callback (progress, cancel, time limit) runs on rank 0; after each step rank 0 tells the followers
  whether to stop, so a cancelled job stops on every rank at the same step.
- When a call fails on the way between ranks (a rank died, or a collective timed out), the leader marks itself
  unhealthy: `/health` then says so, and the server should be restarted.
"""

from __future__ import annotations

import io
import json
import logging

import torch
import torch.distributed as dist
from PIL import Image

log = logging.getLogger(__name__)


class StopAll(Exception):
    """Rank 0 stopped the run at this step (a cancel or a time limit): every rank stops with it."""


def control_group():
    """A gloo group over every rank, for messages between the ranks' hosts. Every rank calls this once, in step."""
    return dist.new_group(backend="gloo")


def _send(payload: bytes, group) -> None:
    size = torch.tensor([len(payload)], dtype=torch.long)
    dist.broadcast(size, src=0, group=group)
    dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=0, group=group)


def _receive(group) -> bytes:
    size = torch.zeros(1, dtype=torch.long)
    dist.broadcast(size, src=0, group=group)
    data = torch.empty(int(size), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=group)
    return data.numpy().tobytes()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_call(method: str, kwargs: dict) -> bytes:
    """A pipeline call as bytes: a JSON header, then the PNG bytes of its pictures."""
    pictures: list[bytes] = []

    def plain(value):
        if isinstance(value, Image.Image):
            pictures.append(_png(value))
            return {"png": len(pictures) - 1}
        if isinstance(value, torch.Generator):
            return {"seed": value.initial_seed()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {"dict": {k: plain(v) for k, v in value.items()}}
        if value is None or isinstance(value, (str, int, float, bool)):
            return value
        raise TypeError(f"cannot send a {type(value).__name__} to the other ranks")

    sent = {k: plain(v) for k, v in kwargs.items() if k != "callback_on_step_end"}  # each rank has its own
    header = json.dumps({"method": method, "kwargs": sent, "sizes": [len(p) for p in pictures]}).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(pictures)


def decode_call(payload: bytes) -> tuple[str, dict]:
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    offset, pictures = 8 + length, []
    for size in header["sizes"]:
        pictures.append(Image.open(io.BytesIO(payload[offset : offset + size])).copy())
        offset += size

    def value(v):
        if isinstance(v, list):
            return [value(x) for x in v]
        if isinstance(v, dict) and "png" in v:
            return pictures[v["png"]]
        if isinstance(v, dict) and "seed" in v:
            return torch.Generator("cpu").manual_seed(v["seed"])
        if isinstance(v, dict) and "dict" in v:
            return {k: value(x) for k, x in v["dict"].items()}
        return v

    return header["method"], {k: value(v) for k, v in header["kwargs"].items()}


def _stop_flag(stop: bool, group) -> bool:
    flag = torch.tensor([int(stop)], dtype=torch.uint8)
    dist.broadcast(flag, src=0, group=group)
    return bool(flag.item())


class LeaderPipeline:
    """Rank 0's pipeline: the same calls as the pipeline, each made on every rank."""

    def __init__(self, pipe, group=None):
        self.pipe = pipe
        self.group = group if group is not None else control_group()
        self.healthy = True

    def __getattr__(self, name: str):
        return getattr(self.__dict__["pipe"], name)

    def __call__(self, **kwargs):
        return self._everywhere("__call__", kwargs)

    def inpaint(self, **kwargs):
        return self._everywhere("inpaint", kwargs)

    def set_loras(self, loras: dict) -> None:
        self._send("set_loras", {"loras": {name: [str(path), scale] for name, (path, scale) in loras.items()}})
        self.pipe.set_loras(loras)

    def close(self) -> None:
        """Let the followers' loops end."""
        self._send("stop", {})

    def _send(self, method: str, kwargs: dict) -> None:
        try:
            _send(encode_call(method, kwargs), self.group)
        except RuntimeError:
            self.healthy = False
            raise

    def _everywhere(self, method: str, kwargs: dict):
        self._send(method, kwargs)
        callback = kwargs.get("callback_on_step_end")

        def on_step(pipe, step, timestep, tensors):
            try:
                out = callback(pipe, step, timestep, tensors) if callback is not None else {}
            except Exception:
                _stop_flag(True, self.group)
                raise
            _stop_flag(False, self.group)
            return out

        try:
            return getattr(self.pipe, method)(**{**kwargs, "callback_on_step_end": on_step})
        except RuntimeError as e:
            if not isinstance(e, torch.OutOfMemoryError):  # a collective failed: a rank is gone or hangs
                self.healthy = False
                log.error("the split pipeline failed between ranks (%s); this server needs a restart", e)
            raise


def follow(pipe, group=None) -> None:
    """Ranks > 0: make every call rank 0 makes, until it says stop."""
    group = group if group is not None else control_group()

    def on_step(p, step, timestep, tensors):
        if _stop_flag(False, group):
            raise StopAll()
        return {}

    while True:
        method, kwargs = decode_call(_receive(group))
        if method == "stop":
            return
        try:
            if method == "set_loras":
                pipe.set_loras({name: (path, scale) for name, (path, scale) in kwargs["loras"].items()})
            else:
                getattr(pipe, method)(**kwargs, callback_on_step_end=on_step)
        except StopAll:
            continue
        except Exception as e:  # noqa: BLE001  (rank 0 meets the same error on the same inputs and answers for it)
            log.warning("rank %d: call %s failed: %s", dist.get_rank(), method, e)
