"""Integrations with training frameworks; the core never imports this package."""
