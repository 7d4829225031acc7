"""One Qwen3-MoE layer's attention or sparse MoE block, loaded strictly, and the module engines.

Module engine protocol (`--engine` of attention_test.py and moe_test.py; documented here only):
    build_attention(config, weights, device, dtype, attn) -> module
        module(hidden_states [B, S, H], (cos, sin), attention_mask, cache) -> [B, S, H] or (out, ...)
        cos/sin come from HF's rotary embedding; attention_mask is [B, 1, S, past + S], bool (True =
        attend) for sdpa-style attention and additive float for `eager`; cache is a transformers
        DynamicCache holding the past K/V of layer 0, which the module appends to.
    build_moe(config, weights, device, dtype, experts) -> module
        module(hidden_states [B, S, H]) -> [B, S, H] or (out, router_logits); an optional `.gate` router,
        gate(x [T, H]) -> logits [T, E] or a tuple starting with them (HF 5.x: logits, weights, indices),
        enables the router check.
    `config` is the checkpoint's transformers config (num_hidden_layers forced to 1: the module is
    layer 0 of a one-layer model); `weights` are the layer's tensors as on disk, prefix stripped
    (`q_proj.weight`, `experts.3.gate_proj.weight` ...). The built-in `hf` engine is `HFModules`;
    plugins subclass it (see test/kit/faulty_engines.py). A module that launches its work on streams
    of its own sets `own_streams = True`: the timer then synchronises the whole device around each call
    instead of recording events on the current stream, which would miss that work.
"""

import copy
from dataclasses import dataclass

import torch

from .engines import causal_mask
from .errors import UsageError
from .judges import DECISIVE_SIGMAS, PEER_K_MAX, is_admissible, judge_tensor, rounding_floor
from .protocol import resolve_class


def load_config(checkpoint, layer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(checkpoint.path), trust_remote_code=False)
    layers = config.num_hidden_layers
    if not 0 <= layer < layers:
        raise UsageError(f"--layer {layer}: the model has {layers} layers (0..{layers - 1})")
    config.num_hidden_layers = 1
    return config


def layer_weights(checkpoint, layer, part):
    """The tensors of `model.layers.<layer>.<part>.` from every shard, prefix stripped."""
    prefix = f"model.layers.{layer}.{part}."
    names = [n for n in checkpoint.tensors if n.startswith(prefix)]
    if not names:
        raise UsageError(f"{checkpoint.path}: no weights under {prefix}; is --layer right?")
    return {n[len(prefix):]: t for n, t in checkpoint.load_tensors(names).items()}


def moe_weights(checkpoint, layer):
    weights = layer_weights(checkpoint, layer, "mlp")
    if "gate.weight" not in weights:
        raise UsageError(f"{checkpoint.path}: layer {layer} has no sparse MoE block (a dense MLP layer: "
                         "mlp_only_layers or decoder_sparse_step); choose another --layer")
    return weights


def _fuse_experts(weights, num_experts):
    """Per-expert tensors (as on disk) -> transformers 5.x fused layout: gate_up_proj [E, 2I, H] (gate
    first, then up) and down_proj [E, H, I]."""
    fused = {k: v for k, v in weights.items() if not k.startswith("experts.")}
    gate_up, down = [], []
    for e in range(num_experts):
        try:
            gate_up.append(torch.cat([weights[f"experts.{e}.gate_proj.weight"], weights[f"experts.{e}.up_proj.weight"]]))
            down.append(weights[f"experts.{e}.down_proj.weight"])
        except KeyError as exc:
            raise UsageError(f"checkpoint lacks weight mlp.{exc.args[0]} of expert {e}") from None
    known = {f"experts.{e}.{p}.weight" for e in range(num_experts) for p in ("gate_proj", "up_proj", "down_proj")}
    extra = sorted(k for k in weights if k.startswith("experts.") and k not in known)
    if extra:
        raise UsageError(f"checkpoint has unexpected weight mlp.{extra[0]} (the config has {num_experts} experts)")
    fused["experts.gate_up_proj"] = torch.stack(gate_up)
    fused["experts.down_proj"] = torch.stack(down)
    return fused


def load_strict(module, weights, what, prefix):
    """load_state_dict(strict=True), with the first missing or unexpected weight (`prefix` + name) named."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(weights))
    unexpected = sorted(set(weights) - expected)
    if missing:
        raise UsageError(f"{what}: checkpoint lacks weight {prefix}{missing[0]}"
                         + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise UsageError(f"{what}: checkpoint has unexpected weight {prefix}{unexpected[0]}"
                         + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, v in weights.items():
        if tuple(v.shape) != tuple(module.state_dict()[k].shape):
            raise UsageError(f"{what}: weight {prefix}{k} has shape {list(v.shape)}, the config expects "
                             f"{list(module.state_dict()[k].shape)}")
    module.load_state_dict(weights, strict=True)
    return module


class HFModules:
    """HuggingFace Transformers' Qwen3MoeAttention and Qwen3MoeSparseMoeBlock."""

    name = "hf"

    def build_attention(self, config, weights, device, dtype, attn):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention

        config = copy.deepcopy(config)  # each module keeps its own implementation choice
        config._attn_implementation = attn
        module = Qwen3MoeAttention(config, layer_idx=0)
        return load_strict(module, weights, "attention", "self_attn.").to(device.torch_device, dtype).eval()

    def build_moe(self, config, weights, device, dtype, experts):
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        config = copy.deepcopy(config)
        config._experts_implementation = experts
        module = Qwen3MoeSparseMoeBlock(config)
        if "experts.gate_up_proj" in module.state_dict():  # transformers 5.x keeps experts fused
            weights = _fuse_experts(weights, config.num_experts)
        elif experts != "eager":  # 4.57 has only its loop over experts: never label it as another one
            import transformers

            raise UsageError(f"--experts {experts}: transformers {transformers.__version__} has only the eager "
                             "experts loop; use --experts eager (or transformers >= 5)")
        return load_strict(module, weights, "MoE block", "mlp.").to(device.torch_device, dtype).eval()


class CompiledModules(HFModules):
    """The HF modules through torch.compile (dynamic shapes)."""

    name = "compile"

    def build_attention(self, config, weights, device, dtype, attn):
        return _compiled(super().build_attention(config, weights, device, dtype, attn))

    def build_moe(self, config, weights, device, dtype, experts):
        return _compiled(super().build_moe(config, weights, device, dtype, experts))


def _compiled(module):
    return torch.compile(module, dynamic=True)  # attributes such as .gate still reach the module


BUILTIN_MODULES = {"hf": HFModules, "compile": CompiledModules}


def module_engine(spec, required):
    return resolve_class(spec, BUILTIN_MODULES, required, "tools/kitcore/qwen3_moe.py")()


def attention_mask(batch_valid, q_len, dtype, attn, device):
    """[B, 1, q, kv] mask: causal with the past offset, and `batch_valid` [B, kv] (False = left padding)."""
    kv_len = batch_valid.shape[1]
    allowed = causal_mask(q_len, kv_len, dtype, additive=False, device=device) & batch_valid[:, None, None, :].to(device)
    if attn != "eager":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def moe_with_experts(weights, config, x, expert_sets):
    """The sparse MoE block in float64 on the CPU, with each token's experts given: x [T, H], expert_sets
    [T, k]. Router weights are the softmax over every expert's logit, taken at the given set and
    renormalised over it when config.norm_topk_prob (as Qwen3-MoE does). Used to recompute the
    reference for a near-tie token under each expert set the rounding may legitimately choose."""
    x = x.to(torch.float64)
    w = {k: v.to(torch.float64) for k, v in weights.items()}
    probs = (x @ w["gate.weight"].T).softmax(-1)
    chosen = probs.gather(-1, expert_sets)
    if getattr(config, "norm_topk_prob", True):
        chosen = chosen / chosen.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for slot in range(expert_sets.shape[1]):
        for e in expert_sets[:, slot].unique().tolist():
            rows = expert_sets[:, slot] == e
            h = x[rows]
            gate, up = h @ w[f"experts.{e}.gate_proj.weight"].T, h @ w[f"experts.{e}.up_proj.weight"].T
            act = torch.nn.functional.silu(gate) * up
            out[rows] += chosen[rows, slot:slot + 1] * (act @ w[f"experts.{e}.down_proj.weight"].T)
    return out


def admissible_sets(ref_logits, top_k, margin, max_boundary=6):
    """For each token, the expert sets a correct engine may choose: experts whose router logit lies
    within 2 x margin of the k-th/(k+1)-th boundary may swap places. Returns a list (one per token) of
    [n_sets, k] tensors, the reference's own set first; decisive tokens have one set. The enumeration takes
    the `max_boundary` highest experts of the band (is_admissible judges any set, however wide the band)."""
    import itertools

    order = ref_logits.sort(-1, descending=True)
    out = []
    for t in range(ref_logits.shape[0]):
        values, experts = order.values[t], order.indices[t]
        low, high = values[top_k] - 2 * margin[t], values[top_k - 1] + 2 * margin[t]
        sure = experts[values > high].tolist()
        boundary = [e for v, e in zip(values.tolist(), experts.tolist()) if low <= v <= high][:max_boundary]
        ref_set = sorted(experts[:top_k].tolist())
        sets = [ref_set]
        near_tie = values[top_k - 1] - values[top_k] <= 2 * margin[t]
        if near_tie and len(sure) < top_k <= len(sure) + len(boundary):
            for extra in itertools.combinations(boundary, top_k - len(sure)):
                candidate = sorted(sure + list(extra))
                if candidate != ref_set:
                    sets.append(candidate)
        out.append(torch.tensor(sets, dtype=torch.long))
    return out


@dataclass(frozen=True)
class MoEBlockCheck:
    """The sparse MoE block's verdict on every token (check_moe_block)."""

    passed: bool
    output: object  # the output's Comparison, judged by the table or calibrated by the peer
    near_ties: int  # tokens a correct engine's rounding may route to another admissible set
    rerouted: int  # near-tie tokens whose output matched another admissible set than the reference's
    peer_rerouted: int = None  # the same for the peer, when calibrated
    router_logits: object = None  # with a candidate router: its logits' Comparison
    set_mismatches: int = None  # tokens whose expert set is not admissible (a failure)
    match_all: float = None  # fraction of tokens with exactly the reference's expert set


def check_moe_block(out, ref_out, x, weights, config, ref_logits, judge, peer_out=None, peer_logits=None,
                    cand_logits=None):
    """The sparse MoE block's verdict on every token, against the float32 reference (a MoEBlockCheck).

    A token is a near-tie when the reference's k-th/(k+1)-th router-logit gap is within twice what a
    correct engine's router error may be there (k x the peer's error + one rounding; without a peer, the
    table's): rounding may then route it to another set, so its output must match the reference
    recomputed with one of its admissible expert sets (moe_with_experts). Every other token must match
    the reference itself. The output is judged by `judge` (calibrated by the peer's output, near-ties
    resolved the same way for the peer); with a candidate router (`cand_logits`), its logits too, and
    its expert set must be the reference's on every decisive token and an admissible one on every other.
    Near-ties come from the reference and the peer only, so their share is bounded by the peer's error.
    """
    from .compare import OWN_TOLERANCES

    top_k = config.num_experts_per_tok
    tokens = ref_logits.shape[0]
    f = rounding_floor(judge.dtype)
    calibrated = judge.calibrated and peer_out is not None
    # the router-logit error a correct engine may have on a token: the peer's largest there (calibrated), or
    # DECISIVE_SIGMAS x the RMS error the own-error table allows (the router is one component), plus the floor
    if calibrated:
        margin = PEER_K_MAX * (peer_logits - ref_logits).abs().max(-1).values
    else:
        margin = DECISIVE_SIGMAS * OWN_TOLERANCES[judge.dtype].nmse**0.5 * ref_logits.pow(2).mean(-1).sqrt()
    margin = margin + 2 * f * ref_logits.abs().max(-1).values
    sets = admissible_sets(ref_logits, top_k, margin)
    # the candidate's and the peer's own sets where admissible, beside the enumerated ones (which take the band's
    # highest experts only: with 128 experts a band can hold more)
    chosen = {name: logits.topk(top_k, -1).indices.sort(-1).values
              for name, logits in (("candidate", cand_logits), ("peer", peer_logits)) if logits is not None}
    for expert_sets in chosen.values():
        for t in is_admissible(expert_sets, ref_logits, top_k, margin).nonzero().flatten().tolist():
            if not (sets[t] == expert_sets[t]).all(-1).any():
                sets[t] = torch.cat([sets[t], expert_sets[t:t + 1]])
    near = [t for t, s in enumerate(sets) if len(s) > 1]
    ref2d = ref_out.reshape(tokens, -1).double()
    alternatives = {}  # token -> [n_sets, H] reference outputs, the reference's own set first
    if near:
        flat_tokens = torch.tensor([t for t in near for _ in sets[t][1:]])
        flat_sets = torch.cat([sets[t][1:] for t in near])
        recomputed = moe_with_experts(weights, config, x.reshape(tokens, -1)[flat_tokens], flat_sets)
        at = 0
        for t in near:
            n = len(sets[t]) - 1
            alternatives[t] = torch.cat([ref2d[t:t + 1], recomputed[at:at + n]])
            at += n

    def resolve(output):
        """The reference with each near-tie row replaced by its admissible output closest to `output`."""
        out2d = output.reshape(tokens, -1).double()
        adjusted, rerouted = ref2d.clone(), 0
        for t, options in alternatives.items():
            best = int((options - out2d[t]).pow(2).sum(-1).argmin())
            adjusted[t] = options[best]
            rerouted += best != 0
        return out2d, adjusted, rerouted

    cand2d, cand_ref, cand_rerouted = resolve(out)
    peer2d, peer_ref, peer_rerouted = resolve(peer_out) if calibrated else (None, None, None)
    output = judge_tensor(cand2d, cand_ref, judge, peer2d, "output", peer_reference=peer_ref)
    if cand_logits is None:
        return MoEBlockCheck(output.passed, output, len(near), cand_rerouted, peer_rerouted)
    logits = judge_tensor(cand_logits, ref_logits, judge, peer_logits if calibrated else None, "router logits")
    reference_sets = torch.stack([options[0] for options in sets])
    mismatches = int((~is_admissible(chosen["candidate"], ref_logits, top_k, margin)).sum())
    return MoEBlockCheck(output.passed and logits.passed and mismatches == 0, output, len(near), cand_rerouted,
                         peer_rerouted, logits, mismatches,
                         float((chosen["candidate"] == reference_sets).all(-1).double().mean()))


def text_hidden_states(checkpoint, layer, tokens, part):
    """[1, tokens, H]: the input of layer `layer`'s `part` ("self_attn": the attention, after its norm; "mlp":
    the MoE block) when the model reads real text (standard-library docstrings, kitcore.inputs; float32, CPU;
    only the layers up to `layer` are loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import inputs

    ids = inputs.text_stream(inputs.tokenizer(checkpoint.path, "use --inputs random"), tokens)
    config = AutoConfig.from_pretrained(str(checkpoint.path))
    config.num_hidden_layers = layer + 1
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint.path), config=config, dtype=torch.float32,
                                                 use_safetensors=True).eval()
    captured = {}

    def keep(module, args, kwargs):
        captured.setdefault("x", kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

    hook = getattr(model.model.layers[layer], part).register_forward_pre_hook(keep, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    hook.remove()
    return captured["x"].detach()


def first_output(out):
    """Modules return a tensor, or a tuple whose first element is the output (4.57 MoE, attention)."""
    return out[0] if isinstance(out, tuple) else out
