"""Harnesses shared by the test files: real daemons, the fake Google service set up for them,
an upstream run driven from a scripted source, the diarization worker and its models, test
audio. Fixtures stay in conftest.py."""
