"""`python -m edge.diarization.worker PARENT_PID`: the diarizer worker process."""

import sys

from edge.diarization.worker.main import main

sys.exit(main())
