"""Engines: HF Transformers (`hf`), the same through torch.compile (`compile`), the streamed reference, and
loading an engine by its `--engine` name. The protocol every engine follows is kitcore.protocol's docstring."""

import ctypes
import functools
import importlib
import importlib.util
import inspect
import queue
import sys
import threading
import time

import torch

from .errors import Unavailable, UsageError
from .points import COMPONENT_INPUTS
from .protocol import capabilities, check_contract, resolve_class


def quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def causal_mask(q_len, kv_len, dtype, additive, device):
    """[1, 1, q_len, kv_len] causal mask whose last query row sees every key (prefill on top of a cache).
    Bool (True = attend) for sdpa-style functions, additive float (0 / finfo.min) for eager."""
    past = kv_len - q_len
    allowed = torch.arange(kv_len, device=device)[None, :] <= (torch.arange(q_len, device=device)[:, None] + past)
    allowed = allowed[None, None]
    if not additive:
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


M_ARENA_MAX = -8  # glibc's malloc.h


def _one_malloc_arena():
    """glibc gives each new thread a malloc arena of its own, whose heaps are trimmed and faulted in again on
    every layer when a capture's forward runs in a worker thread (intermediate validation of a 1B Llama at
    512 tokens: 3.5x the page faults, sys time 13 -> 50 s); with one arena the worker allocates like the main
    thread. Other C libraries: nothing to do."""
    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (AttributeError, OSError):
        pass


class HFEngine:
    """HuggingFace Transformers, loaded from safetensors on the chosen device and dtype."""

    name = "hf"
    padding_sides = ("left", "right")
    OPTIONS = ("device_map",)
    capabilities = frozenset({"new_cache", "capture", "capture_layers", "run_component", "rope", "attest", "tokenize",
                              "stop_tokens"})

    def __init__(self, model_path, device, dtype, attn="sdpa", device_map=None):
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        self.device, self.dtype, self.attn, self.model_path = device, dtype, attn, model_path
        # an accelerator's copy goes straight onto it, shard by shard: no whole copy in CPU memory first;
        # `--device_map auto` spreads it over every visible device and CPU memory (both through accelerate)
        placement = device_map or (None if device.type == "cpu" else device.torch_device)
        if device_map and importlib.util.find_spec("accelerate") is None:
            raise Unavailable("--device_map needs accelerate: pip install -r requirements.txt")
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=dtype, attn_implementation=attn, use_safetensors=True, trust_remote_code=False,
            **({"device_map": placement} if placement else {})).eval()
        self.config = self.model.config
        self._call = self.model  # what forward() runs; CompileEngine swaps in the compiled module
        params = inspect.signature(type(self.model).forward).parameters
        # transformers >= 5.24 calls the cache `cache`; older releases `past_key_values`
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def layers(self):
        return self.model.model.layers

    @functools.cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.model_path))

    def tokenize(self, text=None, messages=None):
        if messages is None:
            return list(self.tokenizer(text).input_ids)
        if not self.tokenizer.chat_template:
            return None
        encoded = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def stop_tokens(self):
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()

    def attest(self):
        weight = next(self.model.parameters())
        return {"engine": self.name, "attn_implementation": self.model.config._attn_implementation,
                "experts_implementation": (getattr(self.model.config, "_experts_implementation", None)
                                           if self.model.config.model_type == "qwen3_moe" else None),
                "dtype": str(weight.dtype).removeprefix("torch."), "device": str(weight.device),
                "compiled": self._call is not self.model}

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    @torch.no_grad()
    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        dev = self.device.torch_device
        kwargs = {self._cache_kwarg: cache, "use_cache": cache is not None}
        out = self._call(input_ids=input_ids.to(dev), position_ids=position_ids.to(dev),
                         attention_mask=None if attention_mask is None else attention_mask.to(dev), **kwargs)
        return out.logits

    # ---- optional capabilities -------------------------------------------------------------------

    def _modeling(self):
        return sys.modules[type(self.layers[0].self_attn).__module__]

    def _heads(self, x, n_heads):
        """[B, S, n*D] -> [B, n, S, D]"""
        b, s, _ = x.shape
        return x.view(b, s, n_heads, -1).transpose(1, 2)

    def rope(self, x, position_ids):
        cos, sin = self.model.model.rotary_emb(x, position_ids.to(x.device))
        return self._modeling().apply_rotary_pos_emb(x, x, cos, sin)[0]

    def _qk_norm(self, attn, proj_out, key):
        """q or k after Qwen3's per-head q_norm/k_norm (as it came, for a model without them), [B, S, heads * D]."""
        norm = getattr(attn, "k_norm" if key else "q_norm", None)
        if norm is None:
            return proj_out
        n = self.config.num_attention_heads if not key else self.config.num_key_value_heads
        b, s, _ = proj_out.shape
        return norm(proj_out.view(b, s, n, -1)).reshape(b, s, -1)

    def _rope_point(self, normed, position_ids, key):
        """q or k (after q_norm/k_norm where the model has them) after the rotary embedding, as [B, heads, S, D]."""
        n = self.config.num_attention_heads if not key else self.config.num_key_value_heads
        return self.rope(self._heads(normed, n), position_ids)

    def _route(self, gate, logits):
        """The router's choice from its logits [T, E]: (weights [T, k] in the logits' dtype, experts [T, k]),
        as transformers' Qwen3-MoE router makes it (softmax in float32, top-k, renormalised where the router
        says so). A plugin whose router differs overrides this for the dual test."""
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = probs.topk(gate.top_k, dim=-1)
        if gate.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(logits.dtype), experts

    @staticmethod
    def _routing_points(experts_module, x, logits, weights, chosen):
        """The router points of one sparse block from its input x [T, H] and the router's result (logits [T, E],
        weights and experts [T, k]): router_logits, experts_selected (ids ascending), routing_weights [T, E],
        expert_outputs [T, k, H] (each selected expert run alone on its token, weight 1)."""
        selected = chosen.sort(-1).values
        dense = torch.zeros_like(logits, dtype=weights.dtype).scatter(-1, chosen, weights)
        return {"router_logits": logits, "experts_selected": selected, "routing_weights": dense,
                "expert_outputs": HFEngine._expert_outputs(experts_module, x, selected)}

    @staticmethod
    def _expert_outputs(experts_module, x, selected):
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        return torch.stack([experts_module(x, selected[:, j:j + 1], ones) for j in range(selected.shape[1])], 1)

    @torch.no_grad()
    def capture(self, input_ids, position_ids, layers=None):
        """The points of `layers` (a range; None: all) from one forward that stops after the range's last
        layer: embed_tokens when the range starts at 0, final_norm and logits when it reaches the last layer."""
        captured = {}
        for one_layer in self._captures(input_ids, position_ids, layers):
            captured.update(one_layer)
        return captured

    def capture_layers(self, input_ids, position_ids):
        """Every point, one layer at a time, from a single forward (see the protocol above)."""
        return self._captures(input_ids, position_ids, None)

    def _captures(self, input_ids, position_ids, layers):
        """Forward hooks on every module of interest, the forward in a worker thread that hands over each
        layer's tensors when the layer ends and waits until the next is asked for: the caller compares one
        layer of every model at a time and no forward is repeated. q/k after RoPE are recomputed from the
        captured projections with the model's own rotary embedding (HF applies it inside forward, unhooked).
        Hooks ignore other threads: run_component() may use the same modules while the forward waits."""
        dev = self.device.torch_device
        m = self.model.model
        layers = range(len(m.layers)) if layers is None else layers
        last = len(m.layers) - 1
        captured, handles = {}, []
        handed = queue.Queue()  # worker -> caller: ("layer", tensors), ("error", exception) or ("end", None)
        resume = queue.Queue()  # caller -> worker: True for the next layer, False to stop the forward

        class Enough(Exception):
            """Raised in a hook when no more layers are wanted: the rest of the forward is not run."""

        def ours():
            return threading.current_thread() is worker

        def keep(name, tensor):
            if ours():
                captured[name] = tensor.detach().to("cpu")

        def out_hook(name):
            return lambda mod, args, out: keep(name, out[0] if isinstance(out, tuple) else out)

        def in_hook(name):
            return lambda mod, args: keep(name, args[0])

        def hand_over():
            handed.put(("layer", dict(captured)))
            captured.clear()
            if not resume.get():
                raise Enough

        def layer_end(i):
            def hook(mod, args, out):
                if not ours():
                    return
                keep(f"layers.{i}.output", out[0] if isinstance(out, tuple) else out)
                for point, key in (("q_rope", False), ("k_rope", True)):
                    # from the captured q_norm/k_norm where the model has them (a streamed layer's weights are gone)
                    p = f"layers.{i}.{point[0]}"
                    normed = captured.get(p + "_norm", captured[p + "_proj"]).to(dev)
                    captured[f"layers.{i}.{point}"] = self._rope_point(normed, position_ids, key).to("cpu")
                if i == layers.stop - 1 and i == last:
                    return  # final_norm and logits come with this layer
                hand_over()
                if i == layers.stop - 1:
                    raise Enough
            return hook

        def heads_hook(name):  # q_norm/k_norm work on [B, S, heads, D]: the point is [B, S, heads * D]
            return lambda mod, args, out: keep(name, out.flatten(-2))

        def router_hook(prefix, experts_module):
            def hook(mod, args, out):
                if ours():
                    b, s = input_ids.shape
                    for name, t in self._routing_points(experts_module, args[0], *out).items():
                        keep(prefix + name, t.reshape(b, s, *t.shape[1:]))
            return hook

        def logits_end(mod, args, out):
            keep("logits", out)
            if ours():
                hand_over()

        if layers.start == 0:
            handles.append(m.embed_tokens.register_forward_hook(out_hook("embed_tokens")))
        for i in layers:
            layer, p = m.layers[i], f"layers.{i}."
            attn, mlp = layer.self_attn, layer.mlp
            handles += [
                layer.input_layernorm.register_forward_hook(out_hook(p + "input_layernorm")),
                attn.q_proj.register_forward_hook(out_hook(p + "q_proj")),
                attn.k_proj.register_forward_hook(out_hook(p + "k_proj")),
                attn.v_proj.register_forward_hook(out_hook(p + "v_proj")),
                attn.o_proj.register_forward_pre_hook(in_hook(p + "attn_out")),
                attn.o_proj.register_forward_hook(out_hook(p + "o_proj")),
                layer.post_attention_layernorm.register_forward_pre_hook(in_hook(p + "attn_residual")),
                layer.post_attention_layernorm.register_forward_hook(out_hook(p + "post_attention_layernorm")),
                layer.register_forward_hook(layer_end(i)),
            ]
            if getattr(attn, "q_norm", None) is not None:  # Qwen3's per-head q/k norms
                handles += [attn.q_norm.register_forward_hook(heads_hook(p + "q_norm")),
                            attn.k_norm.register_forward_hook(heads_hook(p + "k_norm"))]
            if hasattr(mlp, "experts"):  # a sparse MoE block
                handles += [mlp.gate.register_forward_hook(router_hook(p, mlp.experts)),
                            mlp.register_forward_hook(out_hook(p + "moe_out"))]
            if hasattr(mlp, "gate_proj"):  # dense MLP (Llama, Qwen3-MoE's mlp_only_layers)
                handles += [
                    mlp.gate_proj.register_forward_hook(out_hook(p + "gate_proj")),
                    mlp.up_proj.register_forward_hook(out_hook(p + "up_proj")),
                    mlp.down_proj.register_forward_pre_hook(in_hook(p + "act_mul")),
                    mlp.down_proj.register_forward_hook(out_hook(p + "down_proj")),
                ]
        if layers.stop > last:
            handles.append(m.norm.register_forward_hook(out_hook("final_norm")))
            handles.append(self.model.lm_head.register_forward_hook(logits_end))

        def run():
            try:
                with torch.no_grad():  # grad mode is per thread
                    self.forward(input_ids, position_ids)
                handed.put(("end", None))
            except Enough:
                handed.put(("end", None))
            except BaseException as exc:  # raised again in the caller's thread
                handed.put(("error", exc))

        _one_malloc_arena()
        worker = threading.Thread(target=run, name=f"{self.name}-capture", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = handed.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    return
                yield value
                resume.put(True)
        finally:
            if worker.is_alive():
                resume.put(False)
                worker.join()
            for h in handles:
                h.remove()

    @torch.no_grad()
    def run_component(self, point, layer, inputs, position_ids):
        m = self.model.model
        owner = {"embed_tokens": m.embed_tokens, "final_norm": m.norm, "logits": self.model.lm_head}.get(point)
        # the device that holds the component (`--device_map` may spread the layers over several)
        weight = next((owner or m.layers[layer]).parameters())
        dev, dt = (self.device.torch_device if weight.is_meta else weight.device), self.dtype
        x = {k: v.to(dev, dt) if v.is_floating_point() else v.to(dev) for k, v in inputs.items()}
        if point == "embed_tokens":
            return m.embed_tokens(x["input_ids"])
        if point == "final_norm":
            return m.norm(x["last_layer_output"])
        if point == "logits":
            return self.model.lm_head(x["final_norm"])
        blk = m.layers[layer]
        attn, mlp = blk.self_attn, blk.mlp
        if point == "input_layernorm":
            return blk.input_layernorm(x["layer_input"])
        if point in ("q_proj", "k_proj", "v_proj"):
            return getattr(attn, point)(x["input_layernorm"])
        if point in ("q_norm", "k_norm"):
            return self._qk_norm(attn, x[point[0] + "_proj"], key=point == "k_norm")
        if point in ("q_rope", "k_rope"):  # from q_norm/k_norm where the model has them
            key = point == "k_rope"
            normed = x.get(point[0] + "_norm")
            return self._rope_point(self._qk_norm(attn, x[point[0] + "_proj"], key) if normed is None else normed,
                                    position_ids, key)
        if point == "attn_out":
            return self._attention_core(attn, x["q_rope"], x["k_rope"], x["v_proj"])
        if point == "o_proj":
            return attn.o_proj(x["attn_out"])
        if point == "attn_residual":
            return x["layer_input"] + x["o_proj"]
        if point == "post_attention_layernorm":
            return blk.post_attention_layernorm(x["attn_residual"])
        if point in ("gate_proj", "up_proj"):
            return getattr(mlp, point)(x["post_attention_layernorm"])
        if point == "act_mul":
            return mlp.act_fn(x["gate_proj"]) * x["up_proj"]
        if point == "down_proj":
            return mlp.down_proj(x["act_mul"])
        if point in ("router_logits", "experts_selected", "routing_weights", "expert_outputs", "moe_out"):
            return self._sparse_component(mlp, point, x)
        if point == "output":
            return x["attn_residual"] + (x["moe_out"] if "moe_out" in x else x["down_proj"])
        raise UsageError(f"unknown point {point!r}; points are {', '.join(COMPONENT_INPUTS)}")

    def _sparse_component(self, mlp, point, x):
        """One piece of a sparse MoE block on [B, S, ...] inputs (run_component)."""
        if point in ("experts_selected", "routing_weights"):
            b, s, n = x["router_logits"].shape
            weights, chosen = self._route(mlp.gate, x["router_logits"].reshape(b * s, n))
            if point == "experts_selected":
                return chosen.sort(-1).values.reshape(b, s, -1)
            return torch.zeros(b * s, n, dtype=weights.dtype, device=weights.device).scatter(
                -1, chosen, weights).reshape(b, s, n)
        h = x["post_attention_layernorm"]
        b, s, hidden = h.shape
        flat = h.reshape(b * s, hidden)
        if point == "router_logits":
            return mlp.gate(flat)[0].reshape(b, s, -1)
        selected = x["experts_selected"].reshape(b * s, -1)
        if point == "expert_outputs":
            return self._expert_outputs(mlp.experts, flat, selected).reshape(b, s, -1, hidden)
        weights = x["routing_weights"].reshape(b * s, -1).gather(-1, selected)
        return mlp.experts(flat, selected, weights).reshape(b, s, hidden)

    def _attention_core(self, attn, q, k, v_proj):
        """softmax(q k^T * scale + causal) v through the model's own attention function."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        v = self._heads(v_proj, self.config.num_key_value_heads)
        impl = self.config._attn_implementation
        fn = self._modeling().eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
        s = q.shape[2]
        mask = causal_mask(s, k.shape[2], q.dtype, additive=impl == "eager", device=q.device)
        out, _ = fn(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        return out.reshape(q.shape[0], s, -1)


class CompileEngine(HFEngine):
    """The HF model through torch.compile (dynamic shapes, so one compilation serves every length).
    Intermediates are not captured: hooks would change the compiled graph under test."""

    name = "compile"
    capabilities = frozenset({"new_cache", "attest", "tokenize", "stop_tokens"})

    def __init__(self, model_path, device, dtype, attn="sdpa", device_map=None):
        super().__init__(model_path, device, dtype, attn, device_map)
        self._call = torch.compile(self.model, dynamic=True)


class StreamedHFEngine(HFEngine):
    """The HF model with one piece in memory at a time: built without weights (meta device), each decoder
    layer, the embedding and the LM head load their tensors from the safetensors shards just before they
    run (a forward pre-hook) and drop them right after (a forward hook). HF's own forward runs unchanged
    (its masks, rotary embedding, cache), so the logits and captures are the resident model's, bit for bit;
    memory is about one layer plus the embedding or LM head. Every forward reads the weights again (from
    the page cache when they fit there). Llama and Qwen3-MoE checkpoints."""

    capabilities = frozenset({"new_cache", "capture", "capture_layers", "rope"})  # no weights to run a component

    def __init__(self, model_path, device, dtype, attn="eager"):
        from transformers import AutoConfig, AutoModelForCausalLM

        from .checkpoints import open_checkpoint

        quiet_transformers()
        if device.type != "cpu":
            raise UsageError("the streamed reference runs on the CPU")
        self.device, self.dtype, self.attn = device, dtype, attn
        self.checkpoint = open_checkpoint(model_path)
        config = AutoConfig.from_pretrained(model_path, attn_implementation=attn)
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn).eval()
        # buffers computed at construction (the rotary inverse frequencies) are real, not streamed
        rotary = self.model.model.rotary_emb
        self.model.model.rotary_emb = type(rotary)(config=self.model.config)
        self.config = self.model.config
        self._call = self.model
        params = inspect.signature(type(self.model).forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.bytes_read = 0
        m = self.model.model
        pieces = [(m.embed_tokens, "model.embed_tokens."), (m.norm, "model.norm."), (self.model.lm_head, "lm_head.")]
        pieces += [(layer, f"model.layers.{i}.") for i, layer in enumerate(m.layers)]
        for module, prefix in pieces:
            module.register_forward_pre_hook(lambda mod, args, prefix=prefix: self._load(mod, prefix))
            module.register_forward_hook(self._free)

    PROGRESS_AFTER_S = 5.0  # a forward slower than this prints one line per piece it loads

    def forward(self, *args, **kwargs):
        self._started = time.perf_counter()
        return super().forward(*args, **kwargs)

    @staticmethod
    def _free(module, args, output):
        module.to("meta")  # returns None: the output stays what the module computed

    def _load(self, module, prefix):
        wanted = module.state_dict()
        on_disk = {n: n for n in wanted if prefix + n in self.checkpoint.tensors}
        if prefix == "lm_head." and "lm_head.weight" not in self.checkpoint.tensors:
            on_disk["weight"] = "model.embed_tokens.weight"  # tied embeddings
        else:
            on_disk = {n: prefix + n for n in on_disk}
        loaded = self.checkpoint.load_tensors(list(on_disk.values()))
        state = {n: loaded[src].to(self.dtype) for n, src in on_disk.items()}
        self.bytes_read += sum(t.numel() * t.element_size() for t in loaded.values())
        del loaded
        for n in wanted.keys() - state.keys():
            state[n] = self._stacked_experts(prefix + n, wanted[n].shape)
        module.load_state_dict(state, strict=True, assign=True)
        elapsed = time.perf_counter() - getattr(self, "_started", time.perf_counter())
        if elapsed > self.PROGRESS_AFTER_S:
            print(f"  streamed reference: {prefix.rstrip('.')} ({self.bytes_read / 2**30:.1f} GiB read so far, "
                  f"{elapsed:.0f} s into this forward)", file=sys.stderr, flush=True)

    # transformers >= 5 holds a MoE layer's experts as stacked tensors ([experts, 2 * inter, hidden] with gate
    # rows first, and [experts, hidden, inter]); checkpoints hold one tensor per expert
    STACKED_EXPERTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}

    def _stacked_experts(self, name, shape):
        """One stacked expert tensor, filled an expert at a time (no second copy of the layer)."""
        experts, kind = name.rsplit(".", 1)
        parts = self.STACKED_EXPERTS.get(kind) if experts.endswith(".experts") else None
        if parts is None or f"{experts}.0.{parts[0]}.weight" not in self.checkpoint.tensors:
            raise Unavailable(f"the streamed reference cannot find {name} in {self.checkpoint.path} (this "
                              "transformers lays the weights out in a way it does not know); use "
                              "--reference_mode resident")
        out = torch.empty(shape, dtype=self.dtype)
        rows = shape[1] // len(parts)
        where = {f"{experts}.{e}.{p}.weight": (e, i * rows) for e in range(shape[0]) for i, p in enumerate(parts)}
        for name, tensor in self.checkpoint.iter_tensors(list(where)):
            e, first_row = where[name]
            out[e, first_row:first_row + rows] = tensor  # a shape that differs raises here
            self.bytes_read += tensor.numel() * tensor.element_size()
        return out


BUILTIN_ENGINES = {"hf": HFEngine, "compile": CompileEngine}
FLAGS = (("--device_map", dict(choices=["auto", "balanced", "balanced_low_0", "sequential"],
                               help="'auto' spreads a model that does not fit one device over every visible device "
                                    "and CPU memory (accelerate; the others are its other strategies); default: all "
                                    "of it on --device, loaded straight there")),)


PARALLEL_FLAGS = (("--tensor_parallel_size", dict(type=int, default=1, metavar="N",
                                                  help="spread the model over N ranks: hf, HF's own tensor parallelism "
                                                       "(tp_plan auto) over N CPU processes the kit starts (gloo); "
                                                       "vllm, its tensor parallelism (default 1)")),
                  ("--enable_expert_parallel", dict(action="store_true",
                                                    help="with --tensor_parallel_size: a MoE model's experts spread "
                                                         "whole over the ranks (expert parallelism, EP = TP) instead of "
                                                         "each expert split")))


def flag_groups():
    """(title, flags) of every built-in engine: the flags it takes, defined in its own module, grouped by engine in
    --help and handed to the engine that names them in OPTIONS."""
    from . import llamacpp, openai_server

    return (("engine hf, compile", FLAGS), ("engines hf, vllm", PARALLEL_FLAGS), ("engine llama.cpp", llamacpp.FLAGS),
            ("engine openai:URL", openai_server.FLAGS))


def flag_options(args):
    """{option: value} of every engine flag on the parsed command line."""
    return {name.lstrip("-"): getattr(args, name.lstrip("-")) for _, flags in flag_groups() for name, _ in flags}


def engine_class(spec):
    if spec == "llama.cpp":
        from .llamacpp import LlamaCppEngine

        return LlamaCppEngine
    if spec == "infinilm":
        from .infinilm import InfiniLMEngine

        return InfiniLMEngine
    if spec == "vllm":
        from .serving import VLLMEngine

        return VLLMEngine
    if spec.startswith("openai:"):
        from .openai_server import OpenAIEngine

        return OpenAIEngine
    cls = resolve_class(spec, BUILTIN_ENGINES, (), "tools/kitcore/protocol.py")
    check_contract(cls, spec)
    if not callable(getattr(cls, "forward", None)):
        raise UsageError(f"--engine {spec!r}: {cls.__name__} lacks the required method forward() "
                         "(see the engine protocol in tools/kitcore/protocol.py)")
    if not capabilities(cls) & {"new_cache", "generate"}:
        raise UsageError(f"--engine {spec!r}: {cls.__name__} has neither new_cache() nor generate() "
                         "(see the engine protocol in tools/kitcore/protocol.py)")
    return cls


def load_engine(spec, model_path, device, dtype, attn, options=None):
    """Build the engine; `options` (e.g. gguf_type) reach only engines that list them in OPTIONS."""
    cls = engine_class(spec)
    options = dict(options or {}, url=spec.split(":", 1)[1] if spec.startswith("openai:") else None)
    if spec == "hf" and (options.get("tensor_parallel_size") or 1) > 1:
        from .parallel import TensorParallelHFEngine

        if options.get("device_map"):
            raise UsageError("--device_map with --tensor_parallel_size: choose one way to spread the model")
        cls = TensorParallelHFEngine
    if (options.get("tensor_parallel_size") or 1) > 1 and "tensor_parallel_size" not in getattr(cls, "OPTIONS", ()):
        raise UsageError(f"--tensor_parallel_size: engine {spec!r} does not spread a model over ranks (hf and vllm do)")
    if options.get("enable_expert_parallel") and (options.get("tensor_parallel_size") or 1) < 2:
        raise UsageError("--enable_expert_parallel spreads the experts over the tensor-parallel ranks: "
                         "add --tensor_parallel_size N (N >= 2)")
    accepted = getattr(cls, "OPTIONS", ())
    if options.get("engine_args") is not None and "engine_args" not in accepted:
        raise UsageError(f"--engine_args: engine {spec!r} takes no engine settings; drop --engine_args")
    chosen = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(str(model_path), device, dtype, attn, **chosen)



