"""Engines: what is under test. This docstring is the one place where the engine protocol is defined.

An engine is a class, chosen with `--engine`:
    hf                          HuggingFace Transformers on the chosen device/dtype (`--attn eager|sdpa`)
    compile                     the same model through torch.compile (inductor: C++ on the CPU)
    llama.cpp                   llama.cpp through llama-cpp-python, on a GGUF of the same checkpoint
    infinilm                    InfiniLM's InferEngine on InfiniCore (kitcore.infinilm; make setup-infinilm)
    vllm                        vLLM in this process (kitcore.serving; run the script in .venv-vllm)
    openai:http://HOST:PORT/v1  an OpenAI-compatible completions server, black-box (kitcore.openai_server)
    package.module:Class        a plugin, imported from an installed module
    path/to/file.py:Class       a plugin, loaded from a file

Constructor:
    Engine(model_path: str, device: kitcore.devices.Device, dtype: torch.dtype, attn: str, **options)
    `options` are engine-specific settings the class names in an OPTIONS tuple (hf, compile: device_map;
    llama.cpp: gguf_type, kv_type, and n_ctx, the positions the check will use: prompt + decode steps).
Attributes the kit reads: `dtype` (the torch.dtype the engine computes in: the --dtype it was given) and,
optionally, `judged_dtype` (the precision whose tolerance judges it, where that is not `dtype`: llama.cpp's
is the least precise of its GGUF weights and KV cache), `quantization` (e.g. "q8_0" for quantised
weights, "kv-q8_0" for a quantised KV cache: judged by distribution metrics instead of element tolerances) and
`padding_sides`, the padded batches forward() takes: ("left",) when absent, ("left", "right"), or ()
for an engine that takes one unpadded prompt at a time (batch validation is then not available);
`returns`: "logits" when absent, or "logprobs" (log-probabilities: compared with the reference's
log-softmax; NaN where the engine returned none, see kitcore.serving) and then `top_k`, None for the whole
vocabulary or k when only the top k of each position are returned.

Required (end-to-end and forward validation):
    new_cache() -> object   (or generate(), below, for an engine that keeps its KV cache to itself)
        A fresh, empty KV cache; the kit treats it as opaque and hands it back to forward().
    forward(input_ids, position_ids, attention_mask=None, cache=None) -> logits
        input_ids, position_ids: int64 [B, S] on the CPU; attention_mask: int64 [B, past + S] with 1 for real
        tokens and 0 for padding, or None (no padding). With a cache, the S new positions are appended to
        it (prefill when it is empty, decode when S == 1). Returns logits [B, S, vocab] as a torch tensor
        on any device, in any dtype.

    generate(input_ids, position_ids, attention_mask, steps) -> (tokens [B, steps], logits [B, steps + 1, V])
        Instead of new_cache(): the engine's own greedy decode of `steps` tokens, with the distribution after
        the prompt and after each generated token (kitcore.decode compares the steps its tokens share with
        the reference's greedy ones).

Optional capabilities (intermediate validation; an engine without them gets exit code 3 there). A class
declares the optional methods it offers in `capabilities`, a set of their names (HFEngine: all of
them; CompileEngine: new_cache only); a subclass that switches one off declares the smaller set. A plugin
that declares nothing offers the optional methods it defines (engines.capabilities(), read once when the
kit loads it):
    capture(input_ids, position_ids, layers=None) -> dict[str, Tensor]
        The intermediate tensors of one no-cache forward, keyed by the point names of kitcore.points.
        `layers` (a range, or None for all) limits them to those layers (with embed_tokens when the range
        starts at 0, final_norm and logits when it ends at the last layer). Returning more is allowed.
    capture_layers(input_ids, position_ids) -> iterator of dict[str, Tensor]
        Optional, preferred to capture(): the same tensors from ONE forward, a layer at a time (embed_tokens
        comes with layer 0, final_norm and logits with the last layer). The kit compares each layer of every
        model and drops it before asking for the next: one layer's activations in memory, no forward run
        twice. Without it the kit calls capture() in chunks of layers that fit `--max_capture_mb`, each
        chunk's forward running from layer 0 again.
    run_component(point, layer, inputs, position_ids) -> Tensor
        Run the engine's own implementation of one component on the given inputs (the reference's
        captured tensors, keyed by the names in kitcore.points.COMPONENT_INPUTS). Used by the dual test.
    rope(x, position_ids) -> Tensor
        Apply the engine's rotary embedding to x [B, heads, S, head_dim]. Used by the RoPE validation.
    final_hidden(input_ids, position_ids) -> Tensor
        For an engine without capture(): its hidden states after the final norm, [B, S, hidden]; with
        run_component() alone, intermediate validation runs the dual test and compares these at final_norm.
    tokenize(text=None, messages=None) -> list[int] | None
        The ids the engine itself computes from `text` (special tokens as it adds them by default), or from
        chat `messages` ([{"role", "content"}], its own chat template, generation prompt added); None for
        an input it cannot take. stop_tokens() -> set[int]: the ids it stops generating at. Used by
        `--tokenization` (kitcore.tokenization).
    attest() -> dict[str, str]
        What actually ran, read back from the engine after loading (not the settings it was asked for):
        e.g. hf's attention and experts implementations, llama.cpp's KV-cache types, vLLM's prefix cache and
        chunked prefill. Printed and recorded with every result (`env.attested`); `--require KEY=VALUE`
        fails the run when the engine attests another value (a silent fallback never passes under the
        target's name) and exits 3 when it does not attest KEY at all.
    reset_prefix_cache()
        Empty the engine's own prefix cache (an engine that decodes by itself, e.g. vLLM), which reports the
        prompt tokens each request took from it in the list `cached_tokens` (None per request, with
        `reports_cache_hits = False`, where it cannot tell). Used by forward validation's `--cache_pairs`
        (kitcore.prefix_pairs).
    baseline() -> engine | None
        The same engine in its safest mode (llama.cpp: an f32 KV cache and the whole prompt in one batch),
        or None when it already runs so. Forward validation's default engine B for an engine that has one:
        a quantised cache or a chunked prefill is compared step by step with the same weights run plainly.

`HFEngine` implements all of them and exposes the loaded transformers model as `.model`; plugins can
subclass it and override one piece (see test/kit/faulty_engines.py for examples).

What a plugin author asks next:
  * Refusing: raise kitcore.errors.UsageError (bad input or setting: exit 2) or Unavailable (this machine
    cannot run it: exit 3), one line each. Any other exception raised in the plugin's code is reported as
    the engine's failure (its type, message, file:line and the phase; exit 1), never as the kit's bug.
  * Its own settings: name "engine_args" in OPTIONS and take `engine_args` (a dict from --engine_args JSON).
  * A model in its own format: convert it from `model_path` in __init__, into a directory keyed by the
    checkpoint's content (kitcore.checkpoints.open_checkpoint(model_path).fingerprint) under the kit cache,
    and reuse it (as llama.cpp's GGUF export does: kitcore.gguf_export).
  * A cache the kit cannot reach: new_cache() may return the tokens seen so far and forward() recompute
    the whole prefix; declare `recomputes_prefix = True`, and forward validation says that its cache check
    (cached logits against the engine's own no-cache forward, bitwise equal then) had no cache to test. An
    engine with a cache of its own that only decodes by itself implements generate() instead.
  * Positions: position_ids count from the first real token of each row (0 there under left padding);
    padded positions carry 0 and attention_mask 0.
"""

import ctypes
import functools
import importlib
import importlib.util
import inspect
import os
import queue
import sys
import threading
import time

import torch

from .errors import Unavailable, UsageError
from .points import COMPONENT_INPUTS


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


OPTIONAL_METHODS = ("new_cache", "generate", "capture", "capture_layers", "run_component", "rope", "final_hidden",
                    "attest", "tokenize", "stop_tokens", "baseline", "reset_prefix_cache")


def capabilities(engine):
    """The optional methods an engine (or engine class) offers: its class's `capabilities` declaration, or,
    for a plugin that declares none, the optional methods it defines. A declared method the class sets to
    None (the protocol's older way of switching one off) is not offered."""
    cls = engine if isinstance(engine, type) else type(engine)
    declared = getattr(cls, "capabilities", None)
    names = declared if isinstance(declared, (set, frozenset)) else OPTIONAL_METHODS
    return frozenset(m for m in names if callable(getattr(cls, m, None)))


_PLUGIN_FILES = {}  # real path of each plugin module loaded -> what to call it


def raised_by_plugin(exc):
    """(the plugin's name, "file:line" of its innermost frame) when `exc` was raised inside a plugin engine's
    own code (a frame of a loaded plugin's file on its traceback), else None: the engine's error, not the kit's."""
    import traceback

    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.realpath(f.filename) in _PLUGIN_FILES]
    if not frames:
        return None
    last = frames[-1]
    return _PLUGIN_FILES[os.path.realpath(last.filename)], f"{os.path.basename(last.filename)}:{last.lineno}"


def check_contract(cls, spec):
    """One clear line (UsageError, exit 2) for an engine class whose optional capabilities cannot be what its
    author meant: a declared capability it does not define, an unknown name in `capabilities`, or a method
    one typo away from a capability it does not define (`capture_layer` for capture_layers: without this it
    would silently read as "not offered")."""
    import difflib

    declared = getattr(cls, "capabilities", None)
    if isinstance(declared, (set, frozenset)):
        unknown = sorted(set(declared) - set(OPTIONAL_METHODS))
        if unknown:
            raise UsageError(f"--engine {spec!r}: {cls.__name__}.capabilities names {unknown[0]!r}, which is not "
                             f"an optional capability ({', '.join(OPTIONAL_METHODS)}); see tools/kitcore/engines.py")
        missing = sorted(m for m in declared if not callable(getattr(cls, m, None)) and getattr(cls, m, 0) is not None)
        if missing:
            raise UsageError(f"--engine {spec!r}: {cls.__name__} declares {missing[0]}() in its capabilities and does "
                             "not define it; define it or drop it from the declaration")
    defined = [name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name, None))]
    for name in defined:
        if name in OPTIONAL_METHODS or name == "forward":
            continue
        near = [m for m in difflib.get_close_matches(name, (*OPTIONAL_METHODS, "forward"), n=1, cutoff=0.85)
                if not callable(getattr(cls, m, None))]
        if near:
            raise UsageError(f"--engine {spec!r}: {cls.__name__} defines {name}(), one typo from the capability "
                             f"{near[0]}(), which it does not define; rename it to {near[0]} (see the engine "
                             "protocol in tools/kitcore/engines.py)")


def recomputes_prefix(engine):
    """Whether the engine declares that its "cache" recomputes the whole prefix (a plugin without a reachable
    KV cache): its cache check then tests nothing, and forward validation says so."""
    return bool(getattr(engine, "recomputes_prefix", False))


def attested(engine):
    """{key: value as text} of what the engine attests it ran (attest()), {} when it attests nothing."""
    if "attest" not in capabilities(engine):
        return {}
    return {str(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in engine.attest().items()
            if v is not None}


class SequenceCache:
    """The KV cache of an engine that holds one sequence in a context of its own (llama.cpp, InfiniLM's static
    cache): the tokens this sequence has put there, replayed when another sequence used the context since."""

    def __init__(self):
        self.tokens = []


ONE_PROMPT = "takes one unpadded prompt at a time; drop --prompts-file"


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


def resolve_class(spec, builtins, required, protocol):
    """`--engine` -> a class: a built-in name, `package.module:Class` or `path/file.py:Class`.
    `required` names the methods the class must have; `protocol` says where they are documented."""
    if spec in builtins:
        return builtins[spec]
    if ":" not in spec:
        raise UsageError(f"--engine {spec!r}: unknown engine; use one of {', '.join(builtins)}, "
                         "package.module:Class or path/to/file.py:Class")
    target, cls_name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise UsageError(f"--engine {spec!r}: file {target} does not exist")
        mod_name = "kit_engine_" + os.path.splitext(os.path.basename(target))[0]
        module_spec = importlib.util.spec_from_file_location(mod_name, target)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise Unavailable(f"--engine {spec!r}: cannot import {target} ({exc}); install the plugin's package") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise UsageError(f"--engine {spec!r}: {target} has no class {cls_name}")
    if getattr(module, "__file__", None):
        _PLUGIN_FILES[os.path.realpath(module.__file__)] = f"{cls_name} ({target})"
    for method in required:
        if not callable(getattr(cls, method, None)):
            raise UsageError(f"--engine {spec!r}: {cls_name} lacks the required method {method}() "
                             f"(see the engine protocol in {protocol})")
    return cls


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
    cls = resolve_class(spec, BUILTIN_ENGINES, (), "tools/kitcore/engines.py")
    check_contract(cls, spec)
    if not callable(getattr(cls, "forward", None)):
        raise UsageError(f"--engine {spec!r}: {cls.__name__} lacks the required method forward() "
                         "(see the engine protocol in tools/kitcore/engines.py)")
    if not capabilities(cls) & {"new_cache", "generate"}:
        raise UsageError(f"--engine {spec!r}: {cls.__name__} has neither new_cache() nor generate() "
                         "(see the engine protocol in tools/kitcore/engines.py)")
    return cls


def load_engine(spec, model_path, device, dtype, attn, options=None):
    """Build the engine; `options` (e.g. gguf_type) reach only engines that list them in OPTIONS."""
    cls = engine_class(spec)
    options = dict(options or {}, url=spec.split(":", 1)[1] if spec.startswith("openai:") else None)
    accepted = getattr(cls, "OPTIONS", ())
    if options.get("engine_args") is not None and "engine_args" not in accepted:
        raise UsageError(f"--engine_args: engine {spec!r} takes no engine settings; drop --engine_args")
    chosen = {k: v for k, v in options.items() if k in accepted and v is not None}
    return cls(str(model_path), device, dtype, attn, **chosen)


def layer_captures(engine, input_ids, position_ids, num_layers, chunk):
    """One dict of captured points per layer, in order: from capture_layers() when the engine has it, else
    from capture() over `chunk` layers at a time, split by layer (the last dict also holds final_norm and
    logits, the first embed_tokens). A layer the engine did not capture comes as an empty dict."""
    if "capture_layers" in capabilities(engine):
        yield from engine.capture_layers(input_ids, position_ids)
        return
    for start in range(0, num_layers, chunk):
        layers = range(start, min(start + chunk, num_layers))
        captured = engine.capture(input_ids, position_ids, layers=layers)
        for i in layers:
            names = {"embed_tokens"} if i == 0 else set()
            names |= {"final_norm", "logits"} if i == num_layers - 1 else set()
            yield {k: v for k, v in captured.items() if k in names or k.startswith(f"layers.{i}.")}


def require(engine, capability, spec, purpose):
    if capability not in capabilities(engine):
        raise Unavailable(f"engine {spec!r} does not implement {capability}(), which {purpose} needs "
                          "(see the engine protocol in tools/kitcore/engines.py)")
