"""``python -m gpubroker.cli``: the ``gpubroker`` command."""

from __future__ import annotations

from gpubroker.cli import main

if __name__ == "__main__":
    main()
