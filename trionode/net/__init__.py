"""Trio drivers for the wire machines: the only code that touches sockets."""
