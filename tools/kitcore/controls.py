"""Negative controls at run time (`--controls`): what this check could have caught, here.

A PASS says that no gate tripped, not that a gate could have. The controls answer that on the run's own
model, dtype, device and inputs: the kit loads one more copy of the peer (HF Transformers in the
candidate's dtype on its device, from the reference checkpoint), plants one bug of a known shape in it
(in memory, undone after: never written to a checkpoint), runs it through the same call and judges it
with the same judge as the candidate (calibrated by the same peer, or the same static table). A control
that the judge passes is a bug this check cannot see here; it is reported, never held against the
candidate.

The bug shapes (`CONTROLS`), each in the middle layer unless it says otherwise:
  weight x (1 + e)     mlp.down_proj's weight scaled, e = 0.3%, 1%, 3%, 10% (a ladder: the smallest caught
                       is the check's resolution for a single-layer weight error)
  swapped KV heads     KV heads 0 and 1 exchanged in k_proj and v_proj (a head-mapping mistake)
  RoPE layout          q and k rows of every head reordered from half-split to interleaved pairs
  rms_norm_eps         every RMSNorm's epsilon x 100
  rope_theta           the rotary base of every layer halved
  attention scale      every layer's softmax scale x 1.03
  final-norm scale     the final RMSNorm's weight x 1.02
and, for a mixture-of-experts model (where the weight ladder scales the experts' down projections):
  routing not renormalised   the top-k routing weights left unnormalised (norm_topk_prob off)
  expert scaled              the down projection x 1.05 of the expert the inputs route most tokens to
  top-k off by one           each token routed to one expert fewer
Cost: one more model in memory and one more run of the check's call per control (10 controls; 13 for a
mixture-of-experts model).
Intermediate validation also says whether each caught control was located: its first divergence in the
layer of the bug (WHERE: the middle layer, layer 0 for a bug of every layer, the final norm).
"""

from dataclasses import dataclass

import torch

WEIGHT_LADDER = (0.003, 0.01, 0.03, 0.1)


@dataclass
class ControlResult:
    name: str
    shape: str  # the bug shape; the weight ladder's rungs share "weight"
    size: float  # the rung's e for the ladder, else 0
    caught: bool
    figure: str  # the figure that decided, one line
    located: bool = None  # intermediate validation: its first divergence in the layer of the bug (None: n/a)


# Where each shape's bug is (intermediate validation's first divergence should be there): the middle layer,
# layer 0 (a bug of every layer shows in the first) or the final norm.
WHERE = {"weight": "middle", "swapped KV heads": "middle", "RoPE layout": "middle", "rms_norm_eps": 0,
         "rope_theta": 0, "attention scale": 0, "final-norm scale": "final_norm", "routing not renormalised": "middle",
         "expert scaled": "middle", "top-k off by one": "middle"}


def expected_layer(shape, n_layers):
    """The layer index (or "final_norm") at which a control of `shape` should first diverge."""
    where = WHERE[shape]
    return n_layers // 2 if where == "middle" else where


def _middle(model):
    return model.model.layers[len(model.model.layers) // 2]


def _scale(tensor, factor):
    original = tensor.detach().clone()
    tensor.data.mul_(factor)
    return lambda: tensor.data.copy_(original)


def _down_proj(mlp):
    """The MLP's down projection: a dense MLP's weight, or a mixture-of-experts block's stacked experts'."""
    return mlp.down_proj.weight if hasattr(mlp, "down_proj") else mlp.experts.down_proj


def _weight(e):
    return lambda model, busiest_expert: _scale(_down_proj(_middle(model).mlp), 1 + e)


def _router(model):
    """The middle layer's top-k router (a mixture-of-experts model), or None."""
    gate = getattr(_middle(model).mlp, "gate", None)
    return gate if hasattr(gate, "top_k") else None


def _not_renormalised(model, busiest_expert):
    gate = _router(model)
    if gate is None or not gate.norm_topk_prob:
        return None
    gate.norm_topk_prob = False
    return lambda: setattr(gate, "norm_topk_prob", True)


def _expert_scaled(model, busiest_expert):
    if _router(model) is None or busiest_expert is None:
        return None
    experts = _middle(model).mlp.experts.down_proj
    original = experts.detach().clone()
    experts.data[busiest_expert].mul_(1.05)
    return lambda: experts.data.copy_(original)


def busiest_expert(engine, call):
    """The middle layer's expert that the check's own inputs route most tokens to (one call with the router
    watched), or None for a model without a top-k router: the expert the `expert scaled` control scales, since
    a bug in an expert that no token of the check reaches is invisible to any check (on one trained model the
    middle-numbered expert was such a one)."""
    gate = _router(engine.model)
    if gate is None:
        return None
    counts = []
    hook = gate.register_forward_hook(lambda module, args, out: counts.append(out[2].flatten().cpu()))
    try:
        call(engine)
    finally:
        hook.remove()
    return int(torch.bincount(torch.cat(counts)).argmax()) if counts else None


def _top_k_off_by_one(model, busiest_expert):
    gate = _router(model)
    if gate is None or gate.top_k < 2:
        return None
    gate.top_k -= 1
    return lambda: setattr(gate, "top_k", gate.top_k + 1)


def _swap_kv_heads(model, busiest_expert):
    attn, head_dim = _middle(model).self_attn, model.config.head_dim
    if model.config.num_key_value_heads < 2:
        return None
    saved = []
    for proj in (attn.k_proj, attn.v_proj):
        for p in [proj.weight] + ([proj.bias] if proj.bias is not None else []):
            original = p.detach().clone()
            p.data[:head_dim], p.data[head_dim:2 * head_dim] = original[head_dim:2 * head_dim], original[:head_dim]
            saved.append((p, original))
    return lambda: [p.data.copy_(o) for p, o in saved]


def _rope_layout(model, busiest_expert):
    attn, head_dim = _middle(model).self_attn, model.config.head_dim
    half = head_dim // 2
    # half-split rows [0..half, half..d] read as interleaved pairs: row 2i <- i, row 2i+1 <- half + i
    order = torch.stack([torch.arange(half), torch.arange(half) + half], 1).flatten()
    saved = []
    for proj in (attn.q_proj, attn.k_proj):
        for p in [proj.weight] + ([proj.bias] if proj.bias is not None else []):
            original = p.detach().clone()
            heads = original.reshape(-1, head_dim, *original.shape[1:])
            p.data.copy_(heads[:, order].reshape(original.shape))
            saved.append((p, original))
    return lambda: [p.data.copy_(o) for p, o in saved]


def _norm_eps(model, busiest_expert):
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    saved = [(m, m.variance_epsilon) for m in norms]
    for m in norms:
        m.variance_epsilon *= 100
    return lambda: [setattr(m, "variance_epsilon", eps) for m, eps in saved]


def _rope_theta(model, busiest_expert):
    rotary = model.model.rotary_emb
    original = rotary.inv_freq.detach().clone()
    head_dim = original.numel() * 2
    # inv_freq_i = base^(-2i/d): halving the base multiplies it by 2^(2i/d)
    rotary.inv_freq.data.mul_(2.0 ** (torch.arange(0, head_dim, 2, dtype=original.dtype,
                                                   device=original.device) / head_dim))
    return lambda: rotary.inv_freq.data.copy_(original)


def _attention_scale(model, busiest_expert):
    layers = [layer.self_attn for layer in model.model.layers]
    saved = [(a, a.scaling) for a in layers]
    for a in layers:
        a.scaling *= 1.03
    return lambda: [setattr(a, "scaling", s) for a, s in saved]


def _final_norm(model, busiest_expert):
    return _scale(model.model.norm.weight, 1.02)


CONTROLS = ([(f"weight x{1 + e:g} (layer middle, down_proj)", "weight", e, _weight(e)) for e in WEIGHT_LADDER]
            + [("swapped KV heads (middle layer)", "swapped KV heads", 0.0, _swap_kv_heads),
               ("RoPE layout interleaved (middle layer)", "RoPE layout", 0.0, _rope_layout),
               ("rms_norm_eps x100", "rms_norm_eps", 0.0, _norm_eps),
               ("rope_theta halved", "rope_theta", 0.0, _rope_theta),
               ("attention scale x1.03 (every layer)", "attention scale", 0.0, _attention_scale),
               ("final-norm weight x1.02", "final-norm scale", 0.0, _final_norm),
               ("routing weights not renormalised (middle layer)", "routing not renormalised", 0.0,
                _not_renormalised),
               ("one expert's down_proj x1.05 (middle layer, its busiest)", "expert scaled", 0.0, _expert_scaled),
               ("top-k one expert short (middle layer)", "top-k off by one", 0.0, _top_k_off_by_one)])


def each_control(model, busiest=None):
    """Yield (name, shape, size) of every control with its bug planted in `model`, undone after; a control
    the model has no place for (swapped KV heads with one KV head) is left out. `busiest`: busiest_expert()."""
    for name, shape, size, plant in CONTROLS:
        undo = plant(model, busiest)
        if undo is None:
            continue
        try:
            yield name, shape, size
        finally:
            undo()


@torch.no_grad()
def run_controls(engine, call, judge_output):
    """Every control on `engine` (an HFEngine, the peer's copy): `call(engine)` with the bug planted, then
    undone; `judge_output(output, shape)` -> (passed, one-line figure[, located]). Returns [ControlResult]."""
    results = []
    for name, shape, size in each_control(engine.model, busiest_expert(engine, call)):
        passed, figure, *located = judge_output(call(engine), shape)
        results.append(ControlResult(name, shape, size, not passed, figure, *located))
    return results


def sensitivity(results):
    """The one line under the verdict: the smallest caught rung of the weight ladder, the shapes caught, and
    what this check could not see."""
    ladder = [r for r in results if r.shape == "weight"]
    caught_rungs = [r.size for r in ladder if r.caught]
    shapes = [r for r in results if r.shape != "weight"]
    missed_rungs = [r.size for r in ladder if not r.caught]
    missed = ([f"single-layer weight errors of {', '.join(f'{e:.1%}' for e in missed_rungs)}"] if missed_rungs else [])
    missed += [r.shape for r in shapes if not r.caught]
    weight = (f"a single-layer weight error of {min(caught_rungs):.1%} or more" if caught_rungs
              else f"no single-layer weight error up to {max(r.size for r in ladder):.0%}")
    line = (f"sensitivity: this check would have caught {weight} and {sum(r.caught for r in shapes)} of "
            f"{len(shapes)} bug shapes")
    located = [r for r in results if r.caught and r.located is not None]
    if located:
        misplaced = [r.name for r in located if not r.located]
        line += (f"; located {len(located) - len(misplaced)} of the {len(located)} caught at their layer"
                 + (f" (not: {', '.join(misplaced)})" if misplaced else ""))
    return line + (f"; it could not see: {', '.join(missed)}" if missed else "")
