"""Recording a real migration: a relay between two QEMUs that keeps both directions on disk."""

from qmig.capture.recording import (
    INDEX_NAME,
    META_NAME,
    RETURN_PATH_NAME,
    STREAM_NAME,
    Capture,
    Chunk,
    Direction,
    read_capture,
)
from qmig.capture.relay import CaptureSummary, Relay, start_relay

__all__ = [
    "INDEX_NAME",
    "META_NAME",
    "RETURN_PATH_NAME",
    "STREAM_NAME",
    "Capture",
    "CaptureSummary",
    "Chunk",
    "Direction",
    "Relay",
    "read_capture",
    "start_relay",
]
