"""Moved to `job.train.flow` in 0.1.0; this old path is an alias of it until 0.2 (README, Development)."""

import sys

from job.train import flow

sys.modules[__name__] = flow
