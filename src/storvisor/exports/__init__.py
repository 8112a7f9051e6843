"""Servers that bind a protocol from ``storvisor.protocols`` to a ``BlockDevice``."""
