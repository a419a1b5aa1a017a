"""Generate text from a checkpoint with the KV cache and, for a sparse model, DSA's decode path (dsa_lab/inference/decode.py).

    python sample.py --checkpoint results/seq_256/checkpoints/sparse_seed42.pt --prompt "ROMEO:" \
        --max-new-tokens 100 [--temperature 0.8 --top-k-sampling 40 --seed 0] [--no-cache] [--device cpu|cuda|auto]

    python sample.py --retrofit EXPORT_FOLDER --prompt "ROMEO:" [--selection dsa|dense|oracle] [--top-k K] ...

--retrofit loads a folder that `run_experiment.py --experiment retrofit --export FOLDER` writes (the base model,
e.g. SmolLM2, with its trained indexers) and generates on its caches (dsa_lab/inference/retrofit_decode.py: KV
cache, and for DSA the indexer-key cache; k defaults to the export's smallest k; an export trained with the
structure lever decodes DSA with its always-kept sinks and window, so --top-k must exceed sinks + window).
The checkpoint is one that run_experiment.py writes (OUT/seq_<L>/checkpoints/{classic,sparse}_seed<S>.pt, via
train.save_checkpoint): weights, model config and the tokenizer the run trained (the cached byte-level BPE).
--temperature 0 is greedy decoding. --no-cache recomputes the whole context for every token (the reference the
cached path is tested against). A prompt longer than the model's max_seq_len is refused; when prompt + generated
tokens fill max_seq_len, the context window slides (its last max_seq_len // 2 tokens are prefilled again).
Prints the text, then the token counts and tokens/s (decode steps alone, and overall with the prefills).
"""
from __future__ import annotations

import sys

import torch

from dsa_lab.training.data import Tokenizer
from dsa_lab.inference.decode import generate
from dsa_lab.common.results_io import OneLineArgumentParser, run_cli
from dsa_lab.training.train import load_checkpoint, pick_device


def parse_args(argv=None):
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a *.pt written by run_experiment.py")
    source.add_argument("--retrofit", metavar="FOLDER", help="a folder written by the retrofit experiment's --export")
    p.add_argument("--selection", default="dsa", choices=["dense", "dsa", "oracle"],
                   help="--retrofit: the retrofitted model's attention")
    p.add_argument("--top-k", type=int, default=None, help="--retrofit: keys per query (default: the export's smallest k)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k-sampling", type=int, default=40, help="sample among the K most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole context for every token")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    return p.parse_args(argv)


def sample(args) -> dict:
    """Load, generate, print; -> {'text', 'new_tokens', 'timing'}."""
    if not args.prompt:
        raise ValueError("--prompt is empty; give some text to continue")
    if args.retrofit:
        return sample_retrofit(args)
    if args.top_k is not None:
        raise ValueError("--top-k is for --retrofit (a checkpoint decodes with its own k); use --top-k-sampling to "
                         "restrict sampling")
    device = pick_device(args.device)
    model, payload = load_checkpoint(args.checkpoint, str(device))
    if "tokenizer" not in payload:
        raise ValueError(f"{args.checkpoint} holds no tokenizer; use a checkpoint written by run_experiment.py")
    tokenizer = Tokenizer.from_spec(payload["tokenizer"])
    prompt = tokenizer.encode(args.prompt)
    generator = torch.Generator(device).manual_seed(args.seed)
    new, timing = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k_sampling,
                           generator=generator, use_cache=not args.no_cache)
    text = tokenizer.decode(prompt + new)
    print(text)
    path = "full recomputation per token" if args.no_cache else (
        f"KV cache + DSA decode (indexer key cache, top-{model.cfg.sparse_top_k})" if model.default_mode.sparse
        else "KV cache, dense")
    total_s = timing["prefill_s"] + timing["decode_s"]
    decode_rate = timing["decode_steps"] / timing["decode_s"] if timing["decode_s"] > 0 else float("nan")
    print(f"--- {payload['model_type']} {model.cfg.attention_type} model, {path}, "
          f"max_seq_len={model.cfg.max_seq_len}, {device}: prompt {len(prompt)} tokens, {len(new)} new; "
          f"{timing['prefills']} prefill(s) {timing['prefill_s'] * 1e3:.1f} ms, {timing['decode_steps']} decode steps "
          f"{decode_rate:.1f} tokens/s; overall {len(new) / total_s:.1f} tokens/s")
    return {"text": text, "new_tokens": new, "timing": timing}


def sample_retrofit(args) -> dict:
    """--retrofit: the exported retrofitted model generates on its caches (retrofit_decode.generate)."""
    from transformers import AutoTokenizer

    from dsa_lab.inference.retrofit_decode import generate as generate_cached
    from dsa_lab.interop import retrofit
    if args.no_cache:
        raise ValueError("--no-cache is for --checkpoint; a retrofit export always generates on its caches")
    meta = retrofit.read_export_meta(args.retrofit)
    top_k = args.top_k or min(meta.get("top_ks") or [64])
    structure = export_structure(meta, top_k) if args.selection == "dsa" else {}  # refused before the model loads
    device = pick_device(args.device)
    model = retrofit.load_retrofit(args.retrofit).to(device)
    kwargs = {"gguf_file": model.base_id.gguf_file} if model.base_id.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model.base_id.path, **kwargs)
    prompt = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(device)  # (1, L)
    plan = retrofit.Plan(args.selection, top_k=top_k, backend="gather", **structure)
    timing = {}
    ids = generate_cached(model, prompt, args.max_new_tokens, plan, temperature=args.temperature,
                          top_k=args.top_k_sampling, generator=torch.Generator(device).manual_seed(args.seed),
                          timing=timing)
    text = tokenizer.decode(ids[0].tolist())
    print(text)
    rate = timing["decode_steps"] / timing["decode_s"] if timing["decode_s"] > 0 else float("nan")
    k = f" k={top_k}" + (f" (sinks {plan.sinks} + window {plan.window} kept)" if plan.window else "")
    print(f"--- retrofit {model.base_id.describe()}, {args.selection}" + (k if args.selection != "dense"
          else "") + f", KV cache{' + indexer key cache' if args.selection == 'dsa' else ''}, {device}: prompt "
          f"{prompt.shape[1]} tokens, {args.max_new_tokens} new; prefill {timing['prefill_s'] * 1e3:.1f} ms, "
          f"{timing['decode_steps']} decode steps {rate:.1f} tokens/s")
    return {"text": text, "new_tokens": ids[0, prompt.shape[1]:].tolist(), "timing": timing}


def export_structure(meta: dict, top_k: int) -> dict:
    """The structure lever an export's DSA was trained with -> Plan's sinks and window ({} without one: exports
    before it was recorded, or structure_window 0); refuses (one line) a k that leaves the indexer no slot."""
    window = meta.get("structure_window", 0)
    if not window:
        return {}
    sinks = meta["sinks"]
    if top_k <= sinks + window:
        raise ValueError(f"--top-k {top_k}: this export's DSA always keeps sinks + window = {sinks + window} tokens "
                         f"(the structure lever); give --top-k above {sinks + window}")
    return {"sinks": sinks, "window": window}


def main(argv=None) -> int:
    args = parse_args(argv)
    def job():
        from dsa_lab.common import distributed
        distributed.refuse_torchrun("sample.py")
        return sample(args)
    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
