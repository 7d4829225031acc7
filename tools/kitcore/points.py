"""Capture points of a Llama-style decoder: their names are part of the kit's output format.

Global points:
    embed_tokens        output of the token embedding                       [B, S, hidden]
    final_norm          output of the final RMSNorm                         [B, S, hidden]
    logits              output of lm_head                                   [B, S, vocab]
Per layer N, as `layers.N.<point>`, in execution order:
    input_layernorm             RMSNorm before attention                    [B, S, hidden]
    q_proj, k_proj, v_proj      projections                                 [B, S, heads * head_dim]
    q_rope, k_rope              q and k after (q_norm/k_norm and) RoPE      [B, heads, S, head_dim]
    attn_out                    attention output before o_proj              [B, S, heads * head_dim]
    o_proj                      o_proj output                               [B, S, hidden]
    attn_residual               residual stream after attention             [B, S, hidden]
    post_attention_layernorm    RMSNorm before the MLP                      [B, S, hidden]
    gate_proj, up_proj          MLP projections                             [B, S, intermediate]
    act_mul                     act(gate_proj) * up_proj                    [B, S, intermediate]
    down_proj                   MLP output                                  [B, S, hidden]
    output                      layer output (residual after the MLP)       [B, S, hidden]
"""

LAYER_POINTS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "q_rope", "k_rope", "attn_out", "o_proj",
                "attn_residual", "post_attention_layernorm", "gate_proj", "up_proj", "act_mul", "down_proj",
                "output")

# The inputs of each component, as names of other points of the same layer; `layer_input` is the
# previous layer's output (embed_tokens for layer 0). The dual test feeds the reference's tensors here.
COMPONENT_INPUTS = {
    "input_layernorm": ("layer_input",),
    "q_proj": ("input_layernorm",),
    "k_proj": ("input_layernorm",),
    "v_proj": ("input_layernorm",),
    "q_rope": ("q_proj",),
    "k_rope": ("k_proj",),
    "attn_out": ("q_rope", "k_rope", "v_proj"),
    "o_proj": ("attn_out",),
    "attn_residual": ("layer_input", "o_proj"),
    "post_attention_layernorm": ("attn_residual",),
    "gate_proj": ("post_attention_layernorm",),
    "up_proj": ("post_attention_layernorm",),
    "act_mul": ("gate_proj", "up_proj"),
    "down_proj": ("act_mul",),
    "output": ("attn_residual", "down_proj"),
}


def point_order(num_layers, layers=None):
    """(layer or None, point, full name) in execution order; `layers` (a range) limits it to those
    layers, with embed_tokens when the range starts at 0 and final_norm/logits when it ends the model."""
    layers = range(num_layers) if layers is None else layers
    order = [(None, "embed_tokens", "embed_tokens")] if layers.start == 0 else []
    for i in layers:
        order += [(i, p, f"layers.{i}.{p}") for p in LAYER_POINTS]
    if layers.stop >= num_layers:
        order += [(None, "final_norm", "final_norm"), (None, "logits", "logits")]
    return order


def component_inputs(captured, layer, point, num_layers, input_ids):
    """The reference tensors that feed `point` of `layer`, keyed as run_component expects them."""
    if point == "embed_tokens":
        return {"input_ids": input_ids}
    if point == "final_norm":
        return {"last_layer_output": captured[f"layers.{num_layers - 1}.output"]}
    if point == "logits":
        return {"final_norm": captured["final_norm"]}
    layer_input = captured["embed_tokens"] if layer == 0 else captured[f"layers.{layer - 1}.output"]
    return {name: layer_input if name == "layer_input" else captured[f"layers.{layer}.{name}"]
            for name in COMPONENT_INPUTS[point]}
