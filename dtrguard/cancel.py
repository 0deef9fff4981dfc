"""Cancel flags that also count as set when the flag they derive from is."""

from __future__ import annotations

import threading


class ChildEvent(threading.Event):
    """An event that is set on its own, or whenever its parent is: a part of work that can stop alone.

    Only is_set() consults the parent. wait() waits for this event alone.
    """

    def __init__(self, parent: threading.Event):
        super().__init__()
        self.parent = parent

    def is_set(self) -> bool:
        return super().is_set() or self.parent.is_set()
