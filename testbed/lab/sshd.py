"""Real OpenSSH servers in the lab's hosts, so the remote tools and Ansible meet the lab as they meet a Pi.

One Debian `sshd` per lab host (edge and devices), inside the host's namespace (and a device's CPU quota),
listening only on the host's lab address. Key-only: no passwords, no keyboard-interactive, root by key only.
Everything lives under the lab's run directory, named with the lab prefix:

  <run dir>/ssh/<prefix>-client, .pub   the lab's client key (what `lab up --ssh` tells you to use)
  <run dir>/ssh/authorized_keys         the client's public key
  <run dir>/ssh/known_hosts             every lab host's address and host key (for ssh and Ansible)
  <run dir>/ssh/<host>/                 a host's host key, sshd_config, pid file and log

The lab's hosts are network namespaces, not machines: they share this machine's file system and users.
Each server is written to the lab record before it starts and is stopped by pid on `lab down`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from testbed.lab.hosts import command_line, process_start_ticks
from testbed.lab.state import ProcessRecord
from testbed.lab.topology import LabError, LabHost, Topology
from testbed.net.tun import in_netns

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "ssh-keygen"
PRIVSEP_DIR = Path("/run/sshd")
SSH_PORT = 22
READY_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class SshAccess:
    """Where a lab's SSH material lives (derived from the run directory; nothing here is secret outside it)."""

    dir: Path
    prefix: str

    @property
    def client_key(self) -> Path:
        return self.dir / f"{self.prefix}-client"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.yml"

    def host_dir(self, host: LabHost) -> Path:
        return self.dir / host.name

    def host_key(self, host: LabHost) -> Path:
        return self.host_dir(host) / "ssh_host_ed25519_key"

    def config(self, host: LabHost) -> Path:
        return self.host_dir(host) / "sshd_config"

    def pidfile(self, host: LabHost) -> Path:
        return self.host_dir(host) / "sshd.pid"

    def log(self, host: LabHost) -> Path:
        return self.host_dir(host) / "sshd.log"


def access_for(run_dir: Path, prefix: str) -> SshAccess:
    return SshAccess(run_dir / "ssh", prefix)


def record_name(host: LabHost) -> str:
    return f"sshd-{host.name}"


def sshd_config(access: SshAccess, host: LabHost) -> str:
    """The server's whole configuration (pure). StrictModes is off because the lab's files may sit under /tmp
    (world-writable parents); the lab writes them itself with owner-only modes."""
    return "\n".join([
        f"# sshd for lab host {host.name} ({host.netns}); written by `testbed lab up --ssh`",
        f"ListenAddress {host.address}",
        f"Port {SSH_PORT}",
        f"HostKey {access.host_key(host)}",
        f"PidFile {access.pidfile(host)}",
        f"AuthorizedKeysFile {access.authorized_keys}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitEmptyPasswords no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",
        "X11Forwarding no",
        "PrintMotd no",
        "UseDNS no",
        "MaxStartups 50:30:100",
        "Subsystem sftp internal-sftp",
        "",
    ])


def _keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    result = subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise LabError(f"ssh-keygen failed for {path}: {result.stderr.strip()}")


def prepare(access: SshAccess, topo: Topology) -> None:
    """Keys, authorized_keys, known_hosts and one config per host (idempotent)."""
    if not Path(SSHD).exists():
        raise LabError(f"{SSHD} not found: install Debian's openssh-server for `lab up --ssh`")
    access.dir.mkdir(parents=True, exist_ok=True)
    os.chmod(access.dir, 0o700)
    _keygen(access.client_key, f"{topo.prefix}-lab-client")
    access.authorized_keys.write_text(access.client_key.with_suffix(".pub").read_text())
    os.chmod(access.authorized_keys, 0o600)
    known = []
    for host in topo.hosts:
        access.host_dir(host).mkdir(exist_ok=True)
        _keygen(access.host_key(host), f"{topo.prefix}-{host.name}-hostkey")
        kind, blob = access.host_key(host).with_suffix(".pub").read_text().split()[:2]
        known.append(f"{host.address} {kind} {blob}\n")
        access.config(host).write_text(sshd_config(access, host))
    access.known_hosts.write_text("".join(known))
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory


def check_config(access: SshAccess, host: LabHost) -> None:
    result = subprocess.run([SSHD, "-t", "-f", str(access.config(host))], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise LabError(f"sshd rejects the configuration of {host.name}: {result.stderr.strip()}")


def start(access: SshAccess, host: LabHost, wrap: Callable[[list[str]], list[str]]) -> ProcessRecord:
    """Start one host's sshd (`wrap` puts the command in the host's namespace and quota); wait until it listens."""
    check_config(access, host)
    access.pidfile(host).unlink(missing_ok=True)
    argv = wrap([SSHD, "-D", "-f", str(access.config(host)), "-E", str(access.log(host))])
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not _listening(host):
        if proc.poll() is not None:
            tail = access.log(host).read_text(errors="replace")[-600:] if access.log(host).exists() else ""
            raise LabError(f"sshd of {host.name} exited with {proc.returncode}: {tail.strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise LabError(f"sshd of {host.name} did not listen on {host.address}:{SSH_PORT} "
                           f"within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    return ProcessRecord(record_name(host), proc.pid, process_start_ticks(proc.pid) or 0, str(access.pidfile(host)))


def _listening(host: LabHost) -> bool:
    with in_netns(host.netns), socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host.address, SSH_PORT)) == 0


def resolve(record: ProcessRecord) -> ProcessRecord:
    """A record written before its sshd started (pid 0): take the pid from the pid file if that process is
    an sshd with this config's pid file (what a crash between start and record leaves)."""
    if record.pid or not record.name.startswith("sshd-") or not record.control:
        return record
    try:
        pid = int(Path(record.control).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return record
    config = str(Path(record.control).with_name("sshd_config"))
    ticks = process_start_ticks(pid)
    if ticks is None or config not in command_line(pid):
        return record
    return ProcessRecord(record.name, pid, ticks, record.control)
