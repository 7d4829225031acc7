"""Engine plugins with injected faults, loaded with `--engine test/kit/faulty_engines.py:<Class>`.

They subclass the built-in hf engine and change one thing, which is also how a real plugin is written.
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from kitcore.engines import HFEngine  # noqa: E402
from kitcore.formats import FormatEngine  # noqa: E402
from kitcore.parallel import TensorParallelHFEngine  # noqa: E402
from kitcore.llamacpp import LlamaCppEngine  # noqa: E402
from kitcore.qwen3_moe import HFModules  # noqa: E402


class DropOldestCacheEngine(HFEngine):
    """A KV cache that drops its oldest entry on every decode step."""

    name = "drop-oldest-cache"

    def new_cache(self):
        from transformers import DynamicCache

        class DropOldestCache(DynamicCache):
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
                if key_states.shape[-2] == 1 and keys.shape[-2] > 1:
                    layer = self.layers[layer_idx]
                    layer.keys, layer.values = keys[:, :, 1:], values[:, :, 1:]
                    return layer.keys, layer.values
                return keys, values

        return DropOldestCache(config=self.config)


def _gqa_off_by_one_attention(module, query, key, value, attention_mask, **kwargs):
    """sdpa, but query head h reads KV head (h // groups + 1) % kv_heads instead of h // groups."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key.roll(-1, dims=1), value.roll(-1, dims=1), attention_mask,
                                  **kwargs)


class GQAOffByOneEngine(HFEngine):
    """Grouped-query attention that maps query heads to the wrong KV head."""

    name = "gqa-off-by-one"

    def __init__(self, model_path, device, dtype, attn="sdpa"):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        super().__init__(model_path, device, dtype, "sdpa")
        AttentionInterface.register("kit_gqa_off_by_one", _gqa_off_by_one_attention)
        AttentionMaskInterface.register("kit_gqa_off_by_one", sdpa_mask)
        self.model.config._attn_implementation = "kit_gqa_off_by_one"


class DroppedBiasEngine(HFEngine):
    """Layer 1's o_proj without its bias (a fused kernel that takes none)."""

    def __init__(self, model_path, device, dtype, attn="sdpa"):
        super().__init__(model_path, device, dtype, attn)
        module = self.model.model.layers[1].self_attn.o_proj
        module.forward = lambda x: torch.nn.functional.linear(x, module.weight)


class RecomputingEngine:
    """A correct engine whose KV cache the kit cannot reach (a third-party runtime that takes whole prompts):
    its "cache" is the tokens so far, and every forward recomputes the prefix. It says so."""

    recomputes_prefix = True

    def __init__(self, model_path, device, dtype, attn, **options):
        self.inner, self.dtype = HFEngine(model_path, device, dtype, attn), dtype

    def new_cache(self):
        return {"ids": None, "positions": None}

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        if cache is None:
            return self.inner.forward(input_ids, position_ids, attention_mask)
        seen = [t for t in (cache["ids"], input_ids) if t is not None]
        cache["ids"] = torch.cat(seen, 1)
        cache["positions"] = torch.cat([t for t in (cache["positions"], position_ids) if t is not None], 1)
        logits = self.inner.forward(cache["ids"], cache["positions"], attention_mask)
        return logits[:, -input_ids.shape[1]:]


class NoCaptureEngine(HFEngine):
    """A plugin with only the required methods: forward with a KV cache."""

    name = "forward-only"
    capabilities = frozenset({"new_cache"})


class ChunkedCaptureEngine(HFEngine):
    """A plugin with capture() but not capture_layers(): the kit captures it in chunks of layers."""

    name = "chunked-capture"
    capabilities = HFEngine.capabilities - {"capture_layers"}


class LayerOutputsOnlyEngine(HFEngine):
    """An engine that hands out its residual stream only: each layer's output, the final norm and the logits (and
    runs no component alone): intermediate validation compares those and says what it could not see."""

    name = "layer-outputs-only"
    capabilities = frozenset({"new_cache", "capture", "capture_layers"})
    captured_points = ("embed_tokens", "output", "final_norm", "logits")

    def capture_layers(self, input_ids, position_ids):
        for layer in super().capture_layers(input_ids, position_ids):
            yield {k: v for k, v in layer.items() if k.rsplit(".", 1)[-1] in self.captured_points}


class StopsAfterFirstLayerEngine(HFEngine):
    """Its capture_layers() hands over layer 0 and then ends, as a forward that stops early would."""

    name = "stops-after-first-layer"

    def capture_layers(self, input_ids, position_ids):
        layers = super().capture_layers(input_ids, position_ids)
        yield next(layers)
        layers.close()


class NaNEngine(HFEngine):
    """Returns NaN logits at one position."""

    name = "nan"

    @torch.no_grad()
    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        logits = super().forward(input_ids, position_ids, attention_mask, cache).clone()
        logits[:, -1, 0] = float("nan")
        return logits


# ---- Qwen3-MoE module engines (attention_test.py / moe_test.py) ------------------------------------

class _AttentionWrapper(torch.nn.Module):
    def __init__(self, inner, swap_cos_sin=False, drop_mask=False):
        super().__init__()
        self.inner, self.swap_cos_sin, self.drop_mask = inner, swap_cos_sin, drop_mask

    def forward(self, hidden_states, position_embeddings, attention_mask, cache):
        cos, sin = position_embeddings
        return self.inner(hidden_states, (sin, cos) if self.swap_cos_sin else (cos, sin),
                          None if self.drop_mask else attention_mask, cache)


class SwappedCosSinModules(HFModules):
    """Passes position embeddings as (sin, cos), the originals' bug."""

    def build_attention(self, config, weights, device, dtype, attn):
        return _AttentionWrapper(super().build_attention(config, weights, device, dtype, attn), swap_cos_sin=True)


class NoMaskModules(HFModules):
    """Calls attention without a mask, the originals' bug (wrong for a prefill on top of a cache)."""

    def build_attention(self, config, weights, device, dtype, attn):
        return _AttentionWrapper(super().build_attention(config, weights, device, dtype, attn), drop_mask=True)


class PermutedExpertModules(HFModules):
    """Loads expert 0's weights into expert 1 and vice versa."""

    def build_moe(self, config, weights, device, dtype, experts):
        swapped = dict(weights)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            a, b = f"experts.0.{proj}.weight", f"experts.1.{proj}.weight"
            swapped[a], swapped[b] = weights[b], weights[a]
        return super().build_moe(config, swapped, device, dtype, experts)


class UnpermutedLlamaCpp(LlamaCppEngine):
    """llama.cpp on a GGUF written without the q/k row permutation that its interleaved RoPE needs."""

    def __init__(self, model_path, device, dtype, attn="sdpa", **options):
        super().__init__(model_path, device, dtype, attn, permute_qk=False, **options)


class FlipInsideToleranceEngine(HFEngine):
    """Swaps the top-1 and top-2 logits wherever they are less than GAP apart: every logit stays inside
    the (bfloat16 table's) element tolerance, but the predicted token changes at positions the reference
    decides clearly."""

    name = "flip-inside-tolerance"
    GAP = 4.0

    @torch.no_grad()
    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        logits = super().forward(input_ids, position_ids, attention_mask, cache).clone()
        top2 = logits.topk(2, dim=-1)
        close = (top2.values[..., 0] - top2.values[..., 1]) < self.GAP
        first, second = top2.indices[..., 0:1], top2.indices[..., 1:2]
        swapped = logits.scatter(-1, first, top2.values[..., 1:2]).scatter(-1, second, top2.values[..., 0:1])
        return torch.where(close[..., None], swapped, logits)


class UnnormalisedRoutingModules(HFModules):
    """Routing weights not renormalised over the chosen experts (norm_topk_prob ignored)."""

    def build_moe(self, config, weights, device, dtype, experts):
        config = copy.deepcopy(config)
        config.norm_topk_prob = False
        return super().build_moe(config, weights, device, dtype, experts)


class _NoGate(torch.nn.Module):
    """Hides the block's router: the kit sees only outputs, as with a fused engine kernel."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden_states):
        return self.block(hidden_states)


class SwappedRouterModules(HFModules):
    """A router that sends expert 0's tokens to expert 1 and back."""

    def build_moe(self, config, weights, device, dtype, experts):
        swapped = dict(weights)
        rows = weights["gate.weight"].clone()
        rows[[0, 1]] = rows[[1, 0]]
        swapped["gate.weight"] = rows
        return super().build_moe(config, swapped, device, dtype, experts)


class NoGateSwappedRouterModules(SwappedRouterModules):
    """The same router fault in a module without `.gate`."""

    def build_moe(self, config, weights, device, dtype, experts):
        return _NoGate(super().build_moe(config, weights, device, dtype, experts))


class KeepEveryCacheEngine(HFEngine):
    """Correct outputs, but it keeps every KV cache it makes and every logits tensor it returns (a leak)."""

    name = "keep-every-cache"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept = []

    def new_cache(self):
        cache = super().new_cache()
        self.kept.append(cache)
        return cache

    def forward(self, *args, **kwargs):
        logits = super().forward(*args, **kwargs)
        self.kept.append(logits)
        return logits


class MaskIgnoringEngine(HFEngine):
    """Ignores the attention mask and counts positions from the first column, padding included."""

    name = "mask-ignoring"

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        past = 0 if cache is None else cache.get_seq_length()
        columns = past + torch.arange(input_ids.shape[1])
        return super().forward(input_ids, columns.expand_as(position_ids), None, cache)


class RowZeroPositionsEngine(HFEngine):
    """Gives every row of a batch the position ids of row 0."""

    name = "row-zero-positions"

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        return super().forward(input_ids, position_ids[:1].expand_as(position_ids), attention_mask, cache)


class DecodeOtherRowLengthEngine(HFEngine):
    """Prefill is right; in decode, each row reads the next row's cache length (its positions and mask)."""

    name = "decode-other-row-length"

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        if cache is not None and cache.get_seq_length() > 0 and input_ids.shape[0] > 1:
            position_ids = position_ids.roll(-1, 0)
            attention_mask = None if attention_mask is None else attention_mask.roll(-1, 0)
        return super().forward(input_ids, position_ids, attention_mask, cache)


class SecondChoiceAtStep2(HFEngine):
    """Decodes by itself (generate(), like a server) and takes its second choice at decode step 2."""

    name = "second-choice-at-step-2"
    capabilities = frozenset({"generate"})

    @torch.no_grad()
    def generate(self, input_ids, position_ids, attention_mask, steps):
        ids, tokens, logits = input_ids, [], []
        for step in range(steps + 1):
            last = self.forward(ids, torch.arange(ids.shape[1])[None].expand_as(ids))[:, -1].cpu()
            logits.append(last)
            tokens.append(last.topk(2).indices[:, 1 if step == 2 else 0])
            ids = torch.cat([ids, tokens[-1][:, None]], 1)
        return torch.stack(tokens[:steps], 1), torch.stack(logits, 1)


class SegfaultEngine(HFEngine):
    """A native engine's crash: its forward dies of SIGSEGV (reads address 0), taking its process with it."""

    name = "segfault"

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        import ctypes

        ctypes.string_at(0)


class OwnErrorOnlyEngine(HFEngine):
    """An engine like InfiniLM: no per-layer activations (no capture()), its components runnable one at a time
    (run_component()) and its final hidden states (final_hidden()): intermediate validation's dual test alone."""

    name = "own-error-only"
    capabilities = frozenset({"new_cache", "run_component", "final_hidden"})

    def final_hidden(self, input_ids, position_ids):
        return self.capture(input_ids, position_ids)["final_norm"]


class PositiveMaxRouterModules(HFModules):
    """A top-k whose running maximum starts at 0 (the bug class of vllm-project/vllm #37605): a token whose
    router logits are all negative gets experts 0..k-1 with equal weights. Its router logits are right."""

    def build_moe(self, config, weights, device, dtype, experts):
        block = super().build_moe(config, weights, device, dtype, experts)
        gate, route = block.gate, block.gate.forward

        def forward(hidden_states):
            logits, scores, indices = route(hidden_states)
            lost = (logits.max(-1).values <= 0)[:, None]
            first = torch.arange(indices.shape[-1], device=indices.device).expand_as(indices)
            return (logits, torch.where(lost, torch.full_like(scores, 1.0 / indices.shape[-1]), scores),
                    torch.where(lost, first, indices))

        gate.forward = forward
        return block


class ScaledExpertModules(HFModules):
    """One expert's (expert 3's) down projection 5% too large: a per-expert scale applied twice or missed."""

    def build_moe(self, config, weights, device, dtype, experts):
        scaled = dict(weights)
        scaled["experts.3.down_proj.weight"] = weights["experts.3.down_proj.weight"] * 1.05
        return super().build_moe(config, scaled, device, dtype, experts)


class SilentEagerEngine(HFEngine):
    """Asked for sdpa, it quietly runs eager attention (a fallback that must not pass under sdpa's name)."""

    def __init__(self, model_path, device, dtype, attn="sdpa", device_map=None):
        super().__init__(model_path, device, dtype, attn, device_map)
        self.model.config._attn_implementation = "eager"


class DuplicateBOSEngine(HFEngine):
    """Renders the chat template to text and tokenises that text as a plain prompt, adding a BOS in front of
    the one the template already wrote (vLLM #16853)."""

    def tokenize(self, text=None, messages=None):
        if messages is None:
            return super().tokenize(text=text)
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return [self.tokenizer.bos_token_id] + list(self.tokenizer(rendered).input_ids)


class _NoisyCacheEngine(HFEngine):
    """A stand-in for a quantised KV cache (judged as llama.cpp's q8_0 cache is): every K/V entry the cache
    stores gets a deterministic relative error `noise(position)`; its no-cache forward stays exact."""

    format = "kv-q8_0"

    def noise(self, position):
        raise NotImplementedError

    def new_cache(self):
        from transformers import DynamicCache

        engine = self

        class NoisyCache(DynamicCache):
            def update(self, key_states, value_states, layer_idx, *args, **kwargs):
                start = self.get_seq_length(layer_idx)
                scale = torch.tensor([engine.noise(start + i) for i in range(key_states.shape[-2])],
                                     dtype=key_states.dtype, device=key_states.device)[:, None]
                g = torch.Generator().manual_seed(1000 * layer_idx + start)
                jitter = torch.randn(key_states.shape, generator=g).to(key_states.device, key_states.dtype)
                return super().update(key_states * (1 + scale * jitter), value_states * (1 + scale * jitter),
                                      layer_idx, *args, **kwargs)

        return NoisyCache(config=self.config)


class FlatCacheErrorEngine(_NoisyCacheEngine):
    """The same small rounding error at every cache position: a quantised cache that holds up with length."""

    def noise(self, position):
        return 0.01


class GrowingCacheErrorEngine(_NoisyCacheEngine):
    """A cache whose error grows with its length past 80 entries, to 25% from entry 85 on (an FP8 cache whose
    scale stops fitting as the decode goes on, NVIDIA/TensorRT-LLM #16916): exact at first. Sized so that on
    every trained tiny Llama measured (seeds 0-2, trained with AVX-512's and AVX2's own kernels) the last
    quarter of a 64-step decode is 1.9-3.4x above the kv-q8_0 length gate while every step stays CLOSE and
    every all-steps gate passes (tools/measurements.md)."""

    def noise(self, position):
        return min(0.25, 0.05 * max(0, position - 80))


class ChunkedPrefillEngine(HFEngine):
    """Prefills through its cache in chunks of 8 tokens (the last one short), as a serving engine's chunked
    prefill does; its baseline is the plain engine, which prefills the whole prompt at once."""

    CHUNK = 8
    capabilities = HFEngine.capabilities | {"baseline"}

    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        if cache is None or input_ids.shape[1] <= self.CHUNK:
            return super().forward(input_ids, position_ids, attention_mask, cache)
        past, out = cache.get_seq_length(), []
        for start in range(0, input_ids.shape[1], self.CHUNK):
            end = min(start + self.CHUNK, input_ids.shape[1])
            self.boundary(cache, start)
            mask = None if attention_mask is None else attention_mask[:, :past + end]
            out.append(super().forward(input_ids[:, start:end], position_ids[:, start:end], mask, cache))
        return torch.cat(out, 1)

    def boundary(self, cache, start):
        """Between two chunks (start > 0): nothing to do for a correct chunked prefill."""

    def baseline(self):
        return HFEngine(self.model_path, self.device, self.dtype, self.attn)


class ChunkBoundaryOffByOneEngine(ChunkedPrefillEngine):
    """A chunked prefill whose next chunk does not see the previous chunk's last token: the cache loses its
    newest entry at every chunk boundary (the positions go on), an off-by-one in the chunk's KV range."""

    def boundary(self, cache, start):
        if start > 0:
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, :-1], layer.values[:, :, :-1]


class PrefixCachingEngine(HFEngine):
    """Decodes by itself (generate()) through a prefix cache of 16-token blocks, as vLLM does: a request reuses
    the KV of the longest run of full blocks it shares with an earlier request's prompt, and reports its hits
    (`cached_tokens`); reset_prefix_cache() empties it."""

    BLOCK = 16
    capabilities = frozenset({"generate", "reset_prefix_cache", "attest"})

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stored, self.cached_tokens = [], []

    def attest(self):
        return {**super().attest(), "block_size": str(self.BLOCK), "enable_prefix_caching": "true"}

    def reset_prefix_cache(self):
        self.stored = []

    @staticmethod
    def common(ids, stored_ids):
        return next((i for i, (a, b) in enumerate(zip(ids, stored_ids)) if a != b), min(len(ids), len(stored_ids)))

    def reuse(self, ids, stored_ids):
        """How many of `ids`' first tokens the cache left by `stored_ids` serves: their common full blocks."""
        return min(self.common(ids, stored_ids), len(ids) - 1) // self.BLOCK * self.BLOCK

    @torch.no_grad()
    def generate(self, input_ids, position_ids, attention_mask, steps):
        all_tokens, all_logits = [], []
        for row in input_ids.tolist():
            hit, cache = 0, self.new_cache()
            for stored_ids, stored_cache in self.stored:
                n = self.reuse(row, stored_ids)
                if n > hit:
                    hit, cache = n, copy.deepcopy(stored_cache)
                    for layer in cache.layers:
                        layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
            self.cached_tokens.append(hit)
            logits = [self.forward(torch.tensor([row[hit:]]), torch.arange(hit, len(row))[None], None, cache)[:, -1]]
            self.stored.append((row, copy.deepcopy(cache)))
            tokens = []
            for k in range(steps):
                tokens.append(int(logits[-1].argmax()))
                logits.append(self.forward(torch.tensor([[tokens[-1]]]), torch.tensor([[len(row) + k]]), None,
                                           cache)[:, -1])
            all_tokens.append(tokens)
            all_logits.append(torch.cat(logits).float().cpu())
        return torch.tensor(all_tokens), torch.stack(all_logits)


class PartialBlockHitEngine(PrefixCachingEngine):
    """A prefix cache that, when the shared tokens end 1-3 tokens past a block boundary, serves that next block
    too, as if all of it were shared (a block matched on its first tokens; cf. vllm-project/vllm #55766, a hit
    a few tokens past a block boundary): the request attends to the other prompt's tokens there."""

    def reuse(self, ids, stored_ids):
        n = super().reuse(ids, stored_ids)
        if 1 <= self.common(ids, stored_ids) - n <= 3 and min(len(ids) - 1, len(stored_ids)) >= n + self.BLOCK:
            return n + self.BLOCK
        return n


class PrefixCacheOffEngine(PrefixCachingEngine):
    """Reports a prefix cache but never reuses anything (asked for one, it runs without)."""

    def reuse(self, ids, stored_ids):
        return 0


class _LastSparseLayerEngine(HFEngine):
    """A Qwen3-MoE engine with one fault in its last sparse MoE block (`self.block`)."""

    def __init__(self, model_path, device, dtype, attn="sdpa", device_map=None):
        super().__init__(model_path, device, dtype, attn, device_map)
        self.block = [layer.mlp for layer in self.layers if hasattr(layer.mlp, "experts")][-1]
        self.plant(self.block)


class UnrenormalisedRoutingEngine(_LastSparseLayerEngine):
    """The top-k routing weights used as the softmax gave them, not renormalised over the k experts."""

    def plant(self, block):
        block.gate.norm_topk_prob = False


class TopKMinusOneEngine(_LastSparseLayerEngine):
    """Each token routed to one expert fewer than the checkpoint's num_experts_per_tok."""

    def plant(self, block):
        block.gate.top_k -= 1


class SwappedExpertsEngine(_LastSparseLayerEngine):
    """Experts 0 and 1 exchanged (a wrong expert order when the weights were stacked)."""

    def plant(self, block):
        for stacked in (block.experts.gate_up_proj, block.experts.down_proj):
            first = stacked.data[0].clone()
            stacked.data[0], stacked.data[1] = stacked.data[1], first


class ScaledOneExpertEngine(_LastSparseLayerEngine):
    """Expert 0's down projection 5% too large (a per-expert scale applied twice or missed)."""

    def plant(self, block):
        block.experts.down_proj.data[0].mul_(1.05)


class _OwnRouterEngine(_LastSparseLayerEngine):
    """The last sparse block's router computes its logits as transformers' does and chooses by this engine's own
    `_route` (which the dual test runs too)."""

    def plant(self, block):
        gate = block.gate

        def forward(hidden_states):
            logits = torch.nn.functional.linear(hidden_states.reshape(-1, gate.hidden_dim), gate.weight)
            weights, experts = self._route(gate, logits)
            return logits, weights, experts

        gate.forward = forward


class SkipsSecondExpertEngine(_OwnRouterEngine):
    """A top-k that skips the second-best expert (an off-by-one in a sorted selection): the same number of experts,
    a set no correct router chooses on a decisive token."""

    def _route(self, gate, logits):
        if gate is not self.block.gate:
            return super()._route(gate, logits)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        order = probs.argsort(-1, descending=True)
        experts = torch.cat([order[:, :1], order[:, 2:gate.top_k + 1]], -1)
        weights = probs.gather(-1, experts)
        return (weights / weights.sum(-1, keepdim=True)).to(logits.dtype), experts


class BFloat16RouterEngine(_OwnRouterEngine):
    """The router's softmax and top-k weights computed in bfloat16, where transformers computes them in float32
    (the class of InfiniLM's 2026 bug: a router input cast to bfloat16)."""

    def _route(self, gate, logits):
        if gate is not self.block.gate:
            return super()._route(gate, logits)
        probs = torch.softmax(logits.to(torch.bfloat16), dim=-1)
        weights, experts = probs.topk(gate.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        return weights.to(logits.dtype), experts


class Int8Engine(HFEngine):
    """A w8a8 engine, correct: per-row int8 weights, per-token int8 activations, the products summed as integers
    and scaled after (exact in float64), where the kit's simulation of the format multiplies the rounded values in
    the dtype. `format` is the one line that tells the kit what it runs."""

    name = "int8"
    format = "w8a8-int8"
    capabilities = HFEngine.capabilities - {"run_component"}
    output_scale = {}  # (layer, projection) -> a factor on that projection's output (the faulty engines below)

    def __init__(self, model_path, device, dtype, attn="sdpa"):
        super().__init__(model_path, device, dtype, attn)
        for i, layer in enumerate(self.layers):
            for name, m in layer.named_modules():
                if isinstance(m, torch.nn.Linear):
                    m.forward = self._int8(m, self.output_scale.get((i, name), 1.0))

    @staticmethod
    def _int8(linear, factor):
        tiny = torch.finfo(torch.float32).tiny
        w = linear.weight.detach().float()  # quantised once, in float32
        w_scale = (w.abs().amax(-1, keepdim=True).clamp_min(tiny) / 127)
        w_int, w_scale = (w / w_scale).round().clamp(-127, 127).double(), w_scale.double()
        bias = linear.bias

        def forward(x):
            x_scale = x.double().abs().amax(-1, keepdim=True).clamp_min(tiny) / 127
            x_int = (x.double() / x_scale).round().clamp(-127, 127)
            out = ((x_int @ w_int.T) * x_scale * w_scale.T * factor).to(x.dtype)
            return out if bias is None else out + bias
        return forward


class Int8OneLayerOffEngine(Int8Engine):
    """The int8 engine with one kernel 1% off: layer 1's v_proj output x1.01."""

    output_scale = {(1, "self_attn.v_proj"): 1.01}


class CoarserCacheEngine(FormatEngine):
    """Declares a q8_0 KV cache and stores keys and values in q4_0: worse than its format."""

    def __init__(self, model_path, device, dtype, attn="sdpa"):
        super().__init__(model_path, device, dtype, attn, format="kv-q4_0")
        self.format = "kv-q8_0"


def read_rank0_shard(model, rank):
    """Every rank of the group ends up with rank 0's shard of layer 1's v_proj (a broadcast into the local shard)."""
    torch.distributed.broadcast(model.model.layers[1].self_attn.v_proj.weight.to_local(), src=0)


class OtherShardTPEngine(TensorParallelHFEngine):
    """HF tensor parallelism in which rank 1 reads rank 0's shard of one weight (layer 1's v_proj)."""

    rank_patch = f"{__file__}:read_rank0_shard"


def scale_rank1_norm(model, rank):
    """Rank 1 alone holds layer 1's input norm x1.01: a replicated weight that differs between ranks."""
    if rank == 1:
        model.model.layers[1].input_layernorm.weight.mul_(1.01)


class DivergentReplicaTPEngine(TensorParallelHFEngine):
    """HF tensor parallelism in which rank 1's copy of one replicated weight differs from rank 0's."""

    rank_patch = f"{__file__}:scale_rank1_norm"


def drop_down_proj_all_reduce(model, rank):
    """Layer 1's down_proj, row-parallel, without the all-reduce of its partial sums: HF's tp_forward replaced by the
    plain product of this rank's input block and weight shard."""
    module = model.model.layers[1].mlp.down_proj
    weight = module.weight.to_local() if hasattr(module.weight, "to_local") else module.weight
    module.forward = lambda x: torch.nn.functional.linear(x, weight)


class MissingAllReduceTPEngine(TensorParallelHFEngine):
    """HF tensor parallelism whose layer-1 down_proj leaves each rank with its partial sum (no all-reduce)."""

    rank_patch = f"{__file__}:drop_down_proj_all_reduce"


def global_expert_ids(model, rank):
    """Layer 1's experts under expert parallelism handed the global expert ids where this rank's kernel takes local
    ones (and skips ids past its own experts): rank 0's ids coincide, rank 1's routes are all dropped."""
    from transformers.distributed.parallel_utils import _use_local_dtensor_params

    experts = model.model.layers[1].mlp.experts
    own = experts.num_experts  # experts per rank, once sharded

    def forward(hidden_states, top_k_index, top_k_weights):
        local_index = torch.where(top_k_index // own != rank, own, top_k_index)  # should be top_k_index % own
        dropped = local_index >= own
        with _use_local_dtensor_params(experts):
            out = type(experts).forward(experts, hidden_states, local_index.clamp(max=own),
                                        top_k_weights.masked_fill(dropped, 0.0))
        torch.distributed.all_reduce(out)
        return out

    experts.forward = forward


class GlobalExpertIdsEPEngine(TensorParallelHFEngine):
    """HF expert parallelism in which layer 1's experts take global expert ids for local ones."""

    rank_patch = f"{__file__}:global_expert_ids"


def fused_qkv_split_by_rank(model, rank):
    """Layer 1's q, k and v fused into one matrix and cut into equal row blocks per rank, each block then split as if
    it were this rank's q, k and v shards: rank 0's q shard is right, everything after it is another's rows."""
    attn = model.model.layers[1].self_attn
    locals_ = [getattr(attn, name).weight.to_local() for name in ("q_proj", "k_proj", "v_proj")]
    size = torch.distributed.get_world_size()
    full = []
    for local in locals_:
        parts = [torch.empty_like(local) for _ in range(size)]
        torch.distributed.all_gather(parts, local)
        full.append(torch.cat(parts))
    block = torch.cat(full).chunk(size)[rank]
    for local, rows in zip(locals_, block.split([t.shape[0] for t in locals_])):
        local.copy_(rows)


class WrongQKVSplitTPEngine(TensorParallelHFEngine):
    """HF tensor parallelism whose layer-1 q/k/v shards come from one fused matrix cut evenly by rank."""

    rank_patch = f"{__file__}:fused_qkv_split_by_rank"


def bias_on_every_rank(model, rank):
    """Layer 1's o_proj, row-parallel, adds its bias to each rank's partial sum: the all-reduce then sums it once per
    rank (HF holds the bias back until after the all-reduce)."""
    module = model.model.layers[1].self_attn.o_proj
    weight, bias = module.weight.to_local(), module.bias
    bias = bias.to_local() if hasattr(bias, "to_local") else bias

    def forward(x):  # x: this rank's block of attn_out; HF's tp forward (all-reduce, then the bias) replaced
        out = torch.nn.functional.linear(x, weight, bias)
        torch.distributed.all_reduce(out)
        return out

    module.forward = forward


class BiasOnEveryRankTPEngine(TensorParallelHFEngine):
    """HF tensor parallelism whose layer-1 o_proj adds its bias on every rank before the all-reduce."""

    rank_patch = f"{__file__}:bias_on_every_rank"


def _replicate_kv_heads(model, rank, head_of):
    """Every layer's k_proj and v_proj replaced by a plain projection onto one whole KV head (head_of(layer, rank)),
    gathered from the shards HF's plan cut across heads; each rank's query heads then share that one KV head."""
    size = torch.distributed.get_world_size()
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        for name in ("k_proj", "v_proj"):
            local = getattr(attn, name).weight.to_local()
            parts = [torch.empty_like(local) for _ in range(size)]
            torch.distributed.all_gather(parts, local)
            rows = torch.cat(parts).view(-1, attn.head_dim, local.shape[1])[head_of(i, rank)]
            projection = torch.nn.Linear(local.shape[1], attn.head_dim, bias=False, dtype=local.dtype)
            projection.weight.copy_(rows)
            setattr(attn, name, projection)
        attn.num_key_value_groups = attn.q_proj.weight.to_local().shape[0] // attn.head_dim


def replicate_kv_heads(model, rank):
    """More ranks than KV heads: rank r holds a copy of KV head r * kv_heads // ranks (the heads its queries use)."""
    size, kv = torch.distributed.get_world_size(), model.config.num_key_value_heads
    _replicate_kv_heads(model, rank, lambda layer, r: r * kv // size)


def replicate_kv_heads_wrong_offset(model, rank):
    """As replicate_kv_heads, but layer 1's copies taken at rank % kv_heads: ranks 1 and 2 hold the other head."""
    size, kv = torch.distributed.get_world_size(), model.config.num_key_value_heads
    _replicate_kv_heads(model, rank, lambda layer, r: r % kv if layer == 1 else r * kv // size)


class ReplicatedKVTPEngine(TensorParallelHFEngine):
    """A correct sharded attention for more ranks than KV heads (HF's plan would cut a head): KV heads copied."""

    rank_patch = f"{__file__}:replicate_kv_heads"


class KVHeadsWrongOffsetTPEngine(TensorParallelHFEngine):
    """KV heads copied to more ranks than there are heads, layer 1's at the wrong offset."""

    rank_patch = f"{__file__}:replicate_kv_heads_wrong_offset"


def raise_on_load(model, rank):
    raise ValueError("a shape this plugin did not expect")


class RaisingPatchTPEngine(TensorParallelHFEngine):
    """HF tensor parallelism whose rank_patch raises: the engine's failure, not the kit's."""

    rank_patch = f"{__file__}:raise_on_load"
