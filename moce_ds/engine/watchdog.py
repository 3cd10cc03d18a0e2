"""Fail fast when a rank dies instead of hanging every other rank in a collective.

Every rank bumps a heartbeat counter in the rendezvous store each second. Rank 0 watches all of them (O(world)
reads per second, not O(world^2)); when one has not moved for `timeout_s` it publishes the dead rank's number,
and every rank that sees it, or that stops seeing rank 0's own heartbeat, logs which rank died and exits with
EXIT_PEER_LOST. Runs in a daemon thread: gloo and NCCL release the GIL while they wait, so it runs even when
the main thread is stuck in a collective.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import torch.distributed as dist

__all__ = ["PeerWatchdog", "EXIT_PEER_LOST"]

log = logging.getLogger("moce_ds")
EXIT_PEER_LOST = 17
_PREFIX = "moce_watchdog"


class PeerWatchdog:
    def __init__(self, rank: int, world_size: int, timeout_s: float, interval_s: float = 1.0) -> None:
        self.rank, self.world, self.timeout, self.interval = rank, world_size, timeout_s, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> PeerWatchdog:
        if self.world < 2 or self.timeout <= 0 or not dist.is_initialized():
            return self
        self.store = dist.distributed_c10d._get_default_store()
        self._thread = threading.Thread(target=self._run, name="moce-peer-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def explain(self, error: BaseException) -> None:
        """A collective raised (gloo notices a closed socket at once): give the watchdog its timeout to name
        the dead rank and exit; returns (so the caller re-raises) when every peer is still alive."""
        if self._thread is None or not self._thread.is_alive():
            return
        log.error("a collective failed (%s: %s); waiting up to %.0f s to find the rank that died",
                  type(error).__name__, str(error).splitlines()[0] if str(error) else "", self.timeout)
        self._thread.join(self.timeout + 5 * self.interval)

    def _die(self, message: str) -> None:
        log.error(message)
        for h in log.handlers:
            h.flush()
        os._exit(EXIT_PEER_LOST)  # the main thread may be blocked in a collective: no clean unwinding possible

    def _run(self) -> None:
        beat = 0
        watched = range(self.world) if self.rank == 0 else [0]
        last_value: dict[int, bytes | None] = dict.fromkeys(watched)
        last_change = dict.fromkeys(watched, time.monotonic())
        while not self._stop.wait(self.interval):
            try:
                beat += 1
                self.store.set(f"{_PREFIX}/hb/{self.rank}", str(beat))
                if self.store.check([f"{_PREFIX}/dead"]):
                    dead = self.store.get(f"{_PREFIX}/dead").decode()
                    self._die(f"rank {dead} stopped responding (no heartbeat for {self.timeout:.0f} s); "
                              f"rank {self.rank} is stopping too. Relaunch with --resume to continue from the "
                              f"last complete checkpoint.")
                now = time.monotonic()
                for r in watched:
                    if r == self.rank:
                        continue
                    key = f"{_PREFIX}/hb/{r}"
                    value = self.store.get(key) if self.store.check([key]) else None
                    if value != last_value[r]:
                        last_value[r], last_change[r] = value, now
                    elif now - last_change[r] > self.timeout:
                        if self.rank == 0:
                            self.store.set(f"{_PREFIX}/dead", str(r))
                        self._die(f"rank {r} stopped responding (no heartbeat for {self.timeout:.0f} s); "
                                  f"rank {self.rank} is stopping too. Relaunch with --resume to continue from "
                                  f"the last complete checkpoint.")
            except Exception as e:  # the store lives on rank 0: losing it means rank 0 is gone
                if self._stop.is_set():
                    return
                self._die(f"lost the rendezvous store hosted by rank 0 ({type(e).__name__}: {e}); rank 0 has "
                          f"probably died; rank {self.rank} is stopping. Relaunch with --resume.")
