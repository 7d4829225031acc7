"""test/models/llama/utils.py: tensor conversion, parameter names, RoPE references."""

import sys

import numpy as np
import pytest
import torch
from kit_helpers import LLAMA, ROOT

sys.path.insert(0, str(ROOT / LLAMA))
import utils  # noqa: E402

from kitcore.errors import UsageError  # noqa: E402


def test_numpy_to_torch_is_zero_copy_and_shares_memory():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = utils.to_torch(a)
    a[0, 0] = 42.0  # the keep-alive rule: t views a's memory
    assert t[0, 0].item() == 42.0 and t.dtype == torch.float32


def test_objects_without_dlpack_are_copied():
    t = utils.to_torch([[1, 2], [3, 4]])
    assert t.tolist() == [[1, 2], [3, 4]]


def test_torch_to_numpy_shares_cpu_memory_and_copies_bf16():
    t = torch.zeros(3)
    a = utils.to_numpy(t)
    t[1] = 7.0
    assert a[1] == 7.0
    b = utils.to_numpy(torch.ones(2, dtype=torch.bfloat16))
    assert b.dtype == np.float32 and b.tolist() == [1.0, 1.0]


def test_parameter_names_pair_up_or_name_the_orphan():
    hf = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    engine = ["embed_tokens.weight", "layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    assert utils.map_param_names(hf, engine) == dict(zip(hf, engine))
    with pytest.raises(UsageError, match="parameter model.layers.0.self_attn.q_proj.weight has no partner"):
        utils.map_param_names(hf, ["embed_tokens.weight", "lm_head.weight"])
    renamed = utils.map_param_names(hf, ["tok.weight", "layers.0.self_attn.q_proj.weight", "lm_head.weight"],
                                    rename=lambda n: n.replace("tok.", "embed_tokens."))
    assert renamed["model.embed_tokens.weight"] == "tok.weight"


def test_rope_references_agree_with_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, head_dim=32, rope_theta=10000.0)
    x = torch.randn(1, 2, 5, 32, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 7, 100, 511]])
    cos, sin = LlamaRotaryEmbedding(cfg)(x.float(), pos)
    hf = apply_rotary_pos_emb(x.float(), x.float(), cos, sin)[0]
    assert torch.allclose(utils.rope_half(x, pos, 10000.0).float(), hf, atol=1e-5)
    assert not torch.allclose(utils.rope_interleaved(x, pos, 10000.0).float(), hf, atol=1e-2)


def test_the_layout_permutation_maps_half_split_to_interleaved_rotation():
    """Rotating permuted rows the interleaved way equals permuting rows rotated the half-split way."""
    x = torch.randn(1, 1, 6, 8, dtype=torch.float64)
    pos = torch.arange(6)[None]
    perm = lambda t: utils.half_to_interleaved_rows(t, 1)  # noqa: E731
    assert torch.allclose(utils.rope_interleaved(perm(x), pos, 500.0), perm(utils.rope_half(x, pos, 500.0)))
    w = torch.arange(8 * 3.0).reshape(8, 3)
    assert perm(w)[:, 0].tolist() == [0.0, 12.0, 3.0, 15.0, 6.0, 18.0, 9.0, 21.0]
