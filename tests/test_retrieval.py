"""Retrieval evaluations (dsa_lab/experiments/retrieval.py): passkey prompts, the accuracy bookkeeping, greedy exact
match in one forward, the per-layer hit on the sparse forward's selections, the copy-probe layout, Wilson CIs and
the passkey heat maps (tiny random Llama and a character tokenizer: no download, seconds)."""
import dataclasses

import pytest
import torch

from dsa_lab.experiments import retrieval
from dsa_lab.experiments import retrofit as rx
from dsa_lab.interop import retrofit
from test_retrofit import tiny_retrofit


class CharTokenizer:
    """One token per character (its code point): every piece's position is easy to check."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


TOK = CharTokenizer()
L = 400


def text(ids) -> str:
    return TOK.decode(ids.tolist())


def test_passkey_prompt_puts_the_key_at_the_depth_and_appends_the_answer():
    """Exactly L tokens: intro, filler with the needle after the asked share of it (snapped down to a whole filler
    sentence for the classic filler, exact for held-out text), the question, then ' <key>' as the scored answer;
    `needed` points at the needle's two copies of each answer token. Caught: the needle placed at depth * L instead
    of depth * filler, the answer's rows off by one."""
    unit = len(retrieval.PASSKEY_FILLER)
    intro = len(retrieval.PASSKEY_INTRO)
    needle = " The pass key is 71432. Remember it. 71432 is the pass key."
    n = L - intro - len(needle) - len(retrieval.PASSKEY_QUESTION) - len(" 71432")  # filler tokens
    for depth in (0.0, 0.3, 0.5, 1.0):
        p = retrieval.passkey_prompt(TOK, L, depth, "71432", [ord(c) for c in retrieval.PASSKEY_FILLER] * 9, unit)
        cut = p.needle_start - intro
        assert len(p.ids) == L and cut % unit == 0 and p.needle_depth == cut / n
        assert abs(depth * n - cut) <= unit / 2 or cut == n - n % unit
        assert text(p.ids[:intro]) == retrieval.PASSKEY_INTRO
        assert text(p.ids[intro:p.needle_start]) == (retrieval.PASSKEY_FILLER * 9)[:cut]
        assert text(p.ids[p.needle_start:]).startswith(needle)
        assert text(p.ids[:p.answer_start]).endswith("? The pass key is") and text(p.ids[p.answer_start:]) == " 71432"
        assert [text(p.ids[col]) for col in p.needed.T] == [" 71432", " 71432"]
    heldout = torch.arange(1000, 1000 + 3 * L)
    prompts = retrieval.passkey_prompts(TOK, L, [0.0, 0.5, 1.0], 2, seed=3, filler="heldout", heldout=heldout)
    assert len(prompts) == 6 and len({p.key for p in prompts}) == 6 and all(len(p.key) == 5 for p in prompts)
    mid = prompts[4]  # trial 1, depth 0.5: its filler starts at offset L of the held-out stream, no snapping
    assert mid.needle_start - intro == round(0.5 * n) and mid.ids[intro].item() == 1000 + L
    assert [p.needle_depth for p in prompts[:3]] == [0.0, round(0.5 * n) / n, 1.0]
    with pytest.raises(ValueError, match="use seq_lens >= "):
        retrieval.passkey_prompt(TOK, 200, 0.5, "12345", [32] * 200)


class Oracle:
    """A fake model that reads the input: row t's argmax is token t + 1 (`shift` 0), or token t (`shift` -1: an
    off-by-one), or the right token except at `wrong` positions."""

    def __init__(self, shift: int = 0, wrong: tuple = ()):
        self.shift, self.wrong = shift, wrong

    def __call__(self, ids, plan):
        nxt = torch.roll(ids, -1 - self.shift, dims=1)
        for pos in self.wrong:
            nxt[0, pos - 1] += 1  # the row predicting position `pos` answers another token
        return torch.nn.functional.one_hot(nxt, 200).float() * 5, retrofit.RetrofitAux()


def test_accuracy_bookkeeping_counts_only_an_exact_answer():
    """A model that always answers right scores 1.0 at every depth (Wilson CI of 10/10); one that echoes the current
    token (off by one) scores 0; one wrong answer token makes the trial wrong (token accuracy 5/6 left). Caught: the
    answer's rows shifted by one, exact match counted per token."""
    prompts = retrieval.passkey_prompts(TOK, L, [0.0, 0.5], 5, seed=0)
    plan = retrofit.Plan()
    right = retrieval.summarise_passkey(retrieval.passkey_eval([("dense", Oracle(), plan)], prompts, "cpu"))["dense"]
    assert right["overall"]["accuracy"] == 1.0 and right["overall"]["n"] == 10
    assert [c["correct"] for c in right["by_depth"]] == [5, 5] and right["token_accuracy"]["mean"] == 1.0
    assert right["overall"]["ci95"] == [pytest.approx(0.7225, abs=1e-3), 1.0]
    echo = retrieval.summarise_passkey(retrieval.passkey_eval([("x", Oracle(-1), plan)], prompts, "cpu"))["x"]
    assert echo["overall"]["correct"] == 0
    p = prompts[0]
    last = retrieval.score_answer(Oracle(wrong=(L - 1,))(p.ids[None], plan)[0], p)
    assert last["exact"] == 0.0 and last["token_accuracy"] == pytest.approx(5 / 6)


def test_exact_match_in_one_forward_is_the_greedy_answer():
    """On a tiny random Llama under DSA (k 16 < L): the answer greedy decoding produces (one forward per token) is
    scored exact by the one teacher-forced forward; the same answer with one token changed is not."""
    model = tiny_retrofit(vocab=128)
    p = retrieval.passkey_prompt(TOK, 300, 0.5, "12345", [ord(c) for c in retrieval.PASSKEY_FILLER] * 9)
    plan = retrofit.Plan("dsa", top_k=16, backend="gather")
    greedy = retrofit.greedy_generate(model, p.ids[None, :p.answer_start], 6, plan)[0]
    ok = dataclasses.replace(p, ids=greedy)
    with torch.no_grad():
        assert retrieval.score_answer(model(greedy[None], plan)[0], ok)["exact"] == 1.0
        bad = greedy.clone()
        bad[-3] = (bad[-3] + 1) % 128
        assert retrieval.score_answer(model(bad[None], plan)[0], dataclasses.replace(p, ids=bad))["exact"] == 0.0


def test_selection_hits_against_a_hand_made_selection():
    """Row 5 needs position 2, row 6 position 3 or 4: layer 0 selects 2 at row 5 only (0.5), layer 1 selects 4 at
    row 6 and nothing needed at row 5 (0.5), layer 2 holds both (1.0); an empty slot (-1) never matches a missing
    need (-1). Caught: -1 slots counted as hits."""
    sel = torch.full((3, 1, 8, 3), -1)
    sel[0, 0, 5] = torch.tensor([2, 0, -1])
    sel[0, 0, 6] = torch.tensor([0, 1, -1])
    sel[1, 0, 5] = torch.tensor([1, 0, -1])
    sel[1, 0, 6] = torch.tensor([4, -1, -1])
    sel[2, 0, 5] = torch.tensor([2, 3, 4])
    sel[2, 0, 6] = torch.tensor([3, 2, 1])
    hits = retrieval.selection_hits(list(sel), torch.tensor([5, 6]), torch.tensor([[2, -1], [3, 4]]))
    assert hits == [0.5, 0.5, 1.0]


def test_passkey_hits_come_from_the_sparse_forward_that_answered():
    """passkey_eval's per-layer hits are those of the selections its sparse forward used: every key selected at k >= L
    (1.0), none by a local window shorter than the needle's distance (0.0); equal to `selection_hits` on the
    selections a separate `keep_selection` forward returns; the dense entry has none."""
    model = tiny_retrofit(vocab=128)
    prompts = retrieval.passkey_prompts(TOK, 300, [0.0, 1.0], 1, seed=1)
    s = {**rx.COMMON, "eval_backend": "gather"}
    entries = [("dense", model, retrofit.Plan())] + [e for e in rx.eval_entries(model, 300, s) if e[0] == "dsa"]
    entries += [("local", model, retrofit.Plan("local", top_k=8)), ("dsa8", model, retrofit.Plan("dsa", top_k=8))]
    raw = retrieval.passkey_eval(entries, prompts, "cpu")
    assert all(t["hit_by_layer"] == [1.0, 1.0] for t in raw["dsa"]) and "hit_by_layer" not in raw["dense"][0]
    assert all(t["hit_by_layer"] == [0.0, 0.0] for t in raw["local"])
    p = prompts[1]
    with torch.no_grad():
        aux = model(p.ids[None], retrofit.Plan("dsa", top_k=8, keep_selection=True))[1]
    rows = torch.arange(p.answer_start - 1, len(p.ids) - 1)
    assert raw["dsa8"][1]["hit_by_layer"] == retrieval.selection_hits([aux.selected[0], aux.selected[1]], rows,
                                                                      p.needed)


def test_copy_windows_put_the_first_copy_distance_before_the_second():
    """At L 80, segment 8, distance 30: the copies start at 42 and 72, the filler around them is one held-out window
    in order. Caught: the first copy placed `distance` before the row's end instead of before the second copy."""
    val = torch.arange(10 * 100).reshape(10, 100)
    w = retrieval.copy_windows(val, 80, 8, 30, 3)
    assert w.shape == (3, 80)
    for row in w:  # filler = one window's first 64 tokens (consecutive), the segment another's 8
        assert torch.equal(row[42:50], row[72:80]) and len(set(row.tolist())) == 72
        filler = torch.cat([row[:42], row[50:72]])
        assert torch.equal(filler, torch.arange(filler[0], filler[0] + 64))
    assert retrieval.copy_distances(80, 8, [0.1, 0.5, 1.0]) == [8, 36, 72]
    with pytest.raises(ValueError, match="probe_distances"):
        retrieval.copy_distances(80, 8, [0.0])


def test_wilson_interval():
    assert retrieval.wilson_ci95(5, 10) == [pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4)]
    assert retrieval.wilson_ci95(0, 4) == [0.0, pytest.approx(0.4899, abs=1e-4)]
    assert retrieval.wilson_ci95(0, 0) == [None, None]


def test_passkey_figure_draws_every_mode_and_length():
    """One heat map per (k, mode), titled with the mode; each image holds the accuracy per depth (rows) × L
    (columns) and each cell its correct/trials. Caught: a mode's panel left out, L and depth transposed."""
    modes = ["dense", "dsa", "oracle", "sink_local"]

    def trials(correct_at):
        return [{"depth": d, "exact": float(i < correct_at[j]), "token_accuracy": 1.0, "nll": 0.1,
                 **({"hit_by_layer": [0.5, 1.0]} if m != "dense" else {})}
                for j, d in enumerate((0.0, 0.5, 1.0)) for i in range(2) for m in [None]]
    results = {}
    for L_, right in (("1024", (2, 1, 0)), ("2048", (2, 2, 1))):
        raw = {m: [{**t, **({"hit_by_layer": [0.5, 1.0]} if m != "dense" else {})} for t in trials(right)]
               for m in modes}
        results[L_] = {"64": {"passkey": retrieval.summarise_passkey(raw)}}
    fig = rx.passkey_figure({"results": results})
    panels = [ax for ax in fig.axes if ax.get_images()]
    assert [ax.get_title() for ax in panels] == [f"{m}, k = 64" for m in modes]
    for ax in panels:
        assert ax.get_images()[0].get_array().tolist() == [[1.0, 1.0], [0.5, 1.0], [0.0, 0.5]]
        assert [t.get_text() for t in ax.texts] == ["2/2", "2/2", "1/2", "2/2", "0/2", "1/2"]
