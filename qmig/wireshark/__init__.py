"""Wireshark support: a Lua dissector generated from a wire profile."""
