"""SIGTERM / SIGINT -> finish the current step on every rank, checkpoint, exit cleanly.

A scheduler usually signals every rank, but not at the same instant, and some only signal one; so each
step the ranks agree (one tiny all-reduce, shared with the non-finite-loss vote) and all stop after the
same step. A second SIGINT interrupts at once, as usual.

DeepSpeed's launcher on one node (deepspeed 0.19, launcher/runner.py) installs no signal handler: a SIGTERM
to the `deepspeed` process ends it at once (exit 143) and leaves launch.py and the ranks training as orphans.
So each rank also watches the launcher processes above it and stops, as for a signal, when one of them is
gone. DeepSpeed's launch.py, when signalled itself, sends SIGTERM to every rank, SIGKILLs what is left 30 s
later and exits 1; the first signal's name is kept, so a Ctrl-C still reports SIGINT. `supervise` runs the
launcher in its own session and hands a signal to the ranks only, so the command returns the ranks' 0.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import types

__all__ = ["StopRequest", "launcher_processes", "supervise"]

log = logging.getLogger("moce_ds")


def launcher_processes(pid: int | None = None) -> list[tuple[int, float]]:
    """(pid, start time) of the deepspeed launcher processes above this one (launch.py, then runner), nearest
    first; empty when not started by DeepSpeed's launcher."""
    import psutil

    found = []
    try:
        proc = psutil.Process(os.getppid() if pid is None else pid)
        for _ in range(2):
            if proc is None or "deepspeed" not in " ".join(proc.cmdline()):
                break
            found.append((proc.pid, proc.create_time()))
            proc = proc.parent()
    except psutil.Error:
        pass
    return found


def _gone(pid: int, started: float) -> bool:
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.create_time() != started or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


class StopRequest:
    def __init__(self, watch_every_s: float = 1.0) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self._watch_every_s = watch_every_s
        self._watching = threading.Event()

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        launchers = launcher_processes()
        if launchers:
            self._watching.set()
            threading.Thread(target=self._watch, args=(launchers,), name="moce-launcher-watch", daemon=True).start()
        return self

    def uninstall(self) -> None:
        self._watching.clear()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.signal_name is None:  # the first signal names the stop (launch.py adds a SIGTERM of its own)
            self.signal_name = name
        log.warning("%s received: finishing this step, then checkpointing and exiting", name)

    def _watch(self, launchers: list[tuple[int, float]]) -> None:
        while self._watching.wait(self._watch_every_s) and self._watching.is_set():
            gone = [pid for pid, started in launchers if _gone(pid, started)]
            if gone:
                if self.signal_name is None:
                    self.signal_name = f"the end of the deepspeed launcher (pid {gone[-1]})"
                log.warning("the deepspeed launcher (pid %d) is gone: finishing this step, then checkpointing and "
                            "exiting", gone[-1])
                return

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def _ranks(pid: int) -> list:
    import psutil

    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if "--local_rank" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def supervise(cmd: list[str]) -> int:
    """Run `cmd` (a deepspeed launcher command) in its own session and return its exit status. SIGTERM/SIGINT to
    this process (or its process group) go to the ranks only, so they checkpoint at the same step and exit 0, and
    DeepSpeed's launcher, which would exit 143 or 1 (or kill the ranks 30 s later), sees them finish instead."""
    import psutil

    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum: int, frame: types.FrameType | None) -> None:
        ranks = _ranks(proc.pid)
        if not ranks:  # not training yet: nothing to save, stop everything
            os.killpg(proc.pid, signum)
        for p in ranks:
            try:
                p.send_signal(signum)
            except psutil.Error:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
