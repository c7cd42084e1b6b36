"""Integrations with the tools users already train with; each framework is imported lazily."""
