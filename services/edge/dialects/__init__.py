"""One translator module per SDK dialect: pure functions from a parsed request to the steps of
services.edge.steps, no I/O. segment.py, posthog.py and countly.py."""
