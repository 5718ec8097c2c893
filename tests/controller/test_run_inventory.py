"""`testbed run --inventory` against the emulated lab's hosts over real sshd (prefix tbi): the controller runs in
the lab's switch namespace (where an operator's controller host would sit), the edge and two agents are started
over SSH from the venvs the Ansible roles installed, and nothing is left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed.lab import sshd
from testbed.lab.hosts import list_namespaces, pids_in_namespace, process_start_ticks
from testbed.lab.lab import Lab
from testbed.lab.state import StateStore
from testbed.net.link import LinkSpec
from testbed.remote.inventory import dump_inventory, lab_inventory
from testbed.remote.wheelhouse import build_wheelhouse

from ..conftest import REPO

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or not Path(sshd.SSHD).exists(),
                       reason="needs root, iproute2 and openssh-server"),
]

PREFIX = "tbi"
VENV_BIN = Path(sys.executable).parent
WHEELHOUSE = Path(os.environ.get("TESTBED_TEST_WHEELHOUSE_TBI", "/tmp/tbi-wheelhouse"))
SEED = Path(os.environ.get("TESTBED_TEST_WHEELHOUSE", "/tmp/tbr-wheelhouse"))  # tests/remote's cache
PROFILES = {"device_profile": "profiles/measured/vm-cnn-onnxruntime.yaml",
            "edge_profile": "profiles/measured/vm-cnn-torch.yaml"}


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def ssh_processes() -> set[tuple[int, int]]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _exe(int(entry.name)) in ("/usr/bin/ssh", "/usr/sbin/sshd"):
            ticks = process_start_ticks(int(entry.name))
            if ticks is not None:
                out.add((int(entry.name), ticks))
    return out


def wheelhouse() -> Path:
    """The agent's wheelhouse, its dependencies reused from the caches (only the project's wheel is rebuilt)."""
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    for wheel in SEED.glob("*.whl") if SEED.is_dir() else ():
        if not wheel.name.startswith("edge_split_testbed-") and not (WHEELHOUSE / wheel.name).exists():
            shutil.copy2(wheel, WHEELHOUSE / wheel.name)
    return build_wheelhouse(REPO, WHEELHOUSE)[0].parent


def agent_playbook(inventory: Path, wheels: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"),
           "ANSIBLE_SSH_ARGS": "-o ControlMaster=no -o ControlPath=none -o ControlPersist=no",
           "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-tmp"), "ANSIBLE_NOCOLOR": "1",
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    return subprocess.run(["ip", "netns", "exec", f"{PREFIX}-lab", str(VENV_BIN / "ansible-playbook"), "-i",
                           str(inventory), str(REPO / "ansible" / "agent.yml"), "-e", f"testbed_wheelhouse={wheels}"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=REPO / "ansible")


def test_run_on_the_hosts_of_an_inventory_over_ssh(cnn_weights, tmp_path: Path) -> None:
    before = ssh_processes()
    store = StateStore(tmp_path / "state")
    lab = Lab(store, PREFIX)
    lab.down()  # a previous crashed run
    try:
        lab.up(2, "unshaped", LinkSpec.unlimited(), ssh=True)
        topo = lab.require_state().topology
        access = lab.ssh_access()
        run_dir = store.run_dir(PREFIX)
        access.inventory.write_text(dump_inventory(lab_inventory(topo, access.client_key, access.known_hosts,
                                                                 run_dir)))
        play = agent_playbook(access.inventory, wheelhouse(), tmp_path)
        assert play.returncode == 0, play.stdout[-3000:] + play.stderr[-2000:]
        # The edge's venv: the Ansible edge role installs torch from the internet, which CI cannot reach; the
        # lab's hosts share this file system, so the edge host's venv is this repository's (torch included).
        edge_root = run_dir / "hosts" / "edge"
        edge_root.mkdir(parents=True, exist_ok=True)
        (edge_root / "venv").symlink_to(VENV_BIN.parent)

        out = tmp_path / "out"
        spec = tmp_path / "inv.yaml"
        spec.write_text(yaml.safe_dump({
            "name": "inv", "weights": str(cnn_weights.path), "edge": {"device": "cpu"},
            "devices": [{"id": "a", "data": "shard", "link": "5g-sub6"}, {"id": "b", "data": "synthetic"}],
            "planner": {**PROFILES, "evaluate_every": "500ms"},
            "workload": {"batch_size": 8, "requests": 30, "rate": 20},
            "metrics": {"enabled": True, "prometheus": shutil.which("prometheus") is not None,
                        "scrape_interval": "500ms"},
            "output": str(out)}, sort_keys=False))
        # The controller host of this lab is its switch namespace, which reaches every host.
        proc = subprocess.run(["ip", "netns", "exec", f"{PREFIX}-lab", str(VENV_BIN / "testbed"), "run", str(spec),
                               "--inventory", str(access.inventory), "--json", "--cache-dir",
                               str(tmp_path / "cache")], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
        summary = json.loads(proc.stdout)
        assert summary["placement"] == "inventory" and summary["failed"] == 0, summary["device_failures"]
        # The spec's ids were bound to the inventory's device hosts, in order.
        assert {d: s["requests"] for d, s in summary["devices"].items()} == {"dev1": 30, "dev2": 30}
        assert summary["accuracy"]["dev1"] is not None  # its shard went over SFTP, labels with it
        log = " ".join(proc.stderr.split())  # the live lines, unwrapped
        assert "dev1: uplink on tun0 shaped to 5g-sub6" in log and "edge: weights " in log and "verified" in log
        for name in ("edge", "dev1", "dev2"):
            assert f"{name}: {'edge' if name == 'edge' else 'agent'} started over SSH" in log
        # The remote logs were kept; the agents ran from the playbook's venvs.
        for host in ("dev1", "dev2"):
            text = (out / "logs" / f"{host}-agent.log").read_text()
            assert f"testbed-agent {host}: serving" in text and f"testbed-agent {host}: stopped" in text
        if summary["prometheus"]:
            assert len(summary["prometheus"]["targets"]) == 4
        # Nothing left on the hosts but their sshd; the qdisc the run added is gone; no ssh client left.
        for host in ("edge", "dev1", "dev2"):
            left = [p for p in pids_in_namespace(f"{PREFIX}-{host}") if _exe(p) != "/usr/sbin/sshd"]
            assert left == [], (host, [Path(f"/proc/{p}/cmdline").read_bytes() for p in left])
        for host in ("dev1", "dev2"):
            assert not (run_dir / "hosts" / host / "run" / "agent.pid").exists()
        assert not (edge_root / "run" / "edge.pid").exists()
    finally:
        lab.down()
    assert not [ns for ns in list_namespaces() if ns.startswith(f"{PREFIX}-")]
    assert ssh_processes() <= before, "an ssh or sshd process outlived the lab"
