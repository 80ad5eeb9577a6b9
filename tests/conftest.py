"""Shared fixtures. Settings for hypothesis: profiles chosen by `HYPOTHESIS_PROFILE`.

* ``default`` (`make test`, CI): each property test runs the same 60 examples on every run
  (``derandomize``: the seed comes from the test itself). A green run stays green, so CI
  refuses a change for what the change did, never for an unlucky draw: one latent
  counterexample that a random seed reached now and then (a routing-table property in
  session 18) could fail any unrelated landing.
* ``explore``: the same size with fresh random examples each run, to look for what the
  fixed ones miss (``HYPOTHESIS_PROFILE=explore make unit``); a counterexample it finds
  goes into the test as an ``@example``.
* ``slow``: 2,000 random examples per property, for the long runs.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_QUIET = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

settings.register_profile("default", _QUIET, max_examples=60, derandomize=True)
settings.register_profile("explore", _QUIET, max_examples=60)
settings.register_profile("slow", _QUIET, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
