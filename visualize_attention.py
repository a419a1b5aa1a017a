"""Which tokens does the lightning indexer select? Heat maps per layer from a saved sparse checkpoint.

    python visualize_attention.py --checkpoint results/seq_256/checkpoints/sparse_seed42.pt \
        [--text "..." | --text-file FILE] [--out results/attention_selection.png]

Prints sparsity statistics: mean sparsity (share of the causal prefix *not* selected), token coverage
(share of key positions selected by at least one query), mean distance t - s of the selected tokens.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

DEFAULT_TEXT = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer "
                "The slings and arrows of outrageous fortune, Or to take arms against a sea of troubles "
                "And by opposing end them. To die, to sleep; No more; and by a sleep to say we end "
                "The heart-ache and the thousand natural shocks That flesh is heir to.")


@torch.no_grad()
def selection_masks(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """input_ids (1, L) -> per layer a (L, L) 0/1 matrix of selected (query t, key s) pairs."""
    from sparse_attention import AttentionMode, selection_mask
    _, aux = model(input_ids, AttentionMode(sparse=True), return_aux=True)
    L = input_ids.shape[1]
    masks = []
    for layer in aux.layers:
        idx = layer.selected_idx  # (1, L, K)
        masks.append(selection_mask(idx, idx >= 0, L)[0].float())
    return masks


def sparsity_stats(masks: list[torch.Tensor]) -> dict:
    """Mean sparsity, token coverage and mean selected distance over layers."""
    L = masks[0].shape[0]
    t = torch.arange(L)
    causal = (t[None, :] <= t[:, None]).float()
    distance = (t[:, None] - t[None, :]).float()
    stats = {"mean_sparsity": 0.0, "token_coverage": 0.0, "mean_selected_distance": 0.0}
    for m in masks:
        stats["mean_sparsity"] += 1 - m.sum().item() / causal.sum().item()
        stats["token_coverage"] += (m.sum(0) > 0).float().mean().item()
        stats["mean_selected_distance"] += (m * distance).sum().item() / m.sum().item()
    return {k: v / len(masks) for k, v in stats.items()}


def main(argv=None) -> int:
    from dsa_lab.common.results_io import OneLineArgumentParser
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--text", default=None)
    p.add_argument("--text-file", default=None)
    p.add_argument("--out", default="results/attention_selection.png")
    args = p.parse_args(argv)
    try:
        from dsa_lab.common import distributed
        distributed.refuse_torchrun("visualize_attention.py")
        from dsa_lab.experiments import plots
        from dsa_lab.training.data import Tokenizer
        from dsa_lab.training.train import load_checkpoint
        model, payload = load_checkpoint(args.checkpoint)
        if payload["model_type"] != "sparse":
            raise ValueError(f"{args.checkpoint} is a {payload['model_type']} checkpoint; pass a sparse_*.pt one")
        if args.text_file and not Path(args.text_file).exists():
            raise ValueError(f"--text-file {args.text_file} does not exist")
        text = Path(args.text_file).read_text() if args.text_file else (args.text or DEFAULT_TEXT)
        tokenizer = Tokenizer.from_spec(payload["tokenizer"])
        ids = tokenizer.encode(text)[: model.cfg.max_seq_len]
        if len(ids) < 2:
            raise ValueError("the text encodes to fewer than 2 tokens; give a longer --text")
        masks = selection_masks(model, torch.tensor([ids]))
        tokens = [tokenizer.decode([i]) for i in ids]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        plots.selection_heatmaps([m.numpy() for m in masks], tokens, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = sparsity_stats(masks)
    print(f"{len(ids)} tokens, top-k {model.cfg.sparse_top_k}, {len(masks)} layers")
    print(f"mean sparsity          {stats['mean_sparsity']:.3f}  (share of the causal prefix not selected)")
    print(f"token coverage         {stats['token_coverage']:.3f}  (share of keys selected by some query)")
    print(f"mean selected distance {stats['mean_selected_distance']:.1f} tokens")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
