"""A short run of the demo configuration raises no Python warning: our own code warns about nothing, and the library
warnings we cannot fix are silenced by name (job/utils/redact.py THIRD_PARTY_WARNINGS), never by category."""

from __future__ import annotations

import re

import pytest
from helpers import job_env, run_job

# How the warnings module prints a warning: "path:line: Category: message".
WARNING_LINE = re.compile(r"^(?P<path>\S+\.py):(?P<line>\d+): (?P<category>\w*Warning): (?P<message>.*)$", re.M)


@pytest.mark.slow
def test_a_demo_run_raises_no_warning(tmp_path, tiny_assets):
    # PYTHONWARNINGS=default shows every warning once per location, including DeprecationWarnings from libraries.
    env = job_env(tmp_path, tiny_assets, SFT_MAX_STEPS="2", SFT_SAVE_STEPS="2", PYTHONWARNINGS="default")
    done = run_job(["run"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = [m.group(0) for m in WARNING_LINE.finditer(done.stdout + done.stderr)]
    assert found == [], "\n".join(found)
