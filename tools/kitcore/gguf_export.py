"""GGUF files for llama.cpp, written by the kit from a HF checkpoint directory with the `gguf` package.

    gguf_path(checkpoint, gguf_type) -> Path      converts once, cached by checkpoint fingerprint

Weight types: f32, f16, bf16, q8_0, q4_0 (1-D norm weights stay f32, as llama.cpp's own converter does).
Llama's q_proj/k_proj rows (and their biases, where `attention_bias` gives them) are permuted from HF's
half-split RoPE layout to llama.cpp's interleaved one; Qwen3-MoE uses NeoX RoPE in llama.cpp too and is
written unpermuted. Qwen3-MoE experts are stacked into [experts, rows, cols] tensors. The vocabulary is
the checkpoint's byte-level BPE (tokens and merges, llama.cpp's "gpt2" tokenizer) where it has one, so that
a server which takes text only (llama-cpp-python's) tokenizes as the checkpoint does; otherwise a
placeholder of the right size (the in-process engine feeds token ids, never text). After writing, the file
is read back and its tensor count and shapes are checked.
"""

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .checkpoints import cache_root
from .errors import Unavailable, UsageError
from .rope import half_to_interleaved_rows

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCH = {"llama": "llama", "qwen3_moe": "qwen3moe"}
# bump when the export changes, so that cached files are rewritten
EXPORT_VERSION = 6  # the file's contents (6: BOS/EOS from the checkpoint's config, not its first special token)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise Unavailable("the gguf package is not installed; fix: make setup (requirements.txt pins it)") from None
    return gguf


def _check_supported(config):
    model_type = config.get("model_type")
    if model_type not in ARCH:
        raise UsageError(f"cannot convert model_type {model_type!r} to GGUF: the kit converts llama and qwen3_moe")
    problems = []
    scaling = config.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
        problems.append(f"rope_scaling {scaling}")
    if config.get("attention_bias") and model_type != "llama":
        problems.append("attention_bias (llama.cpp's qwen3moe has no o_proj bias)")
    if config.get("mlp_bias"):
        problems.append("mlp_bias")
    if model_type == "qwen3_moe" and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        problems.append("dense (mlp_only_layers / decoder_sparse_step) layers")
    if problems:
        raise UsageError(f"cannot convert to GGUF: unsupported {', '.join(problems)}")


def _tensors(checkpoint, permute_qk):
    """(GGUF name, float32 numpy array) of every tensor, in llama.cpp's layout, one at a time: each is read
    from its shard when its turn comes (a layer at a time, never the whole checkpoint)."""
    cfg = checkpoint.config
    moe = cfg["model_type"] == "qwen3_moe"
    left = set(checkpoint.tensors)

    def take(name):
        left.discard(name)
        return checkpoint.load_tensors([name])[name].float()

    out = [("token_embd.weight", take("model.embed_tokens.weight")),
           ("output_norm.weight", take("model.norm.weight"))]
    if "lm_head.weight" in left:
        out.append(("output.weight", take("lm_head.weight")))
    yield from ((name, t.numpy()) for name, t in out)
    for i in range(cfg["num_hidden_layers"]):
        out = []
        p, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = take(p + "self_attn.q_proj.weight"), take(p + "self_attn.k_proj.weight")
        if permute_qk and not moe:  # llama.cpp rotates Llama interleaved, Qwen3 half-split (NeoX)
            q = half_to_interleaved_rows(q, cfg["num_attention_heads"])
            k = half_to_interleaved_rows(k, cfg["num_key_value_heads"])
        out += [(b + "attn_norm.weight", take(p + "input_layernorm.weight")), (b + "attn_q.weight", q),
                (b + "attn_k.weight", k), (b + "attn_v.weight", take(p + "self_attn.v_proj.weight")),
                (b + "attn_output.weight", take(p + "self_attn.o_proj.weight")),
                (b + "ffn_norm.weight", take(p + "post_attention_layernorm.weight"))]
        for proj, heads in (("q", cfg["num_attention_heads"]), ("k", cfg["num_key_value_heads"]), ("v", 0), ("o", 0)):
            bias = p + f"self_attn.{proj}_proj.bias"  # Qwen2 written as Llama (attention_bias) has them
            if bias in left:
                bias = take(bias)
                if heads and permute_qk and not moe:
                    bias = half_to_interleaved_rows(bias, heads)
                out.append((b + f"attn_{'output' if proj == 'o' else proj}.bias", bias))
        if moe:
            out += [(b + "attn_q_norm.weight", take(p + "self_attn.q_norm.weight")),
                    (b + "attn_k_norm.weight", take(p + "self_attn.k_norm.weight")),
                    (b + "ffn_gate_inp.weight", take(p + "mlp.gate.weight"))]
            for proj, gguf_name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                    ("down_proj", "ffn_down_exps")):
                out.append((b + gguf_name + ".weight", torch.stack(
                    [take(f"{p}mlp.experts.{e}.{proj}.weight") for e in range(cfg["num_experts"])])))
        else:
            out += [(b + f"ffn_{proj}.weight", take(p + f"mlp.{proj}_proj.weight")) for proj in ("gate", "up", "down")]
        yield from ((name, t.numpy()) for name, t in out)
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # llama.cpp reads Llama 3's frequency scaling as per-dimension divisors of the plain frequencies
        from transformers import AutoConfig

        from .rope import scaled_frequencies

        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        theta = cfg.get("rope_theta", 10000.0)
        plain = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        scaled, _ = scaled_frequencies(AutoConfig.from_pretrained(str(checkpoint.path)))
        yield "rope_freqs.weight", (plain / scaled).float().numpy()
    if left:
        raise UsageError(f"cannot convert to GGUF: no place for weight {sorted(left)[0]} ({len(left)} left over)")


def write_gguf(checkpoint, path, gguf_type, permute_qk=True):
    gguf = _gguf()
    cfg = checkpoint.config
    _check_supported(cfg)
    if gguf_type not in GGUF_TYPES:
        raise UsageError(f"--gguf_type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    theta = cfg.get("rope_theta") or cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    # each tensor goes to a spooled temporary file as it is added (spilled to disk past 256 MiB), not kept
    w = gguf.GGUFWriter(str(path), ARCH[cfg["model_type"]], use_temp_file=True)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(theta)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    w.add_file_type(file_types[gguf_type])
    if cfg["model_type"] == "qwen3_moe":
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_weights_norm(bool(cfg.get("norm_topk_prob", False)))
    if not _bpe_vocab(w, gguf, checkpoint.path, cfg["vocab_size"], cfg):
        _placeholder_vocab(w, gguf, cfg["vocab_size"])
    qtypes = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
    expected = {}
    for name, arr in _tensors(checkpoint, permute_qk):
        expected[name] = tuple(arr.shape)
        if gguf_type == "f32" or arr.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
        elif gguf_type == "f16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(arr), qtypes[gguf_type]),
                         raw_dtype=qtypes[gguf_type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _verify(gguf, path, expected)


def _special_ids(path, cfg, special):
    """(BOS, EOS) as the checkpoint says them: config.json's bos_token_id; generation_config.json's
    eos_token_id (the first, when a list), else config.json's; else the tokenizer's first special token."""
    import json

    generation = Path(path) / "generation_config.json"
    eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    eos = eos if eos is not None else cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    bos = cfg.get("bos_token_id")
    first = special[0] if special else None
    return (first if bos is None else bos), (first if eos is None else eos)


def _bpe_vocab(w, gguf, path, vocab, cfg):
    """The checkpoint's byte-level BPE tokenizer (tokenizer.json) as llama.cpp's "gpt2" tokenizer; False when
    it has none of that kind."""
    import json

    try:
        spec = json.loads((Path(path) / "tokenizer.json").read_text())
    except (OSError, ValueError):
        return False
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or len(model.get("vocab", {})) > vocab:
        return False
    tokens = [f"[PAD{i}]" for i in range(vocab)]
    types = [gguf.TokenType.UNUSED] * vocab
    for token, i in model["vocab"].items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos, eos = _special_ids(path, cfg, [a["id"] for a in spec.get("added_tokens", []) if a.get("special")])
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    return True


def _placeholder_vocab(w, gguf, vocab):
    """An SPM-style vocabulary of `vocab` tokens: llama.cpp needs one, the kit never tokenizes with it."""
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"\u2581t{i}".encode() for i in range(vocab - len(tokens))]
    types = ([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
             + [gguf.TokenType.NORMAL] * (vocab - 259))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens[:vocab])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types[:vocab])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)


def _verify(gguf, path, expected):
    reader = gguf.GGUFReader(str(path))
    found = {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in reader.tensors}
    if len(found) != len(expected):
        raise RuntimeError(f"{path}: {len(found)} tensors written, {len(expected)} expected")
    for name, shape in expected.items():
        if found.get(name) != shape:
            raise RuntimeError(f"{path}: tensor {name} has shape {found.get(name)}, expected {shape}")


def gguf_path(checkpoint, gguf_type, permute_qk=True):
    """The GGUF of `checkpoint` in `gguf_type`, converted once and cached by the checkpoint's fingerprint."""
    suffix = "" if permute_qk else "-unpermuted"
    target = cache_root() / "gguf" / f"{checkpoint.fingerprint}-{gguf_type}{suffix}-v{EXPORT_VERSION}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".gguf", dir=target.parent)
    os.close(fd)
    try:
        write_gguf(checkpoint, tmp, gguf_type, permute_qk)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return Path(target)
