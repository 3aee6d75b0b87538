"""How long this agent's process has run, for its hello (the broker learns its boot phases).

On Linux the kernel knows when the process started (``/proc/self/stat``, in clock ticks since
the machine booted; ``/proc/uptime`` gives the machine's age), so the interpreter's own start-up
and the imports before this module count. Elsewhere it is the time since this module was
imported, which the agent's package does first thing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["process_uptime_s"]

_IMPORTED_S = time.monotonic()
# Field 22 of /proc/PID/stat; the fields after the parenthesised command name start at field 3.
_STARTTIME_AFTER_COMM = 22 - 3


def process_uptime_s(proc: Path = Path("/proc")) -> float:
    """Seconds since this process started (never negative)."""
    try:
        stat = (proc / "self" / "stat").read_text()
        machine_s = float((proc / "uptime").read_text().split()[0])
        ticks = int(stat.rsplit(")", 1)[1].split()[_STARTTIME_AFTER_COMM])
        return max(machine_s - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return max(time.monotonic() - _IMPORTED_S, 0.0)
