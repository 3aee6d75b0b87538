"""A fake Compute Engine REST API (v1) on loopback, for testing the real ``compute_v1`` client.

``FakeCompute`` serves the handful of calls the ``gce`` provider makes, with the URLs and JSON of
the real API (``/compute/v1/projects/{project}/zones/{zone}/instances[/{name}]``,
``/aggregated/instances``, ``/zones/{zone}/operations/{op}[/wait]``), and records every request.
Tests script what Google would do: stockouts and quota errors per zone, GPU type and pricing,
slow operations and boots, preemptions and outright rejections::

    with FakeCompute() as fake:
        fake.stockout("us-central1-a", gpu_type="nvidia-l4", spot=True)
        client = compute_v1.InstancesClient(
            credentials=AnonymousCredentials(),
            transport="rest",
            client_options={"api_endpoint": fake.endpoint},
        )
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakes.compute.model import (
    PACIFIC,
    PREFIX,
    ZONE,
    HttpError,
    Json,
    Operation,
    RecordedRequest,
    Rule,
    Vm,
    holds,
    is_insert,
    is_spot,
    not_found,
    parse_filter,
    requested_gpu,
)

__all__ = ["FakeCompute"]


@dataclass
class FakeCompute:
    """The Compute Engine REST API for one project, served on ``127.0.0.1`` (a free port).

    Attributes set before a call shape what it gets: ``operation_polls`` (operations stay RUNNING
    for that many ``get``/``wait`` calls), ``operation_seconds`` (and for that long),
    ``boot_seconds`` (new VMs are PROVISIONING for the first half, then STAGING, then
    RUNNING), ``wait_cap_s`` (the longest one ``wait`` call blocks, like the real API's
    two-minute cap).
    """

    project: str = "test-project"
    operation_polls: int = 0
    operation_seconds: float = 0.0
    boot_seconds: float = 0.0
    wait_cap_s: float = 0.5
    requests: list[RecordedRequest] = field(default_factory=list)
    """Every request received, in order."""
    _vms: dict[str, Vm] = field(default_factory=dict)
    _operations: dict[str, Operation] = field(default_factory=dict)
    _rules: list[Rule] = field(default_factory=list)
    _zones_seen: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1000))
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, for ``client_options={"api_endpoint": ...}``."""
        if self._server is None:
            raise RuntimeError("FakeCompute is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeCompute:
        """Starts serving in a background thread."""
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(0.01,), name="fake-compute"
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes the socket."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FakeCompute:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- scripting -------------------------------------------------------------------------

    def stockout(
        self,
        zone: str | None = None,
        *,
        gpu_type: str | None = None,
        spot: bool | None = None,
        code: str = "ZONE_RESOURCE_POOL_EXHAUSTED",
    ) -> None:
        """Inserts matching these (None: any) end in a DONE operation carrying ``code``."""
        message = (
            f"The zone 'projects/{self.project}/zones/{zone}' does not have enough resources "
            "available to fulfill the request.  Try a different zone, or try again later."
        )
        error = {"errors": [{"code": code, "message": message}]}
        self._rules.append(Rule(zone, gpu_type, spot, operation_error=error))

    def quota(
        self,
        zone: str | None = None,
        *,
        gpu_type: str | None = None,
        spot: bool | None = None,
        on_insert: bool = True,
    ) -> None:
        """Matching inserts fail for quota: HTTP 403 quotaExceeded, or an operation error."""
        message = "Quota 'GPUS_ALL_REGIONS' exceeded.  Limit: 0.0 globally."
        if on_insert:
            http = HttpError(403, "quotaExceeded", message, domain="usageLimits")
            self._rules.append(Rule(zone, gpu_type, spot, http=http))
        else:
            error = {"errors": [{"code": "QUOTA_EXCEEDED", "message": message}]}
            self._rules.append(Rule(zone, gpu_type, spot, operation_error=error))

    def reject(
        self,
        zone: str | None = None,
        *,
        status: int = 400,
        reason: str = "invalid",
        message: str = "Invalid value for field 'resource.machineType'.",
        operation_code: str | None = None,
    ) -> None:
        """Inserts in ``zone`` fail: HTTP ``status``, or an operation error ``operation_code``."""
        if operation_code is None:
            self._rules.append(Rule(zone, None, None, http=HttpError(status, reason, message)))
        else:
            error = {"errors": [{"code": operation_code, "message": message}]}
            self._rules.append(Rule(zone, None, None, operation_error=error))

    def seed(
        self,
        zone: str,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        status: str = "RUNNING",
        machine_type: str = "g2-standard-4",
        spot: bool = False,
        created: datetime | None = None,
    ) -> None:
        """Adds an existing VM, e.g. one another broker or a person made."""
        body: Json = {
            "name": name,
            "machineType": f"zones/{zone}/machineTypes/{machine_type}",
            "labels": labels or {},
            "scheduling": {"provisioningModel": "SPOT" if spot else "STANDARD"},
        }
        with self._lock:
            vm = self._new_vm(zone, body, created or datetime.now(PACIFIC))
            vm.forced_status = status

    def preempt(self, name: str) -> None:
        """Preempts a VM: deleted when its termination action is DELETE, else TERMINATED."""
        with self._lock:
            vm = self._vms[name]
            if vm.resource.get("scheduling", {}).get("instanceTerminationAction") == "DELETE":
                del self._vms[name]
            else:
                vm.forced_status = "TERMINATED"

    def status_of(self, name: str) -> str | None:
        """The VM's status now, or None when there is no such VM."""
        with self._lock:
            self._tick()
            vm = self._vms.get(name)
            return None if vm is None else vm.status()

    def inserted(self) -> list[Json]:
        """The instance bodies of every insert request, in order."""
        return [r.body or {} for r in self.requests if r.method == "POST" and is_insert(r.path)]

    def calls(self, method: str, suffix: str) -> list[RecordedRequest]:
        """Requests with this method whose path ends with ``suffix``."""
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    # -- HTTP ------------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, str], body: Json | None
    ) -> tuple[int, Json]:
        """Serves one request: (HTTP status, JSON payload)."""
        with self._lock:
            self.requests.append(RecordedRequest(method, path, query, body))
        for route_method, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, path)
            if route_method == method and match is not None:
                params = match.groupdict()
                try:
                    if params.pop("project") != self.project:
                        raise HttpError(
                            404, "notFound", f"The resource 'projects/{self.project}' was not found"
                        )
                    return 200, handler(self, params, query, body)
                except HttpError as exc:
                    return exc.status, exc.payload()
        return 404, HttpError(404, "notFound", f"no route for {method} {path}").payload()

    def _insert(self, params: dict[str, str], query: dict[str, str], body: Json | None) -> Json:
        zone, resource = params["zone"], body or {}
        name = str(resource.get("name", ""))
        gpu_type, spot = requested_gpu(resource), is_spot(resource)
        with self._lock:
            self._tick()
            self._zones_seen.add(zone)
            if name in self._vms:
                raise HttpError(409, "alreadyExists", f"The resource '{name}' already exists")
            rule = next((r for r in self._rules if r.matches(zone, gpu_type, spot)), None)
            if rule is not None and rule.http is not None:
                raise rule.http
            if rule is not None and rule.operation_error is not None:
                op = self._new_operation(zone, "insert", name, error=rule.operation_error)
            else:
                created = datetime.now(PACIFIC)
                op = self._new_operation(
                    zone, "insert", name, on_done=lambda: self._new_vm(zone, resource, created)
                )
            return dict(op.resource)

    def _get(self, params: dict[str, str], query: dict[str, str], body: Json | None) -> Json:
        with self._lock:
            self._tick()
            return self._vm(params["zone"], params["name"]).view()

    def _list(self, params: dict[str, str], query: dict[str, str], body: Json | None) -> Json:
        zone = params["zone"]
        with self._lock:
            self._tick()
            items = [v.view() for v in self._matching(query.get("filter", "")) if v.zone == zone]
        return {
            "kind": "compute#instanceList",
            "id": f"projects/{self.project}/zones/{zone}/instances",
            "items": items,
            "selfLink": self._url(f"zones/{zone}/instances"),
        }

    def _aggregated_list(
        self, params: dict[str, str], query: dict[str, str], body: Json | None
    ) -> Json:
        with self._lock:
            self._tick()
            vms = self._matching(query.get("filter", ""))
            scopes: dict[str, Json] = {}
            for vm in vms:
                scopes.setdefault(f"zones/{vm.zone}", {"instances": []})["instances"].append(
                    vm.view()
                )
            for zone in sorted(self._zones_seen - {vm.zone for vm in vms}):
                warning = {
                    "code": "NO_RESULTS_ON_PAGE",
                    "message": "There are no results for scope",
                }
                scopes[f"zones/{zone}"] = {"warning": warning}
        return {
            "kind": "compute#instanceAggregatedList",
            "id": f"projects/{self.project}/aggregated/instances",
            "items": scopes,
            "selfLink": self._url("aggregated/instances"),
        }

    def _delete(self, params: dict[str, str], query: dict[str, str], body: Json | None) -> Json:
        zone, name = params["zone"], params["name"]
        with self._lock:
            self._tick()
            vm = self._vm(zone, name)
            vm.forced_status = "STOPPING"
            op = self._new_operation(
                zone, "delete", name, on_done=lambda: self._vms.pop(name, None)
            )
            return dict(op.resource)

    def _operation_get(
        self, params: dict[str, str], query: dict[str, str], body: Json | None
    ) -> Json:
        with self._lock:
            self._tick()
            op = self._operation(params["zone"], params["operation"])
            self._advance(op, poll=True)
            return dict(op.resource)

    def _operation_wait(
        self, params: dict[str, str], query: dict[str, str], body: Json | None
    ) -> Json:
        deadline = time.monotonic() + self.wait_cap_s
        with self._lock:
            self._tick()
            op = self._operation(params["zone"], params["operation"])
            if self._advance(op, poll=True) or op.done:
                return dict(op.resource)
        # Like the real wait: block until DONE, or give up early and return it still RUNNING.
        while time.monotonic() < min(deadline, op.done_at):
            time.sleep(0.005)
        with self._lock:
            self._advance(op, poll=False)
            return dict(op.resource)

    # -- state (callers hold the lock) ------------------------------------------------------

    def _new_vm(self, zone: str, body: Json, created: datetime) -> Vm:
        resource: Json = {
            **body,
            "kind": "compute#instance",
            "id": str(next(self._ids)),
            "creationTimestamp": created.isoformat(timespec="milliseconds"),
            "zone": self._url(f"zones/{zone}"),
            "machineType": self._url(str(body.get("machineType", ""))),
            "selfLink": self._url(f"zones/{zone}/instances/{body['name']}"),
        }
        vm = Vm(zone, resource, time.monotonic(), self.boot_seconds)
        self._vms[str(body["name"])] = vm
        self._zones_seen.add(zone)
        return vm

    def _new_operation(
        self,
        zone: str,
        kind: str,
        target: str,
        *,
        error: Json | None = None,
        on_done: Callable[[], object] | None = None,
    ) -> Operation:
        number = next(self._ids)
        name = f"operation-{number}-fake"
        resource: Json = {
            "kind": "compute#operation",
            "id": str(number),
            "name": name,
            "zone": self._url(f"zones/{zone}"),
            "operationType": kind,
            "targetLink": self._url(f"zones/{zone}/instances/{target}"),
            "status": "PENDING",
            "progress": 0,
            "insertTime": datetime.now(PACIFIC).isoformat(timespec="milliseconds"),
            "selfLink": self._url(f"zones/{zone}/operations/{name}"),
        }
        op = Operation(
            resource,
            self.operation_polls,
            time.monotonic() + self.operation_seconds,
            error,
            on_done,
        )
        self._operations[name] = op
        self._advance(op, poll=False)
        return op

    def _advance(self, op: Operation, *, poll: bool) -> bool:
        """Moves ``op`` on; True when this was one of its scripted not-done polls."""
        if op.done:
            return False
        if poll and op.polls_left > 0:
            op.polls_left -= 1
            op.resource.update(status="RUNNING", progress=50)
            return True
        if op.polls_left == 0 and time.monotonic() >= op.done_at:
            self._finish(op)
        return False

    def _finish(self, op: Operation) -> None:
        op.resource.update(
            status="DONE",
            progress=100,
            endTime=datetime.now(PACIFIC).isoformat(timespec="milliseconds"),
        )
        if op.error is not None:
            op.resource.update(
                error=op.error, httpErrorStatusCode=503, httpErrorMessage="SERVICE UNAVAILABLE"
            )
        elif op.on_done is not None:
            op.on_done()

    def _tick(self) -> None:
        """Operations finish on time even when nobody polls them."""
        for op in self._operations.values():
            self._advance(op, poll=False)

    def _vm(self, zone: str, name: str) -> Vm:
        vm = self._vms.get(name)
        if vm is None or vm.zone != zone:
            raise not_found(f"projects/{self.project}/zones/{zone}/instances/{name}")
        return vm

    def _operation(self, zone: str, name: str) -> Operation:
        op = self._operations.get(name)
        if op is None or not str(op.resource["zone"]).endswith(f"/zones/{zone}"):
            raise not_found(f"projects/{self.project}/zones/{zone}/operations/{name}")
        return op

    def _matching(self, query: str) -> list[Vm]:
        terms = parse_filter(query)
        return [vm for vm in self._vms.values() if all(holds(vm.view(), *t) for t in terms)]

    def _url(self, path: str) -> str:
        return f"https://www.googleapis.com/compute/v1/projects/{self.project}/{path}"


_Handler = Callable[[FakeCompute, dict[str, str], dict[str, str], "Json | None"], Json]

_ROUTES: tuple[tuple[str, str, _Handler], ...] = (
    ("POST", ZONE + "/instances", FakeCompute._insert),
    ("GET", ZONE + "/instances", FakeCompute._list),
    ("GET", ZONE + "/instances/(?P<name>[^/]+)", FakeCompute._get),
    ("DELETE", ZONE + "/instances/(?P<name>[^/]+)", FakeCompute._delete),
    ("GET", PREFIX + "/aggregated/instances", FakeCompute._aggregated_list),
    ("GET", ZONE + "/operations/(?P<operation>[^/]+)", FakeCompute._operation_get),
    ("POST", ZONE + "/operations/(?P<operation>[^/]+)/wait", FakeCompute._operation_wait),
)


def _handler_for(fake: FakeCompute) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            status, payload = fake.handle(method, url.path, query, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
