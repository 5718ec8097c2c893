"""What goes wrong with a remote host, each with a message that says what to do."""

from __future__ import annotations

from testbed.errors import TestbedError


class RemoteError(TestbedError):
    """Base of every error about a remote host."""


class InventoryError(RemoteError):
    """The inventory file is missing, malformed, or names an unknown host."""


class HostUnreachable(RemoteError):
    """Nothing answered at the host's address and port within the timeout (or the route/port refused)."""


class AuthRefused(RemoteError):
    """The host refused our key (or the key file is missing or unreadable)."""


class HostKeyUnknown(RemoteError):
    """The host's key is not in known_hosts: run `testbed remote trust HOST` after checking it."""


class HostKeyChanged(RemoteError):
    """The host presented a key different from the one recorded: possibly another machine, or an attack."""


class SudoMissing(RemoteError):
    """The command needs root, and the user has no password-less sudo."""


class RemoteCommandFailed(RemoteError):
    """A command on the host exited non-zero or did not finish in time."""


class DeployError(RemoteError):
    """An upload failed or arrived with a different hash."""
