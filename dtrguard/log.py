"""structlog set up for journald: one JSON event per line.

Under systemd (JOURNAL_STREAM is set) each line starts with the syslog priority in angle
brackets, which journald strips and stores, so `journalctl -p err -u dtrguard` works.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

# syslog priorities (RFC 5424) for structlog's method names.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


class _JournalRenderer:
    """Render an event as JSON, prefixed with its syslog priority when journald reads stdout."""

    def __init__(self, prefix_priority: bool):
        self.prefix_priority = prefix_priority
        self.json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        level = "warning" if method in ("warn", "warning") else method
        level = "error" if level == "exception" else level
        event["level"] = level
        line = str(self.json(logger, method, event))
        if self.prefix_priority:
            return f"<{_PRIORITY.get(level, 6)}>{line}"
        return line


def configure(stream: TextIO | None = None, verbose: bool = False) -> None:
    """Send JSON events to stream (default stdout); debug events only when verbose."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _JournalRenderer(prefix_priority=bool(os.environ.get("JOURNAL_STREAM"))),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    """Return a bound logger whose events carry component=name."""
    return structlog.get_logger(component=name)
