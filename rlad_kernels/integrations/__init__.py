"""Integrations with other libraries; each imports its library lazily (on first use)."""
