"""Plumbing every layer may use: RoPE, torchrun, run records and fingerprints, the variant registry, the warm-up
plateau rule, per-device work sizes (docs/architecture.md, layer 1)."""
