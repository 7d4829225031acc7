"""What a check of a model will need, from its config.json alone (`--plan`; no weights are read).

Parameters are counted from the config (Llama and Qwen3-MoE shapes). The float32 reference holds every
parameter in 4 bytes when resident, or one decoder layer plus the embedding and LM head when streamed;
the candidate holds them in its dtype. Reference cache sizes are per 1,000 tokens: the logits (float32)
and, for intermediate validation, every capture point of every layer. The time estimate is the
reference forward's FLOPs (2 x active parameters per token, plus attention) over this machine's
measured float32 matmul throughput, or its weights over the measured memory bandwidth, whichever is
longer (kitcore.roofline): a lower bound, stated as an estimate.
"""

from dataclasses import asdict, dataclass

from .errors import Unavailable, UsageError

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# the resident path loads reference + candidate (+ peer): refuse it up front above this share of the
# available memory, instead of being killed by the OOM killer halfway
RESIDENT_MEMORY_SHARE = 0.9


@dataclass
class Plan:
    model_type: str
    parameters: int
    active_parameters_per_token: int
    parameters_per_layer: int
    layers: int
    reference_bytes_resident: int
    reference_bytes_per_layer: int
    reference_bytes_streamed: int  # one layer + embedding + LM head, float32
    candidate_bytes: int
    reference_cache_bytes_per_1k_tokens: int  # logits
    capture_cache_bytes_per_1k_tokens: int  # every capture point of every layer (intermediate validation)
    tokens: int
    estimated_reference_seconds: float

    def as_dict(self):
        return asdict(self)


def _shape(cfg):
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or h // heads
    return h, layers, heads, kv, head_dim


def layer_parameters(cfg):
    """(all parameters of one decoder layer, those one token uses)."""
    h, _, heads, kv, d = _shape(cfg)
    attention = h * heads * d + 2 * h * kv * d + heads * d * h + (2 * d if cfg.get("model_type") == "qwen3_moe" else 0)
    norms = 2 * h
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if experts:
        inter, k = cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]
        mlp, active_mlp = experts * 3 * h * inter + h * experts, k * 3 * h * inter + h * experts
    else:
        mlp = active_mlp = 3 * h * cfg["intermediate_size"]
    return attention + norms + mlp, attention + norms + active_mlp


def make_plan(cfg, candidate_dtype, tokens, ceilings=None):
    h, layers, heads, kv, d = _shape(cfg)
    vocab = cfg["vocab_size"]
    per_layer, active_layer = layer_parameters(cfg)
    embed = vocab * h
    head = 0 if cfg.get("tie_word_embeddings") else vocab * h
    total = embed + head + h + layers * per_layer
    active = embed // vocab + head + h + layers * active_layer  # a token reads one embedding row
    inter = cfg.get("intermediate_size") or cfg.get("moe_intermediate_size")
    capture_floats = 7 * h + 3 * heads * d + 3 * kv * d + 3 * inter  # per token and layer, as captured
    flops = 2 * active * tokens + layers * 4 * heads * d * tokens * (tokens + 1) // 2
    seconds = 0.0
    if ceilings is not None:
        seconds = max(flops / ceilings.measured["matmul_flops_per_s"]["float32"],
                      4 * total / ceilings.bandwidth_bytes_per_s)
    return Plan(cfg.get("model_type", "?"), total, active, per_layer, layers, 4 * total, 4 * per_layer,
                4 * (per_layer + embed + head), BYTES[candidate_dtype] * total, 4 * 1000 * vocab,
                4 * 1000 * layers * capture_floats, tokens, seconds)


def available_memory_bytes():
    """MemAvailable of /proc/meminfo (None where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def size_text(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


STREAMED_MODEL_TYPES = ("llama", "qwen3_moe")


def choose_reference(cfg, candidate_dtype, cpu_models, reference_dtype="float32", mode="auto"):
    """Resident or streamed reference, decided before loading anything: -> (mode, why).

    The resident reference plus `cpu_models` copies of the model in the candidate dtype (the candidate
    and its peer on the CPU; a candidate on an accelerator passes through CPU memory while it loads) must
    fit in RESIDENT_MEMORY_SHARE of the available memory; `auto` streams the reference when they do not
    (Llama and Qwen3-MoE checkpoints). What cannot fit either way stops with one line (exit 3), instead of the OOM
    killer halfway through."""
    p = make_plan(cfg, candidate_dtype, 1)
    scale = BYTES[reference_dtype] / 4
    resident = p.reference_bytes_resident * scale + cpu_models * p.candidate_bytes
    streamed = p.reference_bytes_streamed * scale + cpu_models * p.candidate_bytes
    available = available_memory_bytes()
    budget = RESIDENT_MEMORY_SHARE * available if available else float("inf")
    figures = f"resident needs {size_text(resident)}, streamed {size_text(streamed)}, " + (
        f"{size_text(available)} available" if available else "available memory unknown")
    can_stream = cfg.get("model_type") in STREAMED_MODEL_TYPES
    if mode == "streamed" and not can_stream:
        raise UsageError(f"--reference_mode streamed: model_type {cfg.get('model_type')!r} has no streamed "
                         f"reference ({', '.join(STREAMED_MODEL_TYPES)} only); use --reference_mode resident")
    if mode == "resident" or (mode == "auto" and (resident <= budget or not can_stream)):
        if resident > budget:
            raise Unavailable(f"the resident {reference_dtype} reference ({p.parameters / 1e9:.2f}B parameters) and "
                              f"the models under test do not fit ({figures}): nothing was loaded (--plan shows the "
                              "figures)" + ("; use --reference_mode streamed" if can_stream else
                                            "; use a machine with more memory"))
        return "resident", figures
    if streamed > budget:
        raise Unavailable(f"even a streamed {reference_dtype} reference and the models under test do not fit "
                          f"({figures}): nothing was loaded; use a machine with more memory")
    return "streamed", figures + ("" if mode == "streamed" else ": the resident reference would not fit")
