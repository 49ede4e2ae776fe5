"""The malloc settings that keep freed memory for reuse during CPU training."""

from __future__ import annotations

import ctypes
import resource
import sys

import pytest

from maskrcnn.engine import memory, train as train_module


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_keep_freed_memory_applies_unless_disabled(monkeypatch):
    monkeypatch.setenv(memory.DISABLE_VARIABLE, "0")
    assert memory.keep_freed_memory() is False
    monkeypatch.delenv(memory.DISABLE_VARIABLE)
    assert memory.keep_freed_memory() is True
    # with the settings in force, a freed 16 MiB block is reused: allocating it again faults no new pages
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 16 * 1024 * 1024
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    assert faults < size // 4096 // 4, faults  # a fresh mapping would fault all 4096 of its pages


def test_cpu_training_applies_the_settings(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(train_module, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(train_module, "_Trainer", _StopAtOnce)
    with pytest.raises(_Stopped):
        train_module.train(train_module.TrainConfig(train_annotations="x.json", train_images="x", iters=1, epochs=None,
                                                    device="cpu", out=str(tmp_path)))
    assert calls == [True]


class _Stopped(Exception):
    pass


class _StopAtOnce:
    def __init__(self, *args, **kwargs):
        raise _Stopped
