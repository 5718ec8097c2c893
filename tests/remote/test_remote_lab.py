"""The remote tools and Ansible against real sshd in the emulated lab (two device hosts, prefix tbr)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.lab import sshd
from testbed.lab.hosts import list_namespaces, pids_in_namespace, process_start_ticks
from testbed.lab.lab import Lab
from testbed.lab.state import StateStore
from testbed.net.link import DirectionSpec, LinkSpec
from testbed.net.tc import read_qdiscs
from testbed.net.tcplan import kernel_rate_bps
from testbed.remote import agents, deploy, facts, shaping
from testbed.remote.errors import (
    AuthRefused,
    DeployError,
    HostKeyChanged,
    HostKeyUnknown,
    HostUnreachable,
    RemoteError,
)
from testbed.remote.inventory import Inventory, load_inventory
from testbed.remote.ssh import connect, fingerprint, host_key, trust
from testbed.remote.wheelhouse import build_wheelhouse

from ..conftest import REPO, stop_process

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or not Path(sshd.SSHD).exists(),
                       reason="needs root, iproute2 and openssh-server"),
]

PREFIX = "tbr"
WHEELHOUSE_CACHE = Path(os.environ.get("TESTBED_TEST_WHEELHOUSE", "/tmp/tbr-wheelhouse"))
VENV_BIN = Path(sys.executable).parent


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def ssh_processes() -> set[tuple[int, int]]:
    """Every ssh client and sshd on this machine, as (pid, start time)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _exe(int(entry.name)) in ("/usr/bin/ssh", "/usr/sbin/sshd"):
            ticks = process_start_ticks(int(entry.name))
            if ticks is not None:
                out.add((int(entry.name), ticks))
    return out


@dataclasses.dataclass(frozen=True)
class SshLab:
    lab: Lab
    inventory: Inventory
    access: sshd.SshAccess


@pytest.fixture(scope="module")
def ssh_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshLab]:
    before = ssh_processes()
    lab = Lab(StateStore(tmp_path_factory.mktemp("state")), PREFIX)
    lab.down()  # a previous crashed run
    try:
        lab.up(2, "unshaped", LinkSpec.unlimited(), ssh=True)
        access = lab.ssh_access()
        from testbed.remote.inventory import dump_inventory, lab_inventory

        access.inventory.write_text(dump_inventory(lab_inventory(
            lab.require_state().topology, access.client_key, access.known_hosts, lab.store.run_dir(PREFIX))))
        yield SshLab(lab, load_inventory(access.inventory), access)
    finally:
        lab.down()
    assert not [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}-")]
    assert ssh_processes() <= before, "an ssh or sshd process outlived the lab"


def test_sshd_is_key_only_and_recorded(ssh_lab: SshLab) -> None:
    state = ssh_lab.lab.require_state()
    records = {p.name: p for p in state.processes if p.name.startswith("sshd-")}
    assert set(records) == {"sshd-edge", "sshd-dev1", "sshd-dev2"}
    for host in state.topology.hosts:
        record = records[f"sshd-{host.name}"]
        assert process_start_ticks(record.pid) == record.start_ticks
        assert record.pid in pids_in_namespace(host.netns)
        # A record written before the server started (pid 0) resolves to the server through its pid file.
        blank = dataclasses.replace(record, pid=0, start_ticks=0)
        assert sshd.resolve(blank).pid == record.pid
    config = ssh_lab.access.config(state.topology.devices[0]).read_text()
    for line in ("PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
                 f"ListenAddress {state.topology.devices[0].address}"):
        assert line in config.splitlines()
    # OpenSSH's own client agrees: publickey is the only method offered.
    dev = state.topology.devices[0]
    probe = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-lab", "ssh", "-v", "-o", "BatchMode=yes",
                            "-o", "ControlMaster=no", "-o", f"UserKnownHostsFile={ssh_lab.access.known_hosts}",
                            "-o", "IdentitiesOnly=yes", "-o", "IdentityFile=/dev/null", f"root@{dev.address}", "true"],
                           capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0
    assert "Authentications that can continue: publickey\n" in probe.stderr


def test_facts_of_both_devices(ssh_lab: SshLab) -> None:
    for host in ssh_lab.inventory.devices:
        with connect(host, ssh_lab.inventory.known_hosts, timeout_s=10) as conn:
            f = facts.gather(conn)
        assert f.cores == os.cpu_count()
        assert f.kernel == os.uname().release and f.arch == os.uname().machine
        assert f.memory_bytes > 100 << 20 and f.cpu_model and f.os
        assert f.tc  # iproute2 is there
        assert f.netem_source in ("loaded", "modinfo", "file", "builtin", "no")


def test_unreachable_hosts_fail_clearly_within_the_timeout(ssh_lab: SshLab) -> None:
    dev = ssh_lab.inventory.host("dev1")
    # The switch's own address: a namespace where nothing listens on port 22.
    refused = dataclasses.replace(dev, name="router", address="10.254.77.254")
    with pytest.raises(HostUnreachable, match=r"router \(10.254.77.254:22\) refused the connection"):
        connect(refused, ssh_lab.inventory.known_hosts, timeout_s=3)
    # A listening socket that never speaks SSH (the handshake times out), in a lab host.
    server = subprocess.Popen(ssh_lab.lab.command_in("dev2", [sys.executable, "-c",
                              "import socket,time; s=socket.create_server(('10.254.77.12', 2200)); "
                              "print('listening', flush=True); c=s.accept(); time.sleep(30)"]),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        silent = dataclasses.replace(ssh_lab.inventory.host("dev2"), port=2200)
        start = time.monotonic()
        with pytest.raises(HostUnreachable, match="did not complete an SSH handshake within 2 s"):
            connect(silent, ssh_lab.inventory.known_hosts, timeout_s=2)
        assert time.monotonic() - start < 30  # bounded by the timeout, not by the silent peer
    finally:
        server.kill()
        server.wait()


def test_a_key_not_in_authorized_keys_is_refused(ssh_lab: SshLab, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    host = dataclasses.replace(ssh_lab.inventory.host("dev1"), key_path=stranger)
    with pytest.raises(AuthRefused, match=r"refused the key .*stranger .* for user root"):
        connect(host, ssh_lab.inventory.known_hosts, timeout_s=10)
    missing = dataclasses.replace(host, key_path=tmp_path / "nope")
    with pytest.raises(AuthRefused, match="does not exist"):
        connect(missing, ssh_lab.inventory.known_hosts, timeout_s=10)


def test_unknown_host_key_is_refused_until_trusted(ssh_lab: SshLab, tmp_path: Path) -> None:
    known = tmp_path / "known_hosts"
    host = ssh_lab.inventory.host("dev2")
    with pytest.raises(HostKeyUnknown, match="testbed remote trust dev2"):
        connect(host, known, timeout_s=10)
    # The CLI records the key it is shown, and prints its fingerprint.
    out = subprocess.run([str(VENV_BIN / "testbed"), "remote", "trust", "dev2", "-i", str(ssh_lab.access.inventory),
                          "--known-hosts", str(known), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    lab_key = ssh_lab.access.host_key(ssh_lab.lab.require_state().topology.host("dev2")).with_suffix(".pub")
    listed = subprocess.run(["ssh-keygen", "-lf", str(lab_key)], capture_output=True, text=True, check=True)
    assert shown["fingerprint"] in listed.stdout and shown["added"]
    with connect(host, known, timeout_s=10) as conn:
        assert conn.run(["echo", "trusted"]).stdout == "trusted\n"
    # Another host's key recorded under this address: refused as changed, and trust will not overwrite it silently.
    other = host_key(ssh_lab.inventory.host("dev1"), timeout_s=10)
    known.write_text(f"{host.address} {other.get_name()} {other.get_base64()}\n")
    with pytest.raises(HostKeyChanged, match="not the key recorded"):
        connect(host, known, timeout_s=10)
    with pytest.raises(HostKeyChanged, match="--replace"):
        trust(host, host_key(host, timeout_s=10), known)
    assert trust(host, host_key(host, timeout_s=10), known, replace=True)
    assert fingerprint(host_key(host, timeout_s=10)) == shown["fingerprint"]


def test_deploy_verifies_hashes_and_detects_corruption(ssh_lab: SshLab, tmp_path: Path) -> None:
    head, tail = tmp_path / "head_a03.onnx", tmp_path / "tail_b07.onnx"
    head.write_bytes(bytes(11) + os.urandom(300_000 - 11))  # byte 10 is 0, so the damage below ("x") changes it
    tail.write_bytes(os.urandom(1000))
    host = ssh_lab.inventory.host("dev1")
    dest = f"{host.root}/partitions"
    with connect(host, ssh_lab.inventory.known_hosts, timeout_s=10) as conn:
        done = deploy.deploy_files(conn, [head, tail], dest)
        assert [d.sha256 for d in done] == [deploy.sha256_file(head), deploy.sha256_file(tail)]
        manifest = {d.name: d.sha256 for d in done}
        assert deploy.verify(conn, dest, manifest) == {"head_a03.onnx": "ok", "tail_b07.onnx": "ok"}
        # A corrupted upload (the bytes that arrive are not the ones the manifest names) never replaces the file.
        good = manifest["tail_b07.onnx"]
        tail.write_bytes(b"corrupted" + tail.read_bytes()[9:])
        with pytest.raises(DeployError, match=r"arrived with sha256 .* expected"):
            deploy.deploy_files(conn, [tail], dest, expected=manifest)
        assert deploy.verify(conn, dest, {"tail_b07.onnx": good}) == {"tail_b07.onnx": "ok"}
        assert conn.run(["ls", "-A", dest]).stdout.split() == ["head_a03.onnx", "tail_b07.onnx"]
        # A file damaged on the host after deployment is found by verify.
        conn.run(["sh", "-c", f"printf x | dd of={dest}/head_a03.onnx bs=1 seek=10 conv=notrunc 2>/dev/null"])
        assert deploy.verify(conn, dest, manifest)["head_a03.onnx"] == "mismatch"


def test_start_logs_stop_a_process_on_a_lab_host(ssh_lab: SshLab) -> None:
    host = ssh_lab.inventory.host("dev2")
    code = "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.1)\n"
    with connect(host, ssh_lab.inventory.known_hosts, timeout_s=10) as conn:
        pid = agents.start(conn, host.root, "ticker", ["python3", "-c", code])
        assert pid in pids_in_namespace(f"{PREFIX}-dev2")
        assert agents.status(conn, host.root, "ticker") == pid
        with pytest.raises(RemoteError, match="already running"):
            agents.start(conn, host.root, "ticker", ["python3", "-c", code])
    # The process outlives the SSH session that started it.
    with connect(host, ssh_lab.inventory.known_hosts, timeout_s=10) as conn:
        deadline = time.monotonic() + 10
        while "tick 2" not in agents.logs(conn, host.root, "ticker") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "tick 2\n" in agents.logs(conn, host.root, "ticker", lines=1000)
        last = agents.logs(conn, host.root, "ticker", lines=3).splitlines()
        assert len(last) == 3 and all(line.startswith("tick ") for line in last)
        assert agents.stop(conn, host.root, "ticker", grace_s=5) == f"stopped {pid}"
        assert agents.status(conn, host.root, "ticker") is None
        assert agents.stop(conn, host.root, "ticker") == "not running"
        with pytest.raises(RemoteError, match="did not start"):
            agents.start(conn, host.root, "broken", ["python3", "-c", "raise SystemExit('no such model')"])
    assert process_start_ticks(pid) is None or pid not in pids_in_namespace(f"{PREFIX}-dev2")


def test_shaping_over_ssh_sets_the_planned_rate(ssh_lab: SshLab) -> None:
    host = ssh_lab.inventory.host("dev1")
    assert host.interface
    spec = DirectionSpec(rate_bps=20_000_000, delay_us=5000)
    with connect(host, ssh_lab.inventory.known_hosts, timeout_s=10) as conn:
        plan = shaping.plan_commands(host.interface, spec, netem=facts.gather(conn).netem)
        shaping.apply(conn, plan)
    classes = [q for q in read_qdiscs(f"{PREFIX}-dev1", host.interface) if q["kind"] == "htb-class"]
    assert [c["rate_bps"] for c in classes] == [kernel_rate_bps(20_000_000)]


def test_cli_reports_facts_as_json_and_errors_in_one_line(ssh_lab: SshLab) -> None:
    inv = str(ssh_lab.access.inventory)
    out = subprocess.run([str(VENV_BIN / "testbed"), "remote", "facts", "devices", "-i", inv, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert sorted(data) == ["dev1", "dev2"] and all(d["cores"] >= 1 for d in data.values())
    bad = subprocess.run([str(VENV_BIN / "testbed"), "remote", "logs", "dev9", "-i", inv],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [f"testbed: error: no host 'dev9' in {inv}; hosts: dev1, dev2, edge"]


def _playbook(ssh_lab: SshLab, wheelhouse: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
           "ANSIBLE_SSH_ARGS": "-o ControlMaster=no -o ControlPath=none -o ControlPersist=no",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1",
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-lab", str(VENV_BIN / "ansible-playbook"),
                           "-i", str(ssh_lab.access.inventory), str(REPO / "ansible" / "agent.yml"),
                           "-e", f"testbed_wheelhouse={wheelhouse}"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=REPO / "ansible")


def _recap(output: str) -> dict[str, dict[str, int]]:
    recap = {}
    for line in output.split("PLAY RECAP")[-1].splitlines():
        if ":" in line and "ok=" in line:
            host, counts = line.split(":", 1)
            recap[host.strip()] = {k: int(v) for k, v in (kv.split("=") for kv in counts.split())}
    return recap


@dataclasses.dataclass(frozen=True)
class Provisioned:
    wheelhouse: Path
    first: subprocess.CompletedProcess[str]
    ssh_before: set[tuple[int, int]]


@pytest.fixture(scope="module")
def provisioned(ssh_lab: SshLab, tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    """The agent playbook's first run against dev1 and dev2 (the venvs the later tests start agents from)."""
    before = ssh_processes()
    wheelhouse = build_wheelhouse(REPO, WHEELHOUSE_CACHE)[0].parent  # cached between runs; project wheel rebuilt
    first = _playbook(ssh_lab, wheelhouse, tmp_path_factory.mktemp("ansible"))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    return Provisioned(wheelhouse, first, before)


def test_agent_playbook_over_ssh_is_idempotent(ssh_lab: SshLab, provisioned: Provisioned, tmp_path: Path) -> None:
    recap = _recap(provisioned.first.stdout)
    assert set(recap) == {"dev1", "dev2"} and all(r["failed"] == 0 and r["unreachable"] == 0 for r in recap.values())
    for host in ssh_lab.inventory.devices:
        with connect(host, ssh_lab.inventory.known_hosts, timeout_s=10) as conn:
            help_text = conn.run([f"{host.root}/venv/bin/testbed-agent", "--help"]).stdout
            assert "serve" in help_text
            # The agent venv has onnxruntime and neither torch nor the controller's CLI libraries.
            probe = conn.run([f"{host.root}/venv/bin/python", "-c",
                              "import importlib.util as u; print(*(bool(u.find_spec(m)) for m in "
                              "('onnxruntime', 'torch', 'typer')))"]).stdout
            assert probe.split() == ["True", "False", "False"]
    second = _playbook(ssh_lab, provisioned.wheelhouse, tmp_path)
    assert second.returncode == 0, second.stdout[-3000:]
    assert all(r["changed"] == 0 for r in _recap(second.stdout).values()), second.stdout[-3000:]
    assert ssh_processes() <= provisioned.ssh_before, "Ansible left ssh processes behind (ControlPersist?)"


CONTROLLER_PORT, EDGE_PORT, REQUESTS = 5600, 5555, 8


def _lab_status(ssh_lab: SshLab, controller: str) -> tuple[dict[str, Any] | None, str]:
    """`testbed status --json` run on the edge host: the status object (None while no controller answers)."""
    out = subprocess.run(ssh_lab.lab.command_in("edge", [str(VENV_BIN / "testbed"), "status", "--controller",
                                                         controller, "--json", "--timeout-s", "2"]),
                         capture_output=True, text=True, timeout=60)
    return (json.loads(out.stdout) if out.returncode == 0 else None), out.stdout + out.stderr


def _remote(ssh_lab: SshLab, *args: str) -> dict[str, Any]:
    """`testbed remote ... --json` against the lab's inventory; its JSON answer."""
    command, *rest = args  # options before the host: `remote start` takes everything after HOST as the command
    out = subprocess.run([str(VENV_BIN / "testbed"), "remote", command, "-i", str(ssh_lab.access.inventory), "--json",
                          *rest], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_provisioned_agents_register_and_serve_split_inference(ssh_lab: SshLab, provisioned: Provisioned,
                                                               cnn_weights: Any, onnx_cache: Any,
                                                               tmp_path: Path) -> None:
    """The whole path a user takes: agents started over SSH from the venvs the playbook installed register with a
    controller on the edge host, take a deployment and serve split-inference requests through the edge."""
    from testbed.partition import PartitionId

    edge_ip = ssh_lab.lab.require_state().topology.edge.address
    controller, edge_data = f"tcp://{edge_ip}:{CONTROLLER_PORT}", f"tcp://{edge_ip}:{EDGE_PORT}"
    head, tail = onnx_cache.partition(cnn_weights.model, cnn_weights.weights_hash, 2, 6)
    partition = str(PartitionId(cnn_weights.weights_hash, 2, 6))
    result = tmp_path / "result.json"
    out_file = open(tmp_path / "controller-edge.log", "wb")  # noqa: SIM115 - the children keep it
    procs = [
        subprocess.Popen(ssh_lab.lab.command_in("edge", [
            sys.executable, "-m", "tests.remote.lab_controller", "--bind", controller, "--edge", edge_data,
            "--partition", partition, "--head", str(head), "--tail", str(tail), "--devices", "2",
            "--requests", str(REQUESTS), "--out", str(result), "--hold-s", "300", "--parent-pid", str(os.getpid())]),
            cwd=REPO, stdout=out_file, stderr=subprocess.STDOUT),
        subprocess.Popen(ssh_lab.lab.command_in("edge", [
            str(VENV_BIN / "testbed-edge"), "--weights", str(cnn_weights.path), "--bind", edge_data,
            "--threads", "1", "--controller", controller, "--parent-pid", str(os.getpid())]),
            cwd=tmp_path, stdout=out_file, stderr=subprocess.STDOUT),
    ]
    out_file.close()
    started: dict[str, int] = {}
    try:
        for host in ssh_lab.inventory.devices:  # as docs/bare-pi-to-first-experiment.md says
            out = _remote(ssh_lab, "start", "--agent", "--controller", controller, "--heartbeat-s", "1", host.name)
            started[host.name] = out["pid"]
            assert out["argv"][:2] == [f"{host.root}/venv/bin/testbed-agent", "serve"]
            assert started[host.name] in pids_in_namespace(f"{PREFIX}-{host.name}")
            # Run by the venv the playbook installed (no torch there: see the idempotency test).
            cmdline = Path(f"/proc/{started[host.name]}/cmdline").read_bytes().split(b"\0")
            assert cmdline[0].decode().startswith(f"{host.root}/venv/bin/python"), cmdline
        # `testbed status`, as a user would ask, until both agents and the edge are up (bounded).
        deadline, answer = time.monotonic() + 90, ""
        nodes: dict[str, dict[str, Any]] = {}
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), (tmp_path / "controller-edge.log").read_text()[-3000:]
            status, answer = _lab_status(ssh_lab, controller)
            nodes = {n["name"]: n for n in (status or {}).get("nodes", [])}
            if {"dev1", "dev2", "edge"} <= {name for name, n in nodes.items() if n["up"]}:
                break
            time.sleep(0.5)
        assert {"dev1", "dev2", "edge"} <= {name for name, n in nodes.items() if n["up"]}, answer[-2000:]
        assert nodes["dev1"]["role"] == nodes["dev2"]["role"] == "device" and nodes["edge"]["role"] == "edge"
        deadline = time.monotonic() + 180  # the workload's result; the controller then holds until stopped
        while not result.exists():
            assert procs[0].poll() is None and time.monotonic() < deadline, \
                (tmp_path / "controller-edge.log").read_text()[-3000:]
            time.sleep(0.2)
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=60) == 0, (tmp_path / "controller-edge.log").read_text()[-3000:]
        done = json.loads(result.read_text())
        assert done["devices"] == ["dev1", "dev2"]
        for device in ("dev1", "dev2"):
            report = done["reports"][device]
            assert done["deployed"][device]["partition"] == partition and done["deployed"][device]["active"]
            assert report["requests"] == REQUESTS and report["failed"] == 0, report
            assert report["by_partition"] == {partition: REQUESTS} and report["partition"] == partition
        assert done["edge"]["served"] == 2 * REQUESTS and done["edge"]["rejected"] == 0, done["edge"]
        for host in ssh_lab.inventory.devices:
            tail = _remote(ssh_lab, "logs", host.name)
            assert tail["pid"] == started[host.name]  # the process started over SSH, never restarted
            assert f"testbed-agent {host.name}: serving, controller {controller}" in tail["log"]
            assert _remote(ssh_lab, "stop", host.name)["result"] == f"stopped {started.pop(host.name)}"
    finally:
        for name in list(started):  # a failure above: stop what is still running, by its pid file
            host = ssh_lab.inventory.host(name)
            with connect(host, ssh_lab.inventory.known_hosts, timeout_s=10) as conn:
                agents.stop(conn, host.root, "agent", grace_s=10)
        for proc in procs:
            stop_process(proc)
    assert all(p.returncode is not None for p in procs)
    assert not [pid for host in ("dev1", "dev2") for pid in pids_in_namespace(f"{PREFIX}-{host}")
                if _exe(pid) != "/usr/sbin/sshd"], "an agent outlived its stop"


def test_ansible_lint_passes() -> None:
    # --offline: no Galaxy or version lookups (CI reaches only the package registries).
    out = subprocess.run([str(VENV_BIN / "ansible-lint"), "--offline", "--nocolor", "ansible/"], capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
