"""Memory of a run: the peak of each phase, and growth across repeated calls (a leak).

Where memory is counted: on accelerators, torch's device allocator (bytes allocated; what a model and
its activations need, without the allocator's cache); on the CPU, the process's resident set size (RSS),
whose peak the kernel tracks (VmHWM) and lets a process reset (/proc/self/clear_refs, Linux). Without
that reset the peak is the process's peak so far, and the output says so.
"""

import ctypes
import gc
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .crashguard import mark_phase

# growth per iteration above which `--repeat` calls an engine leaking: well above what the kit measured
# for correct engines after a warm-up call (RSS: 0 to 8 KiB per iteration on the tiny and the real
# checkpoint; the device allocator: exactly 0), below one retained prompt's logits or KV cache
LEAK_BYTES_PER_ITERATION = 64 * 1024


def _status_kib(field_name):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes():
    """The process's resident set size now (None where /proc is missing)."""
    return _status_kib("VmRSS")


def peak_rss_bytes():
    """The process's peak resident set size since the last reset_peak_rss() (or its start)."""
    peak = _status_kib("VmHWM")
    if peak is None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak


def reset_peak_rss():
    """Reset the kernel's peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def settle():
    """Free what is garbage and hand freed heap pages back to the system, so that RSS counts live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS then includes the allocator's free lists (growth still shows a leak)


def live_bytes(device):
    """Memory in use now: the device allocator's bytes on accelerators, RSS on the CPU."""
    settle()
    device.synchronize()
    return device.memory_bytes()


class Phases:
    """Wall time and peak memory of each named phase of a check (`with phases("candidate_forward"):`)."""

    def __init__(self, device):
        self.device = device
        self.seconds, self.peak, self.peak_rss = {}, {}, {}
        if device.memory_kind == "rss":
            # what lives before the check (torch and transformers: millions of objects) is not its garbage:
            # frozen, the collections of every phase skip it (each took 0.4 s otherwise)
            gc.collect()
            gc.freeze()

    @contextmanager
    def __call__(self, name):
        mark_phase(name)  # a guarded child's last phase, named if the engine kills it (kitcore.crashguard)
        if self.device.memory_kind == "rss":
            settle()  # free heap pages the allocator kept would otherwise serve the phase unseen by RSS
            gc.freeze()  # what survived is live: the next phases' collections skip it (a model's modules, imports)
        self.device.reset_peak_memory()  # on the CPU, the peak RSS
        if self.device.memory_kind != "rss":
            reset_peak_rss()
        t0 = time.perf_counter()
        yield
        self.device.synchronize()
        self.seconds[name] = time.perf_counter() - t0
        self.peak_rss[name] = peak_rss_bytes()
        self.peak[name] = self.device.peak_memory_bytes()

    def report(self, results):
        """Metric lines: seconds, and peak memory (device allocator, or RSS on the CPU) of every phase."""
        kind = self.device.memory_kind
        for name in self.seconds:
            results.add("timing", name, self.seconds[name], unit="s")
            results.add("memory", f"peak_{name}", self.peak[name], unit="bytes", memory=kind)
            if kind != "rss":
                results.add("memory", f"peak_rss_{name}", self.peak_rss[name], unit="bytes", memory="rss")

    def summary(self):
        kind = "device allocator" if self.device.memory_kind != "rss" else "process RSS"
        return f"peak memory ({kind}, MiB): " + ", ".join(
            f"{name} {self.peak[name] / 2**20:.0f}" for name in self.seconds)


@dataclass
class Growth:
    """Live memory after each of `--repeat` calls and what it says about a leak."""

    samples: list = field(default_factory=list)  # bytes after each call
    threshold: int = LEAK_BYTES_PER_ITERATION

    @property
    def per_iteration(self):
        """Median growth between consecutive calls after the first (a warm-up: caches, lazy buffers):
        a leak adds the same amount every call, while noise comes and goes."""
        diffs = [b - a for a, b in zip(self.samples[1:], self.samples[2:])]
        return statistics.median(diffs) if diffs else 0.0

    @property
    def leaking(self):
        return self.per_iteration > self.threshold

    def describe(self):
        total = self.samples[-1] - self.samples[1] if len(self.samples) > 1 else 0
        return (f"{len(self.samples)} calls: live memory grew {total / 2**20:+.2f} MiB after the first, median "
                f"{self.per_iteration / 2**10:+.1f} KiB per call (limit {self.threshold / 2**10:.0f} KiB)")


def repeat_growth(call, device, times):
    """Run `call()` `times` times and sample live memory after each (the outputs are dropped every time)."""
    growth = Growth()
    for _ in range(times):
        call()
        growth.samples.append(live_bytes(device))
    return growth
