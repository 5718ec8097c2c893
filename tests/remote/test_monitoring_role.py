"""The monitoring role's Prometheus configuration, rendered by Ansible from the example inventory, is one that
Debian's promtool accepts, and scrapes every host, agent, the edge and the controller named there."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed.metrics.scrape import JOB_CONTROLLER, JOB_DEVICE, JOB_EDGE

from ..conftest import REPO

VENV_BIN = Path(sys.executable).parent
EXAMPLE = REPO / "ansible" / "inventories" / "example" / "hosts.yml"
ROLE = REPO / "ansible" / "roles" / "monitoring"


@pytest.mark.skipif(not (VENV_BIN / "ansible-playbook").exists(), reason="needs ansible-core in the venv")
@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs Debian's prometheus package (promtool)")
def test_the_scrape_config_rendered_from_the_inventory_passes_promtool(tmp_path: Path) -> None:
    out = tmp_path / "prometheus.yml"
    playbook = tmp_path / "render.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Render the monitoring role's scrape configuration", "hosts": "monitoring",
        "connection": "local", "gather_facts": False,
        "vars_files": [str(ROLE / "defaults" / "main.yml")],
        "vars": {"ansible_python_interpreter": sys.executable},
        "tasks": [{"name": "Template", "ansible.builtin.template": {
            "src": str(ROLE / "templates" / "prometheus.yml.j2"), "dest": str(out), "mode": "0644"}}],
    }]))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible" / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "ANSIBLE_REMOTE_TEMP": str(tmp_path / "ansible-tmp")}
    proc = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(EXAMPLE), str(playbook)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check = subprocess.run(["promtool", "check", "config", str(out)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load(out.read_text())
    jobs = {job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
            for job in config["scrape_configs"]}
    # The same job names as the configs `testbed run` writes (testbed.metrics.scrape).
    assert set(jobs) == {"node", JOB_DEVICE, JOB_EDGE, JOB_CONTROLLER}
    assert len(jobs["node"]) == 5  # every host of the inventory runs a node exporter
    assert sorted(jobs["testbed-device"]) == ["192.168.50.11:9101", "192.168.50.12:9101", "192.168.50.21:9101"]
    assert jobs["testbed-edge"] == ["192.168.50.2:9102"]
    assert jobs["testbed-controller"] == ["192.168.50.1:9103"]
