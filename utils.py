"""LoSparse, as the original repository's module: ``import utils`` keeps working.

The library lives in the ``losparse`` package next to this file (or installed with ``pip install .``); this module
re-exports its public API under the original names, so the three hooks of the original README, the example
scripts and the evaluation of released checkpoints run unchanged::

    utils.substitute_layer_weights(model, allow_name, block_name, parameter_ratio=0.05)     # STEP 1
    pruner = utils.Pruner(model, args, total_step=args.max_train_steps)                   # STEP 2
    threshold, mask_threshold = pruner.update_and_pruning(model, completed_steps)          # STEP 3

``docs/architecture.md`` says which module of ``losparse`` holds what.
"""
from losparse import *  # noqa: F401,F403  (the public API, listed in losparse.__all__)
from losparse import __all__  # noqa: F401
