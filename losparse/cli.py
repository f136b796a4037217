"""The LoSparse flags of the example scripts: ``add_losparse_args`` (checked by
``losparse.config.validate_losparse_args``)."""
from .config import PRUNER_NAMES, STRUCTURED_DIRECTIONS, STRUCTURED_METHODS, SVD_METHODS


def add_losparse_args(parser):
    """Add the LoSparse flags shared by run_glue.py, run_qa.py and run_summarization.py (original defaults)."""
    g = parser.add_argument_group("LoSparse")
    g.add_argument("--low_rank_parameter_ratio", type=float, default=0.05,
                   help="Proportion of the dense parameters kept in the low-rank factors L and R, e.g. 0.10.")
    g.add_argument("--initial_threshold", type=float, default=1.0, help="Kept fraction of S at the start.")
    g.add_argument("--final_threshold", type=float, default=0.1,
                   help="Kept fraction of the sparse matrix S at the end, e.g. 0.20.")
    g.add_argument("--initial_warmup", type=int, default=1,
                   help="Steps (in units of --warmup_steps) fine-tuning only, before pruning starts.")
    g.add_argument("--final_warmup", type=int, default=3,
                   help="Steps (in units of --warmup_steps) at the end with the final kept fraction.")
    g.add_argument("--warmup_steps", type=int, default=6400, help="Unit of --initial_warmup/--final_warmup.")
    g.add_argument("--beta1", type=float, default=0.85, help="EMA coefficient of the importance score.")
    g.add_argument("--beta2", type=float, default=1.0,
                   help="Uncertainty term: 1 = none (paper), in (0,1) = EMA of |ipt-avg|, 2 = running variance.")
    g.add_argument("--deltaT", type=int, default=10, help="Prune every deltaT steps (and average over them).")
    g.add_argument("--structured_method", type=str, default="mean", choices=list(STRUCTURED_METHODS) + ["none"],
                   help="How scores of a row/column are aggregated; 'none' = unstructured.")
    g.add_argument("--structured_direction", type=str, default="row", choices=list(STRUCTURED_DIRECTIONS),
                   help="Prune rows, columns, or rows of q/k/v and columns elsewhere (row_col).")
    g.add_argument("--pruner_name", type=str, default="PLATON", choices=list(PRUNER_NAMES),
                   help="Importance score: PLATON (|S*grad| with EMA) or Magnitude (|S|).")
    g.add_argument("--svd", type=str, default="full", choices=list(SVD_METHODS),
                   help="SVD used by STEP 1: full (exact), randomized (torch.svd_lowrank) or auto.")
    g.add_argument("--eval_checkpoint", type=str, default=None,
                   help="Evaluate this LoSparse checkpoint (.bin/.safetensors); use with --num_train_epochs 0.")
    g.add_argument("--no_losparse", action="store_true",
                   help="Plain fine-tuning baseline: skip STEP 1-3 (no substitution, no pruning).")
    g.add_argument("--fsdp2", action="store_true",
                   help="Shard the model with PyTorch FSDP2 (fully_shard per transformer block, then the root) across "
                        "the processes torchrun/accelerate started, on GPUs or CPU (gloo): for models bigger than "
                        "one GPU. Accelerate's own FSDP2 config (--use_fsdp --fsdp_version 2) works too.")
    return parser
