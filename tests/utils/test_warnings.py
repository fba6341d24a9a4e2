"""A run raises no Python warning: our own code warns about nothing, and the library warnings we cannot fix are
silenced by name (job/utils/redact.py THIRD_PARTY_WARNINGS), never by category."""

from __future__ import annotations

import gc
import re
import tempfile
import warnings

import pytest

from job.utils.redact import ignore_third_party_warnings

# How the warnings module prints a warning: "path:line: Category: message".
WARNING_LINE = re.compile(r"^(?P<path>\S+\.py):(?P<line>\d+): (?P<category>\w*Warning): (?P<message>.*)$", re.M)


@pytest.mark.slow
def test_a_run_raises_no_warning(reference_run):
    """The shared reference run (tests/runs.py) runs with PYTHONWARNINGS=default: every warning shows once per place."""
    assert reference_run.env["PYTHONWARNINGS"] == "default"
    assert reference_run.returncode == 0, reference_run.log[-3000:]
    found = [m.group(0) for m in WARNING_LINE.finditer(reference_run.log)]
    assert found == [], "\n".join(found)


# Third-party lines that told the user nothing (job/utils/redact.py THIRD_PARTY_LOG_NOISE, job/utils/tracking.py).
NOISE = ("Failed to load CPU gemm_4bit_forward", "URL not available in offline run", "Run history:")


@pytest.mark.slow
def test_a_run_prints_each_line_once_and_no_library_noise(reference_run):
    assert reference_run.returncode == 0, reference_run.log[-3000:]
    lines = [line.strip() for line in reference_run.log.splitlines()]
    assert [n for n in NOISE if any(n in line for line in lines)] == []
    seen: set[str] = set()
    repeated = []
    for line in lines:
        if line.strip("wandb: ") and line in seen:
            repeated.append(line)
        seen.add(line)
    assert repeated == [], "\n".join(repeated)


@pytest.mark.parametrize(("prefix", "silenced"), [(None, True), ("qwen3-sft-", False)])
def test_the_temporary_directory_filter_covers_anonymous_directories_only(prefix, silenced):
    """wandb's leaked table staging directories are anonymous ('tmp' + 8 characters) and their ResourceWarning is
    silenced; a named directory of the job's, left to the garbage collector, still warns."""
    gc.collect()  # what earlier tests left to the collector (an unclosed socket) is not this test's to see
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ignore_third_party_warnings()
        leaked = tempfile.TemporaryDirectory(prefix=prefix)
        del leaked
        gc.collect()
    resource = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    if silenced:
        assert resource == []
    else:
        assert len(resource) == 1 and "qwen3-sft-" in resource[0], resource
