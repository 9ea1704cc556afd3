"""Prompt-encoding service throughput and cache latency, tiny random klein encoder on CPU.

    python benchmarks/encode_service.py [--prompts 64] [--clients 16] [--max-sequence-length 512]

Prints:
- prompts/second for one client sending one prompt per request in turn (sequential), for `--clients` clients
  sending at once with micro-batching off (max_batch_prompts=1), and with it on (the default server);
- the encoder alone in-process, one prompt per call and all prompts in one call, for scale;
- median request latency on a cache miss and on a cache hit.
The server is a real uvicorn on loopback in this process, so clients and server share the CPU and the GIL.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.tiny

from featherflux.serve.encoder_service import create_encoder_app
from featherflux.text_encoder.remote import RemotePromptEncoder


def tiny_encoder(folder: Path):
    from featherflux.serve.encoder_service import load_pipeline_prompt_encoder
    from tests.tiny import save_tiny_pipeline

    return load_pipeline_prompt_encoder(str(save_tiny_pipeline("klein", folder / "tiny-klein")))


class Server:
    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()


def mean_batch(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    total = float(re.search(r"^featherflux_encoder_batch_prompts_sum (\S+)$", text, re.MULTILINE).group(1))
    count = float(re.search(r"^featherflux_encoder_batch_prompts_count (\S+)$", text, re.MULTILINE).group(1))
    return total / count


def throughput(encoder, prompts: list[str], clients: int, length: int, **app_kwargs) -> tuple[float, float]:
    """(prompts per second, mean prompts per encoder call), one prompt per request, cache off."""
    with Server(create_encoder_app(encoder, cache_bytes=0, **app_kwargs)) as server:
        remotes = [RemotePromptEncoder(server.url) for _ in range(clients)]
        remotes[0].encode(["warm up"], length)
        share = [prompts[i::clients] for i in range(clients)]
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(lambda i: [remotes[i].encode([p], length) for p in share[i]], range(clients)))
        seconds = time.perf_counter() - start
        return len(prompts) / seconds, mean_batch(server.url)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a tiny model gains nothing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length = args.max_sequence_length
    prompts = [f"a photo of object number {i} on a table" for i in range(args.prompts)]

    with tempfile.TemporaryDirectory() as scratch:
        encoder = tiny_encoder(Path(scratch))
        encoder.encode(["warm up"], length)
        start = time.perf_counter()
        for p in prompts:
            encoder.encode([p], length)
        local_single = len(prompts) / (time.perf_counter() - start)
        start = time.perf_counter()
        encoder.encode(prompts, length)
        local_batch = len(prompts) / (time.perf_counter() - start)

        sequential, _ = throughput(encoder, prompts, 1, length)
        unbatched, _ = throughput(encoder, prompts, args.clients, length, max_batch_prompts=1, batch_window_s=0)
        batched, batch = throughput(encoder, prompts, args.clients, length)

        with Server(create_encoder_app(encoder)) as server, RemotePromptEncoder(server.url) as client:
            miss, hit = [], []
            for p in prompts[:16]:
                for latencies in (miss, hit):
                    start = time.perf_counter()
                    client.encode([p], length)
                    latencies.append(time.perf_counter() - start)

    print(
        f"tiny klein encoder (Qwen3, 28 layers x 16 wide), CPU, {args.threads} thread(s), "
        f"max_sequence_length={length}, {len(prompts)} prompts"
    )
    print(f"in-process encoder, 1 prompt per call       {local_single:8.1f} prompts/s")
    print(f"in-process encoder, all prompts in one call {local_batch:8.1f} prompts/s")
    print(f"service, 1 client, sequential requests      {sequential:8.1f} prompts/s")
    print(f"service, {args.clients} clients, batching off         {unbatched:8.1f} prompts/s")
    print(f"service, {args.clients} clients, micro-batching       {batched:8.1f} prompts/s  ({batch:.1f} prompts/call)")
    print(f"batched vs sequential: {batched / sequential:.2f}x; vs unbatched concurrent: {batched / unbatched:.2f}x")
    miss_ms, hit_ms = statistics.median(miss) * 1e3, statistics.median(hit) * 1e3
    print(
        f"request latency, cache miss {miss_ms:.2f} ms, cache hit {hit_ms:.2f} ms (median of {len(miss)}; "
        f"{miss_ms / hit_ms:.1f}x)"
    )


if __name__ == "__main__":
    main()
