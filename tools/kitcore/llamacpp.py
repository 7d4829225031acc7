"""`--engine llama.cpp`: llama.cpp through llama-cpp-python, on a GGUF the kit writes from the same checkpoint.

Options (flags of test_llama_inference.py and test_forward_validation.py):
    --gguf_type f32|f16|bf16|q8_0|q4_0|source
                                    weight type of the GGUF (default: from --dtype); q8_0 and q4_0 are the
                                    formats of the same names (kitcore.formats: q8_0 activations too); source:
                                    the GGUF a real checkpoint was converted from, as shipped (its weights are
                                    the checkpoint's; its format the activation rounding of its tensor types)
    --kv_type f32|f16|q8_0|q4_0     KV-cache type (default f32: llama.cpp's default f16 cache costs ~2e-4);
                                    a quantised cache runs with flash attention (llama.cpp needs it for a
                                    quantised V cache) and is judged by its distribution thresholds
    --engine_args '{"n_batch": 16, "n_ubatch": 16, "flash_attn": true}'
                                    prefill in chunks of n_batch tokens (default: the whole prompt in one),
                                    n_ubatch the physical micro-batch, flash attention on or off
The engine's tolerance follows the least precise of the two; q8_0 weights and a quantised KV cache are
judged with distribution metrics (KL divergence, top-1 and top-5 agreement), not element tolerances.
`baseline()` is the same GGUF in llama.cpp's safest mode (an f32 cache, the whole prompt in one batch):
forward validation compares a chunked prefill or a quantised cache with it step by step. What ran (batch
sizes, KV-cache types, flash attention) is read back from llama.cpp's context parameters (attest()).

One prompt at a time (llama-cpp-python's high-level API keeps one sequence); the KV cache is
llama.cpp's own.

Layer by layer (capture(), intermediate validation): one prefill in a context of its own whose graph
evaluation callback (`cb_eval`, what llama.cpp's eval-callback tool uses) copies llama.cpp's named graph
tensors out as they are computed (GRAPH_POINTS), in the engine's own KV-cache types, flash-attention and
batch settings; the GGUF's q/k row permutation is undone, MoE expert ids sorted, and every point keeps the
shape of the kit's. llama.cpp runs no component alone: total errors only, no dual test. Device: llama.cpp decides from its build (a CUDA build offloads every layer when a
non-CPU device flag is given).
"""

import ctypes
from pathlib import Path

import torch

from . import real, rope
from .checkpoints import open_checkpoint
from .devices import dtype_name
from .protocol import ONE_PROMPT, SequenceCache
from .errors import Unavailable, UsageError
from .gguf_export import gguf_path

INSTALL_HINT = "fix: make setup-llamacpp (builds llama-cpp-python with CMAKE_ARGS=-DGGML_NATIVE=OFF)"
DTYPE_TO_GGUF = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
GGUF_TO_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SETTINGS = ("n_batch", "n_ubatch", "flash_attn")
KV_TYPES = ("f32", "f16", "q8_0", "q4_0")
QUANTISED = ("q8_0", "q4_0")  # GGUF weight types that are formats (kitcore.formats), judged by their simulation
# its own command-line flags (shown under "engine llama.cpp" in --help; handed over as OPTIONS)
FLAGS = (("--gguf_type", dict(choices=["f32", "f16", "bf16", "q8_0", "q4_0", "source"],
                               help="GGUF weight type (default: from --dtype); source: the GGUF a real checkpoint "
                                    "was converted from, as shipped")),
         ("--kv_type", dict(default="f32", choices=list(KV_TYPES), help="KV-cache type (default f32)")))


# llama.cpp's graph tensor (name, op) -> the kit's point (kitcore.points); "-N" is the layer. A projection with a
# bias (Qwen2's q/k/v/o) is the ADD that follows its product, under the same name. o_proj is found by its weight
# (blk.N.attn_output.weight) and attn_out is o_proj's input: kqv_out-N is not that where llama.cpp rotates a
# quantised cache's attention (its output is still in the rotated basis) or leaves o_proj's product unnamed.
GRAPH_POINTS = {
    ("embd", "GET_ROWS"): "embed_tokens", ("attn_norm", "MUL"): "input_layernorm",
    ("Qcur", "MUL_MAT"): "q_proj", ("Kcur", "MUL_MAT"): "k_proj", ("Vcur", "MUL_MAT"): "v_proj",
    ("Qcur", "ADD"): "q_proj+bias", ("Kcur", "ADD"): "k_proj+bias", ("Vcur", "ADD"): "v_proj+bias",
    ("Qcur_normed", "MUL"): "q_norm", ("Kcur_normed", "MUL"): "k_norm", ("Qcur", "ROPE"): "q_rope",
    ("Kcur", "ROPE"): "k_rope",
    ("attn_out", "ADD"): "o_proj+bias",
    ("ffn_inp", "ADD"): "attn_residual", ("ffn_norm", "MUL"): "post_attention_layernorm",
    ("ffn_gate", "MUL_MAT"): "gate_proj", ("ffn_up", "MUL_MAT"): "up_proj", ("ffn_swiglu", "SWIGLU"): "act_mul",
    ("ffn_out", "MUL_MAT"): "down_proj", ("l_out", "ADD"): "output", ("result_norm", "MUL"): "final_norm",
    ("result_output", "MUL_MAT"): "logits",
    ("ffn_moe_logits", "MUL_MAT"): "router_logits", ("ffn_moe_topk", "VIEW"): "topk",
    ("ffn_moe_weights", "GET_ROWS"): "weights", ("ffn_moe_weights_norm", "DIV"): "weights_norm",
    ("ffn_moe_down", "MUL_MAT_ID"): "down_per_expert", ("ffn_moe_out", "ADD"): "moe_out",
}
GGML_DTYPES = {0: torch.float32, 1: torch.float16, 26: torch.int32, 30: torch.bfloat16}


class _GraphTensor:
    """A ggml_tensor seen by the evaluation callback: name, op, shape and data (read through ggml's own API;
    `type`, `ne` and `nb` are the struct's first fields, stable across ggml versions)."""

    SRC_OFFSET = 152  # type, buffer, ne[4], nb[4], op, op_params[16], flags, then src[GGML_MAX_SRC]

    def __init__(self, ggml, address):
        self.ggml, self.address = ggml, address
        self.name = ggml.ggml_get_name(address).decode()
        self.op = ggml.ggml_op_desc(address).decode()
        self.type = ctypes.c_int32.from_address(address).value
        self.ne = [ctypes.c_int64.from_address(address + 16 + 8 * i).value for i in range(4)]
        self.nb = [ctypes.c_size_t.from_address(address + 48 + 8 * i).value for i in range(4)]

    def source(self, i):
        """The i-th operand of this node (a _GraphTensor), or None."""
        address = ctypes.c_void_p.from_address(self.address + self.SRC_OFFSET + 8 * i).value
        return _GraphTensor(self.ggml, address) if address else None

    def tensor(self):
        """[ne3, ne2, ne1, ne0] as torch holds it (ggml's ne0 is the fastest dimension), a copy on the CPU."""
        dtype = GGML_DTYPES[self.type]
        nbytes = self.ggml.ggml_nbytes(self.address)
        raw = torch.empty(nbytes, dtype=torch.uint8)
        self.ggml.ggml_backend_tensor_get(self.address, raw.data_ptr(), 0, nbytes)
        size = dtype.itemsize
        flat = raw[:nbytes - nbytes % size].view(dtype)
        return flat.as_strided(self.ne[::-1], [n // size for n in self.nb[::-1]]).clone()


# a GGUF tensor's name -> the kit's module, and a weight type -> how llama.cpp's CPU dot product takes the input
SOURCE_MODULES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
                  "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj", "output": "lm_head"}
VEC_DOT = {"Q4_0": "q8_0", "Q5_0": "q8_0", "Q8_0": "q8_0", "Q2_K": "q8_K", "Q3_K": "q8_K", "Q4_K": "q8_K",
           "Q5_K": "q8_K", "Q6_K": "q8_K"}


def source_format(path):
    """The format (kitcore.formats) of llama.cpp on a GGUF whose weights the checkpoint holds: every matrix input
    rounded to its weight type's dot-product type, "activations:KIND[,PROJ=KIND...]"."""
    import gguf

    kinds = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        parts = t.name.split(".")
        base = parts[-2] if len(parts) > 2 else parts[0]
        if base not in SOURCE_MODULES or parts[-1] != "weight":
            continue
        kind = VEC_DOT.get(t.tensor_type.name)
        if kind is None:
            raise Unavailable(f"--gguf_type source: {t.name} is {t.tensor_type.name}, whose dot product llama.cpp takes "
                              f"in a format the kit does not simulate ({', '.join(sorted(set(VEC_DOT)))} it does)")
        kinds.setdefault(SOURCE_MODULES[base], set()).add(kind)
    mixed = [m for m, k in kinds.items() if len(k) > 1]
    if mixed:
        raise Unavailable(f"--gguf_type source: {mixed[0]} takes its input in several formats across layers")
    per_module = {m: k.pop() for m, k in kinds.items()}
    default = max(set(per_module.values()), key=list(per_module.values()).count)
    return ",".join([f"activations:{default}"] + [f"{m}={k}" for m, k in sorted(per_module.items()) if k != default])


def _ggml():
    llama_cpp = _llama_cpp()
    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.*"))))
    for name, restype, argtypes in (("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
                                    ("ggml_op_desc", ctypes.c_char_p, [ctypes.c_void_p]),
                                    ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
                                    ("ggml_backend_tensor_get", None,
                                     [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t])):
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    return lib


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise Unavailable(f"engine llama.cpp: llama-cpp-python is not installed; {INSTALL_HINT}") from None
    return llama_cpp


class LlamaCppEngine:
    name = "llama.cpp"
    padding_sides = ()  # one unpadded prompt at a time
    OPTIONS = ("gguf_type", "kv_type", "n_ctx", "engine_args")
    capabilities = frozenset({"new_cache", "attest", "tokenize", "stop_tokens", "baseline", "capture"})

    def __init__(self, model_path, device, dtype, attn="sdpa", gguf_type=None, kv_type="f32", permute_qk=True,
                 n_ctx=None, engine_args=None):
        llama_cpp = _llama_cpp()
        settings = dict(engine_args or {})
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise UsageError(f"--engine_args: llama.cpp takes {', '.join(SETTINGS)}; not {', '.join(unknown)}")
        for key in ("n_batch", "n_ubatch"):
            if key in settings and not (isinstance(settings[key], int) and settings[key] >= 1):
                raise UsageError(f"--engine_args {key}={settings[key]!r}: a positive integer")
        self.device, self.dtype = device, dtype
        self.gguf_type = gguf_type or DTYPE_TO_GGUF[dtype]
        if kv_type not in KV_TYPES:
            raise UsageError(f"--kv_type {kv_type!r}: choose one of {', '.join(KV_TYPES)}")
        quantised_kv = kv_type not in ("f32", "f16")
        if quantised_kv and self.gguf_type in QUANTISED:
            raise UsageError(f"--gguf_type {self.gguf_type} with --kv_type {kv_type}: the kit has thresholds for "
                             "quantised weights or a quantised KV cache, not both at once; quantise one of them")
        if quantised_kv and settings.get("flash_attn") is False:
            raise UsageError(f"--kv_type {kv_type} with flash_attn false: llama.cpp quantises the V cache only "
                             "with flash attention; drop flash_attn from --engine_args")
        if quantised_kv:
            settings["flash_attn"] = True
        self._args = (model_path, device, dtype, attn, gguf_type, permute_qk, n_ctx)
        self.settings, self.kv_type = settings, kv_type
        checkpoint = open_checkpoint(model_path)
        if self.gguf_type == "source":
            if quantised_kv:
                raise UsageError("--gguf_type source with a quantised --kv_type: quantise one of them")
            self.path = real.source_gguf(model_path)
            self.format = source_format(self.path)
        else:
            self.path = gguf_path(checkpoint, self.gguf_type, permute_qk=permute_qk)
            # the tolerance follows the least precise of weights and KV cache; quantised ones by distribution
            self.format = self.gguf_type if self.gguf_type in QUANTISED else f"kv-{kv_type}" if quantised_kv else None
        weights = GGUF_TO_DTYPE.get(self.gguf_type, torch.float32)
        self.judged_dtype = weights
        # the context the check needs (prompt + decode steps): a max_position_embeddings context would
        # allocate its whole KV cache (32 GiB in f32 for Llama-3.1-8B's 131,072 positions)
        self.n_ctx = n_ctx or checkpoint.config.get("max_position_embeddings", 4096)
        ggml_type = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}")
        n_batch = settings.get("n_batch", self.n_ctx)
        extra = {"flash_attn": bool(settings["flash_attn"])} if "flash_attn" in settings else {}
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), logits_all=True, n_ctx=self.n_ctx, n_batch=n_batch,
                                       n_ubatch=settings.get("n_ubatch", min(n_batch, 512)),
                                       n_threads=torch.get_num_threads(), verbose=False, type_k=ggml_type,
                                       type_v=ggml_type, n_gpu_layers=0 if device.type == "cpu" else -1, **extra)
        except ValueError as exc:  # llama-cpp-python's one word for every refused setting
            raise Unavailable(f"engine llama.cpp: {exc} with KV cache {kv_type} and settings {settings or 'default'}"
                              " (this build refuses the combination)") from None
        # with flash attention llama.cpp casts an f32 K/V cache to f16 before attending (llama-graph.cpp,
        # build_attn_mha): an f16 cache in effect. Beside f32 weights an f16 cache is judged by the next-token
        # distribution: its error grows with the cache (SmolLM2, 256 steps: one step's logits nmse 1.5e-4)
        f16_cache = kv_type == "f16" or self.attest()["flash_attn"] == "enabled"
        if f16_cache and weights == torch.float32 and self.format is None:
            self.format, self.judged_dtype = "kv-f16", torch.float16
        self._active = None
        judged = (f"{self.format} distribution metrics" if self.format
                  else f"{dtype_name(self.judged_dtype)} tolerances")
        self.description = f"GGUF {self.gguf_type} ({self.path}), KV cache {kv_type}; judged by {judged}"

    def capture(self, input_ids, position_ids, layers=None):
        """The kit's points of `layers` (None: all) from one prefill of llama.cpp's own graph (module docstring)."""
        if self.gguf_type == "source":
            raise Unavailable("engine llama.cpp: layer by layer reads the GGUFs the kit writes (their q/k row order is "
                              "known); a source GGUF is checked end to end and over a corpus")
        llama_cpp, ggml = _llama_cpp(), _ggml()
        if input_ids.shape[0] != 1:
            raise UsageError(f"engine llama.cpp {ONE_PROMPT}")
        config = open_checkpoint(self._args[0]).config
        n_layers = config["num_hidden_layers"]
        layers = range(n_layers) if layers is None else layers
        pieces, chosen = {}, {}  # point name -> [per micro-batch], node address -> point name

        def choose(t):
            base, _, layer = t.name.rpartition("-")
            if not (layer.isdigit() and base):
                base, layer = t.name, None
            point = GRAPH_POINTS.get((base, t.op))
            if t.op == "MUL_MAT":
                weight = t.source(0).name.split(".")
                if weight[2:] == ["attn_output", "weight"] and weight[0] == "blk":
                    point, layer = "o_proj", weight[1]
            if point is None or (layer is not None and int(layer) not in layers):
                return None
            if layer is None and not ((point == "embed_tokens" and layers.start == 0)
                                      or (point != "embed_tokens" and layers.stop >= n_layers)):
                return None
            return point if layer is None else f"layers.{layer}.{point}"

        @llama_cpp.ggml_backend_sched_eval_callback
        def observe(address, ask, user_data):
            t = _GraphTensor(ggml, address)
            if ask:
                chosen[address] = choose(t)
                return chosen[address] is not None
            if chosen.get(address):
                pieces.setdefault(chosen[address], []).append(t.tensor())
                if chosen[address].endswith(".o_proj"):  # its input: the attention output, back in the model's basis
                    pieces.setdefault(chosen[address][:-len("o_proj")] + "attn_out", []).append(t.source(1).tensor())
            return True

        params = llama_cpp.llama_context_params.from_buffer_copy(self.llm.context_params)
        params.cb_eval = observe
        ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not ctx:
            raise Unavailable("engine llama.cpp: could not create a context for the captures")
        ids = input_ids[0].tolist()
        try:
            for start in range(0, len(ids), params.n_batch):
                chunk = ids[start:start + params.n_batch]
                batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
                try:
                    for i, token in enumerate(chunk):
                        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, 1
                        batch.seq_id[i][0] = 0
                    batch.n_tokens = len(chunk)
                    if llama_cpp.llama_decode(ctx, batch) != 0:
                        raise Unavailable("engine llama.cpp: llama_decode failed during the captures")
                finally:
                    llama_cpp.llama_batch_free(batch)
        finally:
            llama_cpp.llama_free(ctx)
        return self._as_points(pieces, config)

    def _as_points(self, pieces, config):
        """llama.cpp's tensors (each [ne3, ne2, ne1, ne0], one per micro-batch) in the kit's layouts."""
        heads = {"q": config["num_attention_heads"], "k": config["num_key_value_heads"]}
        permuted = self._args[5] and config.get("model_type") != "qwen3_moe"  # gguf_export permutes Llama's q/k
        for name in [n for n in pieces if n.endswith("+bias")]:
            pieces[name.removesuffix("+bias")] = pieces.pop(name)
        points = {}
        for name, parts in pieces.items():
            point = name.rsplit(".", 1)[-1]
            token_axis = 1 if point in ("q_rope", "k_rope", "q_norm", "k_norm", "down_per_expert", "weights") else 2
            x = torch.cat([p.movedim(token_axis, 0).flatten(1) for p in parts])  # [T, features]
            x = x.long() if point == "topk" else x.float()
            if permuted and point in ("q_proj", "k_proj", "q_rope", "k_rope"):
                x = rope.interleaved_to_half_rows(x, heads[point[0]])
            if point in ("q_rope", "k_rope"):
                x = x.reshape(x.shape[0], heads[point[0]], -1).transpose(0, 1)  # [heads, T, D]
            points[name] = x
        for prefix in sorted({n.rsplit(".", 1)[0] + "." for n in points if n.endswith(".topk")}):
            topk = points.pop(prefix + "topk")
            weights = points.pop(prefix + "weights_norm", None)
            weights = points.pop(prefix + "weights") if weights is None else weights
            points.pop(prefix + "weights", None)
            order = topk.sort(-1)
            logits = points[prefix + "router_logits"]
            points[prefix + "experts_selected"] = order.values
            points[prefix + "routing_weights"] = torch.zeros_like(logits).scatter(-1, topk, weights)
            down = points.pop(prefix + "down_per_expert")
            down = down.reshape(down.shape[0], topk.shape[1], -1)
            points[prefix + "expert_outputs"] = down.gather(1, order.indices[..., None].expand(-1, -1, down.shape[-1]))
        return {name: x[None] for name, x in points.items()}

    def attest(self):
        llama_cpp, p = _llama_cpp(), self.llm.context_params
        types = {getattr(llama_cpp, n): n.removeprefix("GGML_TYPE_").lower() for n in dir(llama_cpp)
                 if n.startswith("GGML_TYPE_")}
        flash = {getattr(llama_cpp, n, None): n.removeprefix("LLAMA_FLASH_ATTN_TYPE_").lower()
                 for n in ("LLAMA_FLASH_ATTN_TYPE_AUTO", "LLAMA_FLASH_ATTN_TYPE_DISABLED", "LLAMA_FLASH_ATTN_TYPE_ENABLED")}
        ran = {"engine": "llama.cpp", "gguf_type": self.gguf_type, "n_ctx": p.n_ctx, "n_batch": p.n_batch,
               "n_ubatch": p.n_ubatch, "type_k": types.get(p.type_k, p.type_k), "type_v": types.get(p.type_v, p.type_v),
               "flash_attn": flash.get(getattr(p, "flash_attn_type", None), getattr(p, "flash_attn", None)),
               "n_gpu_layers": self.llm.model_params.n_gpu_layers}
        if ran["flash_attn"] == "enabled":  # flash attention reads an f32 cache as f16 (see __init__)
            ran["attended_kv"] = "/".join("f16" if ran[t] == "f32" else ran[t] for t in ("type_k", "type_v"))
        return ran

    def baseline(self):
        """The same GGUF with an f32 KV cache and the whole prompt in one batch (flash attention as asked), or
        None when this engine runs so already: what a chunked prefill or a quantised cache is compared with."""
        chunked = any(key in self.settings for key in ("n_batch", "n_ubatch"))
        if self.kv_type == "f32" and not chunked:
            return None
        kept = {k: v for k, v in self.settings.items() if k == "flash_attn"}
        return LlamaCppEngine(*self._args[:4], gguf_type=self._args[4], kv_type="f32", permute_qk=self._args[5],
                              n_ctx=self._args[6], engine_args=kept)

    def tokenize(self, text=None, messages=None):
        if messages is not None:
            return None  # llama-cpp-python's chat path renders templates of its own; not read back here
        # as its completion path tokenises a prompt: BOS where the GGUF asks for one, special tokens parsed
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))

    def stop_tokens(self):
        return {self.llm.token_eos()}

    def new_cache(self):
        return SequenceCache()

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        if input_ids.shape[0] != 1 or (attention_mask is not None and not bool(attention_mask.all())):
            raise UsageError(f"engine llama.cpp {ONE_PROMPT}")
        ids = input_ids[0].tolist()
        cache = cache if cache is not None else SequenceCache()
        if self._active is not cache:  # the context holds another sequence: replay this one's tokens
            self.llm.reset()
            if cache.tokens:
                self.llm.eval(cache.tokens)
            self._active = cache
        if position_ids[0, 0].item() != len(cache.tokens):
            raise UsageError("engine llama.cpp: position ids must continue the cached sequence")
        start = len(cache.tokens)
        self.llm.eval(ids)
        cache.tokens += ids
        return torch.from_numpy(self.llm.scores[start:start + len(ids)].copy())[None]
