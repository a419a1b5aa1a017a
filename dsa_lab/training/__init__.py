"""Data and training: corpus, tokenizer, held-out documents, windows, token files, and the staged training
loop (docs/architecture.md, layer 8)."""
