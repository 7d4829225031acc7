"""A Llama in plain torch behind the kit's engine protocol: forward() and a KV cache of its own.

An example for plugin authors, complete: it passes end-to-end and forward validation in float32, bfloat16 and
float16 (test/kit/test_readme.py runs it).

    python test/models/llama/test_llama_inference.py --engine test/models/llama/plain_llama_engine.py:PlainLlama
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class PlainLlama:
    padding_sides = ()  # one unpadded prompt at a time: batch validation does not apply

    def __init__(self, model_path, device, dtype, attn, **options):
        self.c = json.loads(Path(model_path, "config.json").read_text())
        self.dev, self.dtype = device.torch_device, dtype
        self.w = {k: v.to(self.dev, dtype) for k, v in load_file(Path(model_path, "model.safetensors")).items()}

    def new_cache(self):
        return []  # per layer (keys, values), [batch, kv_heads, positions, head_dim]

    def linear(self, x, name):  # q/k/v/o carry biases where the config says attention_bias (Qwen2)
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def norm(self, x, name):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.c["rms_norm_eps"])).to(self.dtype) * self.w[name]

    @torch.no_grad()
    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        c, w = self.c, self.w
        nq, nkv = c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or c["hidden_size"] // nq
        x = w["model.embed_tokens.weight"][input_ids.to(self.dev)]
        b, s, _ = x.shape
        theta = c.get("rope_theta") or c.get("rope_parameters", {}).get("rope_theta", 10000.0)
        inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, device=self.dev).float() / hd)
        angles = position_ids.to(self.dev)[..., None].float() * inv_freq
        cos, sin = (f(torch.cat([angles, angles], -1))[:, None].to(self.dtype) for f in (torch.cos, torch.sin))

        def rope(t):
            t1, t2 = t.chunk(2, -1)
            return t * cos + torch.cat([-t2, t1], -1) * sin

        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            h = self.norm(x, p + "input_layernorm.weight")
            q, k, v = (self.linear(h, f"{p}self_attn.{n}_proj").view(b, s, -1, hd).transpose(1, 2) for n in "qkv")
            q, k = rope(q), rope(k)
            if cache is not None:
                if i < len(cache):
                    k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
                    cache[i] = (k, v)
                else:
                    cache.append((k, v))
            a = F.scaled_dot_product_attention(q, k.repeat_interleave(nq // nkv, 1), v.repeat_interleave(nq // nkv, 1),
                                               is_causal=s > 1)
            x = x + self.linear(a.transpose(1, 2).reshape(b, s, -1), p + "self_attn.o_proj")
            h = self.norm(x, p + "post_attention_layernorm.weight")
            mlp = p + "mlp."
            x = x + self.linear(F.silu(self.linear(h, mlp + "gate_proj")) * self.linear(h, mlp + "up_proj"), mlp + "down_proj")
        return self.norm(x, "model.norm.weight") @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T
