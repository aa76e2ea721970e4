"""The source and destination state machines, sans-IO (bytes in, events and bytes out)."""
