"""Load on `maskrcnn serve`: N concurrent clients send M uploads; throughput, latency percentiles, errors, and
the server's memory after 50 and after 500 requests.

    python benchmarks/serve_load.py                                   # tiny random model, 8 clients, 500 requests
    python benchmarks/serve_load.py --clients 4 --requests 200 --max-batch 1 4   # batching on and off, side by side
    python benchmarks/serve_load.py --url http://127.0.0.1:8000       # a server already running (no RSS figures)

Without --url the script starts `maskrcnn serve` itself (one subprocess per --max-batch value, OMP_NUM_THREADS
from --threads) with --weights, or with a seeded random resnet18_fpn (as tests/conftest.py `tiny_model`, at
--min-size) saved to a temporary folder. The images are the real COCO photos of tests/assets/coco/val2017,
sent in turn as multipart uploads. The server's RSS is read from /proc/PID/status after request 50 and after
request 500: it must not grow by more than 10% (leaks would show as steady growth). With fewer clients than
the queue has places there must be no errors at all. The script exits 1 when either check fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "tests" / "assets" / "coco" / "val2017"
RSS_AT = (50, 500)


def tiny_checkpoint(folder: Path, min_size: int) -> Path:
    import torch

    import maskrcnn

    torch.manual_seed(0)
    model = maskrcnn.build_model("resnet18_fpn", num_classes=4, min_size=min_size, max_size=min_size * 5 // 3,
                                 fpn_channels=64, mask_head_channels=64, box_head_hidden=256,
                                 rpn=dict(pre_nms_top_n_test=200, post_nms_top_n_test=100))
    with torch.no_grad():
        model.box_predictor.class_logits.weight.mul_(50)
    model.class_names = ["__background__", "cat", "dog", "bird"]
    model.category_ids = [0, 17, 18, 16]
    path = folder / "tiny.safetensors"
    maskrcnn.save_checkpoint(model.eval(), path)
    return path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_server(weights: Path, max_batch: int, args) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "maskrcnn.cli", "serve", "--weights", str(weights), "--port", str(port),
               "--device", "cpu", "--max-batch", str(max_batch), "--batch-wait-ms", str(args.batch_wait_ms),
               "--queue-size", str(args.queue_size)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready within 180 s")


def run_load(url: str, pid: int | None, args) -> dict:
    """`args.clients` threads share a counter of `args.requests` uploads; each records its latency."""
    import httpx

    photos = [(p.name, p.read_bytes()) for p in sorted(IMAGES.glob("*.jpg"))]
    lock = threading.Lock()
    latencies, statuses, rss = [], [], {}
    issued = [0]

    def client():
        with httpx.Client(timeout=300) as session:
            while True:
                with lock:
                    if issued[0] >= args.requests:
                        return
                    index = issued[0]
                    issued[0] += 1
                name, data = photos[index % len(photos)]
                started = time.perf_counter()
                response = session.post(url + "/v1/predict", files={"image": (name, data, "image/jpeg")})
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    statuses.append(response.status_code)
                    done = len(statuses)
                    if pid is not None and done in RSS_AT:
                        rss[done] = rss_mb(pid)

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    p50, p95, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 95, 99])
    return dict(throughput=len(statuses) / wall, p50=p50, p95=p95, p99=p99, wall=wall,
                errors=sum(s != 200 for s in statuses), statuses=sorted(set(statuses)), rss=rss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server (else one is started per --max-batch value)")
    parser.add_argument("--weights", type=Path, help="checkpoint for the started server (default: tiny random)")
    parser.add_argument("--min-size", type=int, default=128, help="input size of the tiny random model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--max-batch", type=int, nargs="+", default=[1])
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--queue-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the started server")
    args = parser.parse_args()

    print(f"{args.clients} clients, {args.requests} requests, queue {args.queue_size}, "
          f"{len(list(IMAGES.glob('*.jpg')))} COCO photos in turn")
    failed = False
    with tempfile.TemporaryDirectory() as folder:
        targets = [(None, args.url, None)] if args.url else [(b, None, None) for b in args.max_batch]
        weights = args.weights or (None if args.url else tiny_checkpoint(Path(folder), args.min_size))
        for max_batch, url, _ in targets:
            process = None
            if url is None:
                process, url = start_server(weights, max_batch, args)
            try:
                result = run_load(url, process.pid if process else None, args)
            finally:
                if process is not None:
                    process.send_signal(signal.SIGTERM)
                    process.wait(timeout=30)
            label = "given server" if max_batch is None else f"--max-batch {max_batch}"
            print(f"{label}: {result['throughput']:.2f} req/s, latency p50 {result['p50']:.0f} ms, "
                  f"p95 {result['p95']:.0f} ms, p99 {result['p99']:.0f} ms, errors {result['errors']} "
                  f"(statuses {result['statuses']}), {result['wall']:.1f} s")
            if result["errors"] and args.clients < args.queue_size:
                print("  FAIL: errors below the queue limit")
                failed = True
            if len(result["rss"]) == 2:
                first, last = (result["rss"][n] for n in RSS_AT)
                growth = last / first - 1
                verdict = "ok" if growth <= 0.10 else "FAIL (over 10%)"
                print(f"  server RSS after {RSS_AT[0]} requests {first:.0f} MB, after {RSS_AT[1]} {last:.0f} MB "
                      f"({growth:+.1%}): {verdict}")
                failed |= growth > 0.10
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
