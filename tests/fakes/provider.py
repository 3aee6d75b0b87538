"""An in-memory ``Provider`` for tests of the autoscaling loop: machines are records, and the
test moves them through their lives (RUNNING, gone) or makes launches fail."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

from gpubroker.broker.scaling.providers.base import (
    Instance,
    InstanceStatus,
    LaunchRequest,
    ProviderError,
)


class FakeProvider:
    """Starts nothing: each launch adds a PROVISIONING instance, or raises ``refusal``."""

    name = "fake"

    def __init__(self, zone: str = "zone-a") -> None:
        self._zone = zone
        self._lock = threading.Lock()
        self._instances: dict[str, Instance] = {}
        self.requests: list[LaunchRequest] = []
        """Every launch asked for, refused ones included, in order."""
        self.refusal: ProviderError | None = None
        """Raised by every launch while set."""

    def launch(self, request: LaunchRequest) -> Instance:
        """Records the request; creates ``fake-<n>`` of its first GPU type, or refuses."""
        with self._lock:
            self.requests.append(request)
            if self.refusal is not None:
                raise self.refusal
            instance = Instance(
                name=f"fake-{len(self.requests)}",
                zone=self._zone,
                gpu_type=request.gpu_types[0],
                machine_type="fake-machine",
                spot=request.spot,
                status=InstanceStatus.PROVISIONING,
                created_at=datetime.now(UTC),
            )
            self._instances[instance.name] = instance
            return instance

    def list(self) -> list[Instance]:
        """Every live instance."""
        with self._lock:
            return list(self._instances.values())

    def terminate(self, name: str) -> None:
        """Forgets the instance."""
        with self._lock:
            self._instances.pop(name, None)

    def run(self, name: str) -> None:
        """Moves an instance to RUNNING."""
        with self._lock:
            instance = self._instances[name]
            self._instances[name] = Instance(
                instance.name, instance.zone, instance.gpu_type, instance.machine_type,
                instance.spot, InstanceStatus.RUNNING, instance.created_at,
            )  # fmt: skip
