"""Cancel flags that also count as set when the flag they derive from is, and a wait that lets signals in."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any


class ChildEvent(threading.Event):
    """An event that is set on its own, or whenever its parent is: a part of work that can stop alone.

    Only is_set() consults the parent. wait() waits for this event alone.
    """

    def __init__(self, parent: threading.Event):
        super().__init__()
        self.parent = parent

    def is_set(self) -> bool:
        return super().is_set() or self.parent.is_set()


def wait_waking(future: concurrent.futures.Future[Any]) -> None:
    """Wait for future to finish, waking every second.

    Python runs signal handlers only in the main thread. There, a wait without a timeout would hold
    back a SIGTERM that the kernel handed to another thread until the future finished.
    """
    while not future.done():
        concurrent.futures.wait([future], timeout=1.0)
