#!/usr/bin/env python3
"""Measure the device's ceilings (memory bandwidth, matmul throughput per dtype), cache and print them.

    python tools/device_ceilings.py --cpu [--dtypes float32,bfloat16,float16] [--threads N] [--refresh]

The benchmarks (attention_test.py, moe_test.py) read the same cache to put every row against the
device's limit (kitcore/roofline.py says what is measured and how); run this to see or refresh them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kitcore import cli, devices, roofline  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__)
    devices.add_device_args(parser)
    parser.add_argument("--dtypes", default="float32,bfloat16,float16", help="matmul dtypes (default all three)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's choice); part of the fingerprint")
    parser.add_argument("--refresh", action="store_true", help="measure again even when cached")
    args = parser.parse_args(argv)
    devices.set_threads(args.threads)
    device = devices.resolve_device(args)
    names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for name in names:
        if name not in ("float32", "bfloat16", "float16"):
            raise UsageError(f"--dtypes: unknown dtype {name!r}; use float32, bfloat16, float16")
        device.check_dtype(devices.parse_dtype(name))
    ceilings = roofline.ceilings_for(device, names, refresh=args.refresh)
    print(f"device: {ceilings.fingerprint}")
    print(f"memory bandwidth: {ceilings.bandwidth_bytes_per_s / 1e9:.2f} GB/s "
          f"(copy of {ceilings.measured['copy_bytes'] / 2**20:.0f} MiB, counted as read + write)")
    for name in names:
        own = ceilings.measured["matmul_flops_per_s"][name]
        print(f"{name} matmul: {own / 1e9:.2f} GFLOP/s ({ceilings.measured['gemm_n'][name]}^3, counted as 2 n^3)"
              + (f"; ceiling {ceilings.flops_per_s[name] / 1e9:.2f} GFLOP/s (float32's, faster)"
                 if ceilings.flops_per_s[name] > own else ""))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
