"""Retrieval evaluations for any set of `(name, model, plan)` entries (the retrofit's modes, or a lever's model):

- **passkey retrieval**: a random 5-digit key inside filler text, asked for at the end (the classic prompt of
  Landmark Attention / LongLoRA, shared/RESEARCH_NOTES.md "Retrieval"), on a grid of needle depth × L. A trial is
  right when the model's **greedy answer is the key exactly**, computed in one forward: with the answer's tokens
  appended (teacher forcing), greedy decoding begins with those tokens iff every answer position's argmax is the
  answer token (causality: a row sees only the tokens before it; a test checks it against `greedy_generate`).
  Accuracy per (depth, L) with Wilson 95 % intervals over trials.
- **copy probe**: a held-out segment, filler, the segment again at a chosen distance: top-1 accuracy and NLL on the
  second copy (its tokens after the first), per window, with Student-t 95 % CIs over windows.
- **the token the answer needs, per layer, on the sparse forward**: the selections a sparse plan actually used in
  the forward that produced its answer (`Plan(keep_selection=True)`) — does the row that predicts an answer token
  select the earlier occurrence of that token (the needle's copy of the key / the first copy of the segment)?

    prompts = passkey_prompts(tokenizer, L=1024, depths=[0, .5, 1], trials=4, seed=0)
    raw = passkey_eval(entries, prompts, device);  summary = summarise_passkey(raw)
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dsa_lab.common.results_io import mean_ci95
from dsa_lab.experiments import mqar

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = (" The pass key is", ". Remember it.", " is the pass key.")  # the key goes between the parts
PASSKEY_QUESTION = " What is the pass key? The pass key is"
FILLERS = ("classic", "heldout")  # the repeated sentences above, or held-out text
RETRIEVAL_MODES = ("dense", "dsa", "oracle", "sink_local")  # the ones that can reach a far token (+ stage 2's)
KEY_RANGE = (10000, 100000)  # 5-digit keys


# ----------------------------------------------------------------------------- passkey prompts
@dataclass(frozen=True)
class PasskeyPrompt:
    """One trial: `ids` (L,) = intro, filler with the needle at `needle_start`, question, then the answer's tokens
    (from `answer_start`, teacher-forced); `needed` (A, 2): the needle's two copies of each answer token."""
    ids: torch.Tensor
    answer_start: int
    key: str
    depth: float  # asked: share of the filler before the needle
    needle_start: int
    needle_depth: float  # realised (the classic filler snaps to a sentence boundary)
    needed: torch.Tensor


def _tok(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(tokenizer, L: int, depth: float, key: str, filler: list[int], snap: int = 1) -> PasskeyPrompt:
    """One prompt of exactly L tokens. `filler`: at least as many tokens as the prompt leaves for it; the needle goes
    after round(depth * n) of them, snapped down to a multiple of `snap` (the classic filler's sentence length).
    Built from separately tokenised pieces, so every answer token's position is known exactly."""
    answer = _tok(tokenizer, " " + key)
    head, mid, tail = (_tok(tokenizer, part) for part in PASSKEY_NEEDLE)
    needle = head + answer + mid + answer + tail
    intro, question = _tok(tokenizer, PASSKEY_INTRO), _tok(tokenizer, PASSKEY_QUESTION)
    n = L - len(intro) - len(needle) - len(question) - len(answer)  # filler tokens
    if n < 1 or len(filler) < n:
        raise ValueError(f"seq_len {L} leaves {n} filler tokens for the passkey prompt ({len(filler)} given); "
                         f"use seq_lens >= {L - n + 1}")
    cut = min(n, snap * round(depth * n / snap))
    cut -= cut % snap
    ids = intro + filler[:cut] + needle + filler[cut:n] + question + answer
    needle_start = len(intro) + cut
    first = needle_start + len(head)  # the needle's first copy of the answer
    second = first + len(answer) + len(mid)
    needed = torch.tensor([[first + i, second + i] for i in range(len(answer))])
    return PasskeyPrompt(torch.tensor(ids), L - len(answer), key, depth, needle_start, cut / n, needed)


def passkey_prompts(tokenizer, L: int, depths: list[float], trials: int, seed: int, filler: str = "classic",
                    heldout: torch.Tensor | None = None) -> list[PasskeyPrompt]:
    """trials × depths prompts of L tokens, depth-major within a trial; keys drawn per (seed, L). `heldout`: a 1-D
    held-out token stream for filler='heldout' (trial i reads its filler from offset i * L)."""
    if filler not in FILLERS:
        raise ValueError(f"passkey_filler={filler!r} is unknown; choose one of {', '.join(FILLERS)}")
    gen = torch.Generator().manual_seed(seed * 100003 + L)
    keys = torch.randint(*KEY_RANGE, (trials, len(depths)), generator=gen).tolist()
    unit = _tok(tokenizer, PASSKEY_FILLER)
    prompts = []
    for t in range(trials):
        if filler == "classic":
            text, snap = unit * (L // len(unit) + 1), len(unit)
        else:
            if heldout is None or len(heldout) < (t + 1) * L:
                raise ValueError(f"passkey_filler='heldout' needs {(t + 1) * L} held-out tokens; use fewer "
                                 f"passkey_trials or passkey_filler='classic'")
            text, snap = heldout[t * L:(t + 1) * L].tolist(), 1
        prompts += [passkey_prompt(tokenizer, L, d, str(keys[t][j]), text, snap) for j, d in enumerate(depths)]
    return prompts


# ----------------------------------------------------------------------------- scoring
def score_answer(logits: torch.Tensor, prompt: PasskeyPrompt) -> dict:
    """logits (1, L, V) of the prompt with its answer appended -> exact (1.0 iff the greedy answer is the key's
    tokens), token_accuracy (share of answer tokens that are the argmax), nll (mean over the answer's tokens)."""
    rows = torch.arange(prompt.answer_start - 1, len(prompt.ids) - 1)  # the rows predicting the answer
    target = prompt.ids[prompt.answer_start:].to(logits.device)
    scores = logits[0, rows.to(logits.device)].float()  # (A, V)
    right = scores.argmax(-1) == target
    return {"exact": float(right.all()), "token_accuracy": right.float().mean().item(),
            "nll": F.cross_entropy(scores, target).item()}


def selection_hits(selected: list[torch.Tensor], rows: torch.Tensor, needed: torch.Tensor) -> list[float]:
    """selected: per layer (1, L, K) key positions (-1 = empty slot); rows (R,) query positions; needed (R, J) the
    positions one of which row r's selection should hold (-1 = none) -> per layer, the share of rows that hold one."""
    out = []
    for sel in selected:
        chosen = sel[0, rows.to(sel.device)]  # (R, K)
        need = needed.to(sel.device)
        hit = ((chosen[:, :, None] == need[:, None, :]) & (need[:, None, :] >= 0)).any(-1).any(-1)  # (R,)
        out.append(hit.float().mean().item())
    return out


@torch.no_grad()
def passkey_eval(entries: list, prompts: list[PasskeyPrompt], device) -> dict:
    """entries: (name, model, plan) -> {name: [per trial {"depth", "needle_depth", "key", "exact", "token_accuracy",
    "nll"} and, for a sparse plan, "hit_by_layer": per layer, does the row predicting answer token i select the
    needle's copy of token i (share of the answer's rows)]}, same prompts for every entry."""
    out = {}
    for name, net, plan in entries:
        sparse = plan.selection != "dense"
        if sparse:
            plan = dataclasses.replace(plan, keep_selection=True)
        trials = out.setdefault(name, [])
        for p in prompts:
            logits, aux = net(p.ids[None].to(device), plan)
            trial = {"depth": p.depth, "needle_depth": p.needle_depth, "key": p.key, **score_answer(logits, p)}
            if sparse:
                rows = torch.arange(p.answer_start - 1, len(p.ids) - 1)
                trial["hit_by_layer"] = selection_hits([aux.selected[i] for i in sorted(aux.selected)], rows, p.needed)
            trials.append(trial)
    return out


def wilson_ci95(correct: int, n: int) -> list[float | None]:
    """Wilson score 95 % interval of a proportion correct / n ([None, None] when n is 0)."""
    if n == 0:
        return [None, None]
    z, p = 1.959964, correct / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)
    return [0.0 if correct == 0 else lo, 1.0 if correct == n else hi]  # exact at the ends (rounding)


def proportion(values: list[float]) -> dict:
    """0/1 outcomes -> {"correct", "n", "accuracy", "ci95" (Wilson)}."""
    correct, n = int(round(sum(values))), len(values)
    return {"correct": correct, "n": n, "accuracy": correct / n if n else None, "ci95": wilson_ci95(correct, n)}


def summarise_passkey(raw: dict) -> dict:
    """passkey_eval's trials -> per mode: accuracy overall and per asked depth (Wilson CIs over trials), token
    accuracy (mean ± t CI), and for sparse plans the per-layer hit share (mean ± t CI over trials) and its mean over
    layers per trial (mean ± t CI)."""
    out = {}
    for name, trials in raw.items():
        depths = sorted({t["depth"] for t in trials})
        entry = {"overall": proportion([t["exact"] for t in trials]),
                 "by_depth": [{"depth": d, **proportion([t["exact"] for t in trials if t["depth"] == d])}
                              for d in depths],
                 "token_accuracy": mean_ci95([t["token_accuracy"] for t in trials]),
                 "nll": mean_ci95([t["nll"] for t in trials])}
        if trials and "hit_by_layer" in trials[0]:
            per_layer = list(zip(*[t["hit_by_layer"] for t in trials]))
            entry["hit_by_layer"] = [mean_ci95(list(layer)) for layer in per_layer]
            entry["hit_mean"] = mean_ci95([sum(t["hit_by_layer"]) / len(t["hit_by_layer"]) for t in trials])
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- copy probe
def copy_distances(L: int, segment: int, fractions: list[float]) -> list[int]:
    """Distances between the copies' starts: round(f * (L - segment)) for each fraction, at least `segment`
    (the copies never overlap), sorted, distinct; f = 1 puts the first copy at position 0."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"probe_distances={fractions}: give fractions in (0, 1] of L - probe_segment")
    return sorted({max(segment, round(f * (L - segment))) for f in fractions})


def copy_windows(val: torch.Tensor, L: int, segment: int, distance: int, n: int) -> torch.Tensor:
    """Copy-probe inputs (n, L) from held-out windows val (N, >= L): filler from one window with a segment S of
    another inserted so that its first copy starts `distance` before the second, which ends the row. The second
    copy's tokens (after its first) are predictable from the first copy, `distance - 1` tokens back."""
    if not segment <= distance <= L - segment:
        raise ValueError(f"copy distance {distance} must lie in [{segment}, {L - segment}] at L {L}")
    idx = torch.linspace(0, len(val) - 1, min(2 * n, len(val))).long()
    first = L - segment - distance
    rows = []
    for a, b in zip(idx[0::2].tolist(), idx[1::2].tolist()):
        seg, filler = val[a, :segment], val[b, :L - 2 * segment]
        rows.append(torch.cat([filler[:first], seg, filler[first:], seg]))
    return torch.stack(rows)


@torch.no_grad()
def copy_probe(entries: list, windows: torch.Tensor, segment: int, distance: int, device) -> dict:
    """Per window and entry: NLL and top-1 accuracy on the second copy (its tokens after the first); for a sparse
    plan also, per layer, the share of those rows whose selection (in that sparse forward) holds the token to copy
    ('value': distance - 1 back) and the earlier copy of the current token ('key': distance back)."""
    out = {}
    for ids in windows:
        ids = ids[None].to(device)
        L = ids.shape[1]
        pred, target = slice(L - segment, L - 1), ids[:, L - segment + 1:]
        back = torch.full((1, L), -1, dtype=torch.long)
        back[0, pred] = distance  # each predicting row's earlier copy; the token to copy is the one after it
        for name, net, plan in entries:
            sparse = plan.selection != "dense"
            logits, aux = net(ids, dataclasses.replace(plan, keep_selection=sparse))
            logits = logits[:, pred].float()
            entry = out.setdefault(name, {"nll": [], "accuracy": []})
            entry["nll"].append(F.cross_entropy(logits.flatten(0, 1), target.flatten()).item())
            entry["accuracy"].append((logits.argmax(-1) == target).float().mean().item())
            if sparse:
                hits = mqar.answer_hits([aux.selected[i].cpu() for i in sorted(aux.selected)], back)
                for part in ("key", "value"):
                    entry.setdefault(f"{part}_hit_by_layer", []).append([h[part] for h in hits])
    return out


def summarise_copy(per_window: dict) -> dict:
    """copy_probe's windows -> per mode: accuracy and NLL (mean ± t CI over windows); for sparse plans the key/value
    hit shares per layer (means over windows, as lists), their CIs per layer, and the value hit's mean over layers
    per window (mean ± t CI)."""
    out = {}
    for name, pw in per_window.items():
        entry = {"accuracy": mean_ci95(pw["accuracy"]), "nll": mean_ci95(pw["nll"]), "windows": len(pw["nll"])}
        for part in ("key_hit_by_layer", "value_hit_by_layer"):
            if part in pw:  # windows x layers -> layers
                stats = [mean_ci95(list(layer)) for layer in zip(*pw[part])]
                entry[part] = [st["mean"] for st in stats]
                entry[f"{part}_ci95"] = [st["ci95"] for st in stats]
        if "value_hit_by_layer" in pw:
            entry["value_hit_mean"] = mean_ci95([sum(w) / len(w) for w in pw["value_hit_by_layer"]])
        out[name] = entry
    return out


# ----------------------------------------------------------------------------- figure
def passkey_heatmaps(panels: list[tuple[str, dict]], ncols: int):
    """panels: (title, {L: one mode's summarise_passkey entry}) -> a matplotlib figure, one heat map per panel:
    accuracy by needle depth (rows) × L (columns), each cell annotated correct/trials; `ncols` panels per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 + 1.1 * ncols * max(2, len(panels[0][1])), 3.6 * nrows),
                             squeeze=False, layout="constrained")
    for ax, (title, per_L) in zip(axes.flat, panels):
        lengths = sorted(per_L)
        depths = [c["depth"] for c in per_L[lengths[0]]["by_depth"]]
        cells = [[per_L[L]["by_depth"][i] for L in lengths] for i in range(len(depths))]
        grid = [[c["accuracy"] for c in row] for row in cells]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for i, row in enumerate(cells):
            for j, c in enumerate(row):
                ax.text(j, i, f"{c['correct']}/{c['n']}", ha="center", va="center", fontsize=7)
        ax.set(xticks=range(len(lengths)), xticklabels=[str(L) for L in lengths], yticks=range(len(depths)),
               yticklabels=[f"{d:.0%}" for d in depths], xlabel="L (tokens)", ylabel="needle depth", title=title)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="passkey accuracy (greedy exact match)")
    return fig
