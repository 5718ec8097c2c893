"""Measure blocks and links; keep the measurements as profiles (profiles/measured/); feed them to the planner.

* :mod:`~testbed.profiling.blocks` — per-block forward/backward times of a zoo model on onnxruntime or torch
  (imports torch; loaded on first use of :func:`profile_blocks`);
* :mod:`~testbed.profiling.links` — round trip and throughput to a running edge server over ZeroMQ;
* :mod:`~testbed.profiling.hostfacts` — what machine measured it;
* :mod:`~testbed.profiling.store` — the YAML format, validation, conversion to the planner's ModelProfile;
* :mod:`~testbed.profiling.problem` — profiles + device classes + links → PlanningProblem.

See docs/profiling.md.
"""

from __future__ import annotations

from typing import Any

from testbed.profiling.hostfacts import host_facts
from testbed.profiling.links import EchoTarget, empty_body_echo, measure_link
from testbed.profiling.problem import build_problem
from testbed.profiling.records import BatchTimings, BlockProfile, LinkMeasurement, ProfileError, Stat, to_model_profile
from testbed.profiling.store import (
    default_link_path,
    default_profile_path,
    load_block_profile,
    load_link_measurement,
    load_profile,
    save_profile,
)

__all__ = [
    "BatchTimings",
    "BlockProfile",
    "EchoTarget",
    "LinkMeasurement",
    "ProfileError",
    "Stat",
    "build_problem",
    "default_link_path",
    "default_profile_path",
    "empty_body_echo",
    "host_facts",
    "load_block_profile",
    "load_link_measurement",
    "load_profile",
    "measure_link",
    "profile_blocks",
    "save_profile",
    "to_model_profile",
]


def __getattr__(name: str) -> Any:
    # profile_blocks needs torch: import it only when asked for, so loading profiles and planning stay light.
    if name == "profile_blocks":
        from testbed.profiling.blocks import profile_blocks

        return profile_blocks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
