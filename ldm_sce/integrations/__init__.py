"""Integrations with other libraries (optional dependencies, imported only when used)."""
