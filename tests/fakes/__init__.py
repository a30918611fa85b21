"""Fakes that speak real protocols and formats (ARCHITECTURE.md, "Testing without the
internet"): a simulated machine root, test Sortformer models, a Google Speech service."""
