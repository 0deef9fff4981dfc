"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, a no-op elsewhere."""

from __future__ import annotations

import os
import socket


def notify(**fields: str) -> bool:
    """Send fields such as READY="1" or STATUS="idle" to systemd; return False if not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message)
    return True
