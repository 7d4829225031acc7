"""Number formats as engines store them, simulated in torch on HF Transformers: what a format costs by itself,
and the peer a quantised engine is judged against.

A format is one or more of FORMATS joined by "+" (e.g. "q8_0", "w8a8-int8", "q4_0+kv-q8_0"). An engine
declares the format it runs (`format`, kitcore.protocol); `--format` names it for an engine that does not.

    q8_0        GGML q8_0 weights (blocks of 32 along the input dimension, an fp16 scale each: the `gguf` package's
                own quantiser, so the values are the GGUF's bytes) for every matrix, the token embeddings and the
                LM head included (what the kit's GGUF export writes), and q8_0 activations at every matrix input
                (llama.cpp's CPU dot products of a q8_0 or q4_0 weight take the activation in q8_0)
    q4_0        GGML q4_0 weights (the same matrices), q8_0 activations
    w8a8-int8   int8 weights with one absmax scale per output row, int8 activations with one absmax scale per
                token, at every projection of the decoder layers (embeddings and LM head stay in the dtype)
    fp8-e4m3    float8 e4m3 weights with one scale per output row, float8 e4m3 activations with one scale per
                token (dynamic), at the same projections
    kv-f16      keys and values rounded to float16 in the cache, queries to float16 (llama.cpp's f16 cache)
    kv-q8_0     keys and values in GGML q8_0 blocks, queries in q8_0, as llama.cpp stores them: Hadamard-rotated
    kv-q4_0     where head_dim is a multiple of 64, q/k in a Llama GGUF's interleaved RoPE order (rounded_attention)
    activations:KIND[,PROJ=KIND...]
                the weights as the checkpoint holds them (a GGUF's own, dequantised: llama.cpp on the GGUF a real
                checkpoint came from) and every matrix input rounded as llama.cpp's dot product with that
                matrix's type takes it: KIND q8_0 (q4_0, q5_0, q8_0 weights) or q8_K (the K-quants), PROJ a module
                name's end (down_proj, lm_head) where it differs

Only the rounding is simulated; every sum is the model's own float arithmetic in the engine's dtype. A correct
engine of the format differs from the simulation by the order of its sums, and by the rare value its own
arithmetic rounds to the other side of a quantisation step; a kernel bug differs by more (kitcore.corpus
measures both). Dense Llama models; the fused experts of a Qwen3-MoE are not simulated (refused, exit 3).
"""

import functools
from dataclasses import dataclass

import torch

from . import rope
from .engines import HFEngine
from .errors import Unavailable, UsageError


@dataclass(frozen=True)
class Format:
    name: str
    weights: str = None  # "ggml:q8_0", "int8", "fp8": how a matrix's weights are stored
    activations: str = None  # "q8_0", "int8", "fp8": how a matrix's input is rounded
    embeddings: bool = False  # the token embeddings and the LM head are stored in the format too (GGML)
    kv: str = None  # "f16", "q8_0", "q4_0": the KV cache
    summary: str = ""


FORMATS = {f.name: f for f in (
    Format("q8_0", "ggml:q8_0", "q8_0", True, summary="GGML q8_0 weights and q8_0 activations"),
    Format("q4_0", "ggml:q4_0", "q8_0", True, summary="GGML q4_0 weights and q8_0 activations"),
    Format("w8a8-int8", "int8", "int8", summary="per-row int8 weights, per-token int8 activations"),
    Format("fp8-e4m3", "fp8", "fp8", summary="per-row fp8 e4m3 weights, per-token fp8 e4m3 activations"),
    Format("kv-f16", kv="f16", summary="an f16 KV cache (f16 queries)"),
    Format("kv-q8_0", kv="q8_0", summary="a q8_0 KV cache as llama.cpp stores it (q8_0 queries)"),
    Format("kv-q4_0", kv="q4_0", summary="a q4_0 KV cache as llama.cpp stores it (q8_0 queries)"),
)}
FP8_MAX = 448.0  # the largest finite float8 e4m3fn


ACTIVATION_KINDS = ("q8_0", "q8_K")


def _activations_format(name):
    """The Format of "activations:KIND[,PROJ=KIND...]" (module docstring), or None when the name is not one."""
    if not name.startswith("activations:"):
        return None
    default, *rest = name.removeprefix("activations:").split(",")
    overrides = dict(item.partition("=")[::2] for item in rest)
    if default not in ACTIVATION_KINDS or any(k not in ACTIVATION_KINDS or not p for p, k in overrides.items()):
        raise UsageError(f"format {name!r}: activations:KIND[,PROJ=KIND...] with KIND one of "
                         f"{', '.join(ACTIVATION_KINDS)}, e.g. activations:q8_0,down_proj=q8_K")
    shown = ", ".join(f"{p} {k}" for p, k in overrides.items())
    return Format(name, weights="as stored", activations=(default, tuple(overrides.items())),
                  summary=f"the weights as the checkpoint holds them, {default} activations"
                          + (f" ({shown})" if shown else ""))


def parse(spec):
    """The Formats of a "+"-joined format name (at most one for the weights and one for the KV cache), or ()."""
    if not spec:
        return ()
    names = spec.split("+")
    extra = {n: _activations_format(n) for n in names if n.startswith("activations:")}
    unknown = [n for n in names if n not in FORMATS and n not in extra]
    if unknown:
        raise UsageError(f"format {spec!r}: {', '.join(unknown)} unknown; formats: {', '.join(FORMATS)} "
                         "(join a weight format and a KV-cache format with '+')")
    parts = tuple(extra.get(n) or FORMATS[n] for n in names)
    if sum(p.weights is not None for p in parts) > 1 or sum(p.kv is not None for p in parts) > 1:
        raise UsageError(f"format {spec!r}: one weight format and one KV-cache format at most")
    return parts


def describe(spec):
    return "; ".join(p.summary for p in parse(spec)) or "none"


# ---- rounding, one function per storage ----------------------------------------------------------------


def ggml_round(x, kind):
    """x rounded to GGML's `kind` ("q8_0", "q4_0") blocks of 32 along its last dimension and back, by the `gguf`
    package's own quantiser: in float32, the values a GGUF of that type holds; a float64 x in float64 (its block
    function on float64 blocks: the format's exact value, kitcore.corpus)."""
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[kind.upper()]
    flat = x.detach().reshape(-1, x.shape[-1]).cpu()
    if x.dtype == torch.float64:
        blocks = getattr(quants, kind.upper()).quantize_blocks(flat.numpy().reshape(-1, 32))
        raw = blocks.reshape(flat.shape[0], -1)
    else:
        raw = quants.quantize(flat.float().numpy(), qtype)
    return torch.from_numpy(quants.dequantize(raw, qtype)).reshape(x.shape).to(x.dtype).to(x.device)


def _working(x):
    """The precision a scale and quotient are computed in: float32, as engines do, or float64 for the format's exact
    value (kitcore.corpus): a correct peer's roundings then differ from it as an engine's do."""
    return x.double() if x.dtype == torch.float64 else x.float()


def q8_0_activations(x):
    """x rounded as llama.cpp quantises a matrix product's input to q8_0 (quantize_row_q8_0): blocks of 32,
    d = absmax / 127 kept in float16, q = round(x / d). In torch (an activation is rounded on every call)."""
    shape, dtype = x.shape, x.dtype
    blocks = _working(x).reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, blocks / d, torch.zeros((), dtype=blocks.dtype)).round()
    return (q * d.half().to(q.dtype)).reshape(shape).to(dtype)


def q8_K_activations(x):
    """x rounded as llama.cpp quantises a K-quant product's input to q8_K (quantize_row_q8_K): blocks of 256, the
    element of largest magnitude `max` (signed), iscale = -127 / max, q = min(127, round(iscale x)), d = 1 / iscale
    kept in float32."""
    shape, dtype = x.shape, x.dtype
    blocks = _working(x).reshape(-1, 256)
    peak = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    iscale = torch.where(peak != 0, -127 / peak, torch.zeros((), dtype=blocks.dtype))
    q = (iscale * blocks).round().clamp(max=127)
    d = torch.where(peak != 0, 1 / iscale, torch.zeros((), dtype=blocks.dtype))
    return (q * d).reshape(shape).to(dtype)


def absmax_round(x, kind, dim=-1):
    """x rounded symmetrically with one absmax scale per slice along `dim`: "int8" (127 levels each side) or "fp8"
    (float8 e4m3fn, largest 448); computed in _working(x)."""
    work = _working(x)
    amax = work.abs().amax(dim, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if kind == "int8":
        scale = amax / 127
        return ((work / scale).round().clamp(-127, 127) * scale).to(x.dtype)
    scale = amax / FP8_MAX
    return ((work / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def round_activations(x, kind):
    block = {"q8_0": 32, "q8_K": 256}.get(kind)
    if block and x.shape[-1] % block:
        raise Unavailable(f"format {kind}: a matrix input of {x.shape[-1]} features is not a multiple of {block}")
    if kind == "q8_0":
        return q8_0_activations(x)
    if kind == "q8_K":
        return q8_K_activations(x)
    return absmax_round(x, kind)


def round_weights(w, kind):
    if kind.startswith("ggml:"):
        if w.shape[-1] % 32:
            raise Unavailable(f"format {kind[5:]}: a matrix of {w.shape[-1]} inputs is not a multiple of 32")
        return ggml_round(w, kind[5:])
    return absmax_round(w, kind, dim=-1)


# ---- the KV cache, as llama.cpp stores it -------------------------------------------------------------


def hadamard(n):
    """The normalised Sylvester Hadamard matrix of size n (a power of two): symmetric and its own inverse."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def rotation_sizes(head_dim):
    """(keys', values' rotation size) llama.cpp uses for a quantised cache, or None where it does not rotate
    (head_dim not a multiple of 64): keys by the largest power of two from 64 that divides head_dim, values by 64
    (llama-kv-cache.cpp, build_input_k_rot / build_input_v_rot)."""
    if head_dim % 64:
        return None
    k = 64
    while head_dim % (2 * k) == 0:
        k *= 2
    return k, 64


def _rotate(x, n):
    """x [..., D] times the block-diagonal matrix of D/n Hadamard blocks of size n."""
    return (x.reshape(*x.shape[:-1], -1, n) @ hadamard(n).to(x.dtype).to(x.device)).reshape(x.shape)


def rounded_attention(kv_type, rotate=True, interleaved_qk=False):
    """An attention function for transformers' AttentionInterface: sdpa on a rounded cache. "f16": keys, values
    and queries rounded to float16. A GGML type, as llama.cpp stores it: `rotate`, q, k and v multiplied by
    Hadamard blocks first where llama.cpp does (rotation_sizes), the output back; `interleaved_qk`, q and k held
    in a Llama GGUF's interleaved RoPE order (what its blocks group); queries in q8_0. Neither changes the exact
    scores: only what is rounded."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def stored(x, kind, interleave, n):  # [B, heads, S, D] as the cache holds it, rounded
        if interleave:
            b, h, s, d = x.shape
            x = rope.half_to_interleaved_rows(x.transpose(1, 2).reshape(b, s, h * d), h).reshape(b, s, h, d)
            x = x.transpose(1, 2)
        return ggml_round(x if n is None else _rotate(x, n), kind)

    def attention(module, query, key, value, attention_mask, **kwargs):
        if kv_type == "f16":
            def f16(t):
                return t.half().to(t.dtype)
            return sdpa_attention_forward(module, f16(query), f16(key), f16(value), attention_mask, **kwargs)
        sizes = rotation_sizes(query.shape[-1]) if rotate else None
        n_k, n_v = sizes or (None, None)
        out, weights = sdpa_attention_forward(module, stored(query, "q8_0", interleaved_qk, n_k),
                                              stored(key, kv_type, interleaved_qk, n_k),
                                              stored(value, kv_type, False, n_v), attention_mask, **kwargs)
        return (out if n_v is None else _rotate(out, n_v)), weights
    return attention


# ---- applying a format to a loaded model -----------------------------------------------------------------


def _projections(model):
    """The matrices a format stores (name, nn.Linear) inside the decoder layers."""
    return [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def apply(model, spec, rotate=True):
    """Round `model` (a transformers Llama, in place) to the format `spec`: its weights once, each stored matrix's
    input inside its forward (a capture hook on the module still reads the input unrounded, as an engine's capture
    does), an attention function for the KV cache."""
    config = model.config
    if config.model_type not in ("llama", "qwen2"):
        raise Unavailable(f"format {spec}: simulated for dense Llama models; this checkpoint is a "
                          f"{config.model_type} (its experts are not nn.Linear matrices)")
    for part in parse(spec):
        if part.weights == "as stored":  # activations only, per module (_activations_format)
            default, overrides = part.activations
            for name, m in [*_projections(model), ("lm_head", model.lm_head)]:
                kind = next((k for p, k in overrides if name.endswith(p)), default)
                m.forward = functools.partial(_rounded_linear, m, kind)
        elif part.weights:
            matrices = [m for _, m in _projections(model)]
            if part.embeddings:
                matrices.append(model.lm_head)
                embed = model.model.embed_tokens
                if embed.weight is not model.lm_head.weight:  # tied embeddings are rounded once, with the head
                    embed.weight.copy_(round_weights(embed.weight, part.weights))
            for m in matrices:
                m.weight.copy_(round_weights(m.weight, part.weights))
                m.forward = functools.partial(_rounded_linear, m, part.activations)
        if part.kv:
            from transformers import AttentionInterface

            name = f"kit_kv_{part.kv}" + ("" if rotate else "_plain")
            AttentionInterface.register(name, rounded_attention(part.kv, rotate,
                                                                interleaved_qk=config.model_type == "llama"))
            model.set_attn_implementation(name)


def _rounded_linear(linear, kind, x):
    return torch.nn.functional.linear(round_activations(x, kind), linear.weight, linear.bias)


def simulated(spec, config):
    """Whether the kit simulates format `spec` on a model of `config` (dict): (True, "") or (False, why)."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "qwen2"):
        return False, f"formats are simulated on dense Llama models, not {model_type} (its experts are fused)"
    for part in parse(spec):
        if part.weights is None:
            continue
        widths = {config["hidden_size"], config["intermediate_size"]}
        if part.weights.startswith("ggml:") and any(w % 32 for w in widths):
            return False, f"{part.name} needs matrix inputs in multiples of 32, not {sorted(widths)}"
    return True, ""


def peer_format(spec, config):
    """The format a check's peer simulates for an engine declaring `spec`, or None: end-to-end and forward validation
    take the peer from the weight formats (their measured tables for a KV-cache format alone stay)."""
    if not spec or not any(p.weights for p in parse(spec)):
        return None
    return spec if simulated(spec, config)[0] else None


class FormatEngine(HFEngine):
    """HF Transformers with a format simulated (apply): the peer of an engine of that format, and what the format
    costs by itself against the reference."""

    capabilities = HFEngine.capabilities - {"run_component"}  # a component run alone would skip its rounding

    def __init__(self, model_path, device, dtype, attn="sdpa", format=None):
        super().__init__(model_path, device, dtype, attn)
        self.format, self.name = format, f"hf+{format}"
        apply(self.model, format)
        self.description = f"HF Transformers with {describe(format)} simulated (kitcore.formats)"

    def attest(self):
        return {**super().attest(), "format": self.format}
