"""The usage ledger: SQL schema, price catalog, exactly-once usage rows and reports."""
