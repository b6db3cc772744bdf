"""A bounded loopback load test of `mnist-ann serve`: requests/s and latency at 1, 4, 16 and 32
clients, for single images and for batches, and the answers checked against the CLI's.

    python bench/bench_serve.py [--store indexes] [--collection seed] [--index hnsw]
                                [--seconds 5] [--clients 1 4 16 32] [--batch 100]
                                [--no-gather]

The server runs as `mnist-ann serve` in a process of its own; the clients are threads of this
process, each with one keep-alive connection, sending the seed test images in turn for
`--seconds` per setting (bounded: no client has more than one request in flight). Prints, per
setting, requests/s, images/s, p50/p95/p99 latency and errors by status; then whether the
server's predictions for 1,000 test images equal `mnist-ann query`'s.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from mnist_ann import Store
from mnist_ann.machine import describe_machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "mnist_ann", "serve", "--collection", args.collection,
               "--index", args.index, "--port", str(port), "--threads", "1", "-q",
               "--gather" if args.gather else "--no-gather"]
    if args.store:
        command += ["--store", args.store]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    sys.exit(f"the server did not start: {server.stderr.read()[-2000:]}")


def client(port: int, bodies: list[bytes], stop: float, latencies: list[float],
           statuses: Counter, offset: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    i = offset
    while time.perf_counter() < stop:
        body = bodies[i % len(bodies)]
        i += 1
        started = time.perf_counter()
        try:
            connection.request("POST", "/v1/classify", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            status = response.status
        except OSError as exc:
            status = type(exc).__name__
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        latencies.append(time.perf_counter() - started)
        statuses[status] += 1
    connection.close()


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
    latencies: list[list[float]] = [[] for _ in range(clients)]
    statuses: list[Counter] = [Counter() for _ in range(clients)]
    stop = time.perf_counter() + seconds
    threads = [threading.Thread(target=client, args=(port, bodies, stop, latencies[c],
                                                     statuses[c], c * 97))
               for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    every = np.array([x for part in latencies for x in part]) * 1000
    status = sum(statuses, Counter())
    return {"requests": len(every), "requests_per_second": len(every) / elapsed,
            "p50_ms": float(np.percentile(every, 50)), "p95_ms": float(np.percentile(every, 95)),
            "p99_ms": float(np.percentile(every, 99)),
            "errors": {str(k): v for k, v in status.items() if k != 200}}


def server_predictions(port: int, pixels: np.ndarray, batch: int) -> np.ndarray:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    predictions = []
    for start in range(0, len(pixels), batch):
        body = json.dumps({"instances": pixels[start:start + batch].tolist()})
        connection.request("POST", "/v1/classify", body=body,
                           headers={"Content-Type": "application/json"})
        answer = json.loads(connection.getresponse().read())
        predictions += [result["prediction"] for result in answer["results"]]
    return np.array(predictions)


def cli_predictions(args: argparse.Namespace, pixels: np.ndarray) -> np.ndarray:
    with tempfile.TemporaryDirectory() as folder:
        np.save(Path(folder) / "queries.npy", pixels)
        out = Path(folder) / "out.csv"
        command = [sys.executable, "-m", "mnist_ann", "query", "--collection", args.collection,
                   "--index", args.index, "--input", str(Path(folder) / "queries.npy"),
                   "--output", str(out), "--threads", "1", "-q"]
        if args.store:
            command += ["--store", args.store]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        with open(out) as handle:
            return np.array([int(row["predicted"]) for row in csv.DictReader(handle)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None)
    parser.add_argument("--collection", default="seed")
    parser.add_argument("--index", default="hnsw")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--no-gather", dest="gather", action="store_false",
                        help="serve --no-gather: every request searched on its own")
    args = parser.parse_args()
    test = Store(args.store)[args.collection].test()
    pixels = test.pixels[:2000]
    singles = [json.dumps({"pixels": p.tolist(), "index": args.index}).encode()
               for p in pixels]
    batches = [json.dumps({"instances": pixels[s:s + args.batch].tolist(),
                           "index": args.index}).encode()
               for s in range(0, len(pixels), args.batch)]
    port = free_port()
    server = start_server(args, port)
    try:
        print(f"machine: {json.dumps(describe_machine())}")
        print(f"server: mnist-ann serve --index {args.index} --threads 1 "
              f"--{'' if args.gather else 'no-'}gather (one uvicorn worker); "
              f"clients: threads of one process, one keep-alive connection each, "
              f"{args.seconds:g} s a setting; {os.cpu_count()} cores shared")
        load(port, singles, 4, 1.0)  # warm-up
        print(f"{'kind':8} {'clients':>7} {'req/s':>8} {'images/s':>9} {'p50 ms':>7} "
              f"{'p95 ms':>7} {'p99 ms':>7}  errors")
        for kind, bodies, size in (("single", singles, 1), (f"batch{args.batch}", batches,
                                                             args.batch)):
            for clients in args.clients:
                row = load(port, bodies, clients, args.seconds)
                print(f"{kind:8} {clients:>7} {row['requests_per_second']:>8.0f} "
                      f"{row['requests_per_second'] * size:>9.0f} {row['p50_ms']:>7.2f} "
                      f"{row['p95_ms']:>7.2f} {row['p99_ms']:>7.2f}  "
                      f"{row['errors'] or 'none'}", flush=True)
        checked = pixels[:1000]
        same = np.array_equal(server_predictions(port, checked, args.batch),
                              cli_predictions(args, checked))
        print(f"predictions of {len(checked)} test images identical to `mnist-ann query`: "
              f"{same}")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
