"""Prefix cache, cold then hot (`test_forward_validation.py --cache_pairs`): does a request that hits an engine's
prefix cache get what it gets cold?

For each shared length L swept across the cache's block boundaries (block size B: L = kB - 2 .. kB + 10 for
k = 1, 2), two requests share the first L tokens of a text and continue differently (B + 8 tokens each, so
that each continues past the next block boundary: a block the two share only in part must not be reused):
  cold  the engine's prefix cache is reset, then Q = prefix + one tail is decoded greedily (`steps` tokens);
  seed  the cache is reset again, then P = prefix + the other tail, which leaves the prefix (and P's last partial
        block) in the cache;
  hot   Q again: it should hit the cache for the full blocks of the prefix.
The hot Q is judged against the cold Q (invariance: bitwise / within rounding / NOT, for the steps whose tokens
agree) and against the reference (calibrated by the peer, teacher-forced on the reference's greedy tokens,
while the hot tokens follow them). The hits each request reports (`cached_tokens`, vLLM's num_cached_tokens)
are recorded: a hot request that takes more than its shared full blocks was served tokens that are not its
own and fails; a cold request that hits, or a sweep in which no hot request hits, cannot say anything about
the cache, and is said so (exit 3 when nothing hit). An engine that does not report its hits (llama-cpp-python's
server) is judged hot against cold all the same, and the output says that its reuse is not seen: a PASS
there says that whatever it reused gave the cold run's numbers, not that it reused anything. Generated
tokens' logprobs only: vLLM skips its prefix cache for requests that ask for prompt logprobs.

Engines: those that decode by themselves (generate()) and offer reset_prefix_cache() and `cached_tokens`
(kitcore.engines): vLLM in-process, vLLM's server started with VLLM_SERVER_DEV_MODE=1 (its
/reset_prefix_cache) and --enable-prompt-tokens-details (the hits in each answer's usage), and llama-cpp-python's
server (it reuses the longest prefix it shares with the last request, token by token; the kit empties it with
one token of another text); a server does not report its block size: give it with --engine_args
'{"block_size": N}' (default 16).
"""

from dataclasses import dataclass

from . import inputs, protocol
from .errors import Unavailable
from .session import FreeRunCheck

BLOCKS, OFFSETS, TAIL_PAST_BLOCK = (1, 2), range(-2, 11), 8


@dataclass
class Pair:
    """One shared length's cold and hot runs of the same request, judged (hot against cold and the reference)."""

    shared: int
    hits_cold: int  # None: the engine does not report its hits (llama-cpp-python's server)
    hits_hot: int
    expected: int  # the full blocks of the shared prefix: what a block-granular cache can reuse
    check: FreeRunCheck

    @property
    def overreach(self):
        """More tokens taken from the cache than the request shares in full blocks: served what is not its own."""
        return self.hits_hot is not None and self.hits_hot > self.expected

    @property
    def passed(self):
        return self.check.passed and not self.overreach


def tail_length(block):
    return block + TAIL_PAST_BLOCK


def shared_lengths(block, steps, max_positions):
    """The swept shared lengths that fit the context with their tail and decode."""
    return [k * block + o for k in BLOCKS for o in OFFSETS
            if k * block + o > 0 and k * block + o + tail_length(block) + steps + 1 <= max_positions]


def base_text(checkpoint, tokens, tail, seed):
    """`tokens` ids of real text (random ids where the checkpoint has no tokenizer) and two tails of `tail` ids."""
    vocab = checkpoint.config["vocab_size"]
    if inputs.has_tokenizer(checkpoint.path):
        ids = inputs.text_stream(inputs.tokenizer(checkpoint.path), tokens + 2 * tail)
        return ids[:tokens], ids[tokens:tokens + tail], ids[tokens + tail:]
    rows = inputs.random_rows([tokens, tail, tail], vocab, seed)
    return rows[0], rows[1], rows[2]


def _generate(engine, ids, steps):
    row = inputs.pad([ids])
    tokens, logprobs = engine.generate(row.input_ids, row.position_ids, None, steps)
    hits = engine.cached_tokens[-1]
    if hits is None and protocol.declared(engine, "reports_cache_hits"):
        raise Unavailable(f"engine {protocol.declared(engine, 'name') or type(engine).__name__} does not say how many prompt "
                          "tokens a request took from its prefix cache, so a hit cannot be told from a miss (vLLM's "
                          "server: --enable-prompt-tokens-details)")
    return tokens[0], logprobs[0], hits


def run_pair(run, engine, prefix, tails, steps, block, judge):
    """Cold Q, seed P, hot Q for one shared prefix (module docstring): the Pair."""
    q, p = prefix + tails[1], prefix + tails[0]
    engine.reset_prefix_cache()
    cold_tokens, cold, hits_cold = _generate(engine, q, steps)
    engine.reset_prefix_cache()  # the cold Q must not serve the hot one
    _generate(engine, p, steps)
    hot_tokens, hot, hits_hot = _generate(engine, q, steps)
    check = run.judge_free_run(engine, q, (hot_tokens, hot), (cold_tokens, cold), judge)
    return Pair(len(prefix), hits_cold, hits_hot, len(prefix) // block * block, check)
