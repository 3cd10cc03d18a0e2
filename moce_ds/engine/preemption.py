"""SIGTERM / SIGINT -> finish the current step on every rank, checkpoint, exit cleanly.

A scheduler usually signals every rank, but not at the same instant, and some only signal one; so each
step the ranks agree (one tiny all-reduce, shared with the non-finite-loss vote) and all stop after the
same step. A second SIGINT interrupts at once, as usual.
"""

from __future__ import annotations

import logging
import signal
import types

__all__ = ["StopRequest"]

log = logging.getLogger("moce_ds")


class StopRequest:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signal_name = name
        log.warning("%s received: finishing this step, then checkpointing and exiting", name)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None
