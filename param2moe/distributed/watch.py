"""Ranks started by torchrun (several machines) watching each other, so that a node that dies stops the others
with a message instead of leaving them waiting in a collective or idle forever.

Each rank's thread bumps its heartbeat in torchrun's key-value store (TCPStore at MASTER_ADDR:MASTER_PORT)
every second and reads the others' (rank 0 reads every rank's, the others read rank 0's): a heartbeat
unchanged for PARAM2MOE_PEER_TIMEOUT seconds (default 30), or a store that no longer answers (it lives on the
first node), ends the process with a line naming the rank. On one machine LocalWorkers watches the processes
directly instead.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

TIMEOUT_ENV = "PARAM2MOE_PEER_TIMEOUT"
_KEY = "param2moe/heartbeat/{}"
_leaving: threading.Event | None = None  # the current watch's: set when this rank leaves on purpose


class RankLostError(RuntimeError):
    """Another rank of a parallel engine is gone (its process or its node died)."""


def start_peer_watch(rank: int, world_size: int) -> None:
    """Start this rank's heartbeat and watch (a daemon thread). Ranks of torchrun only (RANK in the environment)."""
    timeout = float(os.environ.get(TIMEOUT_ENV, "30"))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=datetime.timedelta(seconds=max(5.0, timeout)))
    peers = [r for r in range(world_size) if r != rank] if rank == 0 else [0]
    global _leaving
    _leaving = threading.Event()
    threading.Thread(target=_watch, args=(store, rank, peers, timeout, _leaving), daemon=True,
                     name="param2moe-peer-watch").start()


def stop_peer_watch() -> None:
    """This rank is leaving (the engine stops): from now on nothing the watch sees ends the process."""
    if _leaving is not None:
        _leaving.set()


def _watch(store, rank: int, peers: list[int], timeout: float, leaving: threading.Event) -> None:
    beat = 0
    seen: dict[int, tuple[bytes | None, float]] = {p: (None, time.monotonic()) for p in peers}
    while not leaving.is_set():
        try:
            beat += 1
            store.set(_KEY.format(rank), str(beat))
            for peer in peers:
                key = _KEY.format(peer)
                value = store.get(key) if store.check([key]) else None
                last, since = seen[peer]
                if value != last:
                    seen[peer] = (value, time.monotonic())
                elif time.monotonic() - since > timeout:
                    _stop(f"rank {peer} has not answered for {timeout:.0f} s (its process or node died?)", leaving)
        except (RuntimeError, OSError) as e:  # the store (on the first node) is gone
            _stop(f"lost the rendezvous store at {os.environ.get('MASTER_ADDR')}: the first node is gone? ({e})",
                  leaving)
        time.sleep(1.0)


def _stop(why: str, leaving: threading.Event) -> None:
    if leaving.is_set():
        return
    print(f"param2moe: rank {os.environ.get('RANK', '?')}: {why}; shutting down", file=sys.stderr, flush=True)
    os._exit(1)
