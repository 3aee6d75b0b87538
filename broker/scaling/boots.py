"""A machine's boot in phases: where the time from "create it" to "its agent is here" goes.

Four moments are recorded per machine (``billing.vms``, and the ``/metrics`` histogram
``gpubroker_boot_phase_seconds``):

* created: the provider accepted the insert (GCE's ``creationTimestamp``);
* running: the provider first listed it ``RUNNING`` (GCE starts charging here);
* agent started: the agent's process started (its hello's uptime, taken from its arrival);
* connected: the agent's hello was accepted.

The phases between them are ``provision`` (created to running: the cloud finds a host and
attaches the GPU), ``install`` (running to agent started: the guest boots and the startup
script installs the agent, unless the image has it), ``connect`` (agent started to connected:
imports, device start-up, dialling the broker) and ``total`` (created to connected).

RUNNING is seen on the autoscaler's tick, so it can be seen after the agent already started;
a machine whose agent runs was running, so the running moment is taken as the earliest of the
three. Each phase is clamped to be non-negative.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

__all__ = ["BootPhase", "BootTimeline"]


class BootPhase(enum.StrEnum):
    """One span of a boot (see the module docstring)."""

    PROVISION = "provision"
    INSTALL = "install"
    CONNECT = "connect"
    TOTAL = "total"


@dataclass(frozen=True, slots=True)
class BootTimeline:
    """The recorded moments of one machine's boot (UTC); None where not (yet) known."""

    created: datetime
    running: datetime | None = None
    agent_started: datetime | None = None
    connected: datetime | None = None

    def phases(self) -> dict[BootPhase, float]:
        """Seconds per phase, for the phases whose ends are both known."""
        ends = [t for t in (self.running, self.agent_started, self.connected) if t is not None]
        running = min(ends) if self.running is not None else None
        started = self.agent_started
        if started is not None:
            started = max(started, self.created)
            if self.connected is not None:
                started = min(started, self.connected)
        spans = {
            BootPhase.PROVISION: (self.created, running),
            BootPhase.INSTALL: (running, started),
            BootPhase.CONNECT: (started, self.connected),
            BootPhase.TOTAL: (self.created, self.connected),
        }
        return {
            phase: max((end - begin).total_seconds(), 0.0)
            for phase, (begin, end) in spans.items()
            if begin is not None and end is not None
        }
