"""The second half of a fast path's proof: it runs only where it is faster than the plain code.

A fast path that computes the right thing can still be slower on some CPU (issue 35: the AVX-512 blocking
of fused_dit.c ran 6-9x slower than plain PyTorch on an AVX2-only AMD EPYC). So before a fast path is
used, `choose` times it against the plain path on the model and batch actually used (one warm-up call
each, then ROUNDS alternating calls, medians) and keeps the plain path unless the fast one is at least
MARGIN times faster. The result is cached per CPU, kernel build, model, batch, thread count, torch
version and PyTorch's instruction set (a small JSON file beside the built kernels), so a machine times
each case once, and a decision taken under unusual load stays until the file (its path is in the record
and the log) is deleted.
"""

import hashlib
import json
import os
import statistics
import tempfile
import time

import torch

from .kernels import cache_dir

MARGIN = 1.2  # the fast path must be this many times faster; nearer than that, timing noise decides
ROUNDS = 3


def measure(fast_run, plain_run, rounds=ROUNDS, clock=time.perf_counter):
    """(fast seconds, plain seconds): medians of one call each over `rounds` alternating rounds (the order
    flips every round), after one warm-up call of each."""
    fast_run()
    plain_run()
    times = {fast_run: [], plain_run: []}
    for r in range(rounds):
        for run in (fast_run, plain_run) if r % 2 == 0 else (plain_run, fast_run):
            start = clock()
            run()
            times[run].append(clock() - start)
    return statistics.median(times[fast_run]), statistics.median(times[plain_run])


def record_path(key):
    """The cache file of one timing: key is a JSON-able dict naming everything the times depend on."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / f"speed_{digest}.json"


def choose(key, fast_run, plain_run):
    """The timing record of a fast path against the plain one, timed once per key and cached.

    Returns {"fast_ms", "plain_ms", "speedup", "margin", "choice" ("fast" or "plain"), "cached", "file"}.
    `measure` is looked up at call time, so a test can replace it (fast.speed.measure)."""
    path = record_path(key)
    try:
        record = json.loads(path.read_text())
        if record.get("key") == json.loads(json.dumps(key, default=str)):
            return {**record["timing"], "cached": True, "file": str(path)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no record yet (or an unreadable one): time it
    with torch.random.fork_rng():  # the timed calls may draw; the caller's random stream is left alone
        fast_s, plain_s = measure(fast_run, plain_run)
    speedup = plain_s / fast_s if fast_s > 0 else float("inf")
    timing = {"fast_ms": round(fast_s * 1e3, 3), "plain_ms": round(plain_s * 1e3, 3),
              "speedup": round(speedup, 3), "margin": MARGIN,
              "choice": "fast" if speedup >= MARGIN else "plain"}
    try:  # written whole (another process may time the same case at once; either record will do)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, staged = tempfile.mkstemp(dir=path.parent, suffix=".json")
        with os.fdopen(fd, "w") as out:
            json.dump({"key": key, "timing": timing}, out, indent=1, default=str)
        os.replace(staged, path)
    except OSError:
        pass  # an unwritable cache only means timing again next time
    return {**timing, "cached": False, "file": str(path)}


def describe(timing, unit):
    """One line: both times, the ratio, the choice and whether it was timed now or read from the cache."""
    used = "fast path used" if timing["choice"] == "fast" else "plain path kept"
    origin = "cached timing" if timing["cached"] else "timed now"
    return (f"fast {timing['fast_ms']:.3g} ms, plain {timing['plain_ms']:.3g} ms per {unit}: "
            f"{timing['speedup']:.2f}x, {used} (needs {timing['margin']}x; {origin}, {timing['file']})")


# What limits the plain path's instruction set besides the CPU (PyTorch's own kernels, MKL, oneDNN)
PLAIN_ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")


def key_of(kind, kernels, model, **more):
    """The cache key of a timing: what is timed, the CPU and kernel build, the model, threads, torch and
    the instruction set its kernels use."""
    return {"kind": kind, "library": kernels.lib.key, "isa": kernels.lib.isa, "model": dict(model.config),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "margin": MARGIN,
            "torch_cpu": torch.backends.cpu.get_cpu_capability(),
            **{name: os.environ.get(name) for name in PLAIN_ISA_ENV}, **more}
