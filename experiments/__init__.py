"""experiments: see docs/architecture.md."""
