"""A real `maskrcnn serve` process for the tests: uvicorn in a subprocess on a free 127.0.0.1 port, with a tiny
random checkpoint (conftest.tiny_model), one thread, talked to with httpx."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

import maskrcnn
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def save_tiny_checkpoint(folder: Path, **config_changes) -> Path:
    """conftest.tiny_model saved as a checkpoint; `config_changes` (e.g. min_size) go into its saved config,
    which the server's model is built from."""
    model = tiny_model()
    model.config = dataclasses.replace(model.config, **config_changes)
    path = folder / "tiny.safetensors"
    maskrcnn.save_checkpoint(model, path)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`maskrcnn serve --weights W --device cpu *flags` until `stop()`; `url` is its base address."""

    def __init__(self, weights: Path, *flags, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        python_path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
        self._log = open(log, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "maskrcnn.cli", "serve", "--weights", str(weights), "--device", "cpu",
             "--port", str(self.port), *map(str, flags)], env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}): {self.log()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready within {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def post_image(url: str, path: Path, params: dict | None = None, route: str = "/v1/predict",
               timeout: float = 120.0) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(url + route, files={"image": (path.name, f, "image/jpeg")}, params=params,
                          timeout=timeout)


def without_timing(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k != "timing_ms"}
