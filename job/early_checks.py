"""Moved to `job.preflight.early` in 0.1.0; this old path is an alias of it until 0.2 (README, Development)."""

import sys

from job.preflight import early

sys.modules[__name__] = early
