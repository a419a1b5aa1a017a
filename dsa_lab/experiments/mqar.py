"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023): a long-context retrieval probe.

Each sequence (length L) is laid out like Zoology's MQAR:

    k1 v1 k2 v2 ... kP vP | noise ... kq vq noise ... kq' vq' noise ...
    '---- P pairs -------'  '--- Q queries spread over the rest of the sequence ---'

Keys, values and noise come from disjoint token ranges (token 0 is reserved: the constant filler when
`noise="constant"`). A query repeats a key from the pair region; the target at the query's position is
that key's value. Every key is queried at most once, and query slots are drawn
uniformly over the whole rest of the sequence, so query-key distances span ~2 .. L: a local window of w
tokens cannot see the pairs of most queries once L >> w. `distance` records, per answer position, how far
back the key it asks about sits.

Unlike Zoology, the answer is NOT written into `inputs` after its query by default (`show_answers=False`;
that position holds noise). With answers shown and every key queried once, the answers already given
reveal which values are still unasked, and a model reaches mean(1/P, 1/(P-1), ..., 1) accuracy (0.52 for
P = 4) by elimination, without retrieving anything: measured on the classic model, it plateaus exactly there.

Everything is vectorised across sequences and seeded with a `torch.Generator`: the same seed gives the same
batch. `MQARStream` draws fresh training batches per (seed, step) and a held-out set from a separate seed
stream. `accuracy` scores logits at answer positions, overall and by power-of-two distance bucket.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100  # cross-entropy ignore_index used in `targets`
FILLER_TOKEN = 0  # reserved; fills non-pair, non-query positions when noise="constant"
NUM_SPECIAL = 1
NOISE_MODES = ("random", "constant")


@dataclass
class MQARBatch:
    """inputs (N, L) long; targets (N, L) long, IGNORE_INDEX except at answer positions;
    distance (N, L) long: query position - position of the key it asks about (-1 where no answer)."""
    inputs: torch.Tensor
    targets: torch.Tensor
    distance: torch.Tensor

    def to(self, device) -> "MQARBatch":
        return MQARBatch(self.inputs.to(device), self.targets.to(device), self.distance.to(device))

    def __len__(self) -> int:
        return self.inputs.shape[0]


@dataclass(frozen=True)
class TokenRanges:
    """Half-open token-id ranges [lo, hi) of keys, values and noise inside the vocabulary."""
    keys: tuple[int, int]
    values: tuple[int, int]
    noise: tuple[int, int]


def token_ranges(vocab_size: int, num_keys: int | None = None, num_values: int | None = None) -> TokenRanges:
    """Split the vocabulary: [0] special | keys | values | noise (the rest, possibly empty).

    Defaults: a quarter of the non-special ids for keys, a quarter for values, the rest noise.
    """
    free = vocab_size - NUM_SPECIAL
    num_keys = free // 4 if num_keys is None else num_keys
    num_values = free // 4 if num_values is None else num_values
    if num_keys < 1 or num_values < 1 or num_keys + num_values > free:
        raise ValueError(f"vocab_size={vocab_size} cannot hold num_keys={num_keys} + num_values={num_values} "
                         f"(+{NUM_SPECIAL} special); raise vocab_size or lower num_keys/num_values")
    k_lo = NUM_SPECIAL
    v_lo = k_lo + num_keys
    n_lo = v_lo + num_values
    return TokenRanges((k_lo, v_lo), (v_lo, n_lo), (n_lo, vocab_size))


def make_mqar(n_sequences: int, seq_len: int, num_pairs: int, vocab_size: int, seed: int,
              num_queries: int | None = None, num_keys: int | None = None, num_values: int | None = None,
              noise: str = "random", show_answers: bool = False) -> MQARBatch:
    """Draw `n_sequences` MQAR sequences of length `seq_len` with `num_pairs` key-value pairs each.

    num_queries (default num_pairs, at most num_pairs): keys queried per sequence, each once.
    num_keys / num_values: sizes of the key and value token ranges (see `token_ranges`).
    noise: "random" fills free positions with tokens from the noise range (constant filler if that range
    is empty); "constant" fills them with FILLER_TOKEN.
    show_answers: write each answer into `inputs` right after its query (Zoology's teacher-forced layout;
    opens the elimination shortcut described in the module docstring).
    """
    num_queries = num_pairs if num_queries is None else num_queries
    if n_sequences < 1:
        raise ValueError(f"n_sequences={n_sequences} must be >= 1")
    if num_pairs < 1 or not 1 <= num_queries <= num_pairs:
        raise ValueError(f"num_pairs={num_pairs}, num_queries={num_queries}: need 1 <= num_queries <= num_pairs")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise={noise!r} is unknown; choose one of {', '.join(NOISE_MODES)}")
    ranges = token_ranges(vocab_size, num_keys, num_values)
    n_keys = ranges.keys[1] - ranges.keys[0]
    if num_pairs > n_keys:
        raise ValueError(f"num_pairs={num_pairs} exceeds num_keys={n_keys}: keys in a sequence are distinct; "
                         f"raise num_keys/vocab_size or lower num_pairs")
    pair_len = 2 * num_pairs
    num_slots = (seq_len - pair_len) // 2  # query slots: (key, value) at positions pair_len + 2j, +1
    if num_slots < num_queries:
        raise ValueError(f"seq_len={seq_len} is too short for num_pairs={num_pairs} and num_queries={num_queries}: "
                         f"need seq_len >= {pair_len + 2 * num_queries}")

    gen = torch.Generator().manual_seed(int(seed))
    N, L, P, Q = n_sequences, seq_len, num_pairs, num_queries
    rows = torch.arange(N).unsqueeze(1)  # (N, 1)

    # distinct keys per sequence, values drawn with replacement
    keys = torch.rand(N, n_keys, generator=gen).argsort(dim=1)[:, :P] + ranges.keys[0]  # (N, P)
    values = torch.randint(*ranges.values, (N, P), generator=gen)  # (N, P)
    # which pair each query asks about (each at most once), and where the query sits
    asked = torch.rand(N, P, generator=gen).argsort(dim=1)[:, :Q]  # (N, Q) pair index
    slot = torch.rand(N, num_slots, generator=gen).argsort(dim=1)[:, :Q].sort(dim=1).values  # (N, Q)
    query_pos = pair_len + 2 * slot  # (N, Q)

    if noise == "random" and ranges.noise[1] > ranges.noise[0]:
        inputs = torch.randint(*ranges.noise, (N, L), generator=gen)
    else:
        inputs = torch.full((N, L), FILLER_TOKEN, dtype=torch.long)
    inputs[:, 0:pair_len:2] = keys
    inputs[:, 1:pair_len:2] = values
    answer = values.gather(1, asked)  # (N, Q)
    inputs[rows, query_pos] = keys.gather(1, asked)
    if show_answers:
        inputs[rows, query_pos + 1] = answer

    targets = torch.full((N, L), IGNORE_INDEX, dtype=torch.long)
    targets[rows, query_pos] = answer
    distance = torch.full((N, L), -1, dtype=torch.long)
    distance[rows, query_pos] = query_pos - 2 * asked  # key of pair i sits at position 2i
    return MQARBatch(inputs, targets, distance)


def _derived_seed(seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for (seed, stream, index); distinct streams give unrelated seeds."""
    return int(np.random.SeedSequence([int(seed), int(stream), int(index)]).generate_state(1, np.uint64)[0]
               & np.uint64(2 ** 63 - 1))


TRAIN_STREAM, HELD_OUT_STREAM = 0, 1


class MQARStream:
    """Deterministic MQAR training batches: `batch(step)` is a fresh batch per (seed, step);
    `held_out(n)` is a fixed evaluation set from a separate seed stream (never a training seed)."""

    def __init__(self, seq_len: int, num_pairs: int, vocab_size: int, batch_size: int, seed: int = 0, **options):
        self.seq_len, self.num_pairs, self.vocab_size = seq_len, num_pairs, vocab_size
        self.batch_size, self.seed, self.options = batch_size, seed, options
        make_mqar(1, seq_len, num_pairs, vocab_size, 0, **options)  # validate the settings now

    def train_seed(self, step: int) -> int:
        return _derived_seed(self.seed, TRAIN_STREAM, step)

    def held_out_seed(self) -> int:
        return _derived_seed(self.seed, HELD_OUT_STREAM, 0)

    def batch(self, step: int) -> MQARBatch:
        return make_mqar(self.batch_size, self.seq_len, self.num_pairs, self.vocab_size, self.train_seed(step),
                         **self.options)

    def held_out(self, n_sequences: int) -> MQARBatch:
        return make_mqar(n_sequences, self.seq_len, self.num_pairs, self.vocab_size, self.held_out_seed(),
                         **self.options)

    def __iter__(self):
        step = 0
        while True:
            yield self.batch(step)
            step += 1


def distance_bucket(distance: torch.Tensor) -> torch.Tensor:
    """Power-of-two bucket b of each distance d >= 1: 2^b <= d < 2^(b+1)."""
    return torch.floor(torch.log2(distance.clamp(min=1).double())).long()


def bucket_label(b: int) -> str:
    return f"{2 ** b}-{2 ** (b + 1) - 1}"


@torch.no_grad()
def accuracy(logits: torch.Tensor, batch: MQARBatch) -> dict:
    """logits (N, L, vocab) -> {"accuracy", "n_answers", "by_distance": {"lo-hi": {"accuracy", "n"}}}.

    A prediction is the argmax over the whole vocabulary at an answer position (targets != -100);
    buckets are powers of two of the query-key distance ("8-15" holds 8 <= d <= 15), sorted by distance.
    """
    if logits.shape[:2] != batch.targets.shape:
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match targets {tuple(batch.targets.shape)}")
    mask = batch.targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == batch.targets)[mask].double()  # (n_answers,)
    buckets = distance_bucket(batch.distance[mask])
    by_distance = {}
    for b in buckets.unique().tolist():
        hit = correct[buckets == b]
        by_distance[bucket_label(b)] = {"accuracy": hit.mean().item(), "n": hit.numel()}
    return {"accuracy": correct.mean().item() if correct.numel() else math.nan,
            "n_answers": int(correct.numel()), "by_distance": by_distance}


@torch.no_grad()
def answer_hits(selected: list[torch.Tensor], distance: torch.Tensor, correct: torch.Tensor | None = None) -> list[dict]:
    """Does each layer's selection at an answer row hold the tokens the answer needs? selected: per layer (N, L, K)
    long key positions (-1 = empty slot); distance (N, L): how far back the row's key token sits (-1: not an answer
    row; MQARBatch.distance, or the retrofit copy probe's) -> per layer {"key", "value": share of answer rows whose
    selected set holds the key token (position t - distance) / the token after it (its value: what the last layer
    must read to answer), "value_by_distance": {bucket: share}} (buckets as in `accuracy`). With `correct` (N, L)
    bool (the model's answer right at each position) also "answered_if_held" / "answered_if_missed": the answer
    accuracy at the rows whose selection holds / misses the value token (nan where there are none) and "n_missed":
    does the layer's miss explain the wrong answers?"""
    rows, cols = (distance >= 0).nonzero(as_tuple=True)  # answer positions
    key_pos = cols - distance[rows, cols]  # (n_answers,)
    buckets = distance_bucket(distance[rows, cols])
    per_layer = []
    for sel in selected:
        if sel.shape[:2] != distance.shape:
            raise ValueError(f"selection shape {tuple(sel.shape)} does not match the answer rows {tuple(distance.shape)}")
        chosen = sel[rows, cols]  # (n_answers, K)
        key_hit = (chosen == key_pos[:, None]).any(-1).double()
        value_hit = (chosen == key_pos[:, None] + 1).any(-1).double()
        by_distance = {bucket_label(b): value_hit[buckets == b].mean().item() for b in buckets.unique().tolist()}
        hits = {"key": key_hit.mean().item() if len(rows) else math.nan,
                "value": value_hit.mean().item() if len(rows) else math.nan, "value_by_distance": by_distance}
        if correct is not None:
            right, held = correct[rows, cols].double(), value_hit.bool()
            hits.update(answered_if_held=right[held].mean().item() if held.any() else math.nan,
                        answered_if_missed=right[~held].mean().item() if (~held).any() else math.nan,
                        n_missed=int((~held).sum()))
        per_layer.append(hits)
    return per_layer
