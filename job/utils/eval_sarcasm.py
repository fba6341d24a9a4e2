"""Moved to `job.eval.generate` in 0.1.0; this old path is an alias of it until 0.2 (README, Development)."""

import sys

from job.eval import generate

sys.modules[__name__] = generate
