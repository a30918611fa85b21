"""Upstream speech-to-text: the contract (`base`) and Google Cloud Speech-to-Text (`google`)."""
