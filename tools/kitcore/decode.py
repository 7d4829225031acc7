"""Prefill and teacher-forced greedy decode through an engine's own KV cache (kitcore.engines protocol).

Decode is teacher-forced: every engine is fed the reference's greedy tokens, so that one flipped token
cannot cascade and every step of every engine is compared at the same position.
"""

from dataclasses import dataclass

import torch


@dataclass
class Decoded:
    """One engine's prefill + decode: logits [B, steps + 1, V] with its cache and without (its own forward of
    the same tokens); `comparable` [B, steps + 1]: the steps at the teacher's positions; `tokens` [B, steps]:
    the tokens it was fed or chose."""

    cached: torch.Tensor
    no_cache: torch.Tensor
    comparable: torch.Tensor
    tokens: torch.Tensor


def _mask(inp, mask):
    return mask if inp.padded else None


def greedy_reference(reference, inp, steps):
    """The reference's greedy decode with its KV cache: (teacher tokens [B, steps], its no-cache logits
    [B, steps + 1, V], its cached logits [B, steps + 1, V]). The no-cache logits at the prefill's last
    position and every decode step come from one full forward of prompt + teacher tokens; the cached ones
    are the decode's own, one step past the last teacher token, so that they are also what a teacher-forced
    run of the reference through its cache gives (forward validation's B = reference)."""
    teacher, cached = greedy(reference, inp, steps)
    return teacher, no_cache_steps(reference, inp, teacher), cached


def greedy(engine, inp, steps):
    """Greedy decode of `steps` tokens through the engine's KV cache: (tokens [B, steps], the logits at the
    prefill's last position and every step [B, steps + 1, V])."""
    cache = engine.new_cache()
    pos, mask = inp.position_ids, inp.attention_mask
    logits = engine.forward(inp.input_ids, pos, _mask(inp, mask), cache)[:, -1]
    tokens, cached = [], [logits.cpu()]
    for _ in range(steps):
        tokens.append(logits.argmax(-1, keepdim=True).cpu())
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(tokens[-1])], 1)
        logits = engine.forward(tokens[-1], pos, _mask(inp, mask), cache)[:, -1]
        cached.append(logits.cpu())
    return torch.cat(tokens, 1), torch.stack(cached, 1)


def no_cache_steps(engine, inp, teacher):
    """The engine's no-cache logits over prompt + teacher tokens [B, steps + 1, V], at the prefill's last
    position and every decode step."""
    ids = torch.cat([inp.input_ids, teacher], 1)
    pos = torch.cat([inp.position_ids, inp.position_ids[:, -1:] + 1 + torch.arange(teacher.shape[1])], 1)
    mask = torch.cat([inp.attention_mask, torch.ones_like(teacher)], 1)
    full = engine.forward(ids, pos, _mask(inp, mask)).cpu()
    return full[:, inp.input_ids.shape[1] - 1:]


def run_engine(engine, inp, teacher):
    """Prefill + teacher-forced decode with the engine's own cache, and its own no-cache forward.
    Every step sits at the teacher's position, but for an engine that decodes by itself (run_free)."""
    from .protocol import capabilities

    if "new_cache" not in capabilities(engine):
        return run_free(engine, inp, teacher)
    cache = engine.new_cache()
    ids, pos, mask = inp.input_ids, inp.position_ids, inp.attention_mask
    cached = [engine.forward(ids, pos, _mask(inp, mask), cache)[:, -1].cpu()]
    for k in range(teacher.shape[1]):
        token = teacher[:, k:k + 1]
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        cached.append(engine.forward(token, pos, _mask(inp, mask), cache)[:, -1].cpu())
    comparable = torch.ones(teacher.shape[0], teacher.shape[1] + 1, dtype=torch.long)
    return Decoded(torch.stack(cached, 1), no_cache_steps(engine, inp, teacher), comparable, teacher)


def run_free(engine, inp, teacher):
    """An engine that decodes by itself (generate(), e.g. vLLM): its greedy tokens may leave the teacher's.
    Step s sits at the teacher's position while the engine's first s tokens are the teacher's: `comparable`
    marks those steps (the step where the tokens part is still comparable: its flip is judged). The cache
    check needs no teacher: the engine's no-cache forward of its own tokens."""
    tokens, cached = engine.generate(inp.input_ids, inp.position_ids, inp.mask_or_none, teacher.shape[1])
    same = (tokens == teacher).long().cumprod(1)
    comparable = torch.cat([torch.ones_like(same[:, :1]), same], 1)
    return Decoded(cached, no_cache_steps(engine, inp, tokens), comparable, tokens)


def ragged_decode(engine, batch, teachers, pad_id=0):
    """A batched prefill of `batch` (left-padded Inputs) and a batched teacher-forced decode in which row j
    decodes len(teachers[j]) tokens: rows sit at different cache lengths, and a row that has finished is
    fed a padding token masked out (0 in the attention mask) while the others go on.
    Returns, per row, its logits [steps_j + 1, V]: the prefill's last position, then every decode step."""
    cache = engine.new_cache()
    rows, steps = batch.input_ids.shape[0], max(len(t) for t in teachers)
    pos, mask = batch.position_ids, batch.attention_mask
    logits = engine.forward(batch.input_ids, pos, mask, cache)[:, -1].cpu()
    out = [[logits[j]] for j in range(rows)]
    for k in range(steps):
        active = torch.tensor([k < len(t) for t in teachers])
        token = torch.tensor([[int(t[k]) if k < len(t) else pad_id] for t in teachers])
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, active.long()[:, None]], 1)
        logits = engine.forward(token, pos, mask, cache)[:, -1].cpu()
        for j in range(rows):
            if active[j]:
                out[j].append(logits[j])
    return [torch.stack(o) for o in out]

