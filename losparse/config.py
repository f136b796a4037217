"""The LoSparse hyperparameters: their allowed values and one check of them all (``validate_losparse_args``).

Read from an ``argparse.Namespace`` or a mapping (``config_get``); shared by the ``Pruner`` (which checks its
schedule on construction) and the scripts' flags (``losparse.cli``).
"""

SVD_METHODS = ("full", "randomized", "auto")
PRUNER_NAMES = ("PLATON", "Magnitude")
STRUCTURED_METHODS = ("mean", "sum", "max", "min")
STRUCTURED_DIRECTIONS = ("row", "col", "row_col")
SCHEDULE_KEYS = ("beta1", "beta2", "deltaT", "initial_threshold", "final_threshold", "initial_warmup", "final_warmup",
                  "warmup_steps")


def config_get(args, key, default=None):
    if isinstance(args, dict):
        return args.get(key, default)
    return getattr(args, key, default)


def validate_losparse_args(args, total_step=None, check_all=True):
    """Raise ``ValueError`` naming the flag when a LoSparse flag is out of range.

    ``total_step`` (the number of optimizer steps) also checks that the warm-ups fit in the run.
    """
    get = lambda k, d=None: config_get(args, k, d)  # noqa: E731
    if get("no_losparse", False) and total_step is None:
        return
    checks = []
    if check_all:
        checks.append(("low_rank_parameter_ratio", get("low_rank_parameter_ratio"), lambda v: 0 < v <= 1, "in (0, 1]"))
    checks += [
        ("initial_threshold", get("initial_threshold"), lambda v: 0 < v <= 1, "in (0, 1]"),
        ("final_threshold", get("final_threshold"), lambda v: 0 < v <= 1, "in (0, 1]"),
        ("deltaT", get("deltaT"), lambda v: v >= 1 and int(v) == v, "an integer >= 1"),
        ("beta1", get("beta1"), lambda v: 0 <= v < 1, "in [0, 1)"),
        ("beta2", get("beta2"), lambda v: v >= 0, ">= 0 (1 = no uncertainty, (0,1) = EMA, 2 = variance)"),
        ("warmup_steps", get("warmup_steps"), lambda v: v >= 0, ">= 0"),
        ("initial_warmup", get("initial_warmup"), lambda v: v >= 0, ">= 0"),
        ("final_warmup", get("final_warmup"), lambda v: v >= 0, ">= 0"),
    ]
    for flag, value, ok, allowed in checks:
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
            raise ValueError(f"--{flag} must be {allowed}, got {value!r}")
    fi, ii = get("final_threshold"), get("initial_threshold")
    if fi is not None and ii is not None and fi > ii:
        raise ValueError(f"--final_threshold ({fi}) must be <= --initial_threshold ({ii})")
    sm, sd = get("structured_method"), get("structured_direction")
    if sm is not None and sm not in STRUCTURED_METHODS + ("none",):
        raise ValueError(f"--structured_method must be one of {STRUCTURED_METHODS + ('none',)}, got {sm!r}")
    if sd is not None and sd not in STRUCTURED_DIRECTIONS:
        raise ValueError(f"--structured_direction must be one of {STRUCTURED_DIRECTIONS}, got {sd!r}")
    if get("svd") is not None and get("svd") not in SVD_METHODS:
        raise ValueError(f"--svd must be one of {SVD_METHODS}, got {get('svd')!r}")
    if total_step is not None and not get("no_losparse", False):
        warm = (get("initial_warmup") + get("final_warmup")) * get("warmup_steps")
        if total_step < 1:
            raise ValueError(f"the run has {total_step} optimizer steps; LoSparse pruning needs at least one")
        if warm >= total_step:
            raise ValueError(
                f"--initial_warmup ({get('initial_warmup')}) + --final_warmup ({get('final_warmup')}) times "
                f"--warmup_steps ({get('warmup_steps')}) = {warm} warm-up steps, but the run has only {total_step} "
                "optimizer steps: lower --warmup_steps or train longer")
