"""RoPE references: the rotation in both layouts, computed in float64, and the q/k row permutation between them."""

import torch


def scaled_frequencies(hf_config):
    """(inv_freq, scale) of a scaled RoPE variant (llama3, linear, yarn ...) as transformers defines it, or
    (None, 1.0) for plain RoPE, whose frequencies follow from rope_theta alone."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.to(torch.float64), float(scale)


def rope_angles(position_ids, head_dim, theta, inv_freq=None):
    """[B, S, head_dim/2] angles pos * inv_freq, in float64; inv_freq defaults to theta^(-2i/d) (no scaling)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return position_ids.to(torch.float64)[..., None] * inv_freq.to(torch.float64)


def rope_half(x, position_ids, theta, inv_freq=None, scale=1.0):
    """Half-split ("NeoX", HF) layout: dimension i pairs with i + d/2. x: [B, heads, S, d].
    `inv_freq` and `scale` (cos/sin factor) describe scaled RoPE variants (llama3, yarn ...)."""
    a = rope_angles(position_ids, x.shape[-1], theta, inv_freq)[:, None]
    cos, sin = a.cos() * scale, a.sin() * scale
    x = x.to(torch.float64)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_interleaved(x, position_ids, theta, inv_freq=None, scale=1.0):
    """Interleaved ("GPT-J", llama.cpp/Meta) layout: dimension 2i pairs with 2i + 1."""
    a = rope_angles(position_ids, x.shape[-1], theta, inv_freq)[:, None]
    cos, sin = a.cos() * scale, a.sin() * scale
    x = x.to(torch.float64)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def interleaved_to_half_rows(x, n_heads):
    """The inverse of half_to_interleaved_rows on outputs [..., rows]: a GGUF-permuted q/k back to HF's layout."""
    lead = x.shape[:-1]
    return x.reshape(*lead, n_heads, x.shape[-1] // n_heads // 2, 2).swapaxes(-1, -2).reshape(x.shape)


def half_to_interleaved_rows(w, n_heads):
    """Permute the output rows of q_proj/k_proj from the half-split to the interleaved layout, per head
    (what GGUF converters do for llama.cpp). Works on weights [rows, cols] and on outputs [..., rows]."""
    if w.dim() == 2:
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
    lead = w.shape[:-1]
    return w.reshape(*lead, n_heads, 2, w.shape[-1] // n_heads // 2).swapaxes(-1, -2).reshape(w.shape)
