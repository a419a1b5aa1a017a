"""Fast paths, each tested against the masked reference: chunked selection and token-level MHA/MQA in torch,
the block-shared model, Triton kernels, and the backend registry (docs/architecture.md, layers 3-4)."""
