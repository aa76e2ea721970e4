"""Mapped-ram files (QEMU 9.0+ ``file:`` migrations with the mapped-ram capability): their
layout, their RAM read through the bitmap, and their stream part as an ordinary stream."""
