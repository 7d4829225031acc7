"""Forward validation's verdicts: two engines' prefill + decode steps against the reference, each other
and their own no-cache forward (test_forward_validation.py prints and records what this decides).

Five comparisons (COLUMNS) run over every step: A vs reference and B vs reference (calibrated by the
peer run through the same steps), A vs B (the looser of the two table judges), and each engine's cached
logits against its own no-cache forward of the same tokens (the table: same engine, same kernels, so a
difference is a KV-cache bug, not rounding). A step is CLOSE when every gate of every comparison passes
at that one position; the statistics that need many positions (KL mean/p99, agreement rates) are
judged over every step together. An engine that decodes by itself and leaves the teacher's tokens is
judged at that step: a flip at a decisive position fails, one at a near-tie is a benign divergence.
Over a long decode each comparison's error by position is a Trend: its curve and slope are recorded, and
under a distribution judge (a quantised cache) the last quarter of the steps is gated by itself too.
"""

from dataclasses import dataclass, replace

import torch

from . import judges

COLUMNS = ("a_vs_ref", "b_vs_ref", "a_vs_b", "a_cache", "b_cache")


@dataclass(frozen=True)
class Comparand:
    """One comparison over the steps: logits [B, steps + 1, V] of both sides, its judge and peer."""

    candidate: torch.Tensor
    reference: torch.Tensor
    judge: judges.Judge
    peer: torch.Tensor  # the peer's logits at the same steps, or None
    mask: torch.Tensor  # [B, steps + 1]: the steps compared
    space: judges.Space

    def check(self, at=slice(None), aggregate=True):
        peer = None if self.peer is None else self.peer[:, at]
        return judges.check_logits(self.candidate[:, at], self.reference[:, at], self.mask[:, at], self.judge, peer,
                                   aggregate=aggregate, space=self.space)


def comparisons(engines, decoded, ref_steps, peer_steps, judge_of):
    """The five Comparands of engines (A, B) with their Decoded outputs."""
    a, b = decoded
    judge_a, judge_b = judge_of(engines[0]), judge_of(engines[1])
    space = judges.output_space
    every = torch.ones_like(a.comparable)
    a_vs_b = judges.looser(judge_a, judge_b)
    return {
        "a_vs_ref": Comparand(a.cached, ref_steps, judge_a, peer_steps, a.comparable, space(engines[0])),
        "b_vs_ref": Comparand(b.cached, ref_steps, judge_b, peer_steps, b.comparable, space(engines[1])),
        "a_vs_b": Comparand(a.cached, b.cached, a_vs_b, peer_steps if a_vs_b.calibrated else None,
                            a.comparable & b.comparable, space(*engines)),
        # the cache check compares an engine with itself: the table bounds its rounding, no peer applies
        "a_cache": Comparand(a.cached, a.no_cache, replace(judge_a, calibrated=False), None, every, space(engines[0])),
        "b_cache": Comparand(b.cached, b.no_cache, replace(judge_b, calibrated=False), None, every, space(engines[1])),
    }


def step_checks(table, step):
    """Every comparison at one step (a single position: no aggregate statistics), where it has positions."""
    at = slice(step, step + 1)
    return {name: c.check(at, aggregate=False) for name, c in table.items() if c.mask[:, at].any()}


@dataclass(frozen=True)
class Divergence:
    """Where an engine that decodes by itself first chose another token than the teacher's."""

    row: int
    step: int
    token: int
    teacher: int
    decisive: bool  # at a decisive position: a real failure; else a near-tie, a benign divergence


def divergences(decoded, teacher, comparand):
    """Each row's first step where `decoded` left the teacher, judged at that step by `comparand`'s judge
    (A vs reference or B vs reference): the token it chose is wrong when the position is decisive."""
    found = []
    for row in range(teacher.shape[0]):
        left = (decoded.tokens[row] != teacher[row]).nonzero()
        if not len(left):
            continue
        s = int(left[0])
        at = (slice(row, row + 1), slice(s, s + 1))
        peer = None if comparand.peer is None else comparand.peer[at]
        flip = judges.check_logits(decoded.cached[at], comparand.reference[at], torch.ones(1, 1, dtype=torch.long),
                                   comparand.judge, peer, aggregate=False, space=comparand.space)
        found.append(Divergence(row, s, int(decoded.tokens[row, s]), int(teacher[row, s]),
                                flip.decisive_positions > 0))
    return found


LENGTH_MIN_STEPS = 64  # decode steps below which a quarter of them is too few positions for a KL mean


@dataclass(frozen=True)
class Trend:
    """One comparison's error by decode position: `curve`, the KL mean of every step (None where nothing was
    compared), its least-squares slope over the decode steps, the KL mean of their first and last quarters,
    and the length gate: under a distribution judge, with LENGTH_MIN_STEPS decode steps or more, the last
    quarter's KL mean must stay within the judge's KL-mean bound too, so that an error which grows with
    length cannot hide behind the early steps in the mean over all of them."""

    curve: list
    slope: float  # nats per 100 decode steps
    first_quarter: float
    last_quarter: float
    limit: float  # the KL-mean bound of the last quarter, or None: not gated (see above)
    last_steps: tuple  # (first, last) step of the last quarter

    @property
    def first_above(self):
        """The first decode step whose KL mean is above the bound (None: none, or not gated)."""
        if self.limit is None:
            return None
        return next((s for s, kl in enumerate(self.curve) if s > 0 and kl is not None and kl > self.limit), None)

    @property
    def steps(self):
        return sum(1 for s, kl in enumerate(self.curve) if s > 0 and kl is not None)

    @property
    def long_enough(self):
        """Enough decode steps for a quarter's KL mean to say how the error moves (else: the figures only)."""
        return self.steps >= LENGTH_MIN_STEPS

    @property
    def grows(self):
        return self.long_enough and self.last_quarter > 2 * self.first_quarter and self.slope > 0

    @property
    def passed(self):
        return self.limit is None or self.last_quarter <= self.limit

    def reason(self):
        if self.passed:
            return ""
        return (f"KL mean over the last quarter of the decode (steps {self.last_steps[0]}-{self.last_steps[1]}) "
                f"{self.last_quarter:.2e} above {self.limit:.2g}, the first quarter's {self.first_quarter:.2e}"
                + (": the error grows with decode length" if self.grows else "")
                + (f"; the first step above it: {self.first_above}" if self.first_above is not None else ""))

    def describe(self):
        shape = (f"{self.steps} steps, too few to call a trend (from {LENGTH_MIN_STEPS})" if not self.long_enough
                 else "grows with decode length" if self.grows
                 else "shrinks with decode length" if self.first_quarter > 2 * self.last_quarter else "flat")
        return (f"KL by decode step: first quarter {self.first_quarter:.2e}, last quarter {self.last_quarter:.2e}, "
                f"slope {self.slope:+.2e} nats per 100 steps: {shape}")

    def as_dict(self):
        return {"curve": self.curve, "slope_per_100_steps": self.slope, "kl_first_quarter": self.first_quarter,
                "kl_last_quarter": self.last_quarter, "limit": self.limit, "grows": self.grows,
                "passed": self.passed}


def trend(step_checks_by_step, name, overall):
    """The Trend of comparison `name` from the per-step checks (step_checks of every step) and its check over
    every step together (`overall`, whose limits bound the last quarter); None with fewer than 4 decode steps
    compared."""
    curve = [checks[name].kl_mean if name in checks else None for checks in step_checks_by_step]
    decode = [(s, kl) for s, kl in enumerate(curve) if s > 0 and kl is not None]
    if len(decode) < 4:
        return None
    xs, ys = torch.tensor([s for s, _ in decode], dtype=torch.float64), torch.tensor([k for _, k in decode],
                                                                                       dtype=torch.float64)
    slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / (xs - xs.mean()).pow(2).sum()) * 100
    quarter = len(decode) // 4
    gated = overall.distribution is not None and len(decode) >= LENGTH_MIN_STEPS
    return Trend(curve, slope, float(ys[:quarter].mean()), float(ys[-quarter:].mean()),
                 overall.limits.get("kl_mean") if gated else None, (decode[-quarter][0], decode[-1][0]))


def failed_steps(steps, column):
    """The steps whose `column` check failed (where it was compared): for the cache columns, a KV-cache bug
    from the first one on."""
    return [s["step"] for s in steps if column in s and not s[column]["passed"]]
