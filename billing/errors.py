"""Billing errors.

BillingError
├── PriceCatalogError   the catalog file is malformed
└── UnknownPriceError   no price for a GPU type
"""

from __future__ import annotations

__all__ = ["BillingError", "PriceCatalogError", "UnknownPriceError"]


class BillingError(Exception):
    """Base class for billing errors."""


class PriceCatalogError(BillingError):
    """The price catalog is malformed."""


class UnknownPriceError(BillingError):
    """The catalog has no price for a GPU type."""
