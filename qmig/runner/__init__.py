"""Runners: the small loops that connect a protocol machine to a transport and to RAM."""
