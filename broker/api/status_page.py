"""The status page: read-only HTML at ``/status`` and JSON at ``/status.json`` on the broker's
HTTP port (``--metrics HOST:PORT``, beside ``/metrics``).

Both show ``core.status``'s ``Status``, as an operator sees it: queue, agents, machines, recent
tasks with their failures, spend and idle overhead. The HTML reloads itself every few seconds
(a meta refresh: no script). The JSON is ``GetStatusResponse`` in protobuf's JSON mapping, the
shape grpcurl prints.

Access. On a loopback address (``127.0.0.1``, ``::1``, ``localhost``) the page needs no key:
whoever can reach it is on the broker's host. On any other address each request must present
an operator key, as ``Authorization: Bearer KEY`` or ``?key=KEY`` (the form a browser can
follow; the page's refresh keeps it); anything else gets 401, a tenant's key 403. An open
broker (no keys anywhere) treats every caller as an operator, on any address.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import datetime
from http import HTTPStatus
from urllib.parse import quote

from google.protobuf import json_format

from gpubroker.billing.prices import format_usd
from gpubroker.broker.access.auth import Authenticator
from gpubroker.broker.access.roles import Caller, Role
from gpubroker.broker.access.tls import is_loopback
from gpubroker.broker.api.status import status_to_proto
from gpubroker.broker.core.status import Status, TaskLine
from gpubroker.broker.core.status_source import StatusSource
from gpubroker.broker.errors import UnauthenticatedError
from gpubroker.httpserver import HttpServer, Request, Response

__all__ = ["REFRESH_S", "StatusPage", "render_status_page"]

REFRESH_S = 5
"""How often the page reloads itself, in seconds."""

_LOCAL = Caller("local", Role.OPERATOR)
"""Who a request on a loopback address is: the page shows everything."""
_NO_STORE = (("Cache-Control", "no-store"),)
_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd;
  text-align: left; vertical-align: top; } th { background: #f3f3f3; }
.num { text-align: right; font-variant-numeric: tabular-nums; } .empty { color: #888; }
.failed, .cancelled, .lost, .rejected { color: #b00020; } .succeeded { color: #1b6e20; }
dl { display: grid; grid-template-columns: max-content max-content; gap: 2px 16px; }
"""


class StatusPage:
    """The ``/status`` and ``/status.json`` handlers, checking access (module doc).

    Args:
        source: where the status comes from.
        auth: checks the keys requests present.
        address: the HTTP server's ``host:port``: keys are required unless it is loopback.
    """

    def __init__(self, source: StatusSource, auth: Authenticator, address: str) -> None:
        self._source = source
        self._auth = auth
        self._open = is_loopback(address)

    def add_routes(self, server: HttpServer) -> None:
        """Routes ``/status`` and ``/status.json`` on ``server`` to this page."""
        server.add_route("/status", self.html)
        server.add_route("/status.json", self.json)

    async def html(self, request: Request) -> Response:
        """``GET /status``: the page."""
        caller, refusal = self._caller(request)
        if refusal is not None:
            return refusal
        status = await self._source.status(caller)
        key = request.param("key")
        page = render_status_page(status, refresh_url=f"?key={quote(key)}" if key else "")
        return Response(200, "text/html; charset=utf-8", page.encode(), _NO_STORE)

    async def json(self, request: Request) -> Response:
        """``GET /status.json``: ``GetStatusResponse`` in protobuf's JSON mapping."""
        caller, refusal = self._caller(request)
        if refusal is not None:
            return refusal
        status = await self._source.status(caller)
        body = json_format.MessageToJson(status_to_proto(status), indent=1)
        return Response(200, "application/json", body.encode(), _NO_STORE)

    def _caller(self, request: Request) -> tuple[Caller, Response | None]:
        if self._open:
            return _LOCAL, None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else request.param("key")
        if not key and not self._auth.is_open:
            return _LOCAL, _refuse(HTTPStatus.UNAUTHORIZED, "an operator API key is required")
        try:
            caller = self._auth.key_caller(key)
        except UnauthenticatedError as exc:
            return _LOCAL, _refuse(HTTPStatus.UNAUTHORIZED, str(exc))
        if not caller.is_operator:
            return _LOCAL, _refuse(HTTPStatus.FORBIDDEN, "this page needs an operator key")
        return caller, None


def _refuse(status: HTTPStatus, message: str) -> Response:
    headers = (*_NO_STORE, ("WWW-Authenticate", 'Bearer realm="gpubroker"'))
    return Response(int(status), "text/plain; charset=utf-8", f"{message}\n".encode(), headers)


def render_status_page(status: Status, refresh_s: int = REFRESH_S, refresh_url: str = "") -> str:
    """The status as a self-refreshing HTML page (``refresh_url``: where the reload goes)."""
    target = f"; url={html.escape(refresh_url)}" if refresh_url else ""
    spend = status.spend
    counts = status.machine_counts
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{refresh_s}{target}">',
        f"<title>gpubroker status</title><style>{_STYLE}</style></head><body>",
        "<h1>gpubroker status</h1>",
        f'<p>At <time id="generated">{_when(status.generated_at)}</time> UTC; reloads every '
        f"{refresh_s} s. Viewer: {_e(status.tenant)}"
        f"{' (operator view)' if status.operator_view else ''}.</p>",
        '<h2>Queue</h2><p id="queue-summary">'
        f'<span id="queued-tasks">{status.queued_tasks}</span> queued, '
        f'<span id="running-tasks">{status.running_tasks}</span> running.</p>',
        _table(
            "queue",
            ("Tenant", "Workload", "GPU type", "Queued", "Oldest wait"),
            (
                (q.tenant, q.workload, q.gpu_type or "any", q.depth, _seconds(q.oldest_wait_s))
                for q in status.queue
            ),
        ),
        f'<h2>Agents</h2><p><span id="agent-count">{status.agent_count}</span> connected, '
        f"{status.free_slots} free slots.</p>",
        _table(
            "agents",
            (
                "Agent",
                "GPU type",
                "Slots",
                "Busy",
                "Free",
                "Prefetch",
                "Models",
                "Connected",
                "Tasks",
                "Machine",
            ),
            (
                (
                    a.agent_id + (" (draining)" if a.draining else ""),
                    a.gpu_type,
                    a.slots,
                    a.busy_slots,
                    a.free_slots,
                    a.prefetch_held,
                    ", ".join(a.models),
                    _when(a.connected_at),
                    ", ".join(a.task_ids),
                    a.machine_name,
                )
                for a in status.agents
            ),
        ),
        f"<h2>Machines</h2><p>{counts.booting} booting, {counts.running} running, "
        f"{counts.stopping} stopping.</p>",
        _table(
            "machines",
            ("Machine", "State", "Provider", "GPU type", "Zone", "Age", "Cost so far"),
            (
                (
                    m.name,
                    m.state,
                    m.provider,
                    m.gpu_type,
                    m.zone,
                    _seconds(m.age_s),
                    _usd(m.cost_nanousd),
                )
                for m in status.machines
            ),
        ),
        "<h2>Spend</h2>",
        '<dl id="spend">',
        f"<dt>Billed today</dt><dd>{_usd(spend.today_nanousd)} ({spend.today_tasks} tasks)</dd>",
        f"<dt>Billed this month</dt><dd>{_usd(spend.month_nanousd)} "
        f"({spend.month_tasks} tasks)</dd>",
        f"<dt>Machines today</dt><dd>{_usd(spend.machines_today_nanousd)}</dd>",
        f"<dt>Machines this month</dt><dd>{_usd(spend.machines_month_nanousd)}</dd>",
        f'<dt>Idle overhead today</dt><dd id="idle-today">{_usd(spend.idle_today_nanousd)}</dd>',
        f"<dt>Idle overhead this month</dt><dd>{_usd(spend.idle_month_nanousd)}</dd>",
        "</dl>",
        "<h2>Recent tasks</h2>",
        _table(
            "tasks",
            ("Task", "Tenant", "Workload", "State", "Created", "Attempts", "Error"),
            (_task_row(line) for line in status.recent_tasks),
            raw_columns=(3, 5),
        ),
        "</body></html>",
    ]
    return "\n".join(parts)


def _task_row(line: TaskLine) -> Sequence[object]:
    task = line.task
    state = task.state.value
    attempts = "<br>".join(
        f"{a.number}: {_e(a.agent_id)}{f' on {_e(a.machine_name)}' if a.machine_name else ''} "
        f'<span class="{_e(a.outcome)}">{_e(a.outcome)}</span>'
        for a in line.attempts
    )
    error = f"{task.error_code.value}: {task.error_message}" if task.error_code else ""
    return (
        task.id,
        task.tenant,
        task.workload,
        f'<span class="{_e(state)}">{_e(state)}</span>',
        _when(task.created_at),
        attempts,
        error,
    )


def _table(
    name: str,
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    raw_columns: Sequence[int] = (),
) -> str:
    """An HTML table (cells escaped, but for ``raw_columns``, built escaped already)."""
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            css = ' class="num"' if isinstance(cell, int | float) else ""
            text = str(cell) if i in raw_columns else _e(str(cell))
            cells.append(f"<td{css}>{text}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    if not body:
        return f'<p class="empty" id="{name}-empty">None.</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f'<table id="{name}"><tr>{head}</tr>{"".join(body)}</table>'


def _usd(nanousd: int) -> str:
    """Dollars to a millionth (a tiny negative overhead shows as $0.000000, not -0)."""
    text = format_usd(nanousd, 6)
    return "$0.000000" if text == "$-0.000000" else text


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"
