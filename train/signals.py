"""Stop signals: remember them, let the training loop save and exit at the next step boundary.

SIGTERM and SIGUSR1 are what schedulers send before a kill (Slurm's `--signal`, preemption); SIGINT is
Ctrl-C. The first one only sets a flag. A second Ctrl-C raises KeyboardInterrupt at once, for the user
who does not want to wait for the save. `python -m train` installs the handlers before importing torch,
so a signal that arrives during start-up (minutes at scale) is honoured once start-up is done instead of
killing the process. Standard library only, for that reason.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class StopSignals:
    """The process's stop-signal handlers and the first signal they received (one instance: `stop_signals`)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def install(self) -> None:
        """Idempotent: a second call keeps the handlers (and any signal already received). Main thread only;
        elsewhere (a thread running a Trainer in tests) Python cannot install handlers, and this does nothing."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signum

    def restore(self) -> None:
        """Put the previous handlers back and forget the received signal (the next run starts clean)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        self.received = None


stop_signals = StopSignals()
