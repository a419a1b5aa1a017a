"""transformers interop: DeepSeek-V3.2 / GLM-5 import and export, and lightning indexers retrofitted onto a
pretrained causal LM (docs/architecture.md, layer 6)."""
