"""``qmig replay``: rebuild a captured migration and migrate it into a real QEMU destination."""

from qmig.replay.recording import Recording, load_recording
from qmig.replay.runner import ReplayPlan, ReplayResult, replay

__all__ = ["Recording", "ReplayPlan", "ReplayResult", "load_recording", "replay"]
