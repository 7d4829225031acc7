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

import json
import os

import torch

from .checkpoints import config_view
from .errors import Unavailable, UsageError

INSTALL_HINT = ("fix: build InfiniCore and InfiniLM with make setup-infinilm INFINICORE_SRC=DIR INFINILM_SRC=DIR "
                "(README, section InfiniLM)")
SETTINGS = ("max_cache_len", "attention_backend", "enable_graph_compiling", "kv_cache_dtype")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


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


class InfiniLMCache:
    """The tokens one sequence has put in InfiniLM's static cache (the cache itself is the engine's)."""

    def __init__(self):
        self.tokens = []


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
    capabilities = frozenset({"new_cache"})

    def __init__(self, model_path, device, dtype, attn="sdpa", engine_args=None, n_ctx=None):
        infinicore, StaticKVCacheConfig, InferEngine, load_weights = _import()
        settings = dict(engine_args or {})
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise UsageError(f"--engine_args: infinilm takes {', '.join(SETTINGS)}; not {', '.join(unknown)}")
        if dtype not in DTYPE_NAMES:
            raise UsageError(f"engine infinilm: dtype {dtype} is not one InfiniLM computes in")
        config = json.loads(open(os.path.join(model_path, "config.json")).read())
        if config.get("model_type") == "qwen3_moe" and device.type == "cpu":
            raise Unavailable("engine infinilm: InfiniCore's CPU build has no kernels for the MoE ops "
                              "(moe_topk_softmax ...): Qwen3-MoE runs only on a device build; use --nvidia etc.")
        self.infinicore, self.dtype, self.device = infinicore, dtype, device
        name = DTYPE_NAMES[dtype]
        self._view = config_view(model_path, {"torch_dtype": name, "dtype": name, **_rope_top_level(config)})
        self.max_cache_len = int(settings.get("max_cache_len") or n_ctx or config.get("max_position_embeddings", 2048))
        backend = settings.get("attention_backend", "default")
        graph = bool(settings.get("enable_graph_compiling", False))
        target = infinicore.device(device.torch_device.type, device.torch_device.index or 0)
        self.engine = InferEngine(self._view.name, device=target,
                                  cache_config=StaticKVCacheConfig(max_batch_size=1, max_cache_len=self.max_cache_len),
                                  enable_graph_compiling=graph, attention_backend=backend,
                                  kv_cache_dtype=settings.get("kv_cache_dtype"))
        load_weights(self.engine, self._view.name, dtype=self.engine.dtype)
        self._holder = None  # the InfiniLMCache whose tokens the static cache holds now
        self.description = (f"InfiniLM InferEngine on {target}, {name} (from the config view), static KV cache of "
                            f"{self.max_cache_len} positions, attention backend {backend}, graph compiling "
                            f"{'on' if graph else 'off'}" + (f", KV cache {settings['kv_cache_dtype']}"
                                                           if settings.get("kv_cache_dtype") else ""))

    def new_cache(self):
        return InfiniLMCache()

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.all())):
            raise Unavailable("engine infinilm: its static KV cache takes one unpadded prompt at a time")
        new = input_ids[0].tolist()
        past = cache.tokens if cache is not None else []
        if past and self._holder is not cache:  # another sequence used the static cache since: fill it again
            self._run(past, list(range(len(past))), 0)
        if len(past) + len(new) > self.max_cache_len:
            raise UsageError(f"engine infinilm: {len(past) + len(new)} positions exceed its static cache of "
                             f"{self.max_cache_len}; raise max_cache_len in --engine_args")
        logits = self._run(new, position_ids[0].tolist(), len(past))
        if cache is not None:
            cache.tokens = past + new
        self._holder = cache
        return logits

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
        logits = out["logits"]
        result = torch.empty(list(logits.shape), dtype=ic.utils.to_torch_dtype(logits.dtype))
        ic.from_torch(result).copy_(logits)
        ic.sync_device()
        return result.reshape(1, s, -1)
