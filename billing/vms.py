"""VM uptime: when each agent machine was created, ran, connected and was deleted; its cost.

The cost rule is Compute Engine's (docs/deploy.md, section 7): a machine is charged per second,
in whole seconds rounded up, from when it starts running (GCE's ``RUNNING``, boot included)
until it is deleted, and at least one minute per life. Each machine's charge is laid out as an
interval, ``[begin, begin + charged)`` with ``charged = max(ceil(life), minimum)``, and a report
over ``[start, end)`` counts the part of that interval inside the range. So a GCE machine that
lived 20 s is charged 60 s (whichever range holds them), and adjacent ranges add up to the
machine's whole charge, up to a nano-dollar of rounding per machine and range. The minimum is
the provider's (``minimum_charge``): a minute on GCE, none for ``local`` agents, which are
processes on the broker's own host; the autoscaler's policy uses the same figures.

``begin`` is the provider's first ``RUNNING`` sighting (``running_at``), or the agent's first
connection (``connected_at``) if that came earlier (the loop sees RUNNING on its next tick, and a
machine whose agent connected was running), or ``created_at`` when RUNNING was never recorded:
the report then errs towards more VM cost, never hiding idle overhead. A machine not yet
deleted is charged up to ``now``, and at least its minimum, which it already owes.

Boot time is the part of the charge from ``begin`` until the agent connected; a machine whose
agent never connected spent its whole charge booting. It is part of the machine's cost (and so
of the idle overhead), shown apart so that slow boots can be told from idle machines.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from gpubroker.billing.ledger import UsageSummary, summaries
from gpubroker.billing.models import vm_instances
from gpubroker.billing.prices import prorated_nanousd

__all__ = [
    "MINIMUM_CHARGE",
    "EndReason",
    "LiveMachine",
    "OverheadLine",
    "VmCost",
    "VmCostLine",
    "VmLaunch",
    "idle_overhead",
    "live_machines",
    "minimum_charge",
    "overhead_total",
    "record_connected",
    "record_created",
    "record_deleted",
    "record_running",
    "vm_cost",
]

MINIMUM_CHARGE = timedelta(seconds=60)
"""The least a Compute Engine machine's life is charged."""

_MINIMUM_CHARGES: Mapping[str, timedelta] = {"local": timedelta(0)}
"""Providers that charge less than Compute Engine's minute."""

_TOTAL = "TOTAL"
_MICROS_PER_HOUR = 3_600_000_000


class EndReason(enum.StrEnum):
    """Why a machine was deleted."""

    IDLE = "idle"
    """No work for it: the autoscaler scaled down."""
    PREEMPTED = "preempted"
    """GCE reclaimed the Spot machine."""
    STUCK = "stuck"
    """Its agent never joined, or stopped answering."""
    SHUTDOWN = "shutdown"
    """The broker shut down and took its machines with it."""
    ORPHAN = "orphan"
    """Found running with no owner (e.g. after a broker restart) and deleted."""
    FAILED = "failed"
    """The machine failed on its own (GCE reported it terminated)."""


@dataclass(frozen=True, slots=True)
class VmLaunch:
    """What a provider knows about a machine once it has created it."""

    name: str
    """Instance name, unique among this broker's machines; also its agent's id."""
    provider: str
    """``local`` or ``gce``."""
    zone: str
    gpu_type: str
    machine_type: str
    spot: bool
    price_per_hour_nanousd: int
    """The whole machine's price (GPU and host), in whole nano-dollars per hour."""
    price_version: str
    """The price catalog version the price came from."""

    def __post_init__(self) -> None:
        if self.price_per_hour_nanousd < 0:
            raise ValueError(f"price of {self.price_per_hour_nanousd} nano-USD/h is negative")


@dataclass(frozen=True, slots=True)
class VmCostLine:
    """Machine cost of one GPU type (or ``TOTAL``) over a time range."""

    gpu_type: str
    vms: int
    """Machines charged for some time in the range."""
    charged_seconds: Decimal
    """Machine-seconds charged in the range, minimum included; exact to the microsecond."""
    cost_nanousd: int
    boot_seconds: Decimal = Decimal(0)
    """The part of ``charged_seconds`` before the machines' agents connected."""
    boot_cost_nanousd: int = 0
    """The part of ``cost_nanousd`` for ``boot_seconds``."""


@dataclass(frozen=True, slots=True)
class VmCost:
    """Machine cost over a time range: per GPU type, and the grand total."""

    lines: tuple[VmCostLine, ...]
    """One per GPU type, sorted by it."""
    total: VmCostLine
    """Every machine; its ``gpu_type`` is ``TOTAL``. The cost is the lines' exact sum."""


@dataclass(frozen=True, slots=True)
class OverheadLine:
    """Machine cost beside billed compute, for one GPU type (or ``TOTAL``) over a time range.

    Billed compute is priced at tenant prices, so the overhead is what the machines cost beyond
    what tenants were charged: idle and boot time, lost attempts, less any margin.
    """

    gpu_type: str
    vms: int
    vm_seconds: Decimal
    vm_cost_nanousd: int
    tasks: int
    compute_seconds: float
    billed_nanousd: int
    boot_seconds: Decimal = Decimal(0)
    """Machine-seconds charged before the agents connected; part of ``vm_seconds``."""
    boot_cost_nanousd: int = 0
    """What ``boot_seconds`` cost; part of ``vm_cost_nanousd`` and so of the idle overhead."""

    @property
    def idle_nanousd(self) -> int:
        """Idle overhead: machine cost less billed compute (negative when billing exceeds it)."""
        return self.vm_cost_nanousd - self.billed_nanousd

    @property
    def idle_percent(self) -> Decimal | None:
        """Idle overhead as a percentage of machine cost; None when there was no machine cost."""
        if self.vm_cost_nanousd == 0:
            return None
        return Decimal(self.idle_nanousd * 100) / Decimal(self.vm_cost_nanousd)


@dataclass(frozen=True, slots=True)
class LiveMachine:
    """A machine not yet deleted, and what it has cost so far (``live_machines``)."""

    name: str
    provider: str
    zone: str
    gpu_type: str
    spot: bool
    price_per_hour_nanousd: int
    created_at: datetime
    running_at: datetime | None
    connected_at: datetime | None
    cost_nanousd: int
    """Its charge up to now, the provider's minimum included (it already owes that)."""


@contextlib.contextmanager
def _connection(target: Connection | Engine) -> Iterator[Connection]:
    """The caller's connection, in its transaction; or a new transaction committed on exit."""
    if isinstance(target, Engine):
        with target.begin() as conn:
            yield conn
    else:
        yield target


def minimum_charge(provider: str) -> timedelta:
    """The least a machine of ``provider`` is charged per life.

    Compute Engine's minute (``MINIMUM_CHARGE``), and for providers this module does not know;
    none for ``local`` agents, processes on the broker's host that no one bills by the minute.
    """
    return _MINIMUM_CHARGES.get(provider, MINIMUM_CHARGE)


def record_created(target: Connection | Engine, vm: VmLaunch, created_at: datetime) -> bool:
    """Records a machine the provider created; False, changing nothing, if already recorded."""
    values = {**asdict(vm), "created_at": created_at}
    with _connection(target) as conn:
        return _insert_new(conn, values)


def _insert_new(conn: Connection, values: Mapping[str, Any]) -> bool:
    # RETURNING says whether a row went in; rowcount is -1 for INSERT under psycopg 3.
    insert: sa.Insert
    if conn.dialect.name == "postgresql":
        pg_insert = postgresql.insert(vm_instances).values(values)
        insert = pg_insert.on_conflict_do_nothing(index_elements=["name"])
    elif conn.dialect.name == "sqlite":
        sqlite_insert = sqlite.insert(vm_instances).values(values)
        insert = sqlite_insert.on_conflict_do_nothing(index_elements=["name"])
    else:
        return _insert_if_absent(conn, values)
    return conn.execute(insert.returning(vm_instances.c.name)).first() is not None


def _insert_if_absent(conn: Connection, values: Mapping[str, Any]) -> bool:
    known = sa.select(vm_instances.c.name).where(vm_instances.c.name == values["name"])
    if conn.execute(known).first() is not None:
        return False
    conn.execute(vm_instances.insert().values(values))
    return True


def record_running(target: Connection | Engine, name: str, running_at: datetime) -> bool:
    """Records when a machine started running (its charge starts); only the first time counts.

    Returns False, changing nothing, for a machine not recorded, already running, or deleted.
    """
    update = (
        vm_instances.update()
        .where(vm_instances.c.name == name)
        .where(vm_instances.c.running_at.is_(None), vm_instances.c.deleted_at.is_(None))
        .values(running_at=running_at)
    )
    with _connection(target) as conn:
        return conn.execute(update).rowcount == 1


def record_connected(
    target: Connection | Engine,
    name: str,
    connected_at: datetime,
    agent_started_at: datetime | None = None,
) -> bool:
    """Records when a machine's agent first connected (its boot ends); only the first time counts.

    ``agent_started_at`` is when that agent's process started, if it said so (the end of the
    machine's install phase). Returns False, changing nothing, for a machine not recorded,
    already connected, or deleted.
    """
    update = (
        vm_instances.update()
        .where(vm_instances.c.name == name)
        .where(vm_instances.c.connected_at.is_(None), vm_instances.c.deleted_at.is_(None))
        .values(connected_at=connected_at, agent_started_at=agent_started_at)
    )
    with _connection(target) as conn:
        return conn.execute(update).rowcount == 1


def record_deleted(
    target: Connection | Engine, name: str, deleted_at: datetime, reason: EndReason
) -> bool:
    """Records when and why a machine was deleted (its charge ends); only the first time counts.

    Returns False, changing nothing, for a machine not recorded or already deleted.
    """
    update = (
        vm_instances.update()
        .where(vm_instances.c.name == name, vm_instances.c.deleted_at.is_(None))
        .values(deleted_at=deleted_at, end_reason=EndReason(reason).value)
    )
    with _connection(target) as conn:
        return conn.execute(update).rowcount == 1


def _micros(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _charged(
    row: Any, now: datetime
) -> tuple[tuple[datetime, datetime], tuple[datetime, datetime]]:
    """The intervals a machine's life, and its boot, are charged for (see the module docstring)."""
    begin = row.created_at
    if row.running_at is not None:
        seen = row.running_at if row.connected_at is None else min(row.running_at, row.connected_at)
        begin = max(begin, seen)
    finish = max(row.deleted_at or now, begin)
    whole_seconds = -(-_micros(finish - begin) // 1_000_000)
    charge_end = begin + max(timedelta(seconds=whole_seconds), minimum_charge(row.provider))
    boot_end = charge_end if row.connected_at is None else max(begin, row.connected_at)
    return (begin, charge_end), (begin, min(boot_end, charge_end))


def _overlap_micros(
    interval: tuple[datetime, datetime], start: datetime | None, end: datetime | None
) -> int:
    low = interval[0] if start is None else max(interval[0], start)
    high = interval[1] if end is None else min(interval[1], end)
    return max(_micros(high - low), 0)


def _candidates(start: datetime | None, end: datetime | None) -> sa.Select[Any]:
    """Machines whose charge may fall in the range; exact clipping happens in Python."""
    c = vm_instances.c
    query = sa.select(c.gpu_type, c.price_per_hour_nanousd, c.created_at, c.running_at)
    query = query.add_columns(c.deleted_at, c.connected_at, c.provider)
    if end is not None:
        query = query.where(c.created_at < end)
    if start is not None:
        # A charge ends at most a minute (the longest minimum) after the later of deletion and
        # its start.
        horizon = start - MINIMUM_CHARGE
        query = query.where(
            sa.or_(
                c.deleted_at.is_(None),
                c.deleted_at > horizon,
                c.created_at > horizon,
                c.running_at > horizon,
            )
        )
    return query


def vm_cost(
    target: Connection | Engine,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    now: datetime | None = None,
) -> VmCost:
    """Machine cost over ``[start, end)`` (None: unbounded), per GPU type and in total.

    Each machine's cost in the range is its charged microseconds there times its price,
    rounded half-up to a nano-dollar, and likewise its boot's; totals are exact sums of those.
    Machines not yet deleted are charged up to ``now`` (default: the current time).
    """
    now = now or datetime.now(UTC)
    with _connection(target) as conn:
        rows = conn.execute(_candidates(start, end)).all()
    # Per GPU type: [machines, charged microseconds, nano-dollars, boot microseconds, boot
    # nano-dollars], all exact integers.
    sums: dict[str, list[int]] = {}
    for row in rows:
        charge, boot = _charged(row, now)
        micros = _overlap_micros(charge, start, end)
        if micros > 0:
            boot_micros = _overlap_micros(boot, start, end)
            price = row.price_per_hour_nanousd
            cost = prorated_nanousd(micros, _MICROS_PER_HOUR, price)
            boot_cost = prorated_nanousd(boot_micros, _MICROS_PER_HOUR, price)
            for i, value in enumerate((1, micros, cost, boot_micros, boot_cost)):
                sums.setdefault(row.gpu_type, [0] * 5)[i] += value
    lines = tuple(_cost_line(gpu, sums[gpu]) for gpu in sorted(sums))
    return VmCost(lines, _cost_line(_TOTAL, [sum(s[i] for s in sums.values()) for i in range(5)]))


def live_machines(target: Connection | Engine, now: datetime) -> list[LiveMachine]:
    """Every machine not yet deleted, oldest first, charged up to ``now`` as ``vm_cost`` does."""
    c = vm_instances.c
    query = sa.select(vm_instances).where(c.deleted_at.is_(None)).order_by(c.created_at, c.name)
    with _connection(target) as conn:
        rows = conn.execute(query).all()
    machines = []
    for row in rows:
        charge, _ = _charged(row, now)
        micros = _overlap_micros(charge, None, None)
        cost = prorated_nanousd(micros, _MICROS_PER_HOUR, row.price_per_hour_nanousd)
        machines.append(
            LiveMachine(
                row.name,
                row.provider,
                row.zone,
                row.gpu_type,
                row.spot,
                row.price_per_hour_nanousd,
                row.created_at,
                row.running_at,
                row.connected_at,
                cost,
            )
        )
    return machines


def _cost_line(gpu_type: str, sums: Sequence[int]) -> VmCostLine:
    vms, micros, cost, boot_micros, boot_cost = sums
    seconds, boot_seconds = Decimal(micros).scaleb(-6), Decimal(boot_micros).scaleb(-6)
    return VmCostLine(gpu_type, vms, seconds, cost, boot_seconds, boot_cost)


def idle_overhead(
    target: Connection | Engine,
    start: datetime | None = None,
    end: datetime | None = None,
    *,
    now: datetime | None = None,
) -> list[OverheadLine]:
    """Machine cost beside billed compute (the ledger's usage rows) per GPU type, sorted.

    Both cover ``[start, end)``; a GPU type appears if it has either.
    """
    with _connection(target) as conn:
        machines = {line.gpu_type: line for line in vm_cost(conn, start, end, now=now).lines}
        billed = {s.key: s for s in summaries(conn, by="gpu_type", since=start, until=end)}
    gpu_types = sorted(machines.keys() | billed.keys())
    return [_overhead_line(gpu, machines.get(gpu), billed.get(gpu)) for gpu in gpu_types]


def _overhead_line(
    gpu_type: str, machines: VmCostLine | None, usage: UsageSummary | None
) -> OverheadLine:
    return OverheadLine(
        gpu_type=gpu_type,
        vms=machines.vms if machines else 0,
        vm_seconds=machines.charged_seconds if machines else Decimal(0),
        vm_cost_nanousd=machines.cost_nanousd if machines else 0,
        tasks=usage.tasks if usage else 0,
        compute_seconds=usage.compute_seconds if usage else 0.0,
        billed_nanousd=usage.cost_nanousd if usage else 0,
        boot_seconds=machines.boot_seconds if machines else Decimal(0),
        boot_cost_nanousd=machines.boot_cost_nanousd if machines else 0,
    )


def overhead_total(lines: Sequence[OverheadLine]) -> OverheadLine:
    """The ``TOTAL`` line: exact sums of ``lines``."""
    return OverheadLine(
        gpu_type=_TOTAL,
        vms=sum(line.vms for line in lines),
        vm_seconds=sum((line.vm_seconds for line in lines), Decimal(0)),
        vm_cost_nanousd=sum(line.vm_cost_nanousd for line in lines),
        tasks=sum(line.tasks for line in lines),
        compute_seconds=sum(line.compute_seconds for line in lines),
        billed_nanousd=sum(line.billed_nanousd for line in lines),
        boot_seconds=sum((line.boot_seconds for line in lines), Decimal(0)),
        boot_cost_nanousd=sum(line.boot_cost_nanousd for line in lines),
    )
