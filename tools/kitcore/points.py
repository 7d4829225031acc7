"""Capture points of a Llama or Qwen3-MoE decoder: their names are part of the kit's output format.

Global points:
    embed_tokens        output of the token embedding                       [B, S, hidden]
    final_norm          output of the final RMSNorm                         [B, S, hidden]
    logits              output of lm_head                                   [B, S, vocab]
Per layer N, as `layers.N.<point>`, in execution order:
    input_layernorm             RMSNorm before attention                    [B, S, hidden]
    q_proj, k_proj, v_proj      projections                                 [B, S, heads * head_dim]
    q_norm, k_norm              Qwen3 only: the per-head RMSNorm of q and k [B, S, heads * head_dim]
    q_rope, k_rope              q and k after (q_norm/k_norm and) RoPE      [B, heads, S, head_dim]
    attn_out                    attention output before o_proj              [B, S, heads * head_dim]
    o_proj                      o_proj output                               [B, S, hidden]
    attn_residual               residual stream after attention             [B, S, hidden]
    post_attention_layernorm    RMSNorm before the MLP                      [B, S, hidden]
  a dense MLP (Llama; Qwen3-MoE's mlp_only_layers):
    gate_proj, up_proj          MLP projections                             [B, S, intermediate]
    act_mul                     act(gate_proj) * up_proj                    [B, S, intermediate]
    down_proj                   MLP output                                  [B, S, hidden]
  a sparse MoE block (Qwen3-MoE):
    router_logits               the router's logits                         [B, S, experts]
    experts_selected            each token's top-k experts, ids ascending   [B, S, k] (int64)
    routing_weights             the weight of each expert, 0 where unrouted [B, S, experts]
    expert_outputs              each selected expert's output on its token,
                                unweighted, in experts_selected's order     [B, S, k, hidden]
    moe_out                     the block's output (the weighted sum)       [B, S, hidden]
  then:
    output                      layer output (residual after the MLP)       [B, S, hidden]
"""

# the version of the points' names and layouts: cached reference captures of another version are not reused
POINTS_VERSION = 2

ATTENTION_POINTS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "q_rope", "k_rope", "attn_out", "o_proj",
                    "attn_residual", "post_attention_layernorm")
QK_NORM_POINTS = ("q_norm", "k_norm")
MLP_POINTS = ("gate_proj", "up_proj", "act_mul", "down_proj")
MOE_POINTS = ("router_logits", "experts_selected", "routing_weights", "expert_outputs", "moe_out")
# a Llama layer's points (the report's heat map draws these)
LAYER_POINTS = ATTENTION_POINTS + MLP_POINTS + ("output",)
# points whose tensors hold a token's values along dim 2 ([B, heads, S, D]); every other point along dim 1
HEADS_FIRST = ("q_rope", "k_rope")

# The inputs of each component, as names of other points of the same layer; `layer_input` is the
# previous layer's output (embed_tokens for layer 0). The dual test feeds the reference's tensors here.
COMPONENT_INPUTS = {
    "input_layernorm": ("layer_input",),
    "q_proj": ("input_layernorm",),
    "k_proj": ("input_layernorm",),
    "v_proj": ("input_layernorm",),
    "q_norm": ("q_proj",),
    "k_norm": ("k_proj",),
    "q_rope": ("q_proj",),  # ("q_norm",) where the layer has q_norm: see inputs_of
    "k_rope": ("k_proj",),
    "attn_out": ("q_rope", "k_rope", "v_proj"),
    "o_proj": ("attn_out",),
    "attn_residual": ("layer_input", "o_proj"),
    "post_attention_layernorm": ("attn_residual",),
    "gate_proj": ("post_attention_layernorm",),
    "up_proj": ("post_attention_layernorm",),
    "act_mul": ("gate_proj", "up_proj"),
    "down_proj": ("act_mul",),
    "router_logits": ("post_attention_layernorm",),
    "experts_selected": ("router_logits",),
    "routing_weights": ("router_logits",),
    "expert_outputs": ("post_attention_layernorm", "experts_selected"),
    "moe_out": ("post_attention_layernorm", "experts_selected", "routing_weights"),
    "output": ("attn_residual", "down_proj"),  # ("attn_residual", "moe_out") in a sparse layer
}


def _get(config, key, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def is_sparse(config, layer):
    """Whether `layer` holds a sparse MoE block (Qwen3-MoE's rule: not in mlp_only_layers, every
    decoder_sparse_step-th layer)."""
    if not _get(config, "num_experts") or layer in (_get(config, "mlp_only_layers") or ()):
        return False
    return (layer + 1) % (_get(config, "decoder_sparse_step") or 1) == 0


def layer_points(config, layer):
    """The points of `layer` in execution order; `config` a checkpoint's config (dict or transformers')."""
    attention = ATTENTION_POINTS
    if _get(config, "model_type") == "qwen3_moe":
        attention = attention[:4] + QK_NORM_POINTS + attention[4:]
    return attention + (MOE_POINTS if is_sparse(config, layer) else MLP_POINTS) + ("output",)


def point_order(config, layers=None):
    """(layer or None, point, full name) in execution order; `layers` (a range) limits it to those
    layers, with embed_tokens when the range starts at 0 and final_norm/logits when it ends the model."""
    num_layers = _get(config, "num_hidden_layers")
    layers = range(num_layers) if layers is None else layers
    order = [(None, "embed_tokens", "embed_tokens")] if layers.start == 0 else []
    for i in layers:
        order += [(i, p, f"layers.{i}.{p}") for p in layer_points(config, i)]
    if layers.stop >= num_layers:
        order += [(None, "final_norm", "final_norm"), (None, "logits", "logits")]
    return order


def inputs_of(config, layer, point):
    """The names of the points that feed `point` of `layer` (COMPONENT_INPUTS, adjusted for q/k norms and
    sparse layers)."""
    names = COMPONENT_INPUTS[point]
    points = layer_points(config, layer)
    if point in ("q_rope", "k_rope") and "q_norm" in points:
        names = (point[0] + "_norm",)
    if point == "output" and "moe_out" in points:
        names = ("attn_residual", "moe_out")
    return names


def component_inputs(captured, config, layer, point, input_ids):
    """The reference tensors that feed `point` of `layer`, keyed as run_component expects them."""
    num_layers = _get(config, "num_hidden_layers")
    if point == "embed_tokens":
        return {"input_ids": input_ids}
    if point == "final_norm":
        return {"last_layer_output": captured[f"layers.{num_layers - 1}.output"]}
    if point == "logits":
        return {"final_norm": captured["final_norm"]}
    layer_input = captured["embed_tokens"] if layer == 0 else captured[f"layers.{layer - 1}.output"]
    return {name: layer_input if name == "layer_input" else captured[f"layers.{layer}.{name}"]
            for name in inputs_of(config, layer, point)}
