"""The telemetry window: rates over the window, nearest-rank percentiles, old requests age out; memory."""

from __future__ import annotations

from dynllava.telemetry import RequestWindow, device_memory, percentile


def test_window_rates_percentiles_and_ageing():
    now = [90.0]
    window = RequestWindow(window_s=10.0, clock=lambda: now[0])
    now[0] = 92.0  # 2 s old: rates are over its age, not the full window (a new engine is not slow)
    for _ in range(4):
        window.add(ttft_s=0.1, latency_s=0.2, n_tokens=2)
    assert window.stats()["requests_per_s"] == 2.0 and window.stats()["finished"] == 4
    now[0] = 90.0
    window = RequestWindow(window_s=10.0, clock=lambda: now[0])
    now[0] = 100.0
    for i in range(10):
        window.add(ttft_s=0.1 * (i + 1), latency_s=1.0 + 0.1 * (i + 1), n_tokens=11)
    stats = window.stats()
    assert stats["requests_per_s"] == 1.0 and stats["output_tokens_per_s"] == 11.0
    assert stats["ttft_p50_s"] == 0.5 and stats["ttft_p95_s"] == 1.0
    assert abs(stats["token_latency_p50_s"] - 0.1) < 1e-9
    now[0] = 105.0
    window.add(ttft_s=5.0, latency_s=5.0, n_tokens=1)  # one token: no per-token latency
    now[0] = 110.5
    stats = window.stats()
    assert stats["requests_per_s"] == 0.1 and stats["ttft_p95_s"] == 5.0 and stats["token_latency_p50_s"] is None
    now[0] = 200.0
    assert window.stats()["ttft_p50_s"] is None and window.stats()["requests_per_s"] == 0.0


def test_busy_fraction_and_admissions_over_the_window():
    now = [100.0]
    window = RequestWindow(window_s=10.0, clock=lambda: now[0])
    now[0] = 120.0
    assert window.stats()["busy_fraction"] == 0.0
    for _ in range(5):
        window.add_busy(0.5)
        now[0] += 1.0
    assert window.stats()["busy_fraction"] == 0.25  # 2.5 s of steps in the 10 s window
    now[0] += 7.5  # the first three steps are over 10 s old
    assert window.stats()["busy_fraction"] == 0.1
    window.add_busy(30.0)  # a step longer than the window: the engine was busy all of it
    assert window.stats()["busy_fraction"] == 1.0
    window.add_busy(0.0, admitted=3)
    window.add_busy(0.0, admitted=2)
    assert window.stats()["admitted_per_s"] == 0.5  # 5 requests admitted in the 10 s window


def test_a_window_nobody_reads_keeps_only_its_window():
    """An offline engine without a controller adds an event per step for hours and never asks for stats."""
    now = [0.0]
    window = RequestWindow(window_s=10.0, clock=lambda: now[0])
    for _ in range(1000):
        now[0] += 0.1
        window.add_busy(0.05, admitted=1)
        window.add(ttft_s=0.1, latency_s=0.2, n_tokens=2)
    assert max(len(window._busy), len(window._admitted), len(window._items)) <= 101
    assert window.total == 1000


def test_percentile_is_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0, 3.0, 4.0], 95) == 4.0
    assert percentile([5.0], 0) == 5.0


def test_process_memory_without_a_gpu_is_this_process_resident_set():
    """Without a GPU, used = this process's resident memory (as /proc/self/status reports it) and total = the
    machine's physical memory (/proc/meminfo); 256 MiB more touched memory shows up in `used`."""
    import torch

    def proc_kib(path: str, key: str) -> int:
        line = next(line for line in open(path) if line.startswith(key + ":"))
        return int(line.split()[1]) * 1024

    used, total = device_memory(None)
    assert abs(used - proc_kib("/proc/self/status", "VmRSS")) < 32 * 2**20
    assert abs(total - proc_kib("/proc/meminfo", "MemTotal")) < 64 * 2**20
    block = torch.ones(64 * 2**20)  # 256 MiB, written so the pages are resident
    grown, _ = device_memory(None)
    assert grown - used >= 240 * 2**20
    del block
