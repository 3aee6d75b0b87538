"""Access control: tenants and API keys, bearer authentication, transport security."""
