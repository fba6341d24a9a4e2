"""Moved to `job.demo.tiny` in 0.1.0; this old path is an alias of it until 0.2 (README, Development).

`python -m job.tiny ...` still works: it runs `python -m job.demo.tiny ...`.
"""

import runpy
import sys

if __name__ == "__main__":
    runpy.run_module("job.demo.tiny", run_name="__main__", alter_sys=True)
else:
    from job.demo import tiny

    sys.modules[__name__] = tiny
