"""Load test of `featherflux serve`: images/s and p50/p95 latency under 1, 4 and 16 concurrent clients, batching on
(--max-batch 4) and off (--max-batch 1), over a real uvicorn server on loopback.

    python benchmarks/serve_load.py                      # the demo model if shipped, else a tiny random klein model
    python benchmarks/serve_load.py --model PATH --size 64 --steps 4 --requests 32 --threads 1

Every configuration serves the same number of requests (--requests), split evenly over the clients; each client
sends its requests one after another with the OpenAI JSON body and waits for the b64 image. Latency is measured
at the client (queueing included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

from featherflux.errors import UserError
from featherflux.pipeline import load_pipeline
from featherflux.serve.api import create_app


def model_path(arg: str | None, scratch: Path) -> str:
    if arg:
        return arg
    try:
        load_pipeline("demo")
        return "demo"
    except UserError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.tiny import tiny_pipeline_dir

        print("demo model not available; using a tiny random klein pipeline", flush=True)
        return str(tiny_pipeline_dir("klein", scratch))


def serve(app, port: int) -> uvicorn.Server:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server


def run_clients(url: str, clients: int, per_client: int, body: dict) -> tuple[float, list[float]]:
    latencies, errors = [], []

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            for j in range(per_client):
                started = time.perf_counter()
                response = http.post(url, json=body | {"prompt": f"a red apple {i} {j}", "seed": i * 1000 + j})
                if response.status_code != 200:
                    errors.append(response.text)
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0]}")
    return time.perf_counter() - started, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="pipeline folder or 'demo' (default: demo if shipped, else tiny random)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32, help="requests per configuration")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="serve-load-"))
    pipe = load_pipeline(model_path(args.model, scratch))
    body = {"size": f"{args.size}x{args.size}", "steps": args.steps, "n": 1}
    print(
        f"model {pipe.model_id} ({pipe.family.name}), {args.size}x{args.size}, {args.steps} steps, "
        f"{args.requests} requests per row, torch threads {torch.get_num_threads()}"
    )
    print(f"{'batching':>9} {'clients':>7} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'calls':>6}")
    rows = {}
    for max_batch in (4, 1):
        app = create_app(pipe, output_dir=scratch / f"out-{max_batch}", max_batch=max_batch, max_queue=1024)
        server = serve(app, port=8800 + max_batch)
        url = f"http://127.0.0.1:{8800 + max_batch}/v1/images/generations"
        run_clients(url, 1, 1, body)  # warm-up
        for clients in (int(c) for c in args.clients.split(",")):
            queue = app.state.queue
            steps_before = queue.metrics.step_count
            wall, latencies = run_clients(url, clients, max(1, args.requests // clients), body)
            calls = (queue.metrics.step_count - steps_before) // args.steps
            q = statistics.quantiles(latencies, n=20, method="inclusive")
            rows[max_batch, clients] = len(latencies) / wall
            print(
                f"{'on' if max_batch > 1 else 'off':>9} {clients:>7} {len(latencies) / wall:>9.2f} "
                f"{statistics.median(latencies):>7.3f} {q[18]:>7.3f} {calls:>6}",
                flush=True,
            )
        server.should_exit = True
        time.sleep(0.5)
    for clients in (int(c) for c in args.clients.split(",")):
        print(f"batching speed-up at {clients} clients: {rows[4, clients] / rows[1, clients]:.2f}x")


if __name__ == "__main__":
    main()
