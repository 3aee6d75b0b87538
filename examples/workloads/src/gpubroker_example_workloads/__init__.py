"""Example operator workloads for gpubroker agents, installed as ``gpubroker.workloads`` entry
points (see ``pyproject.toml``): ``example.softmax``, ``example.sobel`` and ``example.topk``.

Each workload is an object with the agent's ``Workload`` call signature and an ``example()``
method the agent calls once per slot to warm the workload up before taking work.
"""

from __future__ import annotations

from collections.abc import Mapping

from gpubroker.gpu_agent.workloads import Workload
from gpubroker_example_workloads import sobel, softmax, topk

__all__ = ["WORKLOADS"]

WORKLOADS: Mapping[str, Workload] = {
    softmax.NAME: softmax.softmax,
    sobel.NAME: sobel.sobel,
    topk.NAME: topk.topk,
}
"""Every workload by name, as the entry points install them (e.g. for ``Runner(workloads=...)``)."""
