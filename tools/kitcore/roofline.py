"""Distance to the device's limit: the device's measured ceilings, the roofline bound of a call, and the
cache flush of cold timings.

Ceilings, measured once per device fingerprint (device name, threads, torch version) and cached in
`$LLM_KIT_CACHE/ceilings/` (`tools/device_ceilings.py` measures, prints and refreshes them):
  * memory bandwidth: a copy between two buffers BANDWIDTH_CACHE_MULTIPLE x the last-level cache
    (device to device on accelerators; on the CPU with the threads of the run), counted as
    2 x buffer bytes (one read, one write);
  * matrix throughput in each dtype: an n x n by n x n matmul, counted as 2 n^3 FLOPs (n doubles from
    256 until one call takes 20 ms, at most 2048 on a CPU and 8192 on accelerators); for bfloat16 and
    float16, the faster of that dtype's and float32's, since a kernel may compute in float32 (CPUs
    without native bfloat16 do: there, bfloat16 matmuls run at ~1% of float32's rate).
Each is the median of timed calls after warm-up (kitcore.timing.benchmark), the best a plain torch
call reaches, not the vendor's datasheet.

The roofline bound of a call that does F FLOPs and moves B bytes: max(B / bandwidth, F / throughput);
its kind is `memory` when the first term is the larger, `compute` otherwise; the fraction achieved is
bound / measured median (1.0 = at the device's limit).
"""

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import checkpoints
from .results import write_json_atomic
from .timing import benchmark

BANDWIDTH_CACHE_MULTIPLE = 8  # the copied buffer is 8x the last-level cache: it streams from memory
MIN_BANDWIDTH_BYTES = 64 * 2**20
GEMM_N_MAX = {"cpu": 2048, "default": 8192}  # the largest matmul tried
MATMUL_MIN_SECONDS = 0.02
RUNS, WARMUPS = 10, 3


def last_level_cache_bytes(device):
    """The largest cache the device has: L2 on a GPU, the last-level CPU cache from sysfs (32 MiB when
    it cannot be read)."""
    if device.type != "cpu":
        props = device._backend().get_device_properties(device.torch_device)
        return int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes) if sizes else 32 * 2**20


class CacheFlush:
    """Evicts the caches before a cold timed call, as triton's do_bench does for L2: it writes a buffer
    twice the last-level cache. The write is outside the timed region."""

    def __init__(self, device):
        self.device = device
        self.bytes = 2 * last_level_cache_bytes(device)
        self.buffer = torch.empty(self.bytes // 4, dtype=torch.int32, device=device.torch_device)

    def __call__(self):
        self.buffer.zero_()
        self.device.synchronize()


@dataclass
class Ceilings:
    fingerprint: str
    bandwidth_bytes_per_s: float
    flops_per_s: dict  # dtype name -> FLOP/s
    measured: dict  # how: buffer bytes, gemm n, runs, date

    def describe(self, dtype):
        return (f"ceilings ({self.fingerprint}): memory {self.bandwidth_bytes_per_s / 1e9:.1f} GB/s, "
                f"{dtype} matmul ceiling {self.flops_per_s[dtype] / 1e9:.1f} GFLOP/s")


@dataclass
class Bound:
    ms: float  # the roofline bound of the call
    kind: str  # "memory" or "compute": which ceiling bounds it
    fraction: float  # bound / measured median: how close the call is to the device's limit


def bound(flops, bytes_moved, ceilings, dtype, median_ms):
    memory_ms = bytes_moved / ceilings.bandwidth_bytes_per_s * 1e3
    compute_ms = flops / ceilings.flops_per_s[dtype] * 1e3
    ms = max(memory_ms, compute_ms)
    return Bound(ms, "memory" if memory_ms >= compute_ms else "compute", ms / median_ms if median_ms > 0 else 0.0)


def fingerprint(device):
    return f"{device.name()}, torch {torch.__version__}".replace("/", "-")


def _path(device):
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in fingerprint(device))
    return checkpoints.cache_root() / "ceilings" / f"{safe}.json"


def measure_bandwidth(device):
    n_bytes = max(BANDWIDTH_CACHE_MULTIPLE * last_level_cache_bytes(device), MIN_BANDWIDTH_BYTES)
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device.torch_device)
    dst = torch.empty_like(src)
    m = benchmark(lambda: dst.copy_(src), device, WARMUPS, RUNS, "copy")
    return 2 * n_bytes / (m.median_ms / 1e3), n_bytes


def measure_matmul(device, dtype):
    """n grows from 256 (doubling) until one call takes MATMUL_MIN_SECONDS or n reaches the device's cap:
    long enough to reach the device's rate, short where a dtype is emulated (bfloat16 on a CPU without it)."""
    n = 256
    while True:
        a = torch.randn(n, n, device=device.torch_device).to(dtype)
        b = torch.randn(n, n, device=device.torch_device).to(dtype)
        once = benchmark(lambda: a @ b, device, 1, 1, "matmul").median_ms / 1e3
        if once >= MATMUL_MIN_SECONDS or n >= GEMM_N_MAX.get(device.type, GEMM_N_MAX["default"]):
            break
        n *= 2
    m = benchmark(lambda: a @ b, device, WARMUPS, RUNS, "matmul")
    return 2 * n**3 / (m.median_ms / 1e3), n


def ceilings_for(device, dtypes, refresh=False, log=print):
    """The device's ceilings for `dtypes` (names): from the cache, measuring what is missing (and saving)."""
    path = _path(device)
    cached = None
    if path.is_file() and not refresh:
        try:
            cached = Ceilings(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            cached = None  # a corrupt or old file is measured again, never trusted
    if cached is not None and cached.fingerprint != fingerprint(device):
        cached = None
    missing = [d for d in dtypes if cached is None or d not in cached.flops_per_s]
    if not missing:
        return cached
    t0 = time.perf_counter()
    if cached is None:
        bandwidth, n_bytes = measure_bandwidth(device)
        cached = Ceilings(fingerprint(device), bandwidth, {}, {"copy_bytes": n_bytes, "runs": RUNS,
                                                                "date": time.strftime("%Y-%m-%d")})
    rates = {}
    for name in sorted(set(missing) | ({"float32"} - set(cached.flops_per_s))):
        rates[name], n = measure_matmul(device, getattr(torch, name))
        cached.measured.setdefault("gemm_n", {})[name] = n
        cached.measured.setdefault("matmul_flops_per_s", {})[name] = rates[name]
    fp32 = cached.measured["matmul_flops_per_s"]["float32"]
    for name in missing:
        # an implementation may compute a reduced-precision product in float32 (CPUs without native
        # bfloat16 do): the ceiling is the faster of the two, so that no correct kernel exceeds it
        cached.flops_per_s[name] = max(rates[name], fp32)
    log(f"  measured the device's ceilings in {time.perf_counter() - t0:.1f} s (cached in {path})")
    os.makedirs(path.parent, exist_ok=True)
    write_json_atomic(path, asdict(cached))
    return cached
