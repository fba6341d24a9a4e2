"""Moved to `job.demo.report` in 0.1.0; this old path is an alias of it until 0.2 (README, Development).

`python -m job.report ...` still works: it runs `python -m job.demo.report ...`.
"""

import runpy
import sys

if __name__ == "__main__":
    runpy.run_module("job.demo.report", run_name="__main__", alter_sys=True)
else:
    from job.demo import report

    sys.modules[__name__] = report
