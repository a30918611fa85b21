"""edge: a meeting-room speech appliance (live audio in, speaker-labelled transcripts out)."""

__version__ = "0.1.0"
