"""LoSparse: low-rank + structured-sparse compression of ``nn.Linear`` layers (ICML 2023).

The public API, one module per idea (``docs/architecture.md`` draws the map):

=================  =============================================================================================
``decomposition``  ``low_rank_decomposition``: the truncated SVD ``W ~ L R`` (plain or activation-aware)
``layer``          ``LinearLoSparse``: ``y = x (L R + S)^T + b`` and its training forward
``forms``          the compacted layer's inference forms, their cost model and cache
``compact``        ``prune``, ``refresh``, ``prepare_for_inference``
``substitute``     STEP 1: ``substitute_layer_weights``
``importance``     PLATON's importance statistics and scoring maths
``distributed``    one process / DDP / FSDP2 row shards for the pruner; ``check_distributed_support``
``pruner``         STEP 2 and 3: ``Pruner``, ``cubic_schedule``
``calibration``    ``collect_input_covariance``, ``InputCovariances``, ``collect_output_fisher``, ``blocks_per_pass``
``one_shot``       ``one_shot_rows``, ``one_shot_allocate`` (and the sequential refit)
``checkpoint``     ``load_checkpoint``, ``save_checkpoint`` (the original key layout)
``report``         ``compression_report``
``export``         ``export_compact``, ``load_compact`` (a folder plain transformers loads)
``fsdp2``          ``apply_fsdp2``, ``fsdp2_checkpointing``, ``fsdp2_full_model``
``config``         the hyperparameters' allowed values, ``validate_losparse_args``
``cli``            ``add_losparse_args``
``runs``           the example scripts' start-up checks, atomic checkpoints and one-line errors
=================  =============================================================================================

The three hooks of the original README (``import losparse as utils`` or the repository's ``utils.py``)::

    utils.substitute_layer_weights(model, allow_name, block_name, parameter_ratio=0.05)     # STEP 1
    pruner = utils.Pruner(model, args, total_step=args.max_train_steps)                   # STEP 2
    threshold, mask_threshold = pruner.update_and_pruning(model, completed_steps)          # STEP 3

Public names, signatures and state-dict keys (``left.weight``, ``right.weight``, ``sparse.weight``, ``bias``,
``sparse_weight_pruned``) are those of the original code (a column-compacted S adds ``sparse_weight_pruned_cols``
and ``nonzero_col_idx``); differences are listed in docs/differences.md.
"""
from .calibration import (InputCovariances, blocks_per_pass, collect_input_covariance, collect_output_fisher,
                          memory_budget, statistics_bytes)
from .checkpoint import CheckpointFileError, CheckpointMismatchError, load_checkpoint, save_checkpoint
from .cli import add_losparse_args
from .common import is_sharded, logger
from .compact import PREPARE_TOKENS, prepare_for_inference, prune, refresh
from .config import PRUNER_NAMES, STRUCTURED_DIRECTIONS, STRUCTURED_METHODS, SVD_METHODS, validate_losparse_args
from .decomposition import LOG_LEVELS, REMOVE_CRITERIA, low_rank_decomposition
from .distributed import SUPPORTED_DISTRIBUTED, check_distributed_support
from .export import COMPACT_CONFIG, COMPACT_FORMS, COMPACT_WEIGHTS, REMOTE_CODE_FILE, export_compact, load_compact
from .forms import COMPACT_PATHS, PATH_CHOICES, PREFER_CHOICES
from .fsdp2 import apply_fsdp2, fsdp2_checkpointing, fsdp2_full_model
from .layer import LinearLoSparse
from .one_shot import one_shot_allocate, one_shot_rows
from .pruner import ROW_COL_ROW_NAMES, Pruner, cubic_schedule
from .report import CompressionReport, compression_report
from .runs import (CHECKPOINT_MARKER, RunInputError, check_checkpoint_file, check_data_file, check_output_dir,
                   check_resume_folder, check_run_paths, checkpoint_problem, latest_checkpoint, one_line_errors,
                   save_state_atomic)
from .substitute import DEFAULT_ALLOW_NAME, DEFAULT_BLOCK_NAME, substitute_layer_weights

__version__ = "0.2.0"

__all__ = [
    # the method: STEP 1, the layer, compaction
    "low_rank_decomposition", "LinearLoSparse", "substitute_layer_weights", "prune", "refresh",
    "prepare_for_inference",
    # STEP 2 and 3
    "Pruner", "cubic_schedule",
    # calibration and one-shot compression
    "collect_input_covariance", "InputCovariances", "collect_output_fisher", "statistics_bytes", "blocks_per_pass",
    "memory_budget", "one_shot_rows", "one_shot_allocate",
    # checkpoints, report, export
    "load_checkpoint", "save_checkpoint", "CheckpointMismatchError", "CheckpointFileError", "compression_report",
    "CompressionReport", "export_compact", "load_compact",
    # flags, distribution, FSDP2
    "add_losparse_args", "validate_losparse_args", "check_distributed_support", "apply_fsdp2", "fsdp2_checkpointing",
    "fsdp2_full_model", "is_sharded",
    # the example scripts' run plumbing
    "check_run_paths", "check_output_dir", "check_checkpoint_file", "check_data_file", "check_resume_folder",
    "checkpoint_problem", "latest_checkpoint", "save_state_atomic", "one_line_errors", "RunInputError",
    # allowed values and file names
    "SVD_METHODS", "REMOVE_CRITERIA", "LOG_LEVELS", "COMPACT_PATHS", "PREFER_CHOICES", "PATH_CHOICES",
    "PREPARE_TOKENS", "DEFAULT_ALLOW_NAME", "DEFAULT_BLOCK_NAME", "PRUNER_NAMES", "STRUCTURED_METHODS",
    "STRUCTURED_DIRECTIONS", "ROW_COL_ROW_NAMES", "SUPPORTED_DISTRIBUTED", "COMPACT_WEIGHTS", "COMPACT_CONFIG",
    "COMPACT_FORMS", "REMOTE_CODE_FILE", "CHECKPOINT_MARKER",
    "logger",
]
