"""`testbed lab up|down|status|calibrate`: the emulated lab on one machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from testbed.cli.errors import friendly_errors
from testbed.lab.lab import Lab
from testbed.lab.state import DEFAULT_STATE_DIR, LabState, StateStore
from testbed.lab.topology import DEFAULT_PREFIX, LabError
from testbed.net.link import load_link_profile

app = typer.Typer(help="Hosts in network namespaces, links shaped to 5G/6G profiles, devices slowed to class speed.",
                  no_args_is_help=True)

PrefixOpt = Annotated[str, typer.Option(help="name prefix of everything the lab creates")]
StateOpt = Annotated[Path, typer.Option(help="where the lab's record is kept")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output (one JSON document on stdout)")]


def lab_for(prefix: str, state_dir: Path) -> Lab:
    return Lab(StateStore(state_dir), prefix)


@app.command()
@friendly_errors
def up(
    devices: Annotated[int, typer.Option(min=1, max=200, help="number of device hosts")] = 3,
    link: Annotated[str, typer.Option(help="link profile (profiles/links/NAME.yaml) or a YAML path")] = "5g-sub6",
    device_class: Annotated[str | None, typer.Option(help="device class (profiles/devices/NAME.yaml)")] = None,
    backend: Annotated[str, typer.Option(help="auto, netem or delay-line")] = "auto",
    ssh: Annotated[bool, typer.Option(help="a real sshd (key-only) in every host, and an Ansible inventory")] = False,
    as_json: JsonOpt = False,
    prefix: PrefixOpt = DEFAULT_PREFIX,
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Create the lab: one namespace per device and one for the edge, cabled to a switch, links shaped."""
    if backend not in ("auto", "netem", "delay-line"):
        raise LabError(f"--backend must be auto, netem or delay-line, not {backend!r}")
    profile = load_link_profile(link)
    the_lab = lab_for(prefix, state_dir)
    state = the_lab.up(devices, profile.name, profile.spec,
                       None if backend == "auto" else backend,  # type: ignore[arg-type]
                       device_class, ssh=ssh)
    topo = state.topology
    summary = lab_summary(state)
    if not as_json:
        Console().print(f"lab {topo.prefix} up: edge {topo.edge.address} and {len(topo.devices)} device(s) on "
                        f"{topo.subnet}, link {profile.name}, backend {topo.backend}"
                        + (f", device class {device_class}" if device_class else ""))
    if ssh:
        summary["ssh"] = _print_ssh_help(the_lab, state, to_stderr=as_json)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))


def lab_summary(state: LabState) -> dict[str, Any]:
    """What `lab up --json` prints: the lab's record as a user needs it (names, addresses, links in base units)."""
    topo = state.topology
    return {
        "prefix": topo.prefix,
        "subnet": topo.subnet,
        "backend": topo.backend,
        "link_profile": topo.link_profile,
        "switch_netns": topo.switch_ns,
        "router_address": topo.router_address,
        "hosts": [{"name": h.name, "role": h.role, "netns": h.netns, "address": h.address,
                   "device_class": h.device_class} for h in topo.hosts],
        "links": {name: {d: dict(spec.get(d, {})) for d in ("uplink", "downlink")}
                  for name, spec in state.links.items()},
        "complete": state.complete,
    }


def _print_ssh_help(the_lab: Lab, state: LabState, to_stderr: bool = False) -> dict[str, str]:
    """Write the lab's Ansible inventory and say how to reach the hosts (from the switch namespace)."""
    from testbed.remote.inventory import dump_inventory, lab_inventory

    access = the_lab.ssh_access()
    topo = state.topology
    access.inventory.write_text(dump_inventory(lab_inventory(topo, access.client_key, access.known_hosts,
                                                             the_lab.store.run_dir(topo.prefix))))
    dev = topo.devices[0]
    help_text = (f"sshd (key-only) on every host; client key {access.client_key}, known hosts {access.known_hosts}\n"
                 f"  ssh:     ip netns exec {topo.switch_ns} ssh -i {access.client_key} "
                 f"-o UserKnownHostsFile={access.known_hosts} root@{dev.address}\n"
                 f"  remote:  testbed remote facts all -i {access.inventory}   (dials from {topo.switch_ns} itself)\n"
                 f"  ansible: ip netns exec {topo.switch_ns} ansible-playbook -i {access.inventory} ansible/agent.yml "
                 f"-e testbed_wheelhouse=DIR")
    typer.echo(help_text, err=to_stderr)
    return {"client_key": str(access.client_key), "known_hosts": str(access.known_hosts),
            "inventory": str(access.inventory), "dial_from_netns": topo.switch_ns}


@app.command()
@friendly_errors
def down(as_json: JsonOpt = False, prefix: PrefixOpt = DEFAULT_PREFIX,
         state_dir: StateOpt = DEFAULT_STATE_DIR) -> None:
    """Remove everything the lab created (idempotent; also after a crash)."""
    removed = lab_for(prefix, state_dir).down()
    if as_json:
        typer.echo(json.dumps({"prefix": prefix, "removed": removed}, indent=2))
        return
    typer.echo(f"removed: {', '.join(removed)}" if removed else "nothing to remove")


@app.command()
@friendly_errors
def status(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    prefix: PrefixOpt = DEFAULT_PREFIX,
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Hosts, addresses, qdiscs read back from the kernel, and the processes in each host."""
    info = lab_for(prefix, state_dir).status()
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"lab {info['prefix']} ({info['subnet']}, backend {info['backend']}, "
                        f"link {info['link_profile']})")
    for col in ("host", "netns", "address", "class", "qdiscs (up / down)", "processes"):
        table.add_column(col)
    for h in info["hosts"]:
        qd = h.get("qdiscs", {})
        kinds = " / ".join(",".join(q.get("kind", "?") for q in qd.get(d, [])) or "-" for d in ("uplink", "downlink"))
        procs = "\n".join(f"{p['pid']} {p['command'][:60]}" for p in h.get("processes", [])) or "-"
        table.add_row(h["name"], h["netns"] + ("" if h["present"] else " (missing)"), h["address"],
                      h.get("device_class") or "-", kinds if h["role"] == "device" else "-", procs)
    Console().print(table)


@app.command()
@friendly_errors
def calibrate(
    device_class: Annotated[str, typer.Option(help="device class to check")] = "raspberry-pi-4",
    seconds: Annotated[float, typer.Option(min=0.2, help="work per measurement")] = 2.0,
    rounds: Annotated[int, typer.Option(min=1, max=5, help="measure, correct the quota, measure again ...")] = 2,
    save: Annotated[bool, typer.Option(help="use the final correction for every later `lab up`")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    state_dir: StateOpt = DEFAULT_STATE_DIR,
) -> None:
    """Measure the slowdown a device class's CPU quota gives the CNN head on this machine, against its target."""
    from testbed.lab.calibrate import calibrate as run_calibration
    from testbed.lab.calibrate import correction_path
    from testbed.lab.hosts import require_root

    require_root()
    result = run_calibration(device_class, seconds=seconds, rounds=rounds)
    if save:
        state_dir.mkdir(parents=True, exist_ok=True)
        correction_path(state_dir).write_text(json.dumps({"correction": result["correction"], "calibration": result}))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for i, step in enumerate(result["steps"], 1):
        Console().print(f"round {i}: quota {step['quota']}, head {step['head_ms_unthrottled']} ms -> "
                        f"{step['head_ms_throttled']} ms: slowdown {step['measured_slowdown']} "
                        f"(target {result['target_slowdown']}, error {100 * step['relative_error']:+.1f}%)")
