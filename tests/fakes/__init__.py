"""Fakes that speak real protocols and formats (docs/ARCHITECTURE.md, "Testing without the
internet"): a simulated machine root, test Sortformer models, a Google Speech service."""
