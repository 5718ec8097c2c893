"""`testbed remote facts|trust|deploy|start|stop|logs|shape`: real devices of an inventory, over SSH."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from testbed.cli.errors import friendly_errors
from testbed.remote import agents as remote_agents
from testbed.remote import deploy as remote_deploy
from testbed.remote import facts as remote_facts
from testbed.remote import shaping
from testbed.remote.errors import RemoteError
from testbed.remote.inventory import Inventory, RemoteHost, load_inventory
from testbed.remote.ssh import Connection, connect, fingerprint, host_key, trust

app = typer.Typer(help="Real devices over SSH: facts, host keys, partitions, agents, logs, link shaping.",
                  no_args_is_help=True)

InventoryOpt = Annotated[Path, typer.Option("--inventory", "-i", envvar="TESTBED_INVENTORY",
                                            help="Ansible YAML inventory (the one ansible-playbook uses)")]
KnownHostsOpt = Annotated[Path | None, typer.Option(help="known_hosts file (default: the inventory's "
                                                         "testbed_known_hosts, else ~/.config/testbed/known_hosts)")]
TimeoutOpt = Annotated[float, typer.Option(min=0.5, max=300, help="connect/authentication timeout, seconds")]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
NameOpt = Annotated[str, typer.Option(help="process name (pid file and log are named after it)")]


def _inventory(path: Path, known_hosts: Path | None) -> tuple[Inventory, Path]:
    inv = load_inventory(path)
    return inv, known_hosts or inv.known_hosts


@contextmanager
def _session(inventory: Path, host: str, known_hosts: Path | None, timeout: float) -> Iterator[Connection]:
    inv, known = _inventory(inventory, known_hosts)
    with connect(inv.host(host), known, timeout_s=timeout) as conn:
        yield conn


def _emit(data: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(data, indent=2) if as_json else text)


@app.command()
@friendly_errors
def facts(
    hosts: Annotated[str, typer.Argument(help="host name, devices, edge, monitoring or all")] = "all",
    inventory: InventoryOpt = Path("inventory.yml"),
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """CPU, cores, memory, OS, kernel, netem and accelerator of each host; an unreachable host is reported, not
    fatal (exit 2 if any failed)."""
    inv, known = _inventory(inventory, known_hosts)
    results: dict[str, Any] = {}
    for host in inv.select(hosts):
        try:
            with connect(host, known, timeout_s=timeout) as conn:
                results[host.name] = remote_facts.gather(conn).as_dict()
        except RemoteError as exc:
            results[host.name] = {"error": str(exc)}
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        table = Table(title=f"hosts of {inventory}")
        for col in ("host", "cpu", "cores", "memory", "os / kernel", "netem", "accelerator"):
            table.add_column(col)
        for name, f in results.items():
            if "error" in f:
                table.add_row(name, f"[red]{f['error']}[/red]", "", "", "", "", "")
                continue
            table.add_row(name, f["cpu_model"], str(f["cores"]), f"{f['memory_bytes'] / 2**30:.1f} GiB",
                          f"{f['os']} / {f['kernel']}", "yes" if f["netem"] else "no", f["accelerator"] or "-")
        Console().print(table)
    if any("error" in f for f in results.values()):
        raise typer.Exit(2)


@app.command("trust")
@friendly_errors
def trust_host(
    host: Annotated[str, typer.Argument(help="host name in the inventory")],
    inventory: InventoryOpt = Path("inventory.yml"),
    known_hosts: KnownHostsOpt = None,
    replace: Annotated[bool, typer.Option(help="replace a different recorded key (the host was reinstalled)")] = False,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Record the host key the host shows now in known_hosts (check the printed fingerprint on the host)."""
    inv, known = _inventory(inventory, known_hosts)
    target: RemoteHost = inv.host(host)
    key = host_key(target, timeout_s=timeout)
    added = trust(target, key, known, replace=replace)
    info = {"host": target.name, "address": target.known_hosts_name, "type": key.get_name(),
            "fingerprint": fingerprint(key), "known_hosts": str(known), "added": added}
    _emit(info, as_json, f"{'recorded' if added else 'already trusted'}: {target.name} ({target.known_hosts_name}) "
                         f"{key.get_name()} {fingerprint(key)} in {known}")


@app.command("deploy")
@friendly_errors
def deploy_cmd(
    host: Annotated[str, typer.Argument(help="host name in the inventory")],
    files: Annotated[list[Path], typer.Argument(help="files to upload (ONNX partitions ...)")],
    dest: Annotated[str | None, typer.Option(help="remote directory (default: <testbed_root>/partitions)")] = None,
    manifest: Annotated[Path | None, typer.Option(help="JSON {file name: sha256} the uploads must match")] = None,
    inventory: InventoryOpt = Path("inventory.yml"),
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Upload by SFTP; each file is hashed on the host and renamed into place only if its sha256 matches."""
    expected = None
    if manifest is not None:
        try:
            expected = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise RemoteError(f"manifest {manifest} is unreadable: {exc}") from exc
    with _session(inventory, host, known_hosts, timeout) as conn:
        done = remote_deploy.deploy_files(conn, files, dest or f"{conn.host.root}/partitions", expected)
    _emit([d.__dict__ for d in done], as_json,
          "\n".join(f"{d.remote_path}  sha256 {d.sha256}  ({d.bytes} bytes) verified" for d in done))


@app.command()
@friendly_errors
def start(
    host: Annotated[str, typer.Argument(help="host name in the inventory")],
    command: Annotated[list[str] | None, typer.Argument(help="the command, after --")] = None,
    name: NameOpt = "agent",
    agent: Annotated[bool, typer.Option(help="start `testbed-agent serve` from the host's venv")] = False,
    controller: Annotated[str | None, typer.Option(help="with --agent: tcp://HOST:PORT")] = None,
    heartbeat_s: Annotated[float | None, typer.Option(help="with --agent")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="with --agent")] = None,
    inventory: InventoryOpt = Path("inventory.yml"),
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Start a process detached (nohup, pid file, log under <testbed_root>); refuses a second of the same name."""
    inv, known = _inventory(inventory, known_hosts)
    target = inv.host(host)
    if agent:
        if not controller:
            raise RemoteError("--agent needs --controller tcp://HOST:PORT")
        argv = remote_agents.agent_argv(target.root, controller, target.name, target.device_class,
                                        metrics_port=metrics_port, heartbeat_s=heartbeat_s)
    elif command:
        argv = command
    else:
        raise RemoteError("give --agent --controller tcp://HOST:PORT, or a command after --")
    with connect(target, known, timeout_s=timeout) as conn:
        pid = remote_agents.start(conn, target.root, name, argv)
    _emit({"host": target.name, "name": name, "pid": pid, "argv": argv}, as_json,
          f"{target.name}: {name} started, pid {pid}")


@app.command()
@friendly_errors
def stop(
    host: Annotated[str, typer.Argument(help="host name in the inventory")],
    name: NameOpt = "agent",
    grace: Annotated[float, typer.Option(min=0.1, max=60, help="seconds between SIGTERM and SIGKILL")] = 10.0,
    inventory: InventoryOpt = Path("inventory.yml"),
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Stop a process started by `remote start`, by the pid (and start time) in its pid file."""
    with _session(inventory, host, known_hosts, timeout) as conn:
        outcome = remote_agents.stop(conn, conn.host.root, name, grace)
    _emit({"host": host, "name": name, "result": outcome}, as_json, f"{host}: {name}: {outcome}")


@app.command()
@friendly_errors
def logs(
    host: Annotated[str, typer.Argument(help="host name in the inventory")],
    name: NameOpt = "agent",
    lines: Annotated[int, typer.Option(min=1, max=100_000)] = 50,
    inventory: InventoryOpt = Path("inventory.yml"),
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """The last lines of a process's log."""
    with _session(inventory, host, known_hosts, timeout) as conn:
        text = remote_agents.logs(conn, conn.host.root, name, lines)
        running = remote_agents.status(conn, conn.host.root, name)
    if as_json:
        typer.echo(json.dumps({"host": host, "name": name, "pid": running, "log": text}, indent=2))
    else:
        typer.echo(text, nl=False)


@app.command()
@friendly_errors
def shape(
    host: Annotated[str, typer.Argument(help="host name in the inventory")],
    link: Annotated[str, typer.Option(help="link profile (profiles/links/NAME.yaml) or a YAML path")] = "5g-sub6",
    direction: Annotated[str, typer.Option(help="which direction of the profile to apply to the host's egress "
                                                "(uplink on a device)")] = "uplink",
    interface: Annotated[str | None, typer.Option(help="default: the inventory's testbed_interface")] = None,
    netem: Annotated[str, typer.Option(help="auto (ask the host), yes or no")] = "auto",
    dry_run: Annotated[bool, typer.Option(help="print the tc commands only")] = False,
    inventory: InventoryOpt = Path("inventory.yml"),
    known_hosts: KnownHostsOpt = None,
    timeout: TimeoutOpt = 10.0,
    as_json: JsonOpt = False,
) -> None:
    """Shape the host's interface with a link profile's direction (tc over SSH, with sudo)."""
    from testbed.net.link import load_link_profile

    if direction not in ("uplink", "downlink"):
        raise RemoteError(f"--direction must be uplink or downlink, not {direction!r}")
    if netem not in ("auto", "yes", "no"):
        raise RemoteError(f"--netem must be auto, yes or no, not {netem!r}")
    profile = load_link_profile(link)
    spec = profile.spec.uplink if direction == "uplink" else profile.spec.downlink
    with _session(inventory, host, known_hosts, timeout) as conn:
        ifname = interface or conn.host.interface
        if not ifname:
            raise RemoteError(f"{host}: no --interface and no testbed_interface in the inventory")
        has_netem = remote_facts.gather(conn).netem if netem == "auto" else netem == "yes"
        plan = shaping.plan_commands(ifname, spec, netem=has_netem)
        if not dry_run:
            shaping.apply(conn, plan)
        shown = "" if dry_run else shaping.show(conn, ifname)
    info = {"host": host, "interface": ifname, "profile": profile.name, "direction": direction,
            "commands": [list(c) for c in plan.commands], "not_applied": plan.dropped, "qdiscs": shown,
            "dry_run": dry_run}
    text = "\n".join(" ".join(c) for c in plan.commands)
    if plan.dropped:
        text += f"\nnot applied: {plan.dropped}"
    _emit(info, as_json, text + ("" if dry_run else f"\n{shown.rstrip()}"))


@app.command()
@friendly_errors
def wheelhouse(
    out: Annotated[Path, typer.Option(help="directory for the wheels (the roles' testbed_wheelhouse)")],
    extra: Annotated[str, typer.Option(help="agent (devices) or edge")] = "agent",
    platform: Annotated[str | None, typer.Option(help="target platform tag, e.g. manylinux_2_28_aarch64 for a "
                                                      "Pi from an x86 controller (default: this machine)")] = None,
    python_version: Annotated[str | None, typer.Option(help="target Python, e.g. 3.11 (default: this one)")] = None,
    repo: Annotated[Path, typer.Option(help="the project's source tree")] = Path("."),
    as_json: JsonOpt = False,
) -> None:
    """Build the wheelhouse the Ansible agent/edge roles install from (hosts need no internet)."""
    from testbed.remote.wheelhouse import build_wheelhouse

    wheels = build_wheelhouse(repo.resolve(), out, extra, platform, python_version)
    _emit({"directory": str(out.resolve()), "extra": extra, "platform": platform, "python_version": python_version,
           "wheels": [w.name for w in wheels]}, as_json, f"{len(wheels)} wheels in {out}")
