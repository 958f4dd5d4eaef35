"""Stop requests: SIGTERM (preemption) or SIGINT ends training cleanly after a checkpoint.

The first signal only sets a flag. The loop feeds that flag into the next step's
all-reduce, so every worker of a synchronous run sees it and stops after the same step;
each saves a checkpoint of that step and `Trainer.run` returns with `preempted` set (the
CLI then exits with --preempt_exit_code, 75 by default: rerunning resumes). A second
signal acts as it normally would; SIGKILL loses the steps since the last checkpoint.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """SIGTERM / SIGINT -> a flag the loop checks every step (a context manager).

    The first signal only sets `signum`; the previous handler is put back at once, so a
    second signal acts as it normally would (kills the process).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
