"""Device layer: one place that maps the vendor flags to a torch device.

    --cpu                                  torch "cpu"
    --nvidia --metax --mars --iluvatar     torch "cuda" (these vendors ship CUDA-compatible torch builds)
    --moore                                torch "musa" through the `torch_musa` extension
    --device TYPE[:INDEX]                  any torch device string, e.g. cuda:1, musa:0, cpu

A device that is not present, or whose backend module is not installed, raises `Unavailable`
(exit code 3) with one line naming the device and the fix.
"""

import importlib

import torch

from . import memory
from .errors import Unavailable, UsageError

# flag -> (torch device type, backend module to import first, install hint)
VENDOR_FLAGS = {
    "cpu": ("cpu", None, ""),
    "nvidia": ("cuda", None, "install a CUDA build of torch and the NVIDIA driver"),
    "metax": ("cuda", None, "install MetaX's MACA build of torch (it exposes the cuda API)"),
    "mars": ("cuda", None, "install the vendor's CUDA-compatible torch build"),
    "iluvatar": ("cuda", None, "install Iluvatar's CoreX build of torch (it exposes the cuda API)"),
    "moore": ("musa", "torch_musa", "pip install torch_musa (Moore Threads MUSA backend)"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def add_device_args(parser):
    group = parser.add_mutually_exclusive_group()
    for flag in VENDOR_FLAGS:
        group.add_argument(f"--{flag}", action="store_true", help=f"run on {flag} ({VENDOR_FLAGS[flag][0]} API)")
    group.add_argument("--device", metavar="TYPE[:N]", help="explicit torch device, e.g. cuda:1 (default: cpu)")


def parse_dtype(name):
    """A dtype flag's value -> torch.dtype: the one type a dtype has from the flag to the record, where
    dtype_name() writes it."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def candidate_dtype(name):
    """--dtype of an engine under test: float32, bfloat16 or float16 (float64 is a reference's)."""
    dtype = parse_dtype(name)
    if dtype == torch.float64:
        raise UsageError("--dtype float64 is a reference dtype; the candidate takes float32, bfloat16 or float16")
    return dtype


def dtype_name(dtype):
    """How records, labels and messages write a torch.dtype: 'bfloat16'."""
    return str(dtype).removeprefix("torch.")


class Device:
    """A torch device plus the operations whose spelling differs between backends."""

    def __init__(self, torch_device, vendor):
        self.torch_device = torch.device(torch_device)
        self.vendor = vendor
        self.type = self.torch_device.type

    def __str__(self):
        return str(self.torch_device)

    def _backend(self):
        return getattr(torch, self.type)

    def name(self):
        if self.type == "cpu":
            return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
        return self._backend().get_device_name(self.torch_device)

    def synchronize(self):
        if self.type != "cpu":
            self._backend().synchronize(self.torch_device)

    def empty_cache(self):
        if self.type != "cpu":
            self._backend().empty_cache()

    @property
    def memory_kind(self):
        """What the memory figures count: torch's device allocator, or the process's RSS on the CPU."""
        return "rss" if self.type == "cpu" else "allocator"

    def reset_peak_memory(self):
        if self.type == "cpu":
            memory.reset_peak_rss()
        else:
            self._backend().reset_peak_memory_stats(self.torch_device)

    def peak_memory_bytes(self):
        """Peak bytes since the last reset: allocated by torch on the device; the process's RSS on the CPU."""
        if self.type == "cpu":
            return memory.peak_rss_bytes()
        return int(self._backend().max_memory_allocated(self.torch_device))

    def memory_bytes(self):
        """Bytes in use now: allocated by torch on the device; the process's RSS on the CPU."""
        if self.type == "cpu":
            return memory.rss_bytes()
        return int(self._backend().memory_allocated(self.torch_device))

    def has_events(self):
        return self.type != "cpu" and hasattr(self._backend(), "Event")

    def event(self):
        return self._backend().Event(enable_timing=True)

    def check_dtype(self, dtype):
        """Refuse a dtype the device cannot compute in, by running a tiny matmul in it."""
        try:
            x = torch.ones(4, 4, dtype=dtype, device=self.torch_device)
            (x @ x).sum().item()
        except (RuntimeError, TypeError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(
                f"dtype {dtype_name(dtype)} is not supported on {self}: {first_line}; "
                "choose another --dtype (float32 works everywhere)"
            ) from None


def _vendor_from_args(args):
    for flag in VENDOR_FLAGS:
        if getattr(args, flag, False):
            return flag
    return None


def resolve_device(args):
    """Turn the parsed device flags into a checked `Device`."""
    vendor = _vendor_from_args(args)
    if vendor is not None:
        dev_type, module, hint = VENDOR_FLAGS[vendor]
        spec = dev_type
    elif getattr(args, "device", None):
        spec = args.device
        dev_type = spec.split(":")[0]
        module = "torch_musa" if dev_type == "musa" else None
        hint = "install the torch build for that device"
        vendor = dev_type
    else:
        return Device("cpu", "cpu")
    label = f"--{vendor}" if vendor in VENDOR_FLAGS else f"--device {spec}"
    if module is not None:  # torch only knows the "musa" device type once torch_musa is imported
        try:
            importlib.import_module(module)
        except ImportError:
            raise Unavailable(f"{label}: backend module {module} is not installed; fix: {hint}") from None
    try:
        torch_device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"{label}: {spec!r} is not a torch device string; use e.g. cuda:0 or cpu") from None
    if torch_device.type == "cpu":
        return Device(torch_device, vendor)
    backend = getattr(torch, torch_device.type, None)
    if backend is None or not backend.is_available():
        raise Unavailable(f"{label}: no {torch_device.type} device is present on this machine; fix: {hint}, or use --cpu")
    index = torch_device.index or 0
    if index >= backend.device_count():
        raise Unavailable(
            f"{label}: device index {index} does not exist ({backend.device_count()} {torch_device.type} device(s) present)"
        )
    return Device(torch.device(torch_device.type, index), vendor)


def set_threads(threads):
    """Fix the CPU thread count (recorded with every result); None keeps torch's default."""
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()

