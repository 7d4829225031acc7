"""Prefill and teacher-forced greedy decode through an engine's own KV cache (kitcore.engines protocol).

Decode is teacher-forced: every engine is fed the reference's greedy tokens, so that one flipped token
cannot cascade and every step of every engine is compared at the same position.
"""

import torch


def _mask(inp, mask):
    return mask if inp.padded else None


def greedy_reference(reference, inp, steps):
    """Teacher tokens [B, steps]: the reference's greedy decode with its KV cache. Then the reference's
    no-cache logits [B, steps + 1, V] at the prefill's last position and every decode step come from one
    full forward of prompt + teacher tokens."""
    cache = reference.new_cache()
    pos, mask = inp.position_ids, inp.attention_mask
    logits = reference.forward(inp.input_ids, pos, _mask(inp, mask), cache)[:, -1]
    tokens = []
    for k in range(steps):
        tokens.append(logits.argmax(-1, keepdim=True).cpu())
        if k < steps - 1:
            pos = pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(tokens[-1])], 1)
            logits = reference.forward(tokens[-1], pos, _mask(inp, mask), cache)[:, -1]
    teacher = torch.cat(tokens, 1)
    return teacher, no_cache_steps(reference, inp, teacher)


def no_cache_steps(engine, inp, teacher):
    """The engine's no-cache logits over prompt + teacher tokens [B, steps + 1, V], at the prefill's last
    position and every decode step."""
    ids = torch.cat([inp.input_ids, teacher], 1)
    pos = torch.cat([inp.position_ids, inp.position_ids[:, -1:] + 1 + torch.arange(teacher.shape[1])], 1)
    mask = torch.cat([inp.attention_mask, torch.ones_like(teacher)], 1)
    full = engine.forward(ids, pos, _mask(inp, mask)).cpu()
    return full[:, inp.input_ids.shape[1] - 1:]


def run_engine(engine, inp, teacher):
    """Prefill + teacher-forced decode with the engine's own cache, and its own no-cache forward."""
    cache = engine.new_cache()
    ids, pos, mask = inp.input_ids, inp.position_ids, inp.attention_mask
    cached = [engine.forward(ids, pos, _mask(inp, mask), cache)[:, -1].cpu()]
    for k in range(teacher.shape[1]):
        token = teacher[:, k:k + 1]
        pos = pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        cached.append(engine.forward(token, pos, _mask(inp, mask), cache)[:, -1].cpu())
    return torch.stack(cached, 1), no_cache_steps(engine, inp, teacher)


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

