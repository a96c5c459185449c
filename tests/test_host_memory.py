"""CPU memory behaviour of the trainer's step (docs/trainer.md, "CPU benchmark"): after every optimizer step the
free pages of the C heap go back to the OS, and the lean RMSNorm forward allocates one full-size tensor, not
three, with HF's output bit for bit."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from misa_train import lean_ops as lo
from misa_train import methods as methods_mod
from tests.test_methods import make, train


@pytest.mark.parametrize("method", ["misa", "full", "lora"])
def test_cpu_step_releases_host_memory_once_per_step(monkeypatch, method):
    calls = []
    monkeypatch.setattr(methods_mod, "release_host_memory", lambda: calls.append(1) or True)
    m, cfg = make(method=method, delta=0.3)
    train(m, cfg, 3)
    assert len(calls) == 3


_TRIM_PROBE = r"""
import sys, torch
from misa_train import methods as m

def rss_anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

if m.release_host_memory() is False:
    print("no-trim"); sys.exit(0)
# 64 KiB blocks are below glibc's smallest mmap threshold, so they come from the heap; the small tensors kept
# alive between them stop the freed blocks from merging into the heap top (which glibc trims itself)
keep, big = [], []
for _ in range(2000):
    big.append(torch.ones(16 * 1024))
    keep.append(torch.ones(1))
del big
before = rss_anon()
assert m.release_host_memory() is True
print(before - rss_anon(), 2000 * 64 * 1024)
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and methods_mod.release_host_memory()),
                    reason="needs glibc malloc_trim and /proc")
def test_release_host_memory_returns_freed_heap_pages():
    # a fresh process: in a long test session earlier allocations shape the heap (holes, a raised dynamic mmap
    # threshold), so what one malloc_trim can return there is not what this test is about
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    assert out != ["no-trim"], "malloc_trim found in this process but not in a fresh one"
    returned, freed = int(out[0]), int(out[1])
    assert returned > freed // 2, (returned, freed)


@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_rms_norm_forward_bit_identical_to_hf(xdt, wdt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 32, generator=g).to(xdt)
    w = (1 + 0.1 * torch.randn(32, generator=g)).to(wdt)
    x32 = x.to(torch.float32)  # HF LlamaRMSNorm.forward, op for op
    want = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    if xdt == torch.float64:  # the lean op keeps float64 statistics (gradcheck); compare with that
        want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    got = lo.rms_norm(x.requires_grad_(), w.requires_grad_(), 1e-6)
    assert got.dtype == want.dtype and torch.equal(got.detach(), want)


def test_rms_norm_forward_allocates_one_full_size_tensor():
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(64, 256, requires_grad=True)
    w = torch.randn(256, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lo.rms_norm(x, w, 1e-6)
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())
    full = x.numel() * x.element_size()
    # the output (x² and x·r were computed in its buffer) plus the (rows, 1) statistics; HF's ops take 3 * full
    assert full <= allocated < full + 4096, allocated
