"""The usage ledger: SQL schema, price catalog, exactly-once usage rows and reports."""

from __future__ import annotations

from gpubroker.billing.errors import BillingError, PriceCatalogError, UnknownPriceError
from gpubroker.billing.ledger import UsageRecord, UsageSummary, record_usage, summaries, usage_rows
from gpubroker.billing.prices import Price, PriceCatalog, cost_nanousd, format_usd

__all__ = [
    "BillingError",
    "Price",
    "PriceCatalog",
    "PriceCatalogError",
    "UnknownPriceError",
    "UsageRecord",
    "UsageSummary",
    "cost_nanousd",
    "format_usd",
    "record_usage",
    "summaries",
    "usage_rows",
]
