"""The engine protocol: what an engine is, what the kit hands it and reads from it. This module is the one place
it is defined and the one place engine objects are probed (capabilities(), declared()).

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
is the least precise of its GGUF weights and KV cache), `format` (the number format it stores and computes in
where that is not its dtype: kitcore.formats' names, e.g. "q8_0", "w8a8-int8", "kv-q8_0", joined by "+": judged
by distribution metrics instead of element tolerances, against HF with that format simulated) and
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
that declares nothing offers the optional methods it defines (capabilities(), read once when the
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
    ranks_of(point_name) -> ("computed", [(rank, index)]) | ("held", [(rank, Tensor)]) | None
        For an engine spread over ranks (kitcore.parallel): which elements of a captured point each rank computed
        (`tensor[index]`: its block of features or heads, or the slots of its experts); for a replicated point the
        ranks hold differently, each rank's tensor; None otherwise.
        Intermediate validation then names the rank of a first divergence, or finds partial sums never
        all-reduced; a replicated tensor a rank holds otherwise (`replicated_differences`) fails by itself.
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

import difflib
import importlib
import importlib.util
import os
import sys
import traceback

from .errors import Unavailable, UsageError


# Attributes an engine may declare, and what their absence means (read through declared() only).
DECLARED = {
    "name": None,  # a short name for lines and records (else its class name)
    "description": None,  # one line printed under the header: what it runs, how it is judged
    "judged_dtype": None,  # the precision whose tolerance judges it, where that is not `dtype`
    "format": None,  # "q8_0", "w8a8-int8", "kv-q8_0" ... (kitcore.formats): judged against that format's simulation
    "padding_sides": ("left",),  # the padded batches forward() takes; () for one prompt at a time
    "returns": "logits",  # or "logprobs" (kitcore.serving)
    "top_k": None,  # with "logprobs": None for the whole vocabulary, k when only the top k come back
    "hidden": (),  # token ids a server's logprobs cannot tell apart (left out on every side)
    "reports_cache_hits": True,  # False: cached_tokens are None per request (--cache_pairs)
    "max_model_len": None,  # the longest sequence it takes (forward validation caps its steps)
    "recomputes_prefix": False,  # its "cache" recomputes the whole prefix: the cache check tests nothing
    "captured_points": None,  # the point kinds capture() hands out (kitcore.points), None for all of them
    "replicated_differences": (),  # after capture(): (point, rank, the rank it should equal) of a replicated tensor
    "ranks": None,  # spread over ranks: {"tensor_parallel_size": N, "expert_parallel": bool}; its peer sums as they do
}


def declared(engine, attribute):
    """An engine's declared attribute (DECLARED), or what its absence means."""
    return getattr(engine, attribute, DECLARED[attribute])


OPTIONAL_METHODS = ("new_cache", "generate", "capture", "capture_layers", "run_component", "rope", "final_hidden",
                    "attest", "tokenize", "stop_tokens", "baseline", "reset_prefix_cache", "ranks_of")


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
    declared = getattr(cls, "capabilities", None)
    if isinstance(declared, (set, frozenset)):
        unknown = sorted(set(declared) - set(OPTIONAL_METHODS))
        if unknown:
            raise UsageError(f"--engine {spec!r}: {cls.__name__}.capabilities names {unknown[0]!r}, which is not "
                             f"an optional capability ({', '.join(OPTIONAL_METHODS)}); see tools/kitcore/protocol.py")
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
                             "protocol in tools/kitcore/protocol.py)")


def recomputes_prefix(engine):
    """Whether the engine declares that its "cache" recomputes the whole prefix (a plugin without a reachable
    KV cache): its cache check then tests nothing, and forward validation says so."""
    return bool(declared(engine, "recomputes_prefix"))


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
                          "(see the engine protocol in tools/kitcore/protocol.py)")
