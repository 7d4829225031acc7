"""Intervals for per-token figures scored over windows of text, and how many tokens a margin needs.

Tokens of one window are not independent (a context that confuses the engine confuses it for many tokens), so
an interval that treats them as independent is too narrow (tested: kit test_corpus_score). The unit of resampling
is the window: a block bootstrap draws whole windows with replacement, recomputes the figure on the drawn tokens,
and reports the percentile interval. Seeded: the same figures give the same interval.
"""

import math
from dataclasses import dataclass
from statistics import NormalDist

import torch

BOOTSTRAP_SAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A figure over the scored tokens and its interval at `confidence` (a block bootstrap over windows)."""

    value: float
    low: float
    high: float
    confidence: float

    def describe(self, fmt=".3g"):
        return f"{self.value:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}]"

    def as_dict(self):
        return dict(self.__dict__)


def _draws(n_windows, samples, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_windows, (samples, n_windows), generator=g)


def _interval(values, point, confidence):
    tail = (1 - confidence) / 2
    low, high = torch.quantile(values.double(), torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Estimate(float(point), min(low, float(point)), max(high, float(point)), confidence)


def mean(per_window, confidence=0.95, samples=BOOTSTRAP_SAMPLES, seed=0):
    """The mean over every token of `per_window` (a list of 1-D tensors, one per window) with its block-bootstrap
    interval."""
    sums = torch.stack([w.double().sum() for w in per_window])
    counts = torch.tensor([float(w.numel()) for w in per_window], dtype=torch.float64)
    draws = _draws(len(per_window), samples, seed)
    return _interval(sums[draws].sum(-1) / counts[draws].sum(-1), sums.sum() / counts.sum(), confidence)


def quantile(per_window, q, confidence=0.95, samples=BOOTSTRAP_SAMPLES // 4, seed=0):
    """The q-quantile over every token, with its block-bootstrap interval (fewer samples: each sorts every token)."""
    every = torch.cat([w.double() for w in per_window])
    draws = _draws(len(per_window), samples, seed)
    values = torch.tensor([float(torch.quantile(torch.cat([per_window[i].double() for i in d]), q))
                           for d in draws.tolist()])
    return _interval(values, torch.quantile(every, q), confidence)


def rms(per_window, confidence=0.95, samples=BOOTSTRAP_SAMPLES, seed=0):
    """The root mean square over every token, with its block-bootstrap interval."""
    m = mean([w.double() ** 2 for w in per_window], confidence, samples, seed)
    return Estimate(math.sqrt(m.value), math.sqrt(m.low), math.sqrt(m.high), confidence)


def naive_mean(values, confidence=0.95):
    """The mean with the interval that treats every token as independent (mean +- z sd / sqrt(n)): what llama.cpp's
    perplexity tool reports; shown beside the block bootstrap's, never used for a verdict."""
    values = values.double()
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    half = z * float(values.std()) / math.sqrt(values.numel())
    return Estimate(float(values.mean()), float(values.mean()) - half, float(values.mean()) + half, confidence)


@dataclass(frozen=True)
class Plan:
    """How many windows a one-sided sign-off `figure < margin` needs: expected value and spread from a pilot."""

    figure: str
    margin: float
    expected: float  # the pilot's mean
    window_sd: float  # the standard deviation of one window's mean in the pilot
    windows: int  # None: the margin is not above the expected value; no number of windows signs it off
    tokens: int

    def describe(self):
        if self.windows is None:
            return (f"{self.figure} < {self.margin:.3g}: the pilot's value {self.expected:.3g} is not below the margin; "
                    "no number of tokens signs it off")
        return (f"{self.figure} < {self.margin:.3g}: {self.windows} windows ({self.tokens} scored tokens); pilot "
                f"{self.expected:.3g}, one window's sd {self.window_sd:.3g}")


def plan(figure, per_window, margin, scored_per_window, confidence=0.95, power=0.8):
    """Windows needed so that, if the figure's true value is the pilot's mean, the upper end of its interval at
    `confidence` (two-sided, as every interval here) falls below `margin` with probability `power`:
    n = ((z_(1+c)/2 + z_p) sd / (margin - mean))^2, sd the spread of one window's mean over the pilot's windows,
    at least 2 windows."""
    window_means = torch.stack([w.double().mean() for w in per_window])
    expected = float(window_means.mean())
    sd = float(window_means.std()) if len(per_window) > 1 else float("nan")
    if not margin > expected:
        return Plan(figure, margin, expected, sd, None, None)
    z = NormalDist().inv_cdf(0.5 + confidence / 2) + NormalDist().inv_cdf(power)
    windows = max(2, math.ceil((z * sd / (margin - expected)) ** 2))
    return Plan(figure, margin, expected, sd, windows, windows * scored_per_window)
