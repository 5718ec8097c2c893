"""SSH to a host of the inventory (paramiko): key-based only, host keys checked against a known_hosts file.

No password is ever read or stored. A host whose key is not in known_hosts is refused until someone runs
`testbed remote trust HOST` (which records the key it is shown); a host whose key changed is refused until
the old entry is replaced on purpose. Connect, authentication and every command have timeouts.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko

from testbed.remote.errors import (
    AuthRefused,
    HostKeyChanged,
    HostKeyUnknown,
    HostUnreachable,
    RemoteCommandFailed,
    SudoMissing,
)
from testbed.remote.inventory import RemoteHost

Dial = Callable[[str, int, float], socket.socket]

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_COMMAND_TIMEOUT_S = 120.0
MAX_OUTPUT_BYTES = 16 << 20
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
_SUDO_MISSING = ("a password is required", "is not in the sudoers", "sudo: not found", "sudo: command not found",
                 "may not run sudo", "a terminal is required")


def dial_direct(address: str, port: int, timeout_s: float) -> socket.socket:
    return socket.create_connection((address, port), timeout=timeout_s)


def dial_from_netns(netns: str) -> Dial:
    """Dial from inside a network namespace (the emulated lab): the socket belongs to the namespace it is made in."""
    from testbed.net.tun import in_netns

    def dial(address: str, port: int, timeout_s: float) -> socket.socket:
        with in_netns(netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect((address, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return dial


def dial_for(host: RemoteHost) -> Dial:
    return dial_from_netns(host.netns) if host.netns else dial_direct


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint, as `ssh-keygen -lf` prints it."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _connect_socket(host: RemoteHost, timeout_s: float, dial: Dial) -> socket.socket:
    where = f"{host.name} ({host.address}:{host.port})"
    try:
        return dial(host.address, host.port, timeout_s)
    except ConnectionRefusedError:
        raise HostUnreachable(f"{where} refused the connection: is sshd running and listening there?") from None
    except TimeoutError:
        raise HostUnreachable(f"{where} did not answer within {timeout_s:g} s: is it on and on the network?") from None
    except socket.gaierror as exc:
        raise HostUnreachable(f"{where}: cannot resolve the address ({exc.strerror})") from None
    except OSError as exc:
        raise HostUnreachable(f"{where} is unreachable: {exc.strerror or exc}") from None


def _known(known_hosts: Path) -> paramiko.HostKeys:
    keys = paramiko.HostKeys()
    if known_hosts.exists():
        try:
            keys.load(str(known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyUnknown(f"known_hosts file {known_hosts} is unreadable: {exc}") from exc
    return keys


def _preferred_types(known_types: Sequence[str]) -> list[str]:
    out: list[str] = []
    for kind in known_types:
        out += ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if kind == "ssh-rsa" else [kind]
    return out


def _handshake(host: RemoteHost, timeout_s: float, dial: Dial, key_types: Sequence[str] = ()) -> paramiko.Transport:
    sock = _connect_socket(host, timeout_s, dial)
    transport = paramiko.Transport(sock)
    transport.banner_timeout = timeout_s
    transport.handshake_timeout = timeout_s
    transport.auth_timeout = timeout_s
    if key_types:
        offered = _preferred_types(key_types)
        supported = [k for k in offered if k in transport.get_security_options().key_types]
        if supported:
            transport.get_security_options().key_types = supported
    problem = ""
    try:
        transport.start_client(timeout=timeout_s)  # returns quietly when the timeout passes
    except (paramiko.SSHException, EOFError, OSError) as exc:
        problem = f": {exc or type(exc).__name__}"
    if problem or not (transport.is_active() and transport.initial_kex_done):
        transport.close()
        raise HostUnreachable(f"{host.name} ({host.address}:{host.port}) did not complete an SSH handshake "
                              f"within {timeout_s:g} s{problem}")
    return transport


def check_host_key(host: RemoteHost, key: paramiko.PKey, known_hosts: Path) -> None:
    entry = _known(known_hosts).lookup(host.known_hosts_name)
    shown = f"{key.get_name()} key {fingerprint(key)}"
    if entry is None:
        raise HostKeyUnknown(
            f"{host.name} ({host.known_hosts_name}) is not in {known_hosts}; it shows the {shown}. If that is its "
            f"key (on the host: `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), run "
            f"`testbed remote trust {host.name}`")
    recorded = entry.get(key.get_name())
    if recorded is None or recorded != key:
        raise HostKeyChanged(
            f"{host.name} ({host.known_hosts_name}) shows the {shown}, not the key recorded in {known_hosts}: "
            f"another machine may be answering at that address. If the host was reinstalled, run "
            f"`testbed remote trust {host.name} --replace`")


def load_key(path: Path | None) -> paramiko.PKey:
    candidates = [path] if path else [Path(os.path.expanduser(p)) for p in DEFAULT_KEYS]
    for candidate in candidates:
        if not candidate.exists():
            continue
        try:
            return paramiko.PKey.from_path(candidate)
        except paramiko.PasswordRequiredException:
            raise AuthRefused(f"the key {candidate} is passphrase-protected; testbed reads no passphrases: use a "
                              f"key without one for the lab (readable only by you)") from None
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise AuthRefused(f"cannot read the SSH key {candidate}: {exc}") from None
    if path:
        raise AuthRefused(f"the SSH key {path} does not exist (ansible_ssh_private_key_file in the inventory)")
    raise AuthRefused("no SSH key: set ansible_ssh_private_key_file in the inventory (or create ~/.ssh/id_ed25519)")


@dataclass(frozen=True)
class CommandResult:
    command: str
    returncode: int
    stdout: str
    stderr: str


def sudo_missing(stderr: str) -> bool:
    """Whether sudo's complaint says the user cannot become root without a password (pure)."""
    return any(marker in stderr for marker in _SUDO_MISSING)


class Connection:
    """An authenticated SSH session with one host; commands run one at a time, each with a timeout."""

    def __init__(self, host: RemoteHost, transport: paramiko.Transport, timeout_s: float) -> None:
        self.host = host
        self.transport = transport
        self.timeout_s = timeout_s

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def sftp(self) -> paramiko.SFTPClient:
        client = paramiko.SFTPClient.from_transport(self.transport)
        if client is None:
            raise RemoteCommandFailed(f"{self.host.name}: the SFTP subsystem is not available")
        client.get_channel().settimeout(self.timeout_s)
        return client

    def run(self, command: str | Sequence[str], *, sudo: bool = False, timeout_s: float | None = None,
            check: bool = True, stdin: bytes | None = None) -> CommandResult:
        """Run a command (an argv is quoted for the remote shell); sudo -n when the user is not root."""
        text = command if isinstance(command, str) else shlex.join(command)
        if sudo and self.host.needs_sudo:
            text = "sudo -n -- sh -c " + shlex.quote(text)
        limit_s = timeout_s or DEFAULT_COMMAND_TIMEOUT_S
        try:
            chan = self.transport.open_session(timeout=self.timeout_s)
            chan.settimeout(self.timeout_s)
            chan.exec_command(text)
            if stdin:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = self._collect(chan, limit_s, text)
            rc = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise RemoteCommandFailed(f"{self.host.name}: the connection failed during `{text[:80]}`: {exc}") from None
        result = CommandResult(text, rc, out.decode(errors="replace"), err.decode(errors="replace"))
        if sudo and self.host.needs_sudo and rc != 0 and sudo_missing(result.stderr):
            raise SudoMissing(f"{self.host.name}: user {self.host.user} needs password-less sudo for this "
                              f"(`{self.host.user} ALL=(ALL) NOPASSWD: ALL` in /etc/sudoers.d/testbed, or connect "
                              f"as root): {result.stderr.strip()[:200]}")
        if check and rc != 0:
            raise RemoteCommandFailed(f"{self.host.name}: `{text[:120]}` exited with {rc}: "
                                      f"{(result.stderr or result.stdout).strip()[-400:]}")
        return result

    def _collect(self, chan: paramiko.Channel, limit_s: float, text: str) -> tuple[bytes, bytes]:
        out, err = bytearray(), bytearray()
        deadline = time.monotonic() + limit_s
        while True:
            busy = False
            if chan.recv_ready():
                out += chan.recv(65536)
                busy = True
            if chan.recv_stderr_ready():
                err += chan.recv_stderr(65536)
                busy = True
            if len(out) + len(err) > MAX_OUTPUT_BYTES:
                chan.close()
                raise RemoteCommandFailed(f"{self.host.name}: `{text[:80]}` wrote more than {MAX_OUTPUT_BYTES} bytes")
            if not busy and chan.exit_status_ready() and (chan.eof_received or chan.closed):
                return bytes(out), bytes(err)
            if time.monotonic() > deadline:
                chan.close()
                raise RemoteCommandFailed(f"{self.host.name}: `{text[:80]}` did not finish within {limit_s:g} s")
            if not busy:
                time.sleep(0.005)


def connect(host: RemoteHost, known_hosts: Path, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
            dial: Dial | None = None) -> Connection:
    """Open, check the host key, authenticate with the host's key; every step bounded by `timeout_s`."""
    known_types = list((_known(known_hosts).lookup(host.known_hosts_name) or {}).keys())
    transport = _handshake(host, timeout_s, dial or dial_for(host), known_types)
    try:
        check_host_key(host, transport.get_remote_server_key(), known_hosts)
        key = load_key(host.key_path)
        try:
            transport.auth_publickey(host.user, key)
        except paramiko.BadAuthenticationType as exc:
            raise AuthRefused(f"{host.name} does not accept keys for {host.user} (it allows: "
                              f"{', '.join(exc.allowed_types) or 'nothing'})") from None
        except paramiko.AuthenticationException:
            raise AuthRefused(f"{host.name} refused the key {host.key_path or 'default'} "
                              f"({fingerprint(key)}) for user {host.user}: add its .pub to that user's "
                              f"~/.ssh/authorized_keys") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise HostUnreachable(f"{host.name}: the connection broke during authentication: {exc}") from None
    except BaseException:
        transport.close()
        raise
    return Connection(host, transport, timeout_s)


def host_key(host: RemoteHost, *, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
             dial: Dial | None = None) -> paramiko.PKey:
    """The key the host shows (no authentication): what `testbed remote trust` records."""
    transport = _handshake(host, timeout_s, dial or dial_for(host))
    try:
        return transport.get_remote_server_key()
    finally:
        transport.close()


def trust(host: RemoteHost, key: paramiko.PKey, known_hosts: Path, *, replace: bool = False) -> bool:
    """Record `key` for the host; False if it was recorded already. A different recorded key needs `replace`."""
    keys = _known(known_hosts)
    entry = keys.lookup(host.known_hosts_name) or {}
    if entry.get(key.get_name()) == key:
        return False
    if entry and not replace:
        raise HostKeyChanged(f"{known_hosts} holds another key for {host.name} ({host.known_hosts_name}); "
                             f"the host now shows the {key.get_name()} key {fingerprint(key)}. Pass --replace "
                             f"only if you know why it changed")
    if replace:
        keys.pop(host.known_hosts_name, None)
    keys.add(host.known_hosts_name, key.get_name(), key)
    known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = known_hosts.with_name(known_hosts.name + ".tmp")
    keys.save(str(tmp))
    os.replace(tmp, known_hosts)
    return True
