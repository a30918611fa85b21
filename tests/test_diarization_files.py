"""Diarizing files (edge/diarization/files.py): the RTTM the `edge diarize` command writes. The
command itself, end to end, is in test_diarization_cli.py."""

from __future__ import annotations

import numpy as np

from edge.diarization.files import rttm_lines


def test_rttm_lines_give_one_turn_per_run_of_a_speaker_above_half() -> None:
    p = np.zeros((10, 4), dtype=np.float32)
    p[2:5, 0] = 0.9
    p[4:10, 1] = 0.7
    assert rttm_lines(p, "f") == [
        "SPEAKER f 1 0.16 0.24 <NA> <NA> speaker_0 <NA> <NA>",
        "SPEAKER f 1 0.32 0.48 <NA> <NA> speaker_1 <NA> <NA>",
    ]
