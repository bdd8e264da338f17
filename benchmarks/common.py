"""Helpers shared by the benchmark scripts: machine description, interleaved timing, peak memory, tables.

Scripts import this as `from common import ...` (run them as `python benchmarks/<name>.py`, which puts
this folder on sys.path).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from typing import Callable, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def refuse_bad_settings(parser: argparse.ArgumentParser, preset: str, overrides: Sequence[str]) -> None:
    """Every run would fail at once on a preset or KEY=VALUE setting poetlm refuses: say it before any starts."""
    from poetlm.train.config import ConfigError, resolve_config

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # each run prints the config's warnings itself
            resolve_config(preset, list(overrides))
    except ConfigError as error:
        parser.error(str(error))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str) -> str:
    """One line per fact, so a pasted table always says which machine produced it."""
    lines = [f"torch {torch.__version__}, Python {platform.python_version()}, {platform.system()} {platform.machine()}"]
    lines.append(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})")
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        lines.append(f"load average before the run: {load:.2f}")
        if device == "cpu" and load >= 0.5 and torch.get_num_threads() > 1:
            # Every multi-threaded op ends in a barrier; a core taken by another process stalls it for a
            # scheduler slice, which hurts many small ops (POET's rotations) far more than one big GEMM.
            lines.append("WARNING: other processes are busy; multi-threaded CPU timings will be skewed, try --threads 1")
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        lines.append(f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda})")
    return "\n".join(lines)


def announce(script: str, argv: list[str] | None, device: str, threads: int | None) -> None:
    """Set the thread count, then print the command line and the machine: the header of every table."""
    if threads:
        torch.set_num_threads(threads)
    print(f"$ python benchmarks/{script} {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    print(describe_machine(device))


def synchronizer(device: str) -> Callable[[], None]:
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def timed_rounds(repeats: int) -> int:
    """Rounds actually timed for `repeats`: rounded up to even. The fold rule turns one side on even steps
    and the other on odd ones, two different costs; pairs of consecutive steps hold one of each."""
    return repeats + repeats % 2


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                      sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of every function, timed_rounds(repeats) samples each, taken round-robin.

    Round-robin rather than one function after another: on a shared, noisy machine (thermal state,
    other jobs) slow phases then hit every contender alike, so per-round ratios stay meaningful. The
    starting point rotates each round so that no contender always runs right after the same one.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection landing inside one sample would be charged to whoever ran then
    try:
        for round_index in range(timed_rounds(repeats)):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                start = time.perf_counter()
                fns[name]()
                sync()
                times[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def pair_sums(times: Sequence[float]) -> list[float]:
    """Sums of consecutive pairs of step times: each pair is one even and one odd step (see timed_rounds)."""
    if len(times) % 2:
        raise ValueError(f"{len(times)} step times: pairing needs an even number (interleaved_times gives one)")
    return [a + b for a, b in zip(times[::2], times[1::2])]


def step_median(times: Sequence[float]) -> float:
    """Seconds of one step: the median of pair means, so that both parities of an alternating step weigh
    alike (a plain median of an odd count picks one parity's cost); harmless where steps do not alternate."""
    return statistics.median(pair_sums(times)) / 2


def paired_ratio(times: Sequence[float], baseline: Sequence[float]) -> float:
    """Median of per-pair ratios: each pair of steps is compared with the baseline's pair of the same rounds."""
    return statistics.median(t / b for t, b in zip(pair_sums(times), pair_sums(baseline)))


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak bytes allocated by one call of `fn` above what was live before it (None if unmeasurable).

    CUDA: the caching allocator's max_memory_allocated (tensor bytes, not reserved segments).
    CPU: every allocation and free of c10's CPU allocator during the call, replayed in order from the
    profiler's memory events; frees of memory allocated before the call are left out, so the caller
    should drop stale tensors (e.g. old .grad) first, as CUDA's count would not see their bytes
    return either. Either way the number counts tensor storage
    (activations saved for backward, temporaries, gradients), not the process's RSS.
    """
    if device.startswith("cuda"):
        sync = synchronizer(device)
        sync()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync()
        return torch.cuda.max_memory_allocated(device) - before
    return _cpu_peak_bytes(fn)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        allocations = cpu_allocations(prof)
    except Exception:  # private profiler internals: report "not measured" rather than a wrong number
        return None
    live = peak = 0
    for _, size in allocations:
        live += size
        peak = max(peak, live)
    return peak


def cpu_allocations(prof, also: Callable[[object], None] = lambda event: None) -> list[tuple[int, int]]:
    """(time ns, ±bytes) of c10's CPU allocator in one profile, in order; `also` sees every other event.

    Only frees of memory allocated inside the profile count: the profiler remembers sizes from earlier
    profiles, so a tensor made during one measured call and freed in the next (a shared input's .grad)
    would otherwise start the next call's running sum below zero.
    """
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
        else:
            also(event)
        stack.extend(event.children)
    events.sort(key=lambda e: (e[0], e[2]))  # at one timestamp, an address is freed before it is reused
    allocated, kept = set(), []
    for time_ns, ptr, size in events:
        if size > 0:
            allocated.add(ptr)
        elif ptr in allocated:
            allocated.remove(ptr)
        else:
            continue
        kept.append((time_ns, size))
    return kept


CHUNKS_HELP = ("how poetlm batches rotation blocks: as it does on this device, as on a GPU (on a CPU: a GPU "
               "step's op counts), or as on a CPU (on a GPU: what the batching saves)")


def batch_rotations_as(chunks: str) -> None:
    """--chunks: batch rotation blocks as on `chunks` ("gpu", "cpu") whatever the device, or as the device
    does ("device"); see `poetlm.primitives.CHUNK_ENTRIES`."""
    if chunks == "device":
        return
    import poetlm.primitives

    if not hasattr(poetlm.primitives, "CHUNK_ENTRIES"):
        sys.exit(f"--chunks {chunks}: this poetlm has no device-dependent batching (poetlm.primitives.CHUNK_ENTRIES)")
    poetlm.primitives.CHUNK_ENTRIES = {} if chunks == "gpu" else {"cpu": 0, "cuda": 0}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; `align` has one of 'l'/'r'/'c' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = [{"l": v.ljust, "r": v.rjust, "c": v.center}[a](w) for v, w, a in zip(values, widths, align)]
        return "| " + " | ".join(padded) + " |"

    rule = [{"l": "-" * w, "r": "-" * (w - 1) + ":", "c": ":" + "-" * (w - 2) + ":"}[a] for w, a in zip(widths, align)]
    return "\n".join([line(headers), "| " + " | ".join(rule) + " |"] + [line(row) for row in cells])


def setting_differences(wanted: dict, have: dict, ignore: Sequence[str] = (), prefix: str = "") -> list[str]:
    """Dotted keys ("data.seq_len") whose values differ between two nested settings dicts; a key on one side
    only differs too. `ignore`: dotted keys left out (where a run writes its files, not what it computes)."""
    differ = []
    for key in sorted(set(wanted) | set(have)):
        dotted = prefix + key
        if dotted in ignore:
            continue
        a, b = wanted.get(key), have.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differ += setting_differences(a, b, ignore, dotted + ".")
        elif key not in wanted or key not in have or a != b:
            differ.append(dotted)
    return differ


def refuse_other_settings(stale: Sequence[tuple[object, str]], out: object) -> None:
    """One-line error naming (up to four of) the finished runs in `out` made with other settings, with why:
    reusing them would label their results with settings they were not made with."""
    if stale:
        listing = "; ".join(f"{where} ({why})" for where, why in stale[:4])
        raise SystemExit(f"{len(stale)} run(s) in {out} were made with other settings than these: {listing}. "
                         "Use another --out, or the settings those runs were made with")
