"""Hypothesis profiles for the property suite.

``sharedquant`` (the default) keeps the whole suite well under two minutes on two
cores; ``thorough`` is for a long local hunt: ``HYPOTHESIS_PROFILE=thorough pytest property_tests``.
No deadline: the first call of a torch op (or a compile) is slow for reasons that have
nothing to do with the property.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "sharedquant",
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("sharedquant"), max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "sharedquant"))
