"""Load test of `pcam serve`: locust, headless, against the server on loopback, beside
in-process ONNX Runtime at the same batch sizes (the limit serving approaches), measured in the
same run; writes reports/serve-load.json and prints the table docs/serving.md shows.

    python -m pcam_pipeline.perf.serve_load                 # 1, 8, 32, 128 users x 1 patch,
                                                             # 8 users x 256 patches, 20 s each
    python -m pcam_pipeline.perf.serve_load --soak 600 --rate 200   # 10 min steady, RSS sampled

Needs locust (the dev extra) and models/export/ (`dvc repro export`). Locust and the server
share this machine's cores: on 2 cores the client's own work is part of every figure."""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pcam_pipeline.bench.environment import environment
from pcam_pipeline.bench.measure import median
from pcam_pipeline.paths import EXPORT_DIR
from pcam_pipeline.repro import write_json

REPORT = Path("reports/serve-load.json")
SCENARIOS = ((1, 1), (8, 1), (32, 1), (128, 1), (8, 256))  # (users, patches per request)
LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(port: int, export_dir: Path, precision: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "pcam_pipeline.cli", "serve", "--port", str(port),
        "--export-dir", str(export_dir), "--precision", precision,
    ]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"pcam serve exited {server.returncode}:\n{server.stdout.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return server
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("pcam serve did not become ready in 60 s")


def run_locust(
    host: str, users: int, patches: int, seconds: float, rate: float = 0.0
) -> dict[str, Any]:
    """One headless locust run; its aggregated row (locust's percentiles are rounded to 2
    significant digits)."""
    with tempfile.TemporaryDirectory() as scratch:
        prefix = Path(scratch) / "load"
        command = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", host, "-u", str(users), "-r", str(users), "-t", f"{round(seconds)}s",
            "--reset-stats", "--csv", str(prefix), "--only-summary", "--loglevel", "ERROR",
            "--exit-code-on-error", "0",
        ]  # fmt: skip
        env = {**os.environ, "PCAM_LOAD_PATCHES": str(patches), "PCAM_LOAD_RATE": str(rate)}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"locust failed ({done.returncode}):\n{done.stderr[-3000:]}")
        with open(f"{prefix}_stats.csv") as handle:
            row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    requests_s = float(row["Requests/s"])
    return {
        "users": users,
        "patches_per_request": patches,
        "requests": int(row["Request Count"]),
        "errors": int(row["Failure Count"]),
        "requests_per_s": requests_s,
        "img_per_s": requests_s * patches,
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
        "p99_ms": float(row["99%"]),
    }


def batches_run(host: str) -> tuple[float, float]:
    """(batches, patches) the server has run so far, from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"{host}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("pcam_batch_patches_count", "pcam_batch_patches_sum"):
            found[name] = float(value)
    return found["pcam_batch_patches_count"], found["pcam_batch_patches_sum"]


def measured(host: str, users: int, patches: int, seconds: float) -> dict[str, Any]:
    """One locust scenario, with the mean batch the server formed during it."""
    batches, patches_run = batches_run(host)
    row = run_locust(host, users, patches, seconds)
    after = batches_run(host)
    row["mean_batch_patches"] = (after[1] - patches_run) / max(after[0] - batches, 1)
    return row


def in_process(
    export_dir: Path, precision: str, batch_sizes: list[int], seconds: float
) -> dict[int, float]:
    """img/s of ONNX Runtime called directly, at each batch size: median of 5 timed spans."""
    from pcam_pipeline.serve.model import load_model

    model = load_model(export_dir, precision, "cpu", 0)
    rng = np.random.default_rng(2026)
    speeds = {}
    for batch in batch_sizes:
        patches = rng.integers(0, 256, (batch, 96, 96, 3), dtype=np.uint8)
        model.probabilities(patches)
        spans = []
        for _ in range(5):
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 5:
                model.probabilities(patches)
                calls += 1
            spans.append(calls * batch / (time.perf_counter() - start))
        speeds[batch] = median(spans)
    return speeds


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def soak(host: str, pid: int, seconds: float, rate: float) -> dict[str, Any]:
    """`rate` single-patch requests a second from 8 users for `seconds`, the server's RSS
    sampled every 10 s alongside."""
    import threading

    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not stop.wait(0 if not samples else 10):
            samples.append((round(time.monotonic() - start, 1), rss_bytes(pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        load = run_locust(host, 8, 1, seconds, rate=rate / 8)
    finally:
        stop.set()
        sampler.join()
    return {**load, "rate_per_s": rate, "seconds": seconds, "rss_samples": samples}


def table(report: dict[str, Any]) -> str:
    lines = [
        "| users x patches | img/s served | in-process ORT img/s (batch) | served/in-process "
        "| mean batch | p50 ms | p95 ms | p99 ms | p99/p50 | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['users']} x {row['patches_per_request']} | {row['img_per_s']:.0f} | "
            f"{row['in_process_img_per_s']:.0f} ({row['in_process_batch']}) | "
            f"{row['served_over_in_process']:.2f} | {row['mean_batch_patches']:.1f} | "
            f"{row['p50_ms']:.0f} | {row['p95_ms']:.0f} | "
            f"{row['p99_ms']:.0f} | {row['p99_over_p50']:.1f} | {row['errors']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="per scenario [20]")
    parser.add_argument("--users", type=int, nargs="+", help="single-patch users [1 8 32 128]")
    parser.add_argument("--export-dir", type=Path, default=EXPORT_DIR)
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--soak", type=float, help="instead: a soak of this many seconds")
    parser.add_argument("--rate", type=float, default=200, help="soak: requests a second [200]")
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    scenarios = [(u, 1) for u in args.users] + [(8, 256)] if args.users else list(SCENARIOS)

    port = free_port()
    host = f"http://127.0.0.1:{port}"
    server = start_server(port, args.export_dir, args.precision)
    try:
        if args.soak:
            report = {"soak": soak(host, server.pid, args.soak, args.rate)}
            samples = report["soak"]["rss_samples"]
            load = report["soak"]
            print(
                f"soak: {load['requests']} requests, {load['errors']} errors; RSS "
                f"{samples[0][1] / 2**20:.0f} MiB at start, {samples[-1][1] / 2**20:.0f} MiB "
                f"after {samples[-1][0]:.0f} s"
            )
        else:
            run_locust(host, 4, 1, min(5.0, args.seconds))  # warm-up, not kept
            rows = [measured(host, u, p, args.seconds) for u, p in scenarios]
            report = {"rows": rows}
    finally:
        server.terminate()
        server.wait(timeout=60)
    if not args.soak:
        batches = sorted({min(row["users"] * row["patches_per_request"], 256) for row in rows})
        limit = in_process(args.export_dir, args.precision, batches, args.seconds / 2)
        for row in rows:
            row["in_process_batch"] = min(row["users"] * row["patches_per_request"], 256)
            row["in_process_img_per_s"] = limit[row["in_process_batch"]]
            row["served_over_in_process"] = row["img_per_s"] / row["in_process_img_per_s"]
            row["p99_over_p50"] = row["p99_ms"] / row["p50_ms"] if row["p50_ms"] else 0.0
        print(table(report))
    report.update(
        command="python -m pcam_pipeline.perf.serve_load " + " ".join(argv or sys.argv[1:]),
        precision=args.precision,
        environment=environment(),
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
