"""Shared pieces for the serving tests: a fake pipeline whose pictures encode their seed, and a live server."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Self

import torch
import uvicorn
from PIL import Image


def seed_colour(seed: int, prompt: str) -> tuple[int, int, int]:
    return seed % 251, (seed // 251) % 251, sum(prompt.encode()) % 251


@dataclass
class FakePipeline:
    """Speaks the pipeline contract (diffusers keyword names, a callback per step, `.images`); each picture is
    one flat colour made from its generator's seed and its prompt, so a test can tell whose picture it is."""

    step_seconds: float = 0.0
    fail_on: str | None = None  # a prompt containing this raises, to test failure isolation
    gate: threading.Event | None = None  # when set up, a call waits for it before its first step
    calls: list[dict] = field(default_factory=list)

    def __call__(
        self,
        *,
        prompt,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        generator,
        num_images_per_prompt=1,
        output_type="pil",
        callback_on_step_end=None,
        image=None,
        show_progress=True,
    ):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        generators = generator if isinstance(generator, list) else [generator]
        assert len(generators) == len(prompts) * num_images_per_prompt
        self.calls.append(
            {"prompts": prompts, "size": (width, height), "steps": num_inference_steps, "references": len(image or [])}
        )
        if self.fail_on and any(self.fail_on in p for p in prompts):
            raise RuntimeError("fake failure")
        if self.gate is not None:
            self.gate.wait(10)
        for step in range(num_inference_steps):
            time.sleep(self.step_seconds)
            if callback_on_step_end is not None:
                callback_on_step_end(self, step, 1.0 - step / num_inference_steps, {})
        images = [
            Image.new("RGB", (width, height), seed_colour(g.initial_seed(), p)) for p, g in zip(prompts, generators)
        ]
        return type("Output", (), {"images": images})()

    def upsample_prompt(self, prompt, images=None, temperature=0.15):
        """Caption upsampling in the pipeline contract: a rewrite that names the temperature and a draw from the global
        RNG, so a test can tell that the job's seed was set."""
        return [f"{prompt}, in detail ({temperature}, {torch.randint(0, 1000, (1,)).item()})"]

    def inpaint(self, *, image, mask_image=None, image_reference=None, strength=0.8, **call):
        """Inpainting in the pipeline contract: records the picture, the mask and the strength, then draws as a call
        with the picture and its references."""
        output = self(image=[image, *(image_reference or [])], **call)
        self.calls[-1] |= {"picture": image, "mask": mask_image, "strength": strength}
        return output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on loopback in a thread, for clients that speak HTTP."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.app.state.queue.stop_accepting()
        self.server.should_exit = True
        self.thread.join(30)


if __name__ == "__main__":  # a server over the fake pipeline in its own process, for shutdown/restart tests
    import argparse
    from pathlib import Path

    from featherflux.serve.api import create_app, run_server

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--step-seconds", type=float, default=0.05)
    args = parser.parse_args()
    run_server(
        create_app(FakePipeline(step_seconds=args.step_seconds), output_dir=args.output_dir, max_batch=1),
        port=args.port,
    )
