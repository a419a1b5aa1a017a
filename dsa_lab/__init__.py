"""dsa-lab's support code under one name of its own (no other distribution provides `dsa_lab`): RoPE and run
records (common), fast paths and backends (kernels), transformers interop and the retrofit (interop), decoding
caches (inference), data and the training loop (training), and the experiments. The design card's modules
(config.py, models.py, sparse_attention.py, …) stay at the top of the checkout. Imports nothing."""
