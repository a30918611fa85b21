"""Fakes that speak real protocols and formats (see ARCHITECTURE.md, Testing without the internet)."""
