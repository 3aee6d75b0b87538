"""The usage ledger: SQL schema, price catalog, exactly-once usage rows and reports."""

from __future__ import annotations

from billing.errors import BillingError, PriceCatalogError, UnknownPriceError
from billing.ledger import TenantSummary, UsageRecord, record_usage, tenant_summaries, usage_rows
from billing.prices import Price, PriceCatalog, cost_nanousd, format_usd

__all__ = [
    "BillingError",
    "Price",
    "PriceCatalog",
    "PriceCatalogError",
    "TenantSummary",
    "UnknownPriceError",
    "UsageRecord",
    "cost_nanousd",
    "format_usd",
    "record_usage",
    "tenant_summaries",
    "usage_rows",
]
