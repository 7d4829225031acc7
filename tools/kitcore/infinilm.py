"""`--engine infinilm`: InfiniLM's InferEngine (C++ models on InfiniCore's operators), through forward_raw.

InfiniLM is not on the package index: `make setup-infinilm INFINICORE_SRC=DIR INFINILM_SRC=DIR ...` builds
it and makes `infinicore` and `infinilm` importable from .venv (README, "InfiniLM"). Without them the
engine says so and exits 3.

What the kit does around InfiniLM's own API:
  * InfiniLM reads its compute dtype from config.json (`torch_dtype`, else `dtype`) and RoPE's theta and
    scaling at config.json's top level (transformers 5 writes `rope_parameters`): the engine opens a view
    of the checkpoint (kitcore.checkpoints.config_view) whose config.json says the candidate's dtype and
    carries the top-level RoPE keys; the user's files are never edited.
  * Its static KV cache (StaticKVCacheConfig) holds one sequence: one unpadded prompt at a time
    (`padding_sides = ()`), and a forward from position 0 overwrites it; a kit cache object holds the
    tokens it has seen, so that the engine re-fills the static cache when another sequence used it.
  * Devices map to InfiniCore's (cpu; cuda for the CUDA-API vendors; musa). Qwen3-MoE on a CPU build is
    refused with one line: InfiniCore has no CPU kernels for the MoE ops (the engine would die of a
    segmentation fault in the first router call; the crash guard would then name it).

Engine settings (`--engine_args`): max_cache_len (default: the positions the check uses),
attention_backend (default "default"), enable_graph_compiling (default false), kv_cache_dtype.
"""

import contextlib
import json
import os
import sys

import torch

from .checkpoints import config_view, open_checkpoint
from .devices import dtype_name
from .protocol import ONE_PROMPT, SequenceCache
from .errors import Unavailable, UsageError

INSTALL_HINT = ("fix: build InfiniCore and InfiniLM with make setup-infinilm INFINICORE_SRC=DIR INFINILM_SRC=DIR "
                "(README, section InfiniLM)")
SETTINGS = ("max_cache_len", "attention_backend", "enable_graph_compiling", "kv_cache_dtype")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _import():
    try:
        import infinicore
        import infinilm  # noqa: F401
        from infinilm.cache import StaticKVCacheConfig
        from infinilm.infer_engine import InferEngine
        from infinilm.modeling_utils import load_model_state_dict_by_file
    except ImportError as exc:
        raise Unavailable(f"engine infinilm: InfiniLM is not importable here ({exc}); {INSTALL_HINT}") from None
    return infinicore, StaticKVCacheConfig, InferEngine, load_model_state_dict_by_file


def _rope_top_level(config):
    """config.json changes that put rope_theta / rope_scaling at the top level, where InfiniLM reads them."""
    params = config.get("rope_parameters") or {}
    changes = {}
    if "rope_theta" not in config and "rope_theta" in params:
        changes["rope_theta"] = params["rope_theta"]
    if "rope_scaling" not in config and params.get("rope_type", "default") != "default":
        changes["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return changes


class InfiniLMEngine:
    name = "infinilm"
    padding_sides = ()  # the static cache holds one unpadded sequence
    OPTIONS = ("engine_args", "n_ctx")
    capabilities = frozenset({"new_cache", "run_component", "final_hidden"})

    def __init__(self, model_path, device, dtype, attn="sdpa", engine_args=None, n_ctx=None):
        infinicore, StaticKVCacheConfig, InferEngine, load_weights = _import()
        settings = dict(engine_args or {})
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise UsageError(f"--engine_args: infinilm takes {', '.join(SETTINGS)}; not {', '.join(unknown)}")
        if dtype not in COMPUTE_DTYPES:
            raise UsageError(f"engine infinilm: dtype {dtype} is not one InfiniLM computes in")
        config = json.loads(open(os.path.join(model_path, "config.json")).read())
        if config.get("model_type") == "qwen3_moe" and device.type == "cpu":
            raise Unavailable("engine infinilm: InfiniCore's CPU build has no kernels for the MoE ops "
                              "(moe_topk_softmax ...): Qwen3-MoE runs only on a device build (make setup-infinilm "
                              "INFINI_BACKEND=\"--nv-gpu=y\" on NVIDIA, then --nvidia)")
        self.infinicore, self.dtype, self.device = infinicore, dtype, device
        name = dtype_name(dtype)
        self._view = config_view(model_path, {"torch_dtype": name, "dtype": name, **_rope_top_level(config)})
        self.max_cache_len = int(settings.get("max_cache_len") or n_ctx or config.get("max_position_embeddings", 2048))
        backend = settings.get("attention_backend", "default")
        graph = bool(settings.get("enable_graph_compiling", False))
        target = infinicore.device(device.torch_device.type, device.torch_device.index or 0)
        self.engine = InferEngine(self._view.name, device=target,
                                  cache_config=StaticKVCacheConfig(max_batch_size=1, max_cache_len=self.max_cache_len),
                                  enable_graph_compiling=graph, attention_backend=backend,
                                  kv_cache_dtype=settings.get("kv_cache_dtype"))
        with contextlib.redirect_stdout(sys.stderr):  # its loader's progress lines, off the results stream
            load_weights(self.engine, self._view.name, dtype=self.engine.dtype)
        self._holder = None  # the SequenceCache whose tokens the static cache holds now
        self._components = None  # InfiniCoreComponents, made for the first dual-test call
        self.description = (f"InfiniLM InferEngine on {target}, {name} (from the config view), static KV cache of "
                            f"{self.max_cache_len} positions, attention backend {backend}, graph compiling "
                            f"{'on' if graph else 'off'}" + (f", KV cache {settings['kv_cache_dtype']}"
                                                           if settings.get("kv_cache_dtype") else ""))

    def new_cache(self):
        return SequenceCache()

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.all())):
            raise UsageError(f"engine infinilm {ONE_PROMPT}")
        new = input_ids[0].tolist()
        past = cache.tokens if cache is not None else []
        if past and self._holder is not cache:  # another sequence used the static cache since: fill it again
            self._run(past, list(range(len(past))), 0)
        if len(past) + len(new) > self.max_cache_len:
            raise UsageError(f"engine infinilm: {len(past) + len(new)} positions exceed its static cache of "
                             f"{self.max_cache_len}; raise max_cache_len in --engine_args")
        logits = self._run(new, position_ids[0].tolist(), len(past))["logits"]
        if cache is not None:
            cache.tokens = past + new
        self._holder = cache
        return logits

    def final_hidden(self, input_ids, position_ids):
        """The hidden states after the final norm that forward_raw returns (a no-cache forward)."""
        self.forward(input_ids, position_ids)  # checks the input; fills the static cache from position 0
        return self._last["hidden_states"]

    def run_component(self, point, layer, inputs, position_ids):
        """The dual test with InfiniCore's own operators on the candidate's weights (InfiniCoreComponents)."""
        if self._components is None:
            self._components = InfiniCoreComponents(self.infinicore, open_checkpoint(self._view.name), self.dtype,
                                                    self.device)
        return self._components.run(point, layer, inputs, position_ids)

    def _run(self, tokens, positions, past):
        ic, s = self.infinicore, len(tokens)
        out = self.engine.forward_raw(
            ic.from_list([tokens], dtype=ic.int64),
            position_ids=ic.from_list([positions], dtype=ic.int64),
            past_kv_lengths=ic.from_list([past], dtype=ic.int32),
            total_kv_lengths=ic.from_list([past + s], dtype=ic.int32),
            input_offsets=ic.from_list([0, s], dtype=ic.int32),
            cu_seqlens=ic.from_list([0, past + s], dtype=ic.int32),
            sample_all_positions=True)
        copied = {}
        for key in ("logits", "hidden_states"):
            t = out[key]
            copied[key] = torch.empty(list(t.shape), dtype=ic.utils.to_torch_dtype(t.dtype))
            ic.from_torch(copied[key]).copy_(t)
        ic.sync_device()
        self._last = {k: v.reshape(1, s, -1) for k, v in copied.items()}
        return self._last


class InfiniCoreComponents:
    """Each Llama component with InfiniCore's own operators on the candidate's weights: the dual test of
    intermediate validation for an engine that hands out no per-layer activations (as the seed's
    `validate_infinicore_component` did). Layout changes (views, the GQA head repeat) are torch's; every
    computation is InfiniCore's: embedding, rms_norm, linear, rope (GPT-NeoX, the half-split layout HF
    uses), matmul + causal_softmax attention, swiglu, add."""

    def __init__(self, infinicore, checkpoint, dtype, device):
        self.ic, self.dtype, self.device = infinicore, dtype, device
        c = checkpoint.config
        self.config = c
        self.heads, self.kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // self.heads
        self.eps = c["rms_norm_eps"]
        theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        # InfiniCore's own table (infinicore.nn.modules.rope: float64 angles, float32 sin/cos), built in torch
        # so that bfloat16 needs no ml_dtypes; kept alive with the tensors InfiniCore reads
        angles = torch.outer(torch.arange(c.get("max_position_embeddings", 2048), dtype=torch.float64),
                             1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float64) / self.head_dim))
        self._tables = [angles.sin().float().to(dtype), angles.cos().float().to(dtype)]
        self.sin, self.cos = (self._in(t, self._tables) for t in list(self._tables))
        names = list(checkpoint.tensors)
        self.weights = {n: t.to(dtype).contiguous() for n, t in checkpoint.load_tensors(names).items()}
        if "lm_head.weight" not in self.weights:  # tied embeddings
            self.weights["lm_head.weight"] = self.weights["model.embed_tokens.weight"]

    def _ic_dtype(self, dtype):
        return {torch.float32: self.ic.float32, torch.bfloat16: self.ic.bfloat16, torch.float16: self.ic.float16,
                torch.int64: self.ic.int64}[dtype]

    def _ic_device(self):
        return self.ic.device(self.device.torch_device.type, self.device.torch_device.index or 0)

    def _in(self, t, keep):
        """A torch tensor as an InfiniCore tensor on the engine's device (the torch copy kept alive in `keep`)."""
        t = t.to(self.device.torch_device).contiguous()
        keep.append(t)
        return self.ic.from_torch(t)

    def _out(self, x):
        result = torch.empty(list(x.shape), dtype=self.ic.utils.to_torch_dtype(x.dtype), device=self.device.torch_device)
        self.ic.from_torch(result).copy_(x)
        self.ic.sync_device()
        return result

    def _w(self, name, keep):
        return self._in(self.weights[name], keep)

    def _linear(self, x, prefix, keep):
        F = self.ic.nn.functional
        bias = self._w(prefix + ".bias", keep) if prefix + ".bias" in self.weights else None
        return F.linear(self._in(x, keep), self._w(prefix + ".weight", keep), bias)

    def _norm(self, x, weight, keep):
        w = self._w(weight, keep)
        return self.ic.nn.functional.rms_norm(self._in(x, keep), [x.shape[-1]], w, self.eps)

    def _rope(self, proj, position_ids, heads, keep):
        b, s, _ = proj.shape
        if b != 1:
            raise Unavailable("engine infinilm: the InfiniCore dual test takes one unpadded row at a time")
        x = self._in(proj.reshape(s, heads, self.head_dim), keep)
        pos = self._in(position_ids.reshape(s), keep)
        rotated = self.ic.nn.functional.rope(x, pos, self.sin, self.cos)
        return self._out(rotated).reshape(1, s, heads, self.head_dim).transpose(1, 2)

    def _attention(self, q, k, v_proj, keep):
        _, nq, s, hd = q.shape
        group = nq // k.shape[1]
        key = k[0].repeat_interleave(group, 0)  # [nq, S_kv, hd]
        value = v_proj[0].reshape(-1, k.shape[1], hd).transpose(0, 1).repeat_interleave(group, 0)
        scores = self.ic.matmul(self._in(q[0], keep), self._in(key.transpose(1, 2), keep), alpha=hd**-0.5)
        self.ic.nn.functional.causal_softmax(scores, out=scores)
        out = self.ic.matmul(scores, self._in(value, keep))  # [nq, S, hd]
        return self._out(out).transpose(0, 1).reshape(1, s, nq * hd)

    @torch.no_grad()
    def run(self, point, layer, inputs, position_ids):
        keep, F = [], self.ic.nn.functional
        x = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        p = f"model.layers.{layer}."
        if point == "embed_tokens":
            return self._out(F.embedding(self._in(x["input_ids"].to(torch.int64), keep),
                                         self._w("model.embed_tokens.weight", keep)))
        if point == "final_norm":
            return self._out(self._norm(x["last_layer_output"], "model.norm.weight", keep))
        if point == "logits":
            return self._out(self._linear(x["final_norm"], "lm_head", keep))
        if point in ("input_layernorm", "post_attention_layernorm"):
            source = x["layer_input"] if point == "input_layernorm" else x["attn_residual"]
            return self._out(self._norm(source, f"{p}{point}.weight", keep))
        if point in ("q_proj", "k_proj", "v_proj"):
            return self._out(self._linear(x["input_layernorm"], f"{p}self_attn.{point}", keep))
        if point == "q_rope":
            return self._rope(x["q_proj"], position_ids, self.heads, keep)
        if point == "k_rope":
            return self._rope(x["k_proj"], position_ids, self.kv_heads, keep)
        if point == "attn_out":
            return self._attention(x["q_rope"], x["k_rope"], x["v_proj"], keep)
        if point == "o_proj":
            return self._out(self._linear(x["attn_out"], f"{p}self_attn.o_proj", keep))
        if point in ("gate_proj", "up_proj", "down_proj"):
            source = x["act_mul"] if point == "down_proj" else x["post_attention_layernorm"]
            return self._out(self._linear(source, f"{p}mlp.{point}", keep))
        if point == "act_mul":
            return self._out(F.swiglu(self._in(x["up_proj"], keep), self._in(x["gate_proj"], keep)))
        if point in ("attn_residual", "output"):
            other = x["o_proj"] if point == "attn_residual" else x["down_proj"]
            base = x["layer_input"] if point == "attn_residual" else x["attn_residual"]
            return self._out(self.ic.add(self._in(base, keep), self._in(other, keep)))
        raise UsageError(f"unknown point {point!r}")
