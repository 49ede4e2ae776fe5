"""`maskrcnn serve` refuses in one line what it cannot serve: a port in use, weights that do not load."""

from __future__ import annotations

import socket

from test_cli_predict import run_cli


def test_port_in_use_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, out, err = run_cli("serve", "--weights", tmp_path / "unused.safetensors", "--port", port,
                                   "--device", "cpu")
    assert status == 2 and out == ""
    assert err == f"maskrcnn serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_weights_that_do_not_load_end_the_server_with_one_line(tmp_path, capfd):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    missing = tmp_path / "missing.safetensors"
    status, _, err = run_cli("serve", "--weights", missing, "--port", port, "--device", "cpu")
    assert status == 2
    assert err.endswith(f"\nmaskrcnn serve: error: {missing}: checkpoint file not found\n")  # after uvicorn's log
    assert not list(tmp_path.iterdir())  # nothing written
