"""MQAR data: answers are the paired values, distances, determinism, held-out seeds, accuracy."""
import math

import pytest
import torch

from dsa_lab.experiments.mqar import IGNORE_INDEX, MQARBatch, MQARStream, accuracy, answer_hits, make_mqar, token_ranges


def _hand_check(batch: MQARBatch, num_pairs: int, vocab_size: int, show_answers=False, **kw):
    """Plain loops: each answer position t holds a key whose first occurrence j < t is in the pair
    region; the target is the token right after that occurrence; distance = t - j; -1 elsewhere."""
    r = token_ranges(vocab_size, kw.get("num_keys"), kw.get("num_values"))
    inputs, targets, distance = batch.inputs.tolist(), batch.targets.tolist(), batch.distance.tolist()
    n_answers = 0
    for row_in, row_tgt, row_dist in zip(inputs, targets, distance):
        for t, (tok, tgt, d) in enumerate(zip(row_in, row_tgt, row_dist)):
            if tgt == IGNORE_INDEX:
                assert d == -1, f"distance {d} at non-answer position {t}"
                continue
            n_answers += 1
            assert r.keys[0] <= tok < r.keys[1], f"query token {tok} at {t} is not a key"
            assert r.values[0] <= tgt < r.values[1], f"target {tgt} at {t} is not a value"
            j = row_in.index(tok)  # the key's first (pair-region) occurrence
            assert j < t and j < 2 * num_pairs and j % 2 == 0
            assert row_in[j + 1] == tgt, "the target is not the value stored after the key"
            assert d == t - j, f"distance {d} at {t}, expected {t - j}"
            if show_answers:  # teacher forcing: the answer follows the query in the inputs
                assert row_in[t + 1] == tgt
            else:  # the answer never appears outside its pair: no elimination over given answers
                assert [p for p, x in enumerate(row_in) if x == tgt and p > 0 and row_in[p - 1] == tok] == [j + 1]
                assert not r.values[0] <= row_in[t + 1] < r.values[1]
    return n_answers


@pytest.mark.parametrize("noise", ["random", "constant"])
@pytest.mark.parametrize("show_answers", [False, True])
def test_answers_and_distances_against_hand_loop(noise, show_answers):
    kw = dict(num_keys=12, num_values=10)
    batch = make_mqar(16, 40, 5, 64, seed=3, noise=noise, show_answers=show_answers, **kw)
    assert batch.inputs.shape == batch.targets.shape == batch.distance.shape == (16, 40)
    assert _hand_check(batch, 5, 64, show_answers, **kw) == 16 * 5  # num_queries defaults to num_pairs


def test_token_ranges_disjoint_and_keys_distinct():
    vocab, P = 256, 8
    r = token_ranges(vocab)
    assert r.keys[1] == r.values[0] and r.values[1] == r.noise[0] and r.noise[1] == vocab and r.keys[0] >= 1
    b = make_mqar(32, 128, P, vocab, seed=0, num_queries=3)
    keys, values = b.inputs[:, 0:2 * P:2], b.inputs[:, 1:2 * P:2]
    assert ((keys >= r.keys[0]) & (keys < r.keys[1])).all()
    assert ((values >= r.values[0]) & (values < r.values[1])).all()
    assert all(len(set(row)) == P for row in keys.tolist())  # distinct keys: the answer is unique
    rest = b.inputs[:, 2 * P:]
    query_or_answer = torch.zeros_like(rest, dtype=torch.bool)
    query_or_answer[:, :-1] |= b.targets[:, 2 * P:-1] != IGNORE_INDEX
    query_or_answer[:, 1:] |= b.targets[:, 2 * P:-1] != IGNORE_INDEX
    noise = rest[~query_or_answer]
    assert ((noise >= r.noise[0]) & (noise < r.noise[1])).all()  # noise never looks like a key or value
    assert ((b.targets != IGNORE_INDEX).sum(1) == 3).all()
    queried = [row_in[row_t != IGNORE_INDEX].tolist() for row_in, row_t in zip(b.inputs, b.targets)]
    assert all(len(set(q)) == 3 for q in queried)  # each key queried at most once: no shorter repeat
    const = make_mqar(4, 64, 2, 64, seed=0, noise="constant")
    assert (const.inputs[:, 4:][(const.targets[:, 4:] == IGNORE_INDEX)
                                & (const.targets[:, 3:-1] == IGNORE_INDEX)] == 0).all()


def test_distances_span_the_sequence():
    L = 512
    b = make_mqar(64, L, 8, 512, seed=1)
    d = b.distance[b.distance >= 0]
    assert d.max() >= 0.9 * L and d.min() < 32
    assert (d > 128).float().mean() > 0.6  # most queries are beyond a 128-token window


def test_deterministic_per_seed_and_different_across_seeds():
    a, b, c = (make_mqar(8, 64, 4, 128, seed=s) for s in (7, 7, 8))
    for name in ("inputs", "targets", "distance"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.inputs, c.inputs) and not torch.equal(a.distance, c.distance)


def test_stream_fresh_per_step_and_held_out_is_disjoint():
    stream = MQARStream(64, 4, 128, batch_size=8, seed=5)
    again = MQARStream(64, 4, 128, batch_size=8, seed=5)
    assert torch.equal(stream.batch(3).inputs, again.batch(3).inputs)
    assert not torch.equal(stream.batch(3).inputs, stream.batch(4).inputs)
    assert not torch.equal(stream.batch(0).inputs, MQARStream(64, 4, 128, 8, seed=6).batch(0).inputs)
    first = next(iter(stream))
    assert torch.equal(first.inputs, stream.batch(0).inputs)
    train_seeds = {stream.train_seed(s) for s in range(2000)}
    assert len(train_seeds) == 2000 and stream.held_out_seed() not in train_seeds
    held = stream.held_out(32)
    assert torch.equal(held.inputs, again.held_out(32).inputs)
    seen = {tuple(row) for s in range(50) for row in stream.batch(s).inputs.tolist()}
    assert not any(tuple(row) in seen for row in held.inputs.tolist())


def test_accuracy_against_hand_computed_logits():
    vocab = 16
    inputs = torch.zeros(2, 8, dtype=torch.long)
    targets = torch.full((2, 8), IGNORE_INDEX)
    distance = torch.full((2, 8), -1)
    # answers: (row, pos, target, distance)
    answers = [(0, 2, 5, 2), (0, 5, 6, 5), (1, 3, 7, 3), (1, 6, 9, 6)]
    for r, t, y, d in answers:
        targets[r, t], distance[r, t] = y, d
    logits = torch.zeros(2, 8, vocab)
    logits[..., 0] = 1.0  # non-answer positions predict 0 (never scored)
    logits[0, 2, 5] = 2.0  # correct, d=2  -> bucket 2-3
    logits[0, 5, 3] = 2.0  # wrong,   d=5  -> bucket 4-7
    logits[1, 3, 7] = 2.0  # correct, d=3  -> bucket 2-3
    logits[1, 6, 9] = 2.0  # correct, d=6  -> bucket 4-7
    out = accuracy(logits, MQARBatch(inputs, targets, distance))
    assert out["accuracy"] == pytest.approx(0.75) and out["n_answers"] == 4
    assert out["by_distance"] == {"2-3": {"accuracy": 1.0, "n": 2}, "4-7": {"accuracy": 0.5, "n": 2}}
    assert list(out["by_distance"]) == ["2-3", "4-7"]
    d1 = distance.clone()
    d1[0, 2] = 1
    assert list(accuracy(logits, MQARBatch(inputs, targets, d1))["by_distance"]) == ["1-1", "2-3", "4-7"]


def test_answer_hits_against_a_loop_over_answer_rows():
    """A layer's selection holds the asked pair's key (position t - distance) or value (the next one) at an answer
    row: checked against plain loops on a real batch with random selections (and a planted full hit)."""
    batch = make_mqar(6, 64, 4, 64, seed=3)
    gen = torch.Generator().manual_seed(0)
    layers = [torch.randint(-1, 64, (6, 64, 12), generator=gen) for _ in range(2)]
    rows, cols = (batch.distance >= 0).nonzero(as_tuple=True)
    for r, t in zip(rows.tolist(), cols.tolist()):  # layer 1 always selects the value token
        layers[1][r, t, 5] = t - batch.distance[r, t] + 1
    out = answer_hits(layers, batch.distance)
    for layer, hits in zip(layers, out):
        key, value, by_bucket = [], [], {}
        for r, t in zip(rows.tolist(), cols.tolist()):
            j = t - batch.distance[r, t].item()
            chosen = set(layer[r, t].tolist())
            key.append(j in chosen)
            value.append(j + 1 in chosen)
            d = batch.distance[r, t].item()
            by_bucket.setdefault(f"{2 ** (d.bit_length() - 1)}-{2 ** d.bit_length() - 1}", []).append(j + 1 in chosen)
        assert hits["key"] == pytest.approx(sum(key) / len(key)) and hits["value"] == pytest.approx(sum(value) / len(value))
        assert hits["value_by_distance"] == pytest.approx({b: sum(v) / len(v) for b, v in by_bucket.items()})
    assert out[1]["value"] == 1.0 and out[0]["value"] < 0.5
    with pytest.raises(ValueError, match="does not match"):
        answer_hits([layers[0][:, :32]], batch.distance)


def test_answer_hits_split_the_accuracy_by_whether_the_value_is_selected():
    """With the model's per-position correctness: the answer accuracy at rows whose selection holds the value token
    and at rows where it misses, against a loop; a layer that always holds it has no missed rows (nan, n_missed 0)."""
    batch = make_mqar(6, 64, 4, 64, seed=3)
    gen = torch.Generator().manual_seed(1)
    layers = [torch.randint(-1, 64, (6, 64, 12), generator=gen) for _ in range(2)]
    rows, cols = (batch.distance >= 0).nonzero(as_tuple=True)
    for r, t in zip(rows.tolist(), cols.tolist()):
        layers[1][r, t, 0] = t - batch.distance[r, t] + 1
        if r % 2:  # layer 0 holds the value at odd rows
            layers[0][r, t, 0] = t - batch.distance[r, t] + 1
    correct = torch.rand(6, 64, generator=gen) < 0.5
    out = answer_hits(layers, batch.distance, correct)
    held = [(r % 2 == 1) or (t - batch.distance[r, t].item() + 1) in layers[0][r, t].tolist()
            for r, t in zip(rows.tolist(), cols.tolist())]
    right = [bool(correct[r, t]) for r, t in zip(rows.tolist(), cols.tolist())]
    want_held = sum(c for c, h in zip(right, held) if h) / sum(held)
    want_missed = sum(c for c, h in zip(right, held) if not h) / (len(held) - sum(held))
    assert out[0]["answered_if_held"] == pytest.approx(want_held)
    assert out[0]["answered_if_missed"] == pytest.approx(want_missed) and out[0]["n_missed"] == len(held) - sum(held)
    assert out[1]["answered_if_held"] == pytest.approx(sum(right) / len(right))
    assert math.isnan(out[1]["answered_if_missed"]) and out[1]["n_missed"] == 0
    assert "answered_if_held" not in answer_hits(layers, batch.distance)[0]  # without correctness: not reported


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=10), "seq_len=10 is too short"),
    (dict(num_pairs=0), "num_pairs=0"),
    (dict(num_queries=9), "num_queries=9"),
    (dict(vocab_size=8, num_keys=8), "vocab_size=8"),
    (dict(num_keys=4), "num_pairs=8 exceeds num_keys=4"),
    (dict(noise="zeros"), "noise='zeros'"),
])
def test_bad_settings_raise_value_error(kwargs, match):
    args = dict(n_sequences=2, seq_len=64, num_pairs=8, vocab_size=64, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        make_mqar(**args)
