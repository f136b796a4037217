"""STEP 1 initialisation: full vs randomized vs auto SVD, substitution time and extra error.

Substitutes the 72 linears of a DeBERTa-v3-base-sized encoder (per layer q, k, v, o 768x768, ffn 768->3072
and 3072->768) at low-rank ratio 0.05 with each ``svd`` method, and reports the wall time of
``substitute_layer_weights`` (median and min of ``--reps`` timed calls after ``--warmup`` untimed ones) and
the extra Frobenius error of ``W - L R`` over the exact truncated SVD (``||W - LR|| / ||W - W_r|| - 1``;
target <= 1 %). The reference ``||W - W_r||`` does not use ``utils``: it is ``sqrt(sum_{i > r} s_i^2)``
from ``torch.linalg.svdvals`` of ``W`` in float64, and ``W - L R`` is formed in float64 from the ``L``, ``R``
the method wrote. Two kinds of random matrices: ``gaussian`` (the ``nn.Linear`` initialisation, a flat
spectrum) and ``powerlaw`` (singular values ``1/i``, like trained weights). ``--llama`` adds one 11008x4096
matrix at rank 256.

    python benchmarks/bench_svd.py --quick
    python benchmarks/bench_svd.py --device cuda --llama

One JSON line per measurement (``what`` = env | svd | svd_llama).
"""
import copy
import statistics
import time

import torch
from torch import nn

import _common as C
from _common import utils
import losparse.decomposition  # noqa: E402  (the repository root is on sys.path once _common is imported)

METHODS = ("full", "randomized", "auto")
NAMES = ["q", "k", "v", "o", "ffn1", "ffn2"]


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="Encoder layers, 6 linears each (default 12, quick 2).")
    p.add_argument("--spectra", type=C.csv(str), default=None, help="gaussian,powerlaw (quick: powerlaw).")
    p.add_argument("--methods", type=C.csv(str), default=list(METHODS))
    p.add_argument("--llama", action="store_true", help="Also one 11008x4096 matrix at rank 256.")
    p.add_argument("--hidden", type=int, default=768, help="Hidden size of the stack (smoke tests: smaller).")
    p.add_argument("--ffn", type=int, default=3072, help="FFN size of the stack.")
    args = C.setup(p.parse_args(argv), warmup=(1, 0), reps=(3, 1))
    args.layers = args.layers or (2 if args.quick else 12)
    args.spectra = args.spectra or (["powerlaw"] if args.quick else ["gaussian", "powerlaw"])
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        p.error(f"--methods must be a comma-separated subset of {','.join(METHODS)}, got {bad or 'nothing'}")
    if args.reps < 1 or args.warmup < 0:
        p.error(f"--reps must be >= 1 and --warmup >= 0, got {args.reps} and {args.warmup}")
    return args


def powerlaw_(weight, generator):
    """Overwrite ``weight`` with ``U diag(1/i) V^T`` (random orthonormal U, V), scaled like the original."""
    H, W = weight.shape
    n = min(H, W)
    U = torch.linalg.qr(torch.randn(H, n, generator=generator))[0]
    V = torch.linalg.qr(torch.randn(W, n, generator=generator))[0]
    s = 1.0 / torch.arange(1, n + 1, dtype=torch.float32)
    w = (U * s) @ V.T
    weight.copy_(w * (weight.norm() / w.norm()))


def make_stack(layers, spectrum, seed, hidden=768, ffn=3072):
    """``layers`` blocks of q, k, v, o (768x768), ffn1 (768->3072), ffn2 (3072->768) ``nn.Linear``s (other
    ``hidden`` / ``ffn`` sizes for smoke tests)."""
    torch.manual_seed(seed)
    stack = nn.ModuleList()
    for _ in range(layers):
        block = nn.Module()
        for name in NAMES:
            d_in, d_out = {"ffn1": (hidden, ffn), "ffn2": (ffn, hidden)}.get(name, (hidden, hidden))
            setattr(block, name, nn.Linear(d_in, d_out))
        stack.append(block)
    if spectrum == "powerlaw":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in stack.modules():
                if isinstance(m, nn.Linear):
                    powerlaw_(m.weight, g)
    elif spectrum != "gaussian":
        raise ValueError(f"unknown spectrum {spectrum!r}")
    return stack


def truncation_error(weight, rank):
    """``||W - W_r||_F`` of the exact rank-``rank`` truncation, from float64 singular values (no ``utils``)."""
    s = torch.linalg.svdvals(weight.detach().double())
    return float(s[rank:].pow(2).sum().sqrt())


def substitute(stack, method, device):
    model = copy.deepcopy(stack).to(device)
    C.sync(device)
    t0 = time.perf_counter()
    rep = utils.substitute_layer_weights(model, NAMES, [], parameter_ratio=C.LOW_RANK_RATIO, svd=method,
                                         log_level="IGNORE")
    C.sync(device)
    return time.perf_counter() - t0, model, rep


def timed_substitutions(stack, method, args):
    """Warm-up, then ``--reps`` timed substitutions; returns (times in s, the last substituted model, report)."""
    for _ in range(args.warmup):
        substitute(stack, method, args.device)
    times = []
    for _ in range(args.reps):
        seconds, model, rep = substitute(stack, method, args.device)
        times.append(seconds)
    return times, model, rep


def bench_stack(args):
    for spectrum in args.spectra:
        stack = make_stack(args.layers, spectrum, args.seed, args.hidden, args.ffn)
        rep0 = utils.substitute_layer_weights(copy.deepcopy(stack), NAMES, [], parameter_ratio=C.LOW_RANK_RATIO,
                                              do_svd=False, log_level="IGNORE")
        ranks = {r["name"]: r["rank"] for r in rep0}
        exact = {n: truncation_error(stack.get_submodule(n).weight, ranks[n]) for n in ranks}
        norms = {n: float(stack.get_submodule(n).weight.detach().double().norm()) for n in ranks}
        timings = {}
        for method in args.methods:
            times, model, rep = timed_substitutions(stack, method, args)
            timings[method] = times
            extra, by_shape, exact_by_shape = {}, {}, {}
            for r in rep:
                n = r["name"]
                layer = model.get_submodule(n)
                assert layer.reduced_rank == ranks[n]
                lr = layer.left.weight.detach().double().cpu() @ layer.right.weight.detach().double().cpu()
                err = float((stack.get_submodule(n).weight.detach().double() - lr).norm())
                extra[n] = err / exact[n] - 1
                key = f"{r['out_features']}x{r['in_features']}@r{r['rank']}"
                by_shape[key] = max(by_shape.get(key, float("-inf")), round(100 * extra[n], 4))
                exact_by_shape[key] = round(exact[n] / norms[n], 6)
            oversample = lambda r: max(10, r // 2)  # noqa: E731  (low_rank_decomposition's default)
            n_rand = sum(method == "randomized" or (method == "auto" and losparse.decomposition.use_randomized(
                "auto", r["out_features"], r["in_features"], r["rank"], oversample(r["rank"]))) for r in rep)
            fields = {}
            if "full" in timings:
                fields["speedup_vs_full"] = round(statistics.median(timings["full"]) / statistics.median(times), 2)
            C.emit("svd", spectrum=spectrum, method=method, matrices=len(rep), dtype="fp32", device=str(args.device),
                   seconds=round(statistics.median(times), 3), seconds_min=round(min(times), 3), reps=len(times),
                   warmup=args.warmup, **fields,
                   extra_error_pct_mean=round(100 * sum(extra.values()) / len(extra), 4),
                   extra_error_pct_max=round(100 * max(extra.values()), 4), extra_error_pct_max_by_shape=by_shape,
                   exact_rel_error_by_shape=exact_by_shape, randomized_matrices=n_rand)


def bench_llama(args):
    H, W, rank = 11008, 4096, 256
    g = torch.Generator().manual_seed(args.seed)
    weight = torch.empty(H, W)
    nn.init.kaiming_uniform_(weight, a=5 ** 0.5, generator=g)
    powerlaw_(weight, g)
    weight = weight.to(args.device)
    ratio = (rank - 0.5) * (H + W) / (H * W)  # ceil(ratio * H * W / (H + W)) == rank
    exact = truncation_error(weight, rank)
    res = {}
    for method in args.methods:
        times = []
        for i in range(args.warmup + args.reps):
            C.sync(args.device)
            t0 = time.perf_counter()
            L, R = utils.low_rank_decomposition(weight, parameter_ratio=ratio, svd=method, log_level="IGNORE")
            C.sync(args.device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        assert L.shape[1] == rank
        err = float((weight.double() - L.double() @ R.double()).norm())
        res[method] = times
        fields = {}
        if "full" in res:
            fields["speedup_vs_full"] = round(statistics.median(res["full"]) / statistics.median(times), 2)
        C.emit("svd_llama", spectrum="powerlaw", method=method, shape=[H, W], rank=rank, dtype="fp32",
               device=str(args.device), seconds=round(statistics.median(times), 3), seconds_min=round(min(times), 3),
               reps=len(times), warmup=args.warmup, **fields, extra_error_pct=round(100 * (err / exact - 1), 4),
               exact_rel_error=round(exact / float(weight.double().norm()), 6))


def main(argv=None):
    args = parse_args(argv)
    C.emit_env(args, "bench_svd")
    bench_stack(args)
    if args.llama:
        bench_llama(args)


if __name__ == "__main__":
    main()
