"""The exception tree and the exit codes the command line maps it to.

Every error carries a message (what failed), an optional detail (the value involved) and an
optional hint (what to do next), so a line in the journal is enough to act on.
"""

from __future__ import annotations

# Exit codes. systemd's RestartPreventExitStatus lists EXIT_CONFIG and EXIT_REFUSED because
# neither goes away by restarting: one needs an edited config, the other an operator's decision.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_REFUSED = 3


class DtrguardError(Exception):
    """Base of every error dtrguard reports; maps to an exit code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint

    def __str__(self) -> str:
        parts = [self.message]
        if self.detail:
            parts.append(self.detail)
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "; ".join(parts)


class ConfigError(DtrguardError):
    """The config file is missing, unreadable or has an invalid value."""

    exit_code = EXIT_CONFIG


class RefusedError(DtrguardError):
    """An action would overwrite live data, so dtrguard stops and waits for an operator."""

    exit_code = EXIT_REFUSED


class TransientError(DtrguardError):
    """A service (S3, instance metadata, the Docker Engine) did not respond, so the caller may retry."""


class RepositoryUnavailable(TransientError):
    """S3 could not be read or written."""


class IntegrityError(DtrguardError):
    """A backup set or one of its artifacts failed a size, checksum or format check."""


class CommandError(DtrguardError):
    """A command run in a container or on the host exited non-zero."""


class Aborted(DtrguardError):
    """Work was stopped on request (SIGTERM or SIGINT) before it finished."""
