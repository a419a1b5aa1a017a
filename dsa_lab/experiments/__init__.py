"""Experiments: the one skeleton, the shared tasks, costs, reports and plots, and one module per experiment
(docs/architecture.md, layers 9-10). No experiment imports another."""
