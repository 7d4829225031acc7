"""Helpers for writing a Llama engine plugin (the runner, judges and engines live in tools/kitcore/).

* Tensor conversion between torch and other libraries (numpy, an engine's own tensors).
* Parameter-name normalisation between HF names and an engine's names.
* RoPE reference functions (half-split "NeoX" layout, which HF uses, and interleaved "GPT-J" layout).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tools"))

from kitcore import rope  # noqa: E402
from kitcore.errors import UsageError  # noqa: E402

# ---- tensor conversion ---------------------------------------------------------------------------


def to_torch(x):
    """Any tensor-like object -> torch.Tensor.

    Zero-copy through DLPack when the object supports it (numpy >= 1.22, cupy, jax, engines that export
    `__dlpack__`): the returned tensor *shares* memory with `x`, so the caller must keep `x` alive for as
    long as the tensor is used (keep-alive rule). Otherwise an explicit copy is made, which owns its memory.
    """
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return torch.from_dlpack(x)
        except (RuntimeError, TypeError, BufferError):
            pass  # e.g. a read-only numpy array or a dtype DLPack lacks: fall through to a copy
    import numpy as np

    return torch.tensor(np.asarray(x))


def to_numpy(t):
    """torch.Tensor -> numpy array. Zero-copy for a contiguous CPU tensor of a numpy dtype (shares memory:
    keep `t` alive); bfloat16, which numpy lacks, and device tensors are copied to float32 / the CPU."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.cpu().numpy()


# ---- parameter names ------------------------------------------------------------------------------


def normalize_param_name(name, prefix="model."):
    """Strip the HF wrapper prefix: 'model.layers.0.self_attn.q_proj.weight' -> 'layers.0.self_attn...'."""
    return name[len(prefix):] if name.startswith(prefix) else name


def map_param_names(hf_names, engine_names, rename=None):
    """Pair HF parameter names with an engine's names, after normalisation and an optional `rename(name)`.
    Returns {hf_name: engine_name}; raises UsageError naming the first parameter without a partner, so a
    missing weight is never silently skipped."""
    rename = rename or (lambda n: n)
    by_key = {normalize_param_name(rename(n)): n for n in engine_names}
    pairs, missing = {}, []
    for n in hf_names:
        key = normalize_param_name(n)
        if key in by_key:
            pairs[n] = by_key.pop(key)
        else:
            missing.append(n)
    if missing or by_key:
        lonely = missing[0] if missing else next(iter(by_key.values()))
        raise UsageError(f"parameter {lonely} has no partner ({len(missing)} HF and {len(by_key)} engine "
                         "names unmatched); fix the name mapping")
    return pairs


# ---- RoPE references (kitcore.rope, shared with the GGUF export) -----------------------------------

rope_angles, rope_half, rope_interleaved = rope.rope_angles, rope.rope_half, rope.rope_interleaved
half_to_interleaved_rows, scaled_frequencies = rope.half_to_interleaved_rows, rope.scaled_frequencies
