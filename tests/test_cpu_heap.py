"""``espo_lightning.training.cpu_heap``: freed heap memory kept for the next step of a CPU policy (glibc).

Checked by what the code controls, not by page-fault counts (those depend on where address
randomisation puts the heap: 2,661 to 5,112 faults per cycle over 50 processes): the two ``mallopt``
settings it makes, in order, and, in a fresh process, that 48 MiB of freed 4 MiB blocks stay in
glibc's heap (``mallinfo2``) after it, where glibc's default trim threshold (twice the largest
freed block, 8 MiB here) would have handed all but a few MiB back."""
from __future__ import annotations

import ctypes
import json
import platform
import subprocess
import sys

import pytest

from espo_lightning.training import cpu_heap
from espo_lightning.training.module import PolicyModule

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")


class _FakeLibc:
    """A libc whose ``mallopt`` records its calls and answers ``answer`` (1: accepted)."""

    def __init__(self, answer: int = 1):
        calls = self.calls = []

        class Mallopt:  # a plain function object: the code sets argtypes and restype on it
            def __call__(self, param, value):
                calls.append((param, value))
                return answer

        self.mallopt = Mallopt()


@pytest.mark.parametrize("answer", [1, 0])
def test_sets_the_mmap_then_the_trim_threshold_once(monkeypatch, answer):
    libc = _FakeLibc(answer)
    monkeypatch.setattr(cpu_heap, "_applied", False)
    monkeypatch.setattr(cpu_heap.platform, "system", lambda: "Linux")
    monkeypatch.setattr(cpu_heap.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(cpu_heap.ctypes, "CDLL", lambda name: libc)
    assert cpu_heap.retain_freed_heap() is bool(answer)
    # M_MMAP_THRESHOLD (-3) = 32 MiB first, then M_TRIM_THRESHOLD (-1) = 64 MiB; a refusal stops there
    assert libc.calls == ([(-3, 32 << 20), (-1, 64 << 20)] if answer else [(-3, 32 << 20)])
    libc.calls.clear()
    assert cpu_heap.retain_freed_heap() is bool(answer)
    assert libc.calls == ([] if answer else [(-3, 32 << 20)]), "applied once per process; a refusal is retried"


_KEPT = r"""
import ctypes, json, torch
from espo_lightning.training.cpu_heap import retain_freed_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = retain_freed_heap()
blocks = [torch.ones(1 << 20) for _ in range(12)]  # 12 x 4 MiB, as a backward's sweep of activations
in_use = libc.mallinfo2().uordblks
del blocks
info = libc.mallinfo2()
print(json.dumps({"applied": applied, "in_use": in_use, "free_kept": info.fordblks, "mmapped": info.hblkhd}))
"""


@glibc_only
def test_freed_blocks_stay_in_the_heap_for_the_next_step():
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    out = subprocess.run([sys.executable, "-c", _KEPT], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["applied"] is True
    assert result["in_use"] >= 48 << 20, result  # the blocks came from the heap, not from mmap
    assert result["free_kept"] >= 48 << 20, result  # and stay there once freed


@glibc_only
def test_applied_once_and_reported():
    assert cpu_heap.retain_freed_heap() is True
    assert cpu_heap.retain_freed_heap() is True  # idempotent: the process-wide setting is already in place


@pytest.mark.parametrize("retain", [True, False])
def test_module_applies_it_at_train_start_on_cpu_only_when_asked(monkeypatch, retain):
    calls = []
    monkeypatch.setattr("espo_lightning.training.module.retain_freed_heap", lambda: calls.append(1) or True)
    module = PolicyModule("unused-path", retain_cpu_heap=retain)
    try:
        module.on_train_start()
    finally:
        module.on_train_end()  # gc.unfreeze
    assert calls == ([1] if retain else [])
