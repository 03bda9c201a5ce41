"""Whether Flatcar has staged an update: update_engine's status on the host's system bus.

Flatcar's update_engine downloads an update into the passive partition and then
reports `UPDATE_STATUS_UPDATED_NEED_REBOOT`, with the release it staged as
NEW_VERSION, until the node reboots into it. Its D-Bus API, the one the Flatcar
Linux Update Operator reads (flatcar-linux-update-operator, pkg/updateengine):
service `com.coreos.update1`, object `/com/coreos/update1`, interface
`com.coreos.update1.Manager`, method `GetStatus` → (x last_checked_time,
d progress, s current_operation, s new_version, x new_size).

The bus is the host's: its socket is mounted read-only at
/run/dbus/system_bus_socket (under HOST_ROOT). The messages are made and parsed
by jeepney (pure Python, no dependencies of its own); the socket is ours, so that
every step (connect, authenticate, Hello, the call) has a timeout: a host bus
that stops answering must not stop the watcher. Not being able to tell (no bus,
not Flatcar, access denied) is never an error: the answer is None, and the reason
is logged once (then at debug level), as the watcher asks every minute.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import socket
import struct
from pathlib import Path
from typing import Any

from jeepney import (
    AuthenticationError,
    DBusAddress,
    HeaderFields,
    MessageType,
    Parser,
    message_bus,
    new_method_call,
)
from jeepney.auth import BEGIN, Authenticator

from nvdriver.config import Config

log = logging.getLogger(__name__)

SYSTEM_BUS_SOCKET = "/run/dbus/system_bus_socket"
SERVICE = "com.coreos.update1"
OBJECT = "/com/coreos/update1"
INTERFACE = "com.coreos.update1.Manager"
STATUS_SIGNATURE = "xdssx"
NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"
# Seconds for each step with the bus; update_engine answers GetStatus at once.
TIMEOUT = 5.0


@dataclasses.dataclass(frozen=True)
class Status:
    """update_engine's GetStatus answer."""

    last_checked_time: int
    progress: float
    current_operation: str
    new_version: str
    new_size: int

    @property
    def staged(self) -> str | None:
        """The release waiting for the reboot, or None when no update is staged."""
        if self.current_operation == NEED_REBOOT and self.new_version:
            return self.new_version
        return None


class BusError(Exception):
    """The host's bus or update_engine did not answer (the reason, for one log line)."""


class UpdateEngine:
    """The host's update_engine, asked afresh at each call (one short connection each)."""

    def __init__(self, config: Config) -> None:
        self.socket = config.host(SYSTEM_BUS_SOCKET)
        self._last_reason: str | None = None

    def status(self) -> Status | None:
        """update_engine's status, or None (with the reason logged) when it cannot be read."""
        try:
            status = _get_status(self.socket)
        except BusError as e:
            reason = str(e)
            level = logging.INFO if reason != self._last_reason else logging.DEBUG
            log.log(level, "Cannot tell whether Flatcar has staged an update: %s", reason)
            self._last_reason = reason
            return None
        self._last_reason = None
        return status

    def staged(self) -> str | None:
        """The Flatcar release that update_engine staged for the next boot, if any."""
        status = self.status()
        return status.staged if status is not None else None


def _get_status(path: Path) -> Status:
    if not path.exists():
        raise BusError(f"the host's system bus is not mounted at {path}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(str(path))
            _authenticate(sock)
            call = _Caller(sock)
            call(message_bus.Hello())
            address = DBusAddress(OBJECT, bus_name=SERVICE, interface=INTERFACE)
            reply = call(new_method_call(address, "GetStatus"))
    except OSError as e:  # TimeoutError included
        raise BusError(f"the host's system bus {path}: {e.strerror or e}") from e
    except AuthenticationError as e:
        raise BusError(f"the host's system bus {path} refused us: {e}") from e
    except (ValueError, KeyError, IndexError, TypeError, struct.error) as e:  # not D-Bus
        raise BusError(f"the host's system bus {path} sent something else than D-Bus: {e}") from e
    signature = reply.header.fields.get(HeaderFields.signature, "")
    body: tuple[Any, ...] = reply.body
    if signature != STATUS_SIGNATURE:
        raise BusError(
            f"update_engine's GetStatus answered ({signature}) {body!r}, "
            f"expected ({STATUS_SIGNATURE})"
        )
    return Status(*body)


def _authenticate(sock: socket.socket) -> None:
    """SASL EXTERNAL (our uid, checked by the bus with SO_PEERCRED), then BEGIN."""
    auth = Authenticator()
    for line in auth:
        sock.sendall(line)
        auth.feed(_receive(sock))
    sock.sendall(BEGIN)


def _receive(sock: socket.socket) -> bytes:
    data = sock.recv(4096)
    if not data:
        raise ConnectionResetError("the bus closed the connection")
    return data


class _Caller:
    """Method calls on one connection: send, then read until the reply to that serial
    (skipping signals such as NameAcquired); an error reply becomes BusError."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.parser = Parser()
        self.serials = itertools.count(1)

    def __call__(self, message: Any) -> Any:
        serial = next(self.serials)
        self.sock.sendall(message.serialise(serial=serial))
        while True:
            reply = self.parser.get_next_message()
            if reply is None:
                self.parser.add_data(_receive(self.sock))
                continue
            if reply.header.fields.get(HeaderFields.reply_serial) != serial:
                continue
            if reply.header.message_type == MessageType.error:
                name = reply.header.fields.get(HeaderFields.error_name)
                detail = f": {reply.body[0]}" if reply.body else ""
                raise BusError(f"{name}{detail}")
            return reply
