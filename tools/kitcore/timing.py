"""Timing that is correct on every device.

`benchmark(fn, device, warmups, runs)` calls `fn` `warmups` times untimed, then `runs` times timed.
On devices with events (cuda, musa) each call is bracketed by a pair of device events and the device
is synchronised once at the end, so the timing covers the kernels, not the launch. On the CPU each call
is bracketed by perf_counter. The result is a `Measurement` that carries its own statistics, in the
spirit of torch.utils.benchmark.Measurement.
"""

import statistics
import time
from dataclasses import dataclass, field

from .errors import UsageError

SPREAD_WARNING_RATIO = 0.10  # warn when IQR exceeds 10% of the median


@dataclass
class Measurement:
    what: str
    samples_ms: list = field(repr=False)
    warmups: int = 0

    def _quantile(self, q):
        s = sorted(self.samples_ms)
        if len(s) == 1:
            return s[0]
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def n(self):
        return len(self.samples_ms)

    @property
    def median_ms(self):
        return statistics.median(self.samples_ms)

    @property
    def mean_ms(self):
        return statistics.fmean(self.samples_ms)

    @property
    def p10_ms(self):
        return self._quantile(0.10)

    @property
    def p90_ms(self):
        return self._quantile(0.90)

    @property
    def iqr_ms(self):
        return self._quantile(0.75) - self._quantile(0.25)

    @property
    def spread_warning(self):
        return self.iqr_ms > SPREAD_WARNING_RATIO * self.median_ms

    def summary(self):
        return {"median_ms": self.median_ms, "mean_ms": self.mean_ms, "p10_ms": self.p10_ms, "p90_ms": self.p90_ms,
                "iqr_ms": self.iqr_ms, "samples": self.n, "warmups": self.warmups,
                "spread_warning": self.spread_warning}

    def describe(self):
        text = (f"{self.what}: median {self.median_ms:.3f} ms, IQR {self.iqr_ms:.3f} ms, "
                f"p10 {self.p10_ms:.3f} / p90 {self.p90_ms:.3f} ms, mean {self.mean_ms:.3f} ms, "
                f"{self.n} runs after {self.warmups} warm-ups")
        if self.spread_warning:
            text += "  [WARNING: IQR > 10% of median, the machine is noisy]"
        return text


def check_counts(warmups, runs):
    if runs < 1:
        raise UsageError(f"--runs must be at least 1, got {runs}")
    if warmups < 0:
        raise UsageError(f"--warmups must be 0 or more, got {warmups}")


def timer_note(device, own_streams):
    """What the timer measures, for the output."""
    if device.type == "cpu":
        return "timer: perf_counter around each call (the CPU runs it synchronously)"
    if own_streams:
        return "timer: the whole device synchronised around each call (the module runs its own streams)"
    return "timer: device events on the current stream around each call, one synchronisation at the end"


def benchmark(fn, device, warmups, runs, what, setup=None, own_streams=False):
    """Time `fn()`; `setup()` (untimed) runs before every call, e.g. to reset a KV cache or evict the
    caches. `own_streams`: the call runs on streams of its own, which events on the current stream would
    not see: the whole device is synchronised around each call instead."""
    check_counts(warmups, runs)
    for _ in range(warmups):
        if setup:
            setup()
        fn()
    device.synchronize()
    samples = []
    if device.has_events() and not own_streams:
        pairs = []
        for _ in range(runs):
            if setup:
                setup()
            start, end = device.event(), device.event()
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        device.synchronize()
        samples = [s.elapsed_time(e) for s, e in pairs]
    else:
        for _ in range(runs):
            if setup:
                setup()
            device.synchronize()
            t0 = time.perf_counter()
            fn()
            device.synchronize()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Measurement(what, samples, warmups)


def time_requests(calls, device, warmups, runs, reset, what, own_streams=False):
    """Run `calls` one after another, as a serving loop meets them, `runs` times after `warmups` rounds.

    `reset()` (untimed) runs before every round, e.g. to crop KV caches back to their past. Returns one
    Measurement per call (from that call's start to its output being ready on the device) and the
    batch-relative samples: for every round, the time from the round's start to each call's end.
    """
    check_counts(warmups, runs)
    for _ in range(warmups):
        reset()
        for fn in calls:
            fn()
    device.synchronize()
    per_call = [[] for _ in calls]
    batch_relative = []
    rounds = []
    for _ in range(runs):
        reset()
        device.synchronize()
        if device.has_events() and not own_streams:
            marks = [device.event() for _ in range(len(calls) + 1)]
            marks[0].record()
            for fn, mark in zip(calls, marks[1:]):
                fn()
                mark.record()
            rounds.append(marks)
        else:
            marks = [time.perf_counter()]
            for fn in calls:
                fn()
                device.synchronize()  # a no-op on the CPU; the end of the call on a device with own streams
                marks.append(time.perf_counter())
            rounds.append([m * 1e3 for m in marks])
    device.synchronize()
    for marks in rounds:
        if device.has_events() and not own_streams:
            ends = [marks[0].elapsed_time(m) for m in marks[1:]]
        else:
            ends = [m - marks[0] for m in marks[1:]]
        starts = [0.0] + ends[:-1]
        for i, (s, e) in enumerate(zip(starts, ends)):
            per_call[i].append(e - s)
        batch_relative.append(ends)
    return [Measurement(f"{what} #{i}", s, warmups) for i, s in enumerate(per_call)], batch_relative
