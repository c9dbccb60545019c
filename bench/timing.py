"""Timers and peak memory for one benchmark step.

CUDA: triton.testing.do_bench (CUDA events, L2 flushed between calls) when triton imports, else
a CUDA-event loop. CPU: torch.utils.benchmark.Timer, in blocks long enough to dwarf timer
overhead. Both take explicit warm-up calls first, so JIT builds, autotuning, torch.compile and
cache builds never land in a sample.

Peak memory, in bytes:
    CUDA  torch.cuda.max_memory_allocated over one step: parameters, gradients, optimizer state
          and activations together.
    CPU   tracemalloc does not see torch's allocations and torch keeps no CPU allocator stats,
          so: bytes of the live tensors the caller names (parameters, gradients, optimizer
          state, caches) + the process RSS high-water mark during one step above the RSS before
          it (Linux /proc/self/clear_refs resets the mark; malloc_trim first returns freed heap
          so the step's transient allocations show). Approximate: other threads of the process
          count too.
"""
from __future__ import annotations

import ctypes
import statistics
from typing import Callable, Iterable, List, NamedTuple

import torch
import torch.utils.benchmark as torch_benchmark

CPU_BLOCK_SECONDS = 0.02


class Timing(NamedTuple):
    median: float  # seconds
    p20: float
    p80: float
    samples: int


def quantile(values: List[float], q: float) -> float:
    """Linear-interpolated quantile, q in [0, 1]."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], object], device: torch.device, warmup: int = 2,
              reps: int = 5) -> Timing:
    """Median and p20/p80 seconds of `step` after `warmup` untimed calls."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        return _time_cuda(step, reps)
    return _time_cpu(step, reps)


def _time_cpu(step, reps: int) -> Timing:
    timer = torch_benchmark.Timer(stmt="step()", globals={"step": step})
    first = timer.timeit(1).median
    number = max(1, int(CPU_BLOCK_SECONDS / max(first, 1e-9)))
    samples = [timer.timeit(number).median for _ in range(reps)]
    return Timing(statistics.median(samples), quantile(samples, 0.2), quantile(samples, 0.8), reps)


def _time_cuda(step, reps: int) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # rep is a time budget in ms: at least `reps` calls of the measured step.
        single = _cuda_event_times(step, 1)[0] * 1e3
        median, p20, p80 = do_bench(step, warmup=0, rep=max(reps * single, 100.0),
                                    quantiles=[0.5, 0.2, 0.8])
        return Timing(median / 1e3, p20 / 1e3, p80 / 1e3, reps)
    samples = _cuda_event_times(step, reps)
    return Timing(statistics.median(samples), quantile(samples, 0.2), quantile(samples, 0.8), reps)


def _cuda_event_times(step, reps: int) -> List[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages (a tensor and its views count once)."""
    seen, total = set(), 0
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.layout != torch.strided:  # sparse gradients: their values and indices
            total += tensor_bytes([tensor._values(), tensor._indices()]) if tensor.is_sparse else 0
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def peak_memory(step: Callable[[], object], device: torch.device,
                live_tensors: Callable[[], Iterable[torch.Tensor]]) -> int:
    """Peak bytes while `step` runs once (method per device: see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    _release_free_heap()
    before = _rss_bytes("VmRSS")
    reset = _reset_rss_peak()
    step()
    transient = max(_rss_bytes("VmHWM") - before, 0) if reset else 0
    return tensor_bytes(live_tensors()) + transient


def _rss_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
