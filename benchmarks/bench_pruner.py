"""Pruner overhead: a training step with and without ``pruner.update_and_pruning`` (STEP 3).

A DeBERTa-v3-base config (random weights, sequence classification) goes through STEP 1 (low-rank 0.05,
dense S, as during training) and trains with AdamW. Each step times the training part (forward, backward,
``optimizer.step``) and the pruner call separately; window steps (importance update only) and mask steps
(every ``--deltaT``: threshold and masking) are reported apart, with the overhead in % of a step. On CUDA,
the peak memory of a few steps with and without the pruner is reported too.

    python benchmarks/bench_pruner.py --quick                                   # CPU, seconds
    python benchmarks/bench_pruner.py --device cuda --batch-size 32 --seq-len 128 --dtype bf16

One JSON line per measurement (``what`` = env | pruner | pruner_memory).
"""
import argparse
import statistics
import time

import torch

import _common as C
from _common import utils


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="Encoder layers (default 12, quick 2).")
    p.add_argument("--batch-size", type=int, default=None, help="Default: cuda 32, cpu 4, quick 2.")
    p.add_argument("--seq-len", type=int, default=None, help="Default: cuda 128, cpu 64, quick 32.")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype (fp32: none).")
    p.add_argument("--deltaT", type=int, default=None, help="Mask every deltaT steps (default 10; cpu 5; quick 2).")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="Override the 128100-token vocabulary (quick: 8000; AdamW on the embeddings dominates "
                        "a CPU step of a shallow model).")
    p.add_argument("--windows", type=int, default=None, help="Timed windows of deltaT steps (default 3, quick 2).")
    args = C.setup(p.parse_args(argv), warmup=(2, 1), reps=(0, 0))
    cuda = args.device.type == "cuda"
    args.layers = args.layers or (2 if args.quick else 12)
    args.batch_size = args.batch_size or (2 if args.quick else 32 if cuda else 4)
    args.seq_len = args.seq_len or (32 if args.quick else 128 if cuda else 64)
    args.deltaT = args.deltaT or (2 if args.quick else 10 if cuda else 5)
    args.windows = args.windows or (2 if args.quick else 3)
    args.vocab_size = args.vocab_size or (8000 if args.quick else None)
    return args


def losparse_args(deltaT):
    return utils.add_losparse_args(argparse.ArgumentParser()).parse_args(
        ["--deltaT", str(deltaT), "--initial_warmup", "0", "--final_warmup", "0", "--warmup_steps", "1",
         "--final_threshold", "0.1"])


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
    steps = args.deltaT * (args.windows + 1)
    pruner = utils.Pruner(model, losparse_args(args.deltaT), total_step=100 * steps)

    def train_part():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()

    def timed(fn):
        C.sync(args.device)
        t0 = time.perf_counter()
        fn()
        C.sync(args.device)
        return 1e3 * (time.perf_counter() - t0)

    for _ in range(args.warmup):
        train_part()
        optimizer.zero_grad(set_to_none=True)
    train_ms, window_ms, mask_ms = [], [], []
    for step in range(1, steps + 1):
        train_ms.append(timed(train_part))
        ms = timed(lambda: pruner.update_and_pruning(model, step))
        optimizer.zero_grad(set_to_none=True)
        if step <= args.deltaT:  # the first window allocates the statistics
            continue
        (mask_ms if step % args.deltaT == 0 else window_ms).append(ms)
    train = statistics.median(train_ms[args.deltaT:])
    common = {"model": "deberta-v3-base", "layers": args.layers, "vocab_size": model.config.vocab_size,
              "shape": [args.batch_size, args.seq_len], "dtype": args.dtype, "device": str(args.device),
              "deltaT": args.deltaT}
    window, mask = statistics.median(window_ms), statistics.median(mask_ms)
    avg = (window * (args.deltaT - 1) + mask) / args.deltaT
    state = sum(t.numel() * t.element_size() for d in (pruner.ipt, pruner.exp_avg_ipt, pruner.exp_avg_unc)
                for t in d.values())
    sparse = sum(p.numel() for n, p in model.named_parameters() if pruner.whether_mask_para(n))
    C.emit("pruner", phase="train_step_without_pruner", ms=round(train, 3), steps=len(train_ms) - args.deltaT,
           **common)
    for phase, ms, n in (("window_step", window, len(window_ms)), ("mask_step", mask, len(mask_ms)),
                         ("average_step", avg, None)):
        C.emit("pruner", phase=phase, pruner_ms=round(ms, 3), step_with_pruner_ms=round(train + ms, 3),
               overhead_pct=round(100 * ms / train, 2), steps=n, **common)
    C.emit("pruner", phase="state", pruner_state_bytes=state, sparse_params=sparse, reduced_path=pruner.reduced,
           **common)
    if args.device.type == "cuda":
        def steps_fn(with_pruner):
            def run():
                for s in range(1, args.deltaT + 1):
                    train_part()
                    if with_pruner:
                        pruner.update_and_pruning(model, s)
                    optimizer.zero_grad(set_to_none=True)
            return run
        without = C.peak_memory(steps_fn(False), args.device)
        with_ = C.peak_memory(steps_fn(True), args.device)
        C.emit("pruner_memory", without_pruner=without, with_pruner=with_,
               overhead_pct=round(100 * (with_["peak_bytes"] / without["peak_bytes"] - 1), 2), **common)


if __name__ == "__main__":
    main()
