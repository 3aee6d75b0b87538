"""Failpoints: named places where a test can make the broker die on the spot, like a power cut
(``Settings.failpoint``, ``GPUBROKER_FAILPOINT``)."""

from __future__ import annotations

import logging
import os

__all__ = ["FAILPOINT_EXIT_CODE", "crash_if_armed"]

logger = logging.getLogger(__name__)

FAILPOINT_EXIT_CODE = 86
"""Exit code of a process killed by an armed failpoint."""


def crash_if_armed(armed: str | None, point: str) -> None:
    """Exits at once, without cleanup, when ``point`` is the ``armed`` failpoint."""
    if armed == point:
        logger.critical("failpoint %s: exiting without cleanup", point)
        os._exit(FAILPOINT_EXIT_CODE)
