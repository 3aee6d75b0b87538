"""``gpubroker``: one command line for the broker, its agents, its users and its operator.

``gpubroker serve`` runs the broker, ``gpubroker agent`` an agent; ``status``, ``tasks``,
``models`` and ``run`` call a broker as a client; ``billing``, ``admin``, ``migrate`` and
``certs`` work on its database and files. ``python -m gpubroker.broker`` (and the other
``python -m`` spellings) stay as aliases of the process commands.
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:
    """The ``gpubroker`` console script."""
    try:
        from gpubroker.cli.app import gpubroker
    except ImportError as exc:  # click or rich missing: a plain install, without the extra
        raise SystemExit(
            f"gpubroker's command line needs {exc.name}: pip install 'gpubroker[cli]'"
        ) from None
    gpubroker(prog_name="gpubroker")
