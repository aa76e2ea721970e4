"""Shared test configuration.

Hypothesis profiles: ``ci`` (loaded when the ``CI`` environment variable is set) keeps the
property tests within a 2-core CI budget; ``thorough`` (``QMIG_HYPOTHESIS=thorough``) runs
many more examples for a local bug hunt. Otherwise hypothesis's defaults apply.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,  # shared CI machines stall; hangs are caught by pytest-timeout instead
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

if os.environ.get("CI"):
    settings.load_profile("ci")
elif os.environ.get("QMIG_HYPOTHESIS"):
    settings.load_profile(os.environ["QMIG_HYPOTHESIS"])
