"""Adaptive k: how many tokens each query selects (seed "Experiment 4" adaptive selection, and the
k rules of "Experiment 3"). Every rule is causal: k_t depends only on positions <= t, and
1 <= k_t <= t+1.

Strategies (`AdaptiveKSelector(top_k, strategy, ...)`):
  ratio                    k_t = ceil(ratio * (t+1)), a fixed share of the causal prefix
  progressive_linear|exponential|cosine
                           k grows over training from start_fraction * top_k to top_k, driven by
                           set_progress(fraction in [0, 1]) (SparseAttentionMoELLM.set_training_progress)
  entropy                  k_t = ceil(top_k * (min_scale + (max_scale - min_scale) * h_t)), h_t the
                           normalised entropy of softmax(I[t, :t+1]) (flat index scores -> more tokens)
  position                 k_t = min(t+1, ceil(sqrt(top_k * (t+1)))): the whole prefix up to t+1 = top_k,
                           then growing as sqrt(t+1) — so k_t > top_k for every t+1 > top_k (top_k is the
                           crossover, not a cap: this rule uses more keys than fixed top_k)
  dynamic                  as entropy, with h replaced by its running mean over rows <= t of the sequence

budget_matched=True (the `*_matched` variants): k_t of the rule is rescaled causally (`match_budget`) to
fixed top-k's mean keys, mean_t min(top_k, t+1): to ~1 % (one scale, rounded) for the positional rule,
by a running ratio for the data-dependent ones (within 8 %, ~2 % at k >= 32; tests check both). The
rule's shape is kept, not its budget. Without it the entropy/dynamic/position/ratio rules use more or
fewer keys than the baseline, and a comparison with them is not budget-matched (reports show
mean_selected_keys beside quality).

"Dynamic" means two things here (both names come from the research plan): the k rule `dynamic`
(k_strategy `adaptive_dynamic`) is the entropy rule on the running mean of the index-score entropy, and
`DynamicSparsityController` is the adaptive-sparsity experiment's selector, whose k_t also reads the content
(token features and the layer's hidden states).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from sparse_attention import TopKTokenSelector, check_no_nan, future_mask

STRATEGIES = ("ratio", "progressive_linear", "progressive_exponential", "progressive_cosine",
              "entropy", "position", "dynamic")

# The plan's adaptive-selection variants (it counts 11 but lists six ratios: 12 here) -> ModelConfig overrides.
SELECTION_VARIANTS: dict[str, dict] = {
    **{f"ratio_{p}": {"k_strategy": f"ratio_{p}"} for p in (5, 10, 25, 50, 75, 90)},
    **{f"progressive_{s}": {"k_strategy": f"progressive_{s}"} for s in ("linear", "exponential", "cosine")},
    **{f"adaptive_{s}": {"k_strategy": f"adaptive_{s}"} for s in ("entropy", "position", "dynamic")},
    **{f"adaptive_{s}_matched": {"k_strategy": f"adaptive_{s}_matched"} for s in ("entropy", "position", "dynamic")},
}


def normalised_entropy(scores: torch.Tensor) -> torch.Tensor:
    """scores (B, L, L) with -inf future -> H(softmax(I[t, :t+1])) / log(t+1) in [0, 1] (B, L); row 0 -> 1."""
    L = scores.shape[-1]
    entropy = torch.special.entr(scores.float().softmax(-1)).sum(-1)  # (B, L), 0 log 0 = 0
    log_n = torch.arange(1, L + 1, device=scores.device, dtype=torch.float32).log()  # (L,)
    return torch.where(log_n > 0, entropy / log_n.clamp_min(1e-12), torch.ones_like(entropy)).clamp(0, 1)


class AdaptiveKSelector(nn.Module):
    """Per-row k_t, then the indexer's top-k_t of the causal prefix (TopKTokenSelector contract).

    K slots = max_t k_t; slots beyond a row's k_t are invalid (a row's k_t is its count of valid slots).
    """

    def __init__(self, top_k: int, strategy: str = "ratio", ratio: float = 0.5, start_fraction: float = 0.25,
                 min_scale: float = 0.5, max_scale: float = 1.5, budget_matched: bool = False):
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
        if top_k <= 0:
            raise ValueError(f"top_k={top_k} must be > 0")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio={ratio} must be in (0, 1]")
        if not 0 < start_fraction <= 1:
            raise ValueError(f"start_fraction={start_fraction} must be in (0, 1]")
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"need 0 < min_scale={min_scale} <= max_scale={max_scale}")
        self.top_k, self.strategy, self.ratio = top_k, strategy, ratio
        self.start_fraction, self.min_scale, self.max_scale = start_fraction, min_scale, max_scale
        self.budget_matched = budget_matched
        self.progress = 0.0

    def set_progress(self, fraction: float) -> None:
        """Training progress in [0, 1] for the progressive schedules (ignored by the other strategies)."""
        if not 0 <= fraction <= 1:
            raise ValueError(f"training progress fraction={fraction} must be in [0, 1]")
        self.progress = float(fraction)

    def scheduled_k(self) -> int:
        """k of a progressive schedule at the current progress."""
        start, end, p = max(1, round(self.start_fraction * self.top_k)), self.top_k, self.progress
        if self.strategy == "progressive_linear":
            k = start + (end - start) * p
        elif self.strategy == "progressive_exponential":
            k = start * (end / start) ** p
        else:  # progressive_cosine
            k = start + (end - start) * (1 - math.cos(math.pi * p)) / 2
        return max(1, min(end, round(k)))

    def row_k(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, L, L) -> k_t (B, L) long with 1 <= k_t <= t+1 (budget-matched when asked)."""
        k = self.raw_row_k(scores)
        prefix = torch.arange(1, k.shape[-1] + 1, device=k.device, dtype=torch.float32).expand_as(k)
        if not self.budget_matched:
            return torch.minimum(k.clamp_min(1), prefix).long()
        return match_budget(k, self.top_k, positional=self.strategy in ("ratio", "position"))

    def raw_row_k(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, L, L) -> the rule's k_t (B, L) float, before clamping to [1, t+1]."""
        B, L = scores.shape[:2]
        prefix = torch.arange(1, L + 1, device=scores.device, dtype=torch.float32).expand(B, L)  # t+1
        if self.strategy == "ratio":
            k = prefix_share(prefix, self.ratio)
        elif self.strategy.startswith("progressive"):
            k = torch.full_like(prefix, self.scheduled_k())
        elif self.strategy == "position":
            k = torch.ceil(torch.sqrt(self.top_k * prefix))
        else:  # entropy, dynamic
            h = normalised_entropy(scores)  # (B, L)
            if self.strategy == "dynamic":
                h = h.cumsum(-1) / prefix
            k = torch.ceil(self.top_k * (self.min_scale + (self.max_scale - self.min_scale) * h))
        return k

    def forward(self, scores: torch.Tensor):
        """scores (B, L, L) -> selected_idx (B, L, K) long (-1 = invalid), valid (B, L, K) bool."""
        L = scores.shape[-1]
        scores = scores.masked_fill(future_mask(L, L, scores.device), float("-inf"))  # guard: never trust callers
        return top_k_per_row(scores, self.row_k(scores.detach()))  # row_k: (B, L)


def match_budget(k: torch.Tensor, top_k: int, positional: bool = False) -> torch.Tensor:
    """Rescale a per-row rule k (B, L) to a budget-matched k_t (B, L) long with 1 <= k_t <= t+1 whose mean
    over rows is fixed top-k's, mean_u min(top_k, u+1). Causal either way:
    positional (the rule depends on positions only): one scale c for the length L, found by bisection on
        positions alone, k_t = clamp(round(c * k_t), 1, t+1) (no token is looked at);
    otherwise (data-dependent rules): row t's k is scaled by the ratio of fixed top-k's keys to the rule's
        keys over rows <= t, k_t = clamp(round(k'_t * sum_{u<=t} min(top_k, u+1) / sum_{u<=t} k'_u), 1, t+1),
        k'_u = clamp(k_u, 1, u+1), so its running total tracks fixed top-k's (only rows <= t are used)."""
    prefix = torch.arange(1, k.shape[-1] + 1, device=k.device, dtype=torch.float32)
    rule = torch.minimum(k.float().clamp_min(1), prefix)
    target = prefix.clamp(max=top_k)
    if not positional:
        scale = target.cumsum(-1) / rule.cumsum(-1)
        return torch.minimum(torch.round(rule * scale).clamp_min(1), prefix).long()
    row = rule.reshape(-1, rule.shape[-1])[0]  # (L,) the same for every sequence

    def keys(c):
        return torch.minimum(torch.round(c * row).clamp_min(1), prefix)

    best = fit_monotone(lambda c: float(keys(c).mean()), float(target.mean()), 0.0, float(prefix[-1]) / float(row.min()))
    return keys(best).long().expand_as(k)


def prefix_share(prefix: torch.Tensor, ratio: float) -> torch.Tensor:
    """k_t = ceil(ratio * (t+1)) for prefix = t+1 (any shape, float); 1e-6 keeps exact products from rounding up."""
    return torch.ceil(ratio * prefix - 1e-6)


def fit_monotone(mean_of, target: float, lo: float, hi: float, iterations: int = 50) -> float:
    """The argument c in [lo, hi] of a non-decreasing (step) function `mean_of(c)` whose value is closest to
    `target`, by bisection (the two ends of the last bracket are compared)."""
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_of(mid) < target else (lo, mid)
    return min((lo, hi), key=lambda c: abs(mean_of(c) - target))


def top_k_per_row(scores: torch.Tensor, row_k: torch.Tensor):
    """Top-k_t of each causal row: scores (B, L, L), row_k (B, L) or (L,) long ->
    selected_idx (B, L, K) (-1 = invalid), valid (B, L, K), K = max k_t; ties go to the most recent key."""
    k_max = int(row_k.max()) if row_k.numel() else 0
    if k_max == 0:
        empty = torch.zeros(*scores.shape[:2], 0, dtype=torch.long, device=scores.device)
        return empty, empty.bool()
    idx, valid = TopKTokenSelector(k_max)(scores)  # (B, L, K), slot order not guaranteed by score
    values = scores.gather(-1, idx.clamp(min=0)).masked_fill(~valid, float("-inf"))
    recent_first = idx.argsort(-1, descending=True)  # then a stable sort by score keeps recent-first ties
    idx, values = idx.gather(-1, recent_first), values.gather(-1, recent_first)
    by_score = values.argsort(dim=-1, descending=True, stable=True)
    idx, valid = idx.gather(-1, by_score), valid.gather(-1, recent_first).gather(-1, by_score)
    valid = valid & (torch.arange(idx.shape[-1], device=idx.device) < row_k[..., None])  # first k_t slots
    return idx.masked_fill(~valid, -1), valid


def build_k_selector(name: str, top_k: int) -> AdaptiveKSelector:
    """Selector for a SELECTION_VARIANTS name ('ratio_25', 'progressive_cosine', 'adaptive_entropy', ...)."""
    if name not in SELECTION_VARIANTS:
        raise ValueError(f"k_strategy={name!r} is unknown; choose fixed or one of {', '.join(SELECTION_VARIANTS)}")
    if name.startswith("ratio_"):
        return AdaptiveKSelector(top_k, "ratio", ratio=int(name.split("_")[1]) / 100)
    matched = name.endswith("_matched")
    return AdaptiveKSelector(top_k, name.removeprefix("adaptive_").removesuffix("_matched"), budget_matched=matched)


# ----------------------------------------------------------------------------- content-adaptive k (the adaptive-sparsity experiment's controller)
# Adaptive sparsity (seed "Experiment 3"): how many keys each query keeps, from what the sequence is like.
@dataclass(frozen=True)
class AdaptiveKConfig:
    """The controller's knobs (the runner's presets set them; every value is checked by `validate`)."""
    min_fraction: float = 0.1  # share of the causal prefix kept at demand 0 ...
    max_fraction: float = 0.75  # ... and at demand 1
    k_min: int = 8  # bounds on k_t (and k_t <= t+1 always); k_min >= L makes the model dense
    k_max: int | None = None  # None: no cap below t+1
    length_exponent: float = 1.0  # k_t grows as (t+1)^exponent: 1 = a share of the prefix, 0.5 = sqrt
    complexity_weight: float = 0.5  # demand = w * complexity + (1 - w) * index-score entropy
    diversity_weight: float = 1.0  # complexity = weighted mean of diversity, surprise, hidden variance
    surprise_weight: float = 1.0
    variance_weight: float = 1.0
    smoothing: float = 0.1  # alpha of the add-alpha unigram count model (the cheap perplexity estimate)
    smooth_entropy: bool = False  # True: h_t = running mean of the entropy over rows <= t

    def validate(self) -> None:
        if not 0 < self.min_fraction <= self.max_fraction <= 1:
            raise ValueError(f"need 0 < min_fraction={self.min_fraction} <= max_fraction={self.max_fraction} <= 1")
        if not isinstance(self.k_min, int) or self.k_min < 1:
            raise ValueError(f"k_min={self.k_min!r} must be an integer >= 1")
        if self.k_max is not None and (not isinstance(self.k_max, int) or self.k_max < self.k_min):
            raise ValueError(f"k_max={self.k_max!r} must be None or an integer >= k_min={self.k_min}")
        if not 0 < self.length_exponent <= 1:
            raise ValueError(f"length_exponent={self.length_exponent} must be in (0, 1]")
        if not 0 <= self.complexity_weight <= 1:
            raise ValueError(f"complexity_weight={self.complexity_weight} must be in [0, 1]")
        weights = (self.diversity_weight, self.surprise_weight, self.variance_weight)
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"diversity/surprise/variance weights {weights} must be >= 0 with a positive sum")
        if self.smoothing <= 0:
            raise ValueError(f"smoothing={self.smoothing} must be > 0 (add-alpha of the unigram count model)")


def _positions(L: int, device) -> torch.Tensor:
    """(L,) float: t+1 for t = 0..L-1 (the causal prefix length)."""
    return torch.arange(1, L + 1, device=device, dtype=torch.float32)


def running_mean(values: torch.Tensor) -> torch.Tensor:
    """(..., L) -> (..., L): the mean over positions <= t."""
    return values.cumsum(-1) / _positions(values.shape[-1], values.device)


def previous_occurrences(ids: torch.Tensor) -> torch.Tensor:
    """ids (B, L) long -> (B, L) long: how often ids[b, t] occurs at positions < t (one stable sort, no loop)."""
    sorted_ids, order = ids.sort(dim=-1, stable=True)  # equal ids keep their positions in ascending order
    pos = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group_start = torch.where(starts, pos, 0).cummax(-1).values  # sorted position where this id's run begins
    return torch.empty_like(ids).scatter_(-1, order, pos - group_start)


class ContentComplexityAnalyzer:
    """Per-prefix content statistics, each in [0, 1] and causal (position t reads positions <= t only)."""

    def __init__(self, vocab_size: int, config: AdaptiveKConfig = AdaptiveKConfig()):
        if vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size} must be >= 2")
        config.validate()
        self.vocab_size, self.alpha = vocab_size, config.smoothing
        weights = torch.tensor([config.diversity_weight, config.surprise_weight, config.variance_weight])
        self.weights = weights / weights.sum()

    def token_diversity(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> distinct tokens among positions <= t, over t+1 (B, L); 1 at t = 0."""
        return running_mean((previous_occurrences(ids) == 0).float())

    def surprise_nats(self, ids: torch.Tensor, logits: torch.Tensor | None = None):
        """ids (B, L) -> (nats (B, L), the most nats position t can have (B, L) or (L,)).

        Without logits: -log p(x_t) under an add-alpha unigram model of the tokens before t,
        p = (count_<t(x_t) + alpha) / (t + alpha V); its maximum is an unseen token's. With logits (B, L, V),
        the model's own prediction of x_t from position t-1 (t = 0: log V), with maximum log V."""
        L = ids.shape[-1]
        if logits is not None:
            if logits.shape[:2] != ids.shape or logits.shape[-1] != self.vocab_size:
                raise ValueError(f"logits {tuple(logits.shape)} do not match ids {tuple(ids.shape)} and "
                                 f"vocab_size={self.vocab_size}; pass the model's (B, L, vocab) logits for these ids")
            log_p = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, L-1)
            first = torch.full_like(ids[:, :1], math.log(self.vocab_size), dtype=torch.float32)
            return torch.cat([first, -log_p], 1), torch.full((L,), math.log(self.vocab_size), device=ids.device)
        seen = _positions(L, ids.device) - 1  # tokens before t
        denominator = seen + self.alpha * self.vocab_size
        nats = -torch.log((previous_occurrences(ids).float() + self.alpha) / denominator)
        return nats, torch.log(denominator / self.alpha)

    def perplexity(self, ids: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """The cheap perplexity estimate of the prefix: exp(mean surprise over positions <= t) (B, L)."""
        return running_mean(self.surprise_nats(ids, logits)[0]).exp()

    def surprise(self, ids: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over positions <= t of each token's surprise over the most it could be, in [0, 1] (B, L)."""
        nats, most = self.surprise_nats(ids, logits)
        return running_mean((nats / most).clamp(0, 1))

    def token_features(self, ids: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) -> [diversity, surprise] (B, L, 2): what the model computes once per forward."""
        return torch.stack([self.token_diversity(ids), self.surprise(ids, logits)], -1)

    @staticmethod
    def hidden_variance(hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, d) -> variance over positions <= t over the second moment, averaged over features
        (B, L), in [0, 1]: 0 when the prefix repeats one state (and at t = 0)."""
        n = _positions(hidden.shape[1], hidden.device)[:, None]
        h = hidden.float()
        first, second = h.cumsum(1) / n, (h * h).cumsum(1) / n  # (B, L, d)
        variance, power = (second - first * first).clamp_min(0).mean(-1), second.mean(-1)
        return torch.where(power > 0, variance / power.clamp_min(1e-30), torch.zeros_like(power)).clamp(0, 1)

    def complexity(self, token_features: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """token_features (B, L, 2), hidden (B, L, d) -> weighted mean of diversity, surprise and hidden
        variance (B, L) in [0, 1]."""
        parts = torch.cat([token_features, self.hidden_variance(hidden)[..., None]], -1)  # (B, L, 3)
        return parts @ self.weights.to(parts.device)


class AttentionEntropyEstimator:
    """How widely a query's attention spreads, estimated from the lightning indexer's causal scores (the indexer
    is trained so that softmax(I[t, :t+1]) matches the attention distribution, so no attention is computed): the
    effective number of keys exp(H(softmax(I[t, :t+1]))) over the prefix length t+1, i.e. (t+1)^(h_t - 1) with
    h_t the normalised entropy — in (0, 1], 1 for a flat row, 1/(t+1) for a one-hot one (B, L). A share of the
    prefix, like k_t's, with more range than h_t (a row spread evenly over 10 % of 256 keys has h = 0.58 but
    share 0.1). With smooth=True: its running mean over rows <= t."""

    def __init__(self, smooth: bool = False):
        self.smooth = smooth

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (B, L, L) with -inf where s > t -> (B, L)."""
        share = _positions(scores.shape[-1], scores.device) ** (normalised_entropy(scores) - 1)
        return running_mean(share) if self.smooth else share


class AdaptiveKCalculator:
    """(length, complexity, entropy) -> k_t within [k_min, k_max] and at most t+1."""

    def __init__(self, config: AdaptiveKConfig = AdaptiveKConfig()):
        config.validate()
        self.config = config

    def demand(self, complexity: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        w = self.config.complexity_weight
        return w * complexity + (1 - w) * entropy

    def __call__(self, complexity: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """complexity, entropy (B, L) in [0, 1] -> k_t (B, L) long."""
        c = self.config
        prefix = _positions(complexity.shape[-1], complexity.device)
        share = c.min_fraction + (c.max_fraction - c.min_fraction) * self.demand(complexity, entropy).clamp(0, 1)
        k = prefix_share(prefix ** c.length_exponent, share).clamp_min(c.k_min)
        if c.k_max is not None:
            k = k.clamp_max(c.k_max)
        return torch.minimum(k, prefix).long()


@dataclass
class KDecision:
    """One layer's choice for a batch: k (B, L) long and what it was computed from (B, L) each."""
    k: torch.Tensor
    complexity: torch.Tensor
    entropy: torch.Tensor


class DynamicSparsityController(nn.Module):
    """A layer's selector with k_t from the controller: (scores (B, L, L), tokens=, hidden=) -> selected_idx, valid
    (B, L, K), K = max k_t, slots past a row's k_t invalid. `tokens` (B, L, 2) are the sequence's token features
    (AdaptiveMoELLM computes them once per forward), `hidden` (B, L, d) the layer's input; the layer passes both
    on every call. `recording` logs the chosen k per sequence."""

    def __init__(self, config: AdaptiveKConfig, analyzer: ContentComplexityAnalyzer, layer: int = 0):
        super().__init__()
        self.config, self.analyzer, self.layer = config, analyzer, layer
        self.calculator = AdaptiveKCalculator(config)
        self.entropy = AttentionEntropyEstimator(config.smooth_entropy)
        self.log: list[dict] | None = None

    @contextlib.contextmanager
    def recording(self):
        """Log one record per forward (per sequence: mean and std of k, mean complexity and entropy)."""
        self.log = []
        try:
            yield self.log
        finally:
            self.log = None

    def decide(self, scores: torch.Tensor, tokens: torch.Tensor | None, hidden: torch.Tensor | None) -> KDecision:
        """scores (B, L, L), -inf where s > t; tokens (B, L, 2); hidden (B, L, d) -> KDecision for every query."""
        B, L = scores.shape[:2]
        if tokens is None or hidden is None:
            raise ValueError("DynamicSparsityController needs the sequence's token features and the layer's hidden "
                             "states: run it inside AdaptiveMoELLM (or call controller(scores, tokens=, hidden=))")
        if tokens.shape[:2] != (B, L) or hidden.shape[:2] != (B, L):
            raise ValueError(f"tokens {tuple(tokens.shape)} / hidden {tuple(hidden.shape)} do not match the index "
                             f"scores {tuple(scores.shape)}")
        complexity = self.analyzer.complexity(tokens, hidden)
        entropy = self.entropy(scores)
        return KDecision(self.calculator(complexity, entropy), complexity, entropy)

    def forward(self, scores: torch.Tensor, tokens: torch.Tensor | None = None, hidden: torch.Tensor | None = None):
        L = scores.shape[-1]
        scores = scores.masked_fill(future_mask(L, L, scores.device), float("-inf"))  # guard: never trust callers
        check_no_nan(scores)
        decision = self.decide(scores, tokens, hidden)
        if self.log is not None:
            k = decision.k.float()
            self.log.append({"layer": self.layer, "k_mean": k.mean(-1).tolist(), "k_std": k.std(-1).tolist(),
                             "complexity": decision.complexity.mean(-1).tolist(),
                             "entropy": decision.entropy.mean(-1).tolist()})
        return top_k_per_row(scores, decision.k)


# ----------------------------------------------------------------------------- budget matching
def mean_keys_of_share(L: int, ratio: float) -> float:
    """Mean keys per query at length L when k_t = ceil(ratio (t+1)) (at least 1, at most t+1)."""
    prefix = _positions(L, "cpu")
    return float(torch.minimum(prefix_share(prefix, ratio).clamp_min(1), prefix).mean())


def ratio_for_mean_keys(L: int, mean_keys: float) -> float:
    """The prefix share r whose mean keys per query at length L (mean_keys_of_share) is closest to `mean_keys`."""
    if not (isinstance(mean_keys, (int, float)) and 1 <= mean_keys <= (L + 1) / 2):
        raise ValueError(f"mean_keys={mean_keys!r} cannot be matched at L={L}: a prefix share keeps between 1 and "
                         f"(L+1)/2 = {(L + 1) / 2} keys per query on average")
    ratio = fit_monotone(lambda r: mean_keys_of_share(L, r), float(mean_keys), 0.0, 1.0)
    return max(ratio, 1 / (2 * L))  # below 1/L every query keeps one key: the same budget, a valid share
