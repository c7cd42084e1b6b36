"""Runnable examples (``python -m gradscope.examples.<name>``)."""
