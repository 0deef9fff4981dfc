"""The EC2 instance id, from the instance metadata service (IMDSv2) or from a file."""

from __future__ import annotations

import http.client
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from dtrguard import log
from dtrguard.config import NodeSettings
from dtrguard.errors import ConfigError, TransientError

_log = log.get("instance")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class MetadataUnavailable(TransientError):
    """The instance metadata service did not respond."""


def instance_id(settings: NodeSettings) -> str:
    """Return this node's instance id from the configured source."""
    if settings.instance_id_source.startswith("file:"):
        return _from_file(Path(settings.instance_id_source[len("file:") :]))
    return _from_imds(settings)


def _from_file(path: Path) -> str:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"instance id file {path} cannot be read: {exc.strerror}",
            hint='write the instance id into it, or set [node].instance_id_source = "imds"',
        ) from None
    return _checked(value, str(path))


def _checked(value: str, source: str) -> str:
    if not _ID.match(value):
        raise ConfigError(f"instance id {value[:80]!r} from {source} is invalid", hint="use an id such as i-0abc123")
    return value


def _from_imds(settings: NodeSettings) -> str:
    """Read the instance id with retries. Raise MetadataUnavailable rather than return a guess.

    A dropped connection, an error status, a truncated response or a value that is no instance
    id (a service still starting) are all retried, here and then by the caller.
    """
    delay = 0.5
    for attempt in range(1, settings.imds_attempts + 1):
        try:
            return _checked(_imds_get(settings), settings.imds_endpoint)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException, ConfigError) as exc:
            error = exc.message if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
            _log.warning("imds.retry", attempt=attempt, error=error, endpoint=settings.imds_endpoint)
            if attempt < settings.imds_attempts:
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
    raise MetadataUnavailable(
        f"instance metadata service at {settings.imds_endpoint} did not respond"
        f" after {settings.imds_attempts} attempts",
        hint="check that IMDS is enabled for the instance, or set [node].instance_id_source to a file",
    )


def _imds_get(settings: NodeSettings) -> str:
    token_request = urllib.request.Request(
        f"{settings.imds_endpoint}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
    )
    with urllib.request.urlopen(token_request, timeout=settings.imds_timeout) as response:
        token = response.read().decode().strip()
    id_request = urllib.request.Request(
        f"{settings.imds_endpoint}/latest/meta-data/instance-id",
        headers={"X-aws-ec2-metadata-token": token},
    )
    with urllib.request.urlopen(id_request, timeout=settings.imds_timeout) as response:
        return str(response.read().decode().strip())
