"""Shared library of the kuasar-py sandboxers: ttrpc, Sandbox API server, Task API, state, events."""

__version__ = "0.1.0"
