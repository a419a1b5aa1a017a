"""Decoding with caches: KV / latent / indexer-key caches, prefill and the DSA decode step (layer 7)."""
