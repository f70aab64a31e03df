"""Shared pytest setup.

Hypothesis profiles: "ci" is the default (no per-example deadline: timing is
not behaviour, and a loaded CI machine must not fail a property test);
`HYPOTHESIS_PROFILE=fuzz` selects a long run with many more examples.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", deadline=None)
settings.register_profile("fuzz", deadline=None, max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
