"""Which backend serves which feature (pure), and the real probe on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from pyroute2 import netns

from testbed.net.capabilities import (
    FEATURES,
    Capability,
    backend_for,
    format_capabilities,
    highest_rate_verified,
    probe,
)
from testbed.net.link import LinkError


def caps(**available: bool) -> list[Capability]:
    return [Capability(name, ok, name, "test") for name, ok in available.items()]


def test_netem_is_the_primary_path_where_present() -> None:
    assert backend_for(caps(htb=True, netem=True, tun=True)) == {
        "rate": "htb", "delay": "netem", "jitter": "netem", "loss": "netem",
    }


def test_delay_line_where_netem_is_missing() -> None:
    assert backend_for(caps(htb=True, netem=False, tun=True)) == {
        "rate": "htb", "delay": "delay-line", "jitter": "delay-line", "loss": "delay-line",
    }


def test_nothing_where_nothing_works() -> None:
    assert backend_for(caps(htb=False, netem=False, tun=False)) == dict.fromkeys(FEATURES, "none")
    assert backend_for([]) == dict.fromkeys(FEATURES, "none")


def test_feature_entries_do_not_confuse_backend_for() -> None:
    mixed = [*caps(htb=True, netem=False, tun=True), Capability("delay", True, "netem", "stale")]
    assert backend_for(mixed)["delay"] == "delay-line"


def test_highest_rate_and_formatting() -> None:
    found = [Capability("htb-rate64", True, "htb", "ok", value=10**12), Capability("tun", False, "delay-line", "no")]
    assert highest_rate_verified(found) == 10**12
    assert highest_rate_verified([]) is None
    lines = format_capabilities(found)
    assert lines[0].split()[:3] == ["htb-rate64", "yes", "htb"] and lines[1].split()[:2] == ["tun", "no"]


def test_probe_refuses_foreign_prefixes() -> None:
    with pytest.raises(LinkError, match="must start with 'tb-'"):
        probe("lab")


def _netns_usable() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.mark.netns
@pytest.mark.skipif(not _netns_usable(), reason="needs root and `ip netns`")
def test_probe_on_this_machine() -> None:
    prefix = f"tb-t-probe-{os.getpid()}"
    found = {c.name: c for c in probe(prefix)}
    assert not [n for n in netns.listnetns() if n.startswith(prefix)], "the scratch namespace must be gone"
    assert found["netns"].available
    assert found["htb"].available and found["tbf"].available
    assert found["ingress"].available
    # 40 Gbit/s needs TCA_HTB_RATE64; it must be set and read back exactly
    assert found["htb-rate64"].available and (found["htb-rate64"].value or 0) >= 40_000_000_000
    assert found["rate"].backend == "htb"
    if found["netem"].available:
        assert {found[f].backend for f in ("delay", "jitter", "loss")} == {"netem"}
    else:
        assert "ENOENT" in found["netem"].reason
        expected = "delay-line" if found["tun"].available else "none"
        assert {found[f].backend for f in ("delay", "jitter", "loss")} == {expected}
    if not found["fq"].available:
        assert "ENOENT" in found["fq"].reason


@pytest.mark.netns
@pytest.mark.skipif(not _netns_usable(), reason="needs root and `ip netns`")
def test_this_ci_kernel_has_no_netem() -> None:
    """The CI machine's kernel (see ARCHITECTURE.md) lacks sch_netem and sch_fq; a real Pi has netem."""
    found = {c.name: c for c in probe(f"tb-t-probe-{os.getpid()}")}
    if found["netem"].available:
        pytest.skip("this kernel has netem: not the CI machine")
    assert "ENOENT" in found["netem"].reason and found["delay"].backend == "delay-line"


def test_probe_without_a_namespace_reports_every_kernel_feature_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("testbed.net.capabilities.netns.create", refuse)
    found = {c.name: c for c in probe("tb-t-noperm")}
    assert not found["netns"].available and "EPERM" in found["netns"].reason
    assert not any(found[k].available for k in ("htb", "htb-rate64", "tbf", "netem", "fq", "ingress", "ifb"))
    assert found["rate"].backend == "none"
    assert found["delay"].backend == ("delay-line" if found["tun"].available else "none")
