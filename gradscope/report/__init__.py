"""Rendering of diagnoses and checkpoint reports (text, markdown, JSON, HTML)."""
