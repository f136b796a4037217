"""STEP 1 initialisation: full vs randomized vs auto SVD, substitution time and extra error.

Substitutes the 72 linears of a DeBERTa-v3-base-sized encoder (per layer q, k, v, o 768x768, ffn 768->3072
and 3072->768) at low-rank ratio 0.05 with each ``svd`` method, and reports the wall time of
``substitute_layer_weights`` and the extra Frobenius error of ``W - L R`` over the exact truncated SVD
(``||W - LR|| / ||W - W_r|| - 1``; target <= 1 %). Two kinds of random matrices: ``gaussian`` (the
``nn.Linear`` initialisation, a flat spectrum) and ``powerlaw`` (singular values ``1/i``, like trained
weights). ``--llama`` adds one 11008x4096 matrix at rank 256.

    python benchmarks/bench_svd.py --quick
    python benchmarks/bench_svd.py --device cuda --llama

One JSON line per measurement (``what`` = env | svd | svd_llama).
"""
import copy
import time

import torch
from torch import nn

import _common as C
from _common import utils
from bench_inference import LinearStack

METHODS = ("full", "randomized", "auto")


def parse_args(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="Encoder layers, 6 linears each (default 12, quick 2).")
    p.add_argument("--spectra", type=C.csv(str), default=None, help="gaussian,powerlaw (quick: powerlaw).")
    p.add_argument("--methods", type=C.csv(str), default=list(METHODS))
    p.add_argument("--llama", action="store_true", help="Also one 11008x4096 matrix at rank 256.")
    args = C.setup(p.parse_args(argv), warmup=(1, 0), reps=(1, 1))
    args.layers = args.layers or (2 if args.quick else 12)
    args.spectra = args.spectra or (["powerlaw"] if args.quick else ["gaussian", "powerlaw"])
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


def make_stack(layers, spectrum, seed):
    torch.manual_seed(seed)
    stack = LinearStack(layers)
    if spectrum == "powerlaw":
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in stack.modules():
                if isinstance(m, nn.Linear):
                    powerlaw_(m.weight, g)
    elif spectrum != "gaussian":
        raise ValueError(f"unknown spectrum {spectrum!r}")
    return stack


def substitute(stack, method, device):
    model = copy.deepcopy(stack).to(device)
    C.sync(device)
    t0 = time.perf_counter()
    rep = utils.substitute_layer_weights(model, ["q", "k", "v", "o", "ffn1", "ffn2"], [],
                                         parameter_ratio=C.LOW_RANK_RATIO, svd=method, log_level="IGNORE")
    C.sync(device)
    seconds = time.perf_counter() - t0
    errors = {r["name"]: float(model.get_submodule(r["name"]).sparse.weight.detach().double().norm()) for r in rep}
    return seconds, errors, rep


def bench_stack(args):
    for spectrum in args.spectra:
        stack = make_stack(args.layers, spectrum, args.seed)
        if args.warmup:  # load LAPACK / cuSOLVER once
            substitute(make_stack(1, "gaussian", args.seed), "full", args.device)
            substitute(make_stack(1, "gaussian", args.seed), "randomized", args.device)
        results = {m: substitute(stack, m, args.device) for m in dict.fromkeys(("full", *args.methods))}
        exact = results["full"][1]  # ||W - W_r|| of the exact truncated SVD
        for method in args.methods:
            seconds, errors, rep = results[method]
            extra = {n: errors[n] / exact[n] - 1 for n in errors}
            by_shape = {}
            for r in rep:
                key = f"{r['out_features']}x{r['in_features']}@r{r['rank']}"
                by_shape[key] = max(by_shape.get(key, float("-inf")), round(100 * extra[r["name"]], 4))
            oversample = lambda r: max(10, r // 2)  # noqa: E731  (low_rank_decomposition's default)
            n_rand = sum(method == "randomized" or (method == "auto" and utils._use_randomized(
                "auto", r["out_features"], r["in_features"], r["rank"], oversample(r["rank"]))) for r in rep)
            C.emit("svd", spectrum=spectrum, method=method, matrices=len(rep), dtype="fp32", device=str(args.device),
                   seconds=round(seconds, 3), speedup_vs_full=round(results["full"][0] / seconds, 2),
                   extra_error_pct_mean=round(100 * sum(extra.values()) / len(extra), 4),
                   extra_error_pct_max=round(100 * max(extra.values()), 4), extra_error_pct_max_by_shape=by_shape,
                   randomized_matrices=n_rand)


def bench_llama(args):
    H, W, rank = 11008, 4096, 256
    g = torch.Generator().manual_seed(args.seed)
    weight = torch.empty(H, W)
    nn.init.kaiming_uniform_(weight, a=5 ** 0.5, generator=g)
    powerlaw_(weight, g)
    weight = weight.to(args.device)
    ratio = (rank - 0.5) * (H + W) / (H * W)  # ceil(ratio * H * W / (H + W)) == rank
    res = {}
    for method in dict.fromkeys(("full", *args.methods)):
        C.sync(args.device)
        t0 = time.perf_counter()
        L, R = utils.low_rank_decomposition(weight, parameter_ratio=ratio, svd=method, log_level="IGNORE")
        C.sync(args.device)
        res[method] = (time.perf_counter() - t0, float((weight - L @ R).double().norm()), L.shape[1])
    for method in args.methods:
        seconds, err, r = res[method]
        C.emit("svd_llama", spectrum="powerlaw", method=method, shape=[H, W], rank=r, dtype="fp32",
               device=str(args.device), seconds=round(seconds, 3), speedup_vs_full=round(res["full"][0] / seconds, 2),
               extra_error_pct=round(100 * (err / res["full"][1] - 1), 4))


def main(argv=None):
    args = parse_args(argv)
    C.emit_env(args, "bench_svd")
    bench_stack(args)
    if args.llama:
        bench_llama(args)


if __name__ == "__main__":
    main()
