"""RoPE references: the rotation in both layouts, computed in float64, and the q/k row permutation between them."""

import torch


def rope_angles(position_ids, head_dim, theta):
    """[B, S, head_dim/2] angles pos * theta^(-2i/d), in float64."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    return position_ids.to(torch.float64)[..., None] * inv_freq


def rope_half(x, position_ids, theta):
    """Half-split ("NeoX", HF) layout: dimension i pairs with i + d/2. x: [B, heads, S, d]."""
    a = rope_angles(position_ids, x.shape[-1], theta)[:, None]
    cos, sin = a.cos(), a.sin()
    x = x.to(torch.float64)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_interleaved(x, position_ids, theta):
    """Interleaved ("GPT-J", llama.cpp/Meta) layout: dimension 2i pairs with 2i + 1."""
    a = rope_angles(position_ids, x.shape[-1], theta)[:, None]
    cos, sin = a.cos(), a.sin()
    x = x.to(torch.float64)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def half_to_interleaved_rows(w, n_heads):
    """Permute the output rows of q_proj/k_proj from the half-split to the interleaved layout, per head
    (what GGUF converters do for llama.cpp). Works on weights [rows, cols] and on outputs [..., rows]."""
    if w.dim() == 2:
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
    lead = w.shape[:-1]
    return w.reshape(*lead, n_heads, 2, w.shape[-1] // n_heads // 2).swapaxes(-1, -2).reshape(w.shape)
