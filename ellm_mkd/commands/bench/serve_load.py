"""The service part of ``ellm-mkd bench serve``: start ``ellm-mkd serve`` on loopback, load it with concurrent
clients, send it a fixed set of bad requests, stop it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

#: (what is wrong, body): each must be answered with a 4xx and a JSON ``detail``
BAD_REQUESTS: list[tuple[str, bytes]] = [
    ("missing items", b'{"query": "drill"}'),
    ("missing title", b'{"query": "drill", "items": [{"brand": "X"}]}'),
    ("query not a string", b'{"query": 5, "items": [{"title": "x"}]}'),
    ("no items", b'{"query": "drill", "items": []}'),
    ("unknown key", b'{"query": "drill", "items": [{"title": "x", "price": 3}]}'),
    ("not JSON", b"query=drill"),
    ("bad UTF-8", b'{"query": "\xff\xfe", "items": [{"title": "x"}]}'),
    ("too many items", json.dumps({"query": "d", "items": [{"title": "x"}] * 10_000}).encode()),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(export: Path, log_path: Path, args: list[str], timeout: float = 300) -> tuple[subprocess.Popen, str]:
    """``ellm-mkd serve`` in its own session (so it and its workers stop together); waits until healthy."""
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "ellm_mkd", "serve", "--model", str(export), "--port", str(port), *args]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ellm-mkd serve exited with status {proc.returncode}; see {log_path}")
        if time.monotonic() > deadline:
            stop_service(proc)
            raise TimeoutError(f"ellm-mkd serve was not healthy after {timeout:.0f} s; see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def stop_service(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def load_test(opts: Any, export: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    import httpx

    args = ["--precision", "int8", "--max_batch_size", "16", "--batch_timeout", "0.005"]
    if opts.threads:
        args += ["--threads", str(opts.threads)]
    proc, url = start_service(export, Path(opts.work_dir) / "serve.log", args)
    k = opts.items_per_request
    bodies = []
    for i in range(opts.load_requests):
        chunk = [rows[(i * k + j) % len(rows)] for j in range(k)]
        bodies.append({"query": chunk[0]["query"], "items": [{"item_id": r["item_id"], **r["item"]} for r in chunk]})
    local = threading.local()
    lat: list[float] = []
    errors = lost = 0
    lock = threading.Lock()

    def send(body: dict[str, Any]) -> None:
        nonlocal errors, lost
        client = getattr(local, "client", None) or httpx.Client(timeout=60)
        local.client = client
        t = time.perf_counter()
        try:
            r = client.post(f"{url}/predict", json=body)
            ok = r.status_code == 200 and len(r.json()["results"]) == len(body["items"])
        except (httpx.HTTPError, ValueError, KeyError):
            with lock:
                lost += 1
            return
        with lock:
            lat.append((time.perf_counter() - t) * 1000)
            errors += not ok

    try:
        send(bodies[0])  # warm-up
        lat.clear()
        errors = lost = 0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(opts.load_clients) as pool:
            list(pool.map(send, bodies))
        wall = time.perf_counter() - t0
        bad_ok = 0
        with httpx.Client(timeout=30) as client:
            for _, body in BAD_REQUESTS:
                r = client.post(f"{url}/predict", content=body, headers={"content-type": "application/json"})
                try:
                    bad_ok += 400 <= r.status_code < 500 and bool(r.json().get("detail"))
                except ValueError:
                    pass
    finally:
        stop_service(proc)
    return {
        "clients": opts.load_clients,
        "requests": len(bodies),
        "items_per_request": k,
        "requests_per_s": len(bodies) / wall,
        "pairs_per_s": len(bodies) * k / wall,
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat else None,
        "errors": errors,
        "lost": lost,
        "bad_requests": len(BAD_REQUESTS),
        "bad_requests_4xx_json": bad_ok,
    }
