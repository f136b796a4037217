"""Pruner overhead: a training step with and without ``pruner.update_and_pruning`` (STEP 3).

A DeBERTa-v3-base config (random weights, sequence classification) goes through STEP 1 (low-rank 0.05,
dense S, as during training) and trains with AdamW. The pruner's schedule spans exactly the run: the
first window of ``--deltaT`` steps is untimed (it allocates the statistics), the ``--reps`` windows after it
are timed, and the kept fraction of S falls along the cubic schedule to ``--final-threshold`` at the last
step, so the timed mask steps really mask. Each step times the training part (forward, backward,
``optimizer.step``) and the pruner call separately; window steps (importance update only) and mask steps
(threshold and masking) are reported apart, with the overhead in % of a step. One window step and one mask
step of the untimed first window run under a ``TorchDispatchMode`` (``_opcount.OpCounter``) that counts the
aten ops they dispatch, and those that are kernels (not views), per step and per masked matrix. On CUDA, the peak memory of one window of steps without the
pruner (measured before the pruner exists) and with it is reported too.

    python benchmarks/bench_pruner.py --quick                                   # CPU, seconds
    python benchmarks/bench_pruner.py --device cuda --batch-size 32 --seq-len 128 --dtype bf16

One JSON line per measurement (``what`` = env | pruner | pruner_ops | pruner_memory).
"""
import argparse
import statistics
import time

import torch

import _common as C
from _common import utils
from _opcount import OpCounter


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="Encoder layers (default 12, quick 2).")
    p.add_argument("--batch-size", type=int, default=None, help="Default: cuda 32, cpu 4, quick 2.")
    p.add_argument("--seq-len", type=int, default=None, help="Default: cuda 128, cpu 64, quick 32.")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (fp32: none).")
    p.add_argument("--deltaT", type=int, default=None,
                   help="Mask every deltaT steps, at least 3 (default cuda 10, cpu 5, quick 3).")
    p.add_argument("--final-threshold", type=float, default=0.1,
                   help="Kept fraction of S reached at the last timed step (--final_threshold's default).")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="Override the 128100-token vocabulary (quick: 8000; AdamW on the embeddings dominates "
                        "a CPU step of a shallow model).")
    args = C.setup(p.parse_args(argv), warmup=(2, 1), reps=(3, 2))
    cuda = args.device.type == "cuda"
    args.layers = args.layers or (2 if args.quick else 12)
    args.batch_size = args.batch_size or (2 if args.quick else 32 if cuda else 4)
    args.seq_len = args.seq_len or (32 if args.quick else 128 if cuda else 64)
    args.deltaT = args.deltaT or (3 if args.quick else 10 if cuda else 5)
    args.vocab_size = args.vocab_size or (8000 if args.quick else None)
    if args.deltaT < 3:
        p.error(f"--deltaT must be >= 3 (the untimed first window holds the counted window and mask steps), "
                f"got {args.deltaT}")
    if args.reps < 1:
        p.error(f"--reps must be >= 1 (timed windows of --deltaT steps), got {args.reps}")
    if not 0 < args.final_threshold < 1:
        p.error(f"--final-threshold must be in (0, 1), got {args.final_threshold}")
    return args


def losparse_args(deltaT, final_threshold):
    """Cubic from step 1 (no initial warm-up) to the step before the last, final threshold at the last step."""
    return utils.add_losparse_args(argparse.ArgumentParser()).parse_args(
        ["--deltaT", str(deltaT), "--initial_warmup", "0", "--final_warmup", "1", "--warmup_steps", "1",
         "--final_threshold", str(final_threshold)])


def main(argv=None):
    args = parse_args(argv)
    C.emit_env(args, "bench_pruner")
    model = C.build_model("deberta", args.layers, head="seq_cls", seed=args.seed, vocab_size=args.vocab_size)
    utils.substitute_layer_weights(model, C.ALLOW_NAME, C.BLOCK_NAME, parameter_ratio=C.LOW_RANK_RATIO,
                                   svd="auto", log_level="IGNORE")
    model.to(args.device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = C.model_inputs("deberta", args.batch_size, args.seq_len, model.config.vocab_size, args.device)
    batch["labels"] = torch.randint(0, 2, (args.batch_size,), device=args.device)
    autocast = torch.autocast(args.device.type, dtype=C.DTYPES[args.dtype], enabled=args.dtype != "fp32")
    total_steps = args.deltaT * (args.reps + 1)
    common = {"model": "deberta-v3-base", "layers": args.layers, "vocab_size": model.config.vocab_size,
              "shape": [args.batch_size, args.seq_len], "dtype": args.dtype, "device": str(args.device),
              "deltaT": args.deltaT}

    def train_part():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()

    def timed(fn):
        C.sync(args.device)
        t0 = time.perf_counter()
        out = fn()
        C.sync(args.device)
        return 1e3 * (time.perf_counter() - t0), out

    for _ in range(args.warmup):
        train_part()
        optimizer.zero_grad(set_to_none=True)

    memory_without = None
    if args.device.type == "cuda":  # before the pruner exists: its statistics must not count here
        def window_without():
            for _ in range(args.deltaT):
                train_part()
                optimizer.zero_grad(set_to_none=True)
        memory_without = C.peak_memory(window_without, args.device)

    pruner = utils.Pruner(model, losparse_args(args.deltaT, args.final_threshold), total_step=total_steps)
    masked = pruner._masked_params(model)
    window_step_counted, mask_step_counted = args.deltaT - 1, args.deltaT
    ops = {}
    train_ms, window_ms, mask_ms, mask_thresholds = [], [], [], []

    def first_window():
        for step in range(1, args.deltaT + 1):
            train_part()
            if step in (window_step_counted, mask_step_counted) and step > 1:
                with OpCounter() as counter:
                    _, mask_threshold = pruner.update_and_pruning(model, step)
                ops["mask_step" if mask_threshold is not None else "window_step"] = counter
            else:
                pruner.update_and_pruning(model, step)
            optimizer.zero_grad(set_to_none=True)

    # First window, untimed: allocates the statistics (peak memory on CUDA), holds the op-counted steps.
    memory_with = C.peak_memory(first_window, args.device) if args.device.type == "cuda" else first_window()
    for step in range(args.deltaT + 1, total_steps + 1):
        ms, _ = timed(train_part)
        train_ms.append(ms)
        ms, (threshold, mask_threshold) = timed(lambda: pruner.update_and_pruning(model, step))
        optimizer.zero_grad(set_to_none=True)
        if mask_threshold is None:
            window_ms.append(ms)
        else:
            mask_ms.append(ms)
            mask_thresholds.append(round(threshold, 4))
    kept = sum(int((p != 0).any(dim=1).sum()) * p.shape[1] for _, p in masked) / sum(p.numel() for _, p in masked)

    train = statistics.median(train_ms)
    window, mask = statistics.median(window_ms), statistics.median(mask_ms)
    avg = (sum(window_ms) + sum(mask_ms)) / (len(window_ms) + len(mask_ms))
    C.emit("pruner", phase="train_step_without_pruner", ms=round(train, 3), steps=len(train_ms), **common)
    for phase, ms, n in (("window_step", window, len(window_ms)), ("mask_step", mask, len(mask_ms)),
                         ("average_step", avg, len(window_ms) + len(mask_ms))):
        C.emit("pruner", phase=phase, pruner_ms=round(ms, 3), step_with_pruner_ms=round(train + ms, 3),
               overhead_pct=round(100 * ms / train, 2), steps=n, **common)
    saved = pruner.state_dict()  # every statistic the pruner keeps, in its public layout
    state = sum(t.numel() * t.element_size() for d in ("ipt", "exp_avg_ipt", "exp_avg_unc") for t in saved[d].values())
    C.emit("pruner", phase="state", pruner_state_bytes=state, sparse_params=sum(p.numel() for _, p in masked),
           masked_matrices=len(masked), reduced_path=pruner.reduced, mask_thresholds=mask_thresholds,
           final_threshold=args.final_threshold, kept_fraction_end=round(kept, 4), **common)
    for phase in ("window_step", "mask_step"):
        c = ops[phase]
        C.emit("pruner_ops", phase=phase, step=window_step_counted if phase == "window_step" else mask_step_counted,
               aten_ops=c.total, kernels=c.kernels, masked_matrices=len(masked),
               ops_per_masked_matrix=round(c.total / len(masked), 2),
               kernels_per_masked_matrix=round(c.kernels / len(masked), 2), top_ops=dict(c.counts.most_common(12)),
               **common)
    if args.device.type == "cuda":
        C.emit("pruner_memory", without_pruner=memory_without, with_pruner=memory_with,
               overhead_pct=round(100 * (memory_with["peak_bytes"] / memory_without["peak_bytes"] - 1), 2),
               **common)


if __name__ == "__main__":
    main()
