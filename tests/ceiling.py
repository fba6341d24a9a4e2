"""`python tests/ceiling.py <job args>`: the job under an injected memory ceiling, as a GPU too small for a batch.

Every training forward whose batch holds more than TEST_TOKEN_CEILING tokens (padding included: rows x the longest
row) raises torch's own OutOfMemoryError, from the language model's token embedding (a global forward pre-hook: the
embedding gets input_ids positionally). Eval (the model in eval mode) is never refused. Used by the shared runs that
train with SFT_PER_DEVICE_BATCH_SIZE=auto (tests/runs_reference.py) and by the audit's NoMicroBatchFits case.
"""

from __future__ import annotations

import os
import runpy
import sys

import torch

VOCAB_AT_LEAST = 150_000  # Qwen3-VL's text embedding (151,936 rows); the vision tower's position embedding is smaller


def install(budget: int):
    """Register the ceiling in this process; returns the hook's handle."""
    def ceiling(module, args):
        if (isinstance(module, torch.nn.Embedding) and module.training and module.num_embeddings >= VOCAB_AT_LEAST
                and args and args[0].numel() > budget):
            raise torch.OutOfMemoryError(f"CUDA out of memory: a batch of {args[0].numel()} tokens is over the test's "
                                         f"ceiling of {budget} (raised by tests/ceiling.py)")

    return torch.nn.modules.module.register_module_forward_pre_hook(ceiling)


if __name__ == "__main__":
    install(int(os.environ["TEST_TOKEN_CEILING"]))
    sys.argv = ["job", *sys.argv[1:]]
    runpy.run_module("job", run_name="__main__", alter_sys=True)
