"""Inference speed and size: dense vs original-style (uncompacted LoSparse) vs compacted.

Models are base-size configs with random weights (BERT-base, DeBERTa-v3-base, BART-base). A "pruned"
model is made without training: low-rank 0.05 plus the rows of each S with the largest norm, so that
the total kept fraction is the target ratio; then ``utils.prune`` compacts it. Also times the 72 linears
of a DeBERTa-v3-base-sized encoder (per layer q, k, v, o 768x768, ffn 768->3072 and 3072->768) as a stack,
and checks that ``export_compact`` writes the predicted number of bytes and reloads to the same outputs.

    python benchmarks/bench_inference.py --quick                   # CPU, a minute or two
    python benchmarks/bench_inference.py --device cuda --dtypes bf16,fp16,fp32 --batch-sizes 1,8,32

One JSON line per measurement (``what`` = env | inference | export | stack72).
"""
import copy
import tempfile

import torch
from torch import nn

import _common as C
from _common import utils


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--models", type=C.csv(str), default=None, help="bert,deberta,bart (quick: bert).")
    p.add_argument("--ratios", type=C.csv(float), default=None,
                   help="Total kept fractions, low-rank 0.05 included (quick: 0.2).")
    p.add_argument("--batch-sizes", type=C.csv(int), default=None, help="Default 1,8 (cuda 1,8,32; quick 1,8).")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtypes", type=C.csv(str), default=None, help="fp32,bf16 (quick: fp32).")
    p.add_argument("--layers", type=int, default=None, help="Override the number of layers (smoke tests).")
    p.add_argument("--vocab-size", type=int, default=None, help="Override the vocabulary (smoke tests).")
    p.add_argument("--stack-tokens", type=int, default=None, help="Tokens of the 72-linear stack (cuda 16384, "
                   "cpu 2048, quick 512).")
    p.add_argument("--stack-ratios", type=C.csv(float), default=None, help="Default: --ratios.")
    p.add_argument("--skip-models", action="store_true", help="Only the 72-linear stack.")
    p.add_argument("--skip-stack", action="store_true", help="Only the models.")
    p.add_argument("--no-export", action="store_true", help="Skip export_compact size and reload checks.")
    args = C.setup(p.parse_args(argv), warmup=(2, 1), reps=(7, 3))
    cuda = args.device.type == "cuda"
    args.models = args.models or (["bert"] if args.quick else ["bert", "deberta", "bart"])
    args.ratios = args.ratios or ([0.2] if args.quick else [0.1, 0.2, 0.4])
    args.batch_sizes = args.batch_sizes or ([1, 8] if args.quick or not cuda else [1, 8, 32])
    args.dtypes = args.dtypes or (["fp32"] if args.quick else ["fp32", "bf16"])
    args.stack_tokens = args.stack_tokens or (512 if args.quick else 16384 if cuda else 2048)
    args.stack_ratios = args.stack_ratios or args.ratios
    return args


def linear_summary(model):
    rep = utils.compression_report(model)
    return {"linears": len(rep.layers), "effective_ratio": round(rep.effective_ratio, 4)}


def bench_export(args, name, ratio, compact, inputs):
    """Write the compact fp32 model, compare the file to the predicted size, reload and compare outputs."""
    rep = utils.compression_report(compact)
    idx_elems = sum(m.nonzero_idx.numel() for m in compact.modules()
                    if isinstance(m, utils.LinearLoSparse) and m.is_compacted)
    predicted = 4 * rep.model_params + 8 * idx_elems
    with tempfile.TemporaryDirectory() as d:
        utils.export_compact(compact, d)
        rep_files = utils.compression_report(compact, export_dir=d)
        actual = rep_files.files[utils.COMPACT_WEIGHTS]
        reloaded = utils.load_compact(d, device=args.device)
        with torch.no_grad():
            a, b = compact(**inputs)[0], reloaded(**inputs)[0]
    C.emit("export", model=name, ratio=ratio, dtype="fp32", device=str(args.device), predicted_bytes=predicted,
           actual_bytes=actual, diff_pct=round(100 * (actual - predicted) / predicted, 3),
           dense_equivalent_bytes=4 * rep.model_params_dense_equivalent,
           size_vs_dense=round(actual / (4 * rep.model_params_dense_equivalent), 4),
           reload_max_abs_diff=float((a - b).abs().max()), **linear_summary(compact))


def bench_models(args):
    for name in args.models:
        dense = C.build_model(name, args.layers, seed=args.seed, vocab_size=args.vocab_size).eval()
        original, compact = C.losparse_variants(dense, args.ratios)
        vocab = dense.config.vocab_size
        if not args.no_export:
            small = C.model_inputs(name, 2, 16, vocab, args.device)
            for ratio, m in compact.items():
                bench_export(args, name, ratio, m.to(args.device), small)
        for dt in args.dtypes:
            dtype = C.DTYPES[dt]
            variants = {"dense": dense, "original": original}
            variants.update({f"compact@{r:g}": m for r, m in compact.items()})
            variants = {k: m.to(device=args.device, dtype=dtype).eval() for k, m in variants.items()}
            params = {k: C.num_params(m) for k, m in variants.items()}
            for batch in args.batch_sizes:
                inputs = C.model_inputs(name, batch, args.seq_len, vocab, args.device)
                with torch.inference_mode():
                    fns = {k: (lambda m=m: m(**inputs)) for k, m in variants.items()}
                    res = C.time_variants(fns, args.device, args.warmup, args.reps)
                    mem = {k: C.peak_memory(f, args.device) for k, f in fns.items()}
                tokens = batch * args.seq_len
                for k, r in res.items():
                    variant, _, ratio = k.partition("@")
                    C.emit("inference", model=name, variant=variant, ratio=float(ratio) if ratio else None,
                           shape=[batch, args.seq_len], dtype=dt, device=str(args.device), ms=r["ms"],
                           ms_min=r["ms_min"], tokens_per_s=round(1e3 * tokens / r["ms"], 1), params=params[k],
                           speedup_vs_dense=round(res["dense"]["ms"] / r["ms"], 3),
                           speedup_vs_original=round(res["original"]["ms"] / r["ms"], 3),
                           **({"peak_memory": mem[k]} if mem[k] else {}))
            del variants
        del dense, original, compact


class _Block(nn.Module):
    def __init__(self, hidden=768, ffn=3072):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.ffn1, self.ffn2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)


class LinearStack(nn.Module):
    """The 72 linears of a DeBERTa-v3-base-sized encoder, each applied to its own input (no chaining)."""

    def __init__(self, layers=12):
        super().__init__()
        self.layers = nn.ModuleList(_Block() for _ in range(layers))

    def forward(self, x, h):
        for b in self.layers:
            for lin in (b.q, b.k, b.v, b.o, b.ffn1):
                lin(x)
            b.ffn2(h)


def bench_stack(args):
    layers = args.layers or 12
    torch.manual_seed(args.seed)
    dense = LinearStack(layers).eval()
    original, compact = C.losparse_variants(dense, args.stack_ratios, allow_name=["q", "k", "v", "o", "ffn1", "ffn2"],
                                            block_name=[])
    dense_flops = 2 * args.stack_tokens * sum(m.in_features * m.out_features for m in dense.modules()
                                              if isinstance(m, nn.Linear))
    for dt in args.dtypes:
        dtype = C.DTYPES[dt]
        variants = {"dense": dense, "original": original}
        variants.update({f"compact@{r:g}": m for r, m in compact.items()})
        variants = {k: copy.deepcopy(m).to(device=args.device, dtype=dtype) for k, m in variants.items()}
        x = torch.randn(args.stack_tokens, 768, device=args.device, dtype=dtype)
        h = torch.randn(args.stack_tokens, 3072, device=args.device, dtype=dtype)
        with torch.inference_mode():
            fns = {k: (lambda m=m: m(x, h)) for k, m in variants.items()}
            res = C.time_variants(fns, args.device, args.warmup, args.reps)
            mem = {k: C.peak_memory(f, args.device) for k, f in fns.items()}
        for k, r in res.items():
            variant, _, ratio = k.partition("@")
            C.emit("stack72", variant=variant, ratio=float(ratio) if ratio else None, linears=6 * layers,
                   shape=[args.stack_tokens, 768], dtype=dt, device=str(args.device), ms=r["ms"], ms_min=r["ms_min"],
                   params=C.num_params(variants[k]), dense_equivalent_tflops=round(dense_flops / r["ms"] / 1e9, 3),
                   speedup_vs_dense=round(res["dense"]["ms"] / r["ms"], 3),
                   speedup_vs_original=round(res["original"]["ms"] / r["ms"], 3),
                   **({"peak_memory": mem[k]} if mem[k] else {}))


def main(argv=None):
    args = parse_args(argv)
    C.emit_env(args, "bench_inference")
    if not args.skip_models:
        bench_models(args)
    if not args.skip_stack:
        bench_stack(args)


if __name__ == "__main__":
    main()
