"""Moved to `job.eval.command` in 0.1.0; this old path is an alias of it until 0.2 (README, Development)."""

import sys

from job.eval import command

sys.modules[__name__] = command
