"""The inventory, facts parsing, tc commands and process scripts: pure, no hosts needed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from testbed.lab.topology import build_topology
from testbed.net.link import DirectionSpec
from testbed.net.tcplan import kernel_rate_bps
from testbed.remote import agents, shaping
from testbed.remote.errors import InventoryError, RemoteError
from testbed.remote.facts import parse_facts
from testbed.remote.inventory import dump_inventory, lab_inventory, load_inventory, parse_inventory
from testbed.remote.ssh import sudo_missing
from testbed.remote.wheelhouse import wheelhouse_commands

from ..conftest import REPO

EXAMPLE = REPO / "ansible" / "inventories" / "example" / "hosts.yml"


def test_example_inventory_has_every_tier() -> None:
    inv = load_inventory(EXAMPLE)
    assert [h.name for h in inv.devices] == ["pi4-1", "pi5-1", "orin-nano-1"]
    pi = inv.host("pi4-1")
    assert (pi.address, pi.user, pi.port, pi.device_class, pi.interface) == (
        "192.168.50.11", "testbed-admin", 22, "raspberry-pi-4", "eth0")
    assert pi.key_path == Path("~/.ssh/testbed_ed25519").expanduser()
    assert inv.host("orin-nano-1").device_class == "jetson-orin-nano"
    assert inv.edge is not None and inv.edge.name == "gpu-1" and inv.edge.interface == "enp1s0"
    assert inv.host("mon-1").roles == ("monitoring",)
    assert inv.known_hosts == Path("~/.config/testbed/known_hosts").expanduser()
    assert [h.name for h in inv.select("edge")] == ["gpu-1"]
    assert len(inv.select("all")) == 5
    for host in inv.hosts:  # every profile the example names exists
        if host.device_class:
            assert (REPO / "profiles" / "devices" / f"{host.device_class}.yaml").exists()


def test_host_vars_override_group_vars_and_ports_are_checked(tmp_path: Path) -> None:
    data = {"all": {"vars": {"ansible_user": "pi", "testbed_interface": "eth0"}, "children": {
        "devices": {"vars": {"testbed_interface": "wlan0"}, "hosts": {
            "a": {"ansible_host": "10.0.0.1", "ansible_port": 2222, "testbed_interface": "usb0"},
            "b": {"ansible_host": "10.0.0.2"}}},
        "monitoring": {"hosts": {"a": None}}}}}
    inv = parse_inventory(data, tmp_path / "inv.yml")
    assert inv.host("a").interface == "usb0" and inv.host("b").interface == "wlan0"
    assert inv.host("a").roles == ("device", "monitoring")
    assert inv.host("a").known_hosts_name == "[10.0.0.1]:2222"
    assert inv.host("b").known_hosts_name == "10.0.0.2"
    bad = {"all": {"hosts": {"x": {"ansible_port": "ssh"}}}}
    with pytest.raises(InventoryError, match="not a port number"):
        parse_inventory(bad, tmp_path / "inv.yml")
    with pytest.raises(InventoryError, match="Jinja"):
        parse_inventory({"all": {"hosts": {"x": {"ansible_host": "{{ lookup('env', 'H') }}"}}}}, tmp_path / "i.yml")
    with pytest.raises(InventoryError, match="no host 'zz'"):
        inv.host("zz")
    with pytest.raises(InventoryError, match="not found"):
        load_inventory(tmp_path / "missing.yml")


def test_lab_inventory_in_the_repository_is_what_the_lab_writes() -> None:
    topo = build_topology(2, "5g-sub6", "netem", prefix="tb")
    run = Path("/run/testbed/lab-tb")
    generated = yaml.safe_load(dump_inventory(lab_inventory(topo, run / "ssh/tb-client", run / "ssh/known_hosts", run)))
    checked_in = yaml.safe_load((REPO / "ansible/inventories/lab/hosts.yml").read_text())
    assert generated == checked_in
    inv = parse_inventory(generated, run / "ssh/inventory.yml")
    assert [h.netns for h in inv.hosts] == ["tb-lab"] * 3
    assert inv.host("dev2").root == "/run/testbed/lab-tb/hosts/dev2"


def test_parse_facts_of_a_pi_a_jetson_and_a_gpu_server() -> None:
    base = "@@cores\n4\n@@mem_kb\n3884108\n@@os\nDebian GNU/Linux 12 (bookworm)\n@@kernel\n6.6.31+rpt-rpi-v8\n" \
           "@@arch\naarch64\n@@tc\n/usr/sbin/tc\n"
    pi = parse_facts(base + "@@cpu_model\n\n@@lscpu_model\n Cortex-A72\n@@netem_module\nmodinfo\n"
                            "@@device_tree_model\nRaspberry Pi 4 Model B Rev 1.4\n")
    assert (pi.cpu_model, pi.cores, pi.memory_bytes, pi.netem) == ("Cortex-A72", 4, 3884108 * 1024, True)
    assert (pi.accelerator, pi.accelerator_source) == ("Raspberry Pi 4 Model B Rev 1.4", "device-tree")
    jetson = parse_facts(base + "@@netem_module\nno\n@@tegra_release\n# R36 (release), REVISION: 3.0\n")
    assert jetson.accelerator_source == "nv_tegra_release" and "R36" in jetson.accelerator and not jetson.netem
    gpu = parse_facts(base + "@@nvidia_smi\nNVIDIA H100 PCIe, 81559 MiB\n")
    assert gpu.accelerator == "NVIDIA H100 PCIe, 81559 MiB" and gpu.tc


def test_tc_commands_follow_the_plan() -> None:
    spec = DirectionSpec(rate_bps=5_700_000, delay_us=16_500, jitter_us=1000, loss_ppm=1000)
    plan = shaping.plan_commands("eth0", spec, netem=True)
    assert plan.commands[0] == ("tc", "qdisc", "del", "dev", "eth0", "root")
    assert plan.commands[1][:9] == ("tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb")
    assert f"{kernel_rate_bps(5_700_000)}bit" in plan.commands[2]
    netem = plan.commands[3]
    assert netem[5:9] == ("parent", "1:1", "handle", "10:") and "16500us" in netem and "0.1000%" in netem
    assert plan.dropped == ""
    rate_only = shaping.plan_commands("eth0", spec, netem=False)
    assert len(rate_only.commands) == 3 and "sch_netem" in rate_only.dropped
    with pytest.raises(RemoteError, match="interface name"):
        shaping.plan_commands("eth0; reboot", spec, netem=True)


def test_process_scripts_are_valid_shell_and_names_are_checked() -> None:
    for script in (agents.start_script("/tmp/x y", "agent", ["python3", "-c", "print('a b')"]),
                   agents.stop_script("/tmp/x", "agent"), agents.status_script("/tmp/x", "agent")):
        assert subprocess.run(["sh", "-n", "-c", script], capture_output=True).returncode == 0
    with pytest.raises(RemoteError, match="process name"):
        agents.paths("/tmp", "../etc")
    argv = agents.agent_argv("/opt/testbed", "tcp://10.0.0.1:5600", "pi4-1", "raspberry-pi-4", heartbeat_s=1.0)
    assert argv[:6] == ["/opt/testbed/venv/bin/testbed-agent", "serve", "--controller", "tcp://10.0.0.1:5600",
                        "--device-id", "pi4-1"]
    assert argv[argv.index("--device-class") + 1] == "raspberry-pi-4"
    with pytest.raises(RemoteError, match="tcp://HOST:PORT"):
        agents.agent_argv("/opt/testbed", "10.0.0.1:5600", "pi4-1")


def test_systemd_unit_runs_exactly_the_agent_command_line() -> None:
    """The unit's ExecStart (rendered with Ansible's own templating) is `testbed-agent serve` as agents.agent_argv
    builds it for `testbed remote start --agent`."""
    jinja2 = pytest.importorskip("jinja2")
    template = (REPO / "ansible/roles/agent/templates/testbed-agent.service.j2").read_text()
    unit = jinja2.Template(template).render(
        ansible_managed="x", agent_device_id="pi4-1", agent_service_user="testbed", agent_root="/opt/testbed",
        agent_controller="tcp://10.0.0.1:5600", agent_device_class="raspberry-pi-4", agent_metrics_port=9101,
        agent_metrics_bind="0.0.0.0", agent_heartbeat_s=1.0)
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))[len("ExecStart="):]
    expected = agents.agent_argv("/opt/testbed", "tcp://10.0.0.1:5600", "pi4-1", "raspberry-pi-4",
                                 metrics_port=9101, metrics_bind="0.0.0.0", heartbeat_s=1.0)
    assert exec_start.split() == expected


def test_sudo_complaints_are_recognised() -> None:
    assert sudo_missing("sudo: a password is required\n")
    assert sudo_missing("pi is not in the sudoers file.  This incident will be reported.")
    assert not sudo_missing("tc: RTNETLINK answers: Operation not permitted")


def test_wheelhouse_commands_for_this_machine_and_for_a_pi() -> None:
    native = wheelhouse_commands(REPO, Path("/w"))
    assert native == [[native[0][0], "-m", "pip", "wheel", "--wheel-dir", "/w", f"{REPO}[agent]"]]
    cross = wheelhouse_commands(REPO, Path("/w"), platform="manylinux_2_28_aarch64", python_version="3.11")
    assert "--no-deps" in cross[0] and "manylinux_2_28_aarch64" in cross[1] and "--only-binary=:all:" in cross[1]
    with pytest.raises(RemoteError, match="--extra"):
        wheelhouse_commands(REPO, Path("/w"), extra="torch")
