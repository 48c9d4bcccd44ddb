#!/usr/bin/env python3
"""Inference under load (issue 14): do engines wait for each other, and does a client that
leaves free its slot?

    python bench/inference.py                 # ~1-3 minutes on a laptop CPU
    python bench/inference.py --width 512     # a smaller "busy" model (faster, less load)

Writes random-weight GGUF models (a ~70 MB llama for the busy model, the tests' tiny llama and
embedding model for the others), starts the server as a subprocess on loopback, and measures:

1. idle latency of an embedding request and a short completion on the other models, and of
   adding (and removing) a model from a local file: ``--samples`` rounds before the load and
   as many after it, so a machine whose background load drifts is sampled on both sides;
2. the same, round after round for as long as 16 long completions (``--tokens`` each) keep
   the busy model's queue full. Target: each median within 2x its idle median;
3. a streamed completion on the busy model whose client disconnects: how long the generation
   ran on after the server saw the disconnect (the engine's ``last_stop_seconds``), in tokens
   of that stream. Target: within one token (the time the server takes to notice the
   disconnect comes on top and is shown);
4. a queued request whose client disconnects: dropped without running.

Prints a markdown table; exit status 0 (1 with --strict when a target fails).
"""

# ruff: noqa: T201 - a benchmark script: it prints its report

from __future__ import annotations

import argparse
import itertools
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from tests.helpers.gguf_models import write_tiny_model  # noqa: E402
from tests.helpers.server import ServerProcess  # noqa: E402


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


class Bench:
    def __init__(self, server: ServerProcess, models: dict[str, Path]) -> None:
        self.url = server.url
        self.models = models
        self.http = httpx.Client(base_url=server.url, timeout=600)
        self.added = 0

    def post(self, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
        response = self.http.post(path, json=body)
        if response.status_code != status:
            raise RuntimeError(f"{path}: {response.status_code} {response.text}")
        return response.json()  # type: ignore[no-any-return]

    def add(self, model_id: str, path: Path, **params: Any) -> None:
        body = {"model_id": model_id, "model_path": str(path), "loading_parameters": params}
        self.post("/v1/models", body, status=201)

    def embed(self) -> None:
        self.post("/v1/embeddings", {"model": "embed", "input": "hello world"})

    def complete_other(self) -> None:
        self.post("/v1/completions", {"model": "other", "prompt": "hello", "max_tokens": 8})

    def add_and_remove(self) -> None:
        self.added += 1
        model_id = f"extra-{self.added}"
        self.add(model_id, self.models["other"])
        self.http.delete(f"/v1/models/{model_id}")

    def requests(self) -> dict[str, Any]:
        details = self.http.get("/v1/models/busy").json()["details"]
        return details["requests"]  # type: ignore[no-any-return]


def wait_until(check: Callable[[], bool], timeout: float = 120) -> float:
    """Poll every millisecond; the time it took."""
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.001)
    return time.perf_counter() - started


def open_stream(url: str, body: dict[str, Any]) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=120)
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1408, help="busy model width (~70 MB)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per long request")
    parser.add_argument("--concurrent", type=int, default=16)
    parser.add_argument("--samples", type=int, default=10, help="idle samples before (and after)")
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        root = Path(tmp)
        say("writing models")
        models = {
            "busy": write_tiny_model(root / "busy.gguf", width=args.width, context_length=4096),
            "other": write_tiny_model(root / "other.gguf"),
            "embed": write_tiny_model(root / "embed.gguf", embedding=True),
        }
        size_mb = models["busy"].stat().st_size / 1e6
        with ServerProcess(root / "server", start_timeout=60) as server:
            bench = Bench(server, models)
            bench.add("busy", models["busy"])
            bench.add("other", models["other"])
            bench.add("embed", models["embed"])
            return run(bench, args, size_mb)


CALLS = {
    "embeddings (other model)": "embed",
    "completion, 8 tokens (other model)": "complete_other",
    "add + remove a model": "add_and_remove",
}


def sample_round(bench: Bench, into: dict[str, list[float]]) -> None:
    """One latency sample of each call, spaced out (to spread them over the load's span)."""
    for name, method in CALLS.items():
        into.setdefault(name, []).append(timed(getattr(bench, method)))
        time.sleep(0.05)


def run(bench: Bench, args: argparse.Namespace, size_mb: float) -> int:
    n = args.samples
    for call in (bench.embed, bench.complete_other):
        call()  # warm up
    say("idle latencies (before the load)")
    idle_samples: dict[str, list[float]] = {}
    for _ in range(n):
        sample_round(bench, idle_samples)
    single = timed(
        lambda: bench.post(
            "/v1/completions", {"model": "busy", "prompt": "the", "max_tokens": args.tokens}
        )
    )

    say(f"{args.concurrent} long requests on the busy model")
    done: list[float] = []
    started = time.perf_counter()

    def long() -> None:
        bench.post("/v1/completions", {"model": "busy", "prompt": "the", "max_tokens": args.tokens})
        done.append(time.perf_counter() - started)

    threads = [threading.Thread(target=long) for _ in range(args.concurrent)]
    for t in threads:
        t.start()
    wait_until(lambda: bench.requests()["queued"] >= args.concurrent - 2)
    # sample through the whole load, while at least two requests still wait
    loaded_samples: dict[str, list[float]] = {}
    while bench.requests()["queued"] >= 2:
        sample_round(bench, loaded_samples)
    for t in threads:
        t.join()
    busy_total = time.perf_counter() - started
    say("idle latencies (after the load)")
    for _ in range(n):
        sample_round(bench, idle_samples)
    idle = {k: statistics.median(v) for k, v in idle_samples.items()}
    loaded = {k: statistics.median(v) for k, v in loaded_samples.items()}
    rounds = len(next(iter(loaded_samples.values())))

    say("a streamed request whose client disconnects")
    sock = open_stream(bench.url, {"model": "busy", "prompt": "the",
                                   "max_tokens": 4000, "stream": True})  # fmt: skip
    arrivals: list[float] = []
    buffer = b""
    while len(arrivals) < 40:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"stream ended early: {buffer[-500:]!r}")
        buffer += chunk
        now = time.perf_counter()
        arrivals += [now] * (buffer.count(b"data: {") - len(arrivals))
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    per_token = statistics.median(gaps)
    before = bench.requests()
    sock.close()
    noticed = wait_until(lambda: bench.requests()["stopped"] > before["stopped"])
    wait_until(lambda: not bench.requests()["running"])
    ran_on = bench.requests()["last_stop_seconds"]  # the worker's own clock
    worker_tokens = ran_on / per_token

    say("a queued request whose client disconnects")
    holder = open_stream(bench.url, {"model": "busy", "prompt": "the",
                                     "max_tokens": 4000, "stream": True})  # fmt: skip
    wait_until(lambda: bench.requests()["running"])
    before = bench.requests()
    queued = open_stream(bench.url, {"model": "busy", "prompt": "x", "max_tokens": 5})
    wait_until(lambda: bench.requests()["queued"] == 1)
    queued.close()
    wait_until(lambda: bench.requests()["dropped"] > before["dropped"])
    holder.close()
    wait_until(lambda: not bench.requests()["running"])
    after = bench.requests()
    dropped_ran = after["completed"] - before["completed"]

    rows = []
    ok = True
    for name, base in idle.items():
        ratio = loaded[name] / base
        passed = ratio <= 2.0
        ok &= passed
        rows.append(f"| {name} | {base * 1000:.1f} ms | {loaded[name] * 1000:.1f} ms | "
                    f"{ratio:.2f}x | {'PASS' if passed else 'FAIL'} (<= 2x) |")  # fmt: skip
    stop_pass = worker_tokens <= 1.0
    ok &= stop_pass and dropped_ran == 0
    print(f"\n## Inference under load (busy model {size_mb:.0f} MB, {args.concurrent} x "
          f"{args.tokens}-token completions)\n")  # fmt: skip
    print(f"One {args.tokens}-token completion alone: {single:.2f} s; the {args.concurrent} "
          f"together: {busy_total:.2f} s (last finished at {max(done):.2f} s); "
          f"Latencies: medians of {2 * n} idle samples (half before, half after the load) and "
          f"{rounds} samples spread over the load.\n")  # fmt: skip
    print("| request to another model / engine creation | idle | during the load | ratio | "
          "target |")  # fmt: skip
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| disconnect | figure | target |\n|---|---|---|")
    print(f"| streamed generation: token interval | {per_token * 1000:.2f} ms | |")
    print(f"| from socket close until the server noticed | {noticed * 1000:.1f} ms "
          f"({noticed / per_token:.1f} tokens) | (transport) |")  # fmt: skip
    print(f"| from the server noticing until the generation ended | "
          f"{ran_on * 1000:.2f} ms ({worker_tokens:.2f} tokens) | "
          f"{'PASS' if stop_pass else 'FAIL'} (<= 1 token) |")  # fmt: skip
    print(f"| queued request whose client left: runs | {dropped_ran} | "
          f"{'PASS' if dropped_ran == 0 else 'FAIL'} (0, dropped) |")  # fmt: skip
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
