"""`esep-jax bench serve`: a bounded load test of `esep-jax serve` over loopback.

Starts `esep-jax serve` on the bundle in a child process on a free port of 127.0.0.1 (or uses one already
listening on 127.0.0.1:PORT), waits for /ready, and runs each scenario — text or vector queries, one per request
or a batch, dense or hybrid — from `concurrency` client threads until `requests` requests are answered or
`duration_s` has passed, whichever comes first. Reports per scenario: requests/s, queries/s, and the p50 / p99
latency of a request as the client sees it (encoding, search, JSON and HTTP included). The child is stopped at
the end (SIGTERM, then SIGKILL). Nothing leaves the machine: the client only connects to 127.0.0.1.

Query texts come from `--query-file` (BEIR queries.jsonl), else from the bundle's document store (each document's
title and first words, a stand-in for real queries), else there are only vector scenarios. Vectors are random
unit vectors of the bundle's input dimension (search cost does not depend on what they say).
"""

from __future__ import annotations

import json
import platform
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from esep_jax.atomic import atomic_write_text
from esep_jax.errors import InputError

HOST = "127.0.0.1"  # loopback only: a load test must not be pointed at someone else's machine
MAX_REQUESTS = 100_000
MAX_DURATION_S = 600.0
READY_TIMEOUT_S = 300.0
COLUMNS = [("scenario", "scenario"), ("queries_per_request", "queries/request"), ("concurrency", "clients"),
           ("requests", "requests"), ("requests_per_s", "requests/s"), ("queries_per_s", "queries/s"),
           ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("errors", "errors")]


class ServerProcess:
    """`esep-jax serve` in a child process on a free loopback port; a context manager that stops it."""

    def __init__(self, bundle: str, key_file: str | None = None, extra: list[str] | None = None):
        command = [sys.executable, "-m", "esep_jax", "serve", "--bundle", bundle, "--host", HOST, "--port", "0",
                   *(["--key-file", key_file] if key_file else []), *(extra or [])]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.process.stderr), daemon=True).start()
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True).start()
        deadline = time.monotonic() + 60
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line and "listening on http://" in line:
                self.url = line.split("listening on ", 1)[1].split()[0]
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise InputError(f"esep-jax serve did not start: {''.join(self.stderr[-3:]).strip() or 'no output'}")

    def wait_ready(self, client, timeout_s: float = READY_TIMEOUT_S) -> dict:
        """The /ready payload once the bundle is loaded; an InputError if the server exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                time.sleep(0.2)  # let the stderr reader catch the last line
                raise InputError(f"esep-jax serve stopped: {''.join(self.stderr[-1:]).strip()}")
            try:
                response = client.get(f"{self.url}/ready", timeout=5)
                if response.status_code == 200:
                    return response.json()
            except Exception:  # noqa: BLE001 - not accepting yet
                pass
            time.sleep(0.2)
        raise InputError(f"esep-jax serve was not ready after {timeout_s:.0f} s")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 15 s; the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _query_texts(bundle: str, query_file: str | None, count: int, seed: int) -> list[str]:
    if query_file:
        from esep_jax.data.beir import read_beir_queries

        return read_beir_queries(query_file)[1][:count]
    manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    if "documents" not in manifest:
        return []
    from esep_jax.serving.documents import DocumentStore

    ids = (Path(bundle) / manifest["corpus"]["ids"]).read_text(encoding="utf-8").splitlines()
    store = DocumentStore.open(Path(bundle), manifest["documents"], ids)
    rows = np.random.default_rng(seed).choice(len(ids), min(count, len(ids)), replace=False)
    return [" ".join((doc["title"] + " " + doc["text"]).split()[:12]) for doc in store.get(rows)]


def _scenarios(ready: dict, texts: list[str], batch: int, k: int, documents: bool, seed: int) -> list[tuple]:
    """(name, queries per request, payload factory) per scenario the bundle supports."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((max(256, batch), ready["input_dim"])).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).round(6).tolist()
    out = []

    def cycle(pool, size):
        state = {"next": 0}

        def take():
            start = state["next"]
            state["next"] = (start + size) % len(pool)
            return [pool[(start + i) % len(pool)] for i in range(size)]
        return take

    for size in (1, batch):
        if texts and ready["text_queries"]:
            for hybrid in (False, True) if ready["hybrid"] else (False,):
                take = cycle(texts, size)
                out.append((f"{'hybrid' if hybrid else 'dense'} text", size,
                            lambda take=take, hybrid=hybrid: {"queries": take(), "k": k, "hybrid": hybrid,
                                                              "documents": documents}))
        take = cycle(vectors, size)
        out.append(("dense vector", size, lambda take=take: {"vectors": take(), "k": k, "documents": documents}))
    return sorted(out, key=lambda s: (s[0], s[1]))


def _load(url: str, make_payload, requests: int, duration_s: float, concurrency: int) -> dict:
    """Sends requests from `concurrency` threads until `requests` are done or `duration_s` is over."""
    import httpx

    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    budget = [requests]
    deadline = time.monotonic() + duration_s

    def worker():
        with httpx.Client(timeout=60) as client:
            while time.monotonic() < deadline:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                    body = json.dumps(make_payload())
                start = time.perf_counter()
                try:
                    ok = client.post(f"{url}/search", content=body,
                                     headers={"content-type": "application/json"}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors[0] += not ok

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    times = np.asarray(latencies) * 1000
    return {"requests": len(latencies), "wall_s": wall, "errors": errors[0],
            "requests_per_s": len(latencies) / wall if wall else 0.0,
            "p50_ms": float(np.percentile(times, 50)) if times.size else None,
            "p99_ms": float(np.percentile(times, 99)) if times.size else None}


def run_serve_benchmark(bundle: str, *, port: int | None = None, requests: int = 200, duration_s: float = 20.0,
                        concurrency: int = 4, batch: int = 16, k: int = 10, query_file: str | None = None,
                        key_file: str | None = None, documents: bool = False, seed: int = 0, log=print) -> dict:
    """Load-tests a server over loopback (started here unless `port` names one on 127.0.0.1); one record."""
    import httpx

    if not 1 <= requests <= MAX_REQUESTS or not 0 < duration_s <= MAX_DURATION_S:
        raise InputError(f"need 1 <= --requests <= {MAX_REQUESTS} and 0 < --duration <= {MAX_DURATION_S:.0f} s")
    if not 1 <= concurrency <= 64 or batch < 1 or k < 1:
        raise InputError("need 1 <= --concurrency <= 64, --batch >= 1 and --k >= 1")
    server = None if port is not None else ServerProcess(bundle, key_file)
    url = f"http://{HOST}:{port}" if port is not None else server.url
    try:
        with httpx.Client() as client:
            if server is not None:
                log(f"started esep-jax serve at {url}; waiting for /ready")
                ready = server.wait_ready(client)
            else:
                ready = client.get(f"{url}/ready", timeout=10).json()
        if not ready.get("ready"):
            raise InputError(f"the server at {url} is not ready: {ready}")
        texts = _query_texts(bundle, query_file, max(512, batch * 8), seed)
        results = []
        for name, size, make in _scenarios(ready, texts, batch, k, documents, seed):
            _load(url, make, min(3, requests), duration_s, 1)  # warm-up (connection, first-call costs)
            measured = _load(url, make, requests, duration_s, concurrency)
            measured.update(scenario=f"{name} x{size}", queries_per_request=size, concurrency=concurrency,
                            queries_per_s=measured["requests_per_s"] * size)
            log(f"{measured['scenario']}: {measured['requests_per_s']:.1f} requests/s, p50 "
                f"{measured['p50_ms']:.1f} ms, p99 {measured['p99_ms']:.1f} ms")
            results.append(measured)
    finally:
        status = server.stop() if server is not None else None
    return {"bundle": str(bundle), "documents": ready["documents"], "index": ready["index"], "k": k,
            "hybrid": ready["hybrid"], "encoder": ready["encoder"], "requests_per_scenario": requests,
            "duration_limit_s": duration_s, "server_exit": status, "scenarios": results,
            "machine": {"cpus": _cpus(), "platform": platform.platform()}}


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def markdown_table(record: dict) -> str:
    """One row per scenario."""
    def cell(value):
        if value is None:
            return "–"
        return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(s.get(key)) for key, _ in COLUMNS) + " |" for s in record["scenarios"]]
    return "\n".join(lines) + "\n"


def write_results(record: dict, json_path: str | None, markdown_path: str | None) -> None:
    """The record as JSON and/or a markdown table, each written atomically."""
    for path, text in ((json_path, json.dumps(record, indent=2) + "\n"), (markdown_path, markdown_table(record))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
