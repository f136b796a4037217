"""Count the aten ops a callable runs (each one a kernel launch on a GPU) and check GEMM alignment.

``TorchDispatchMode`` sees every op below autograd, forward and backward alike, on any device, so the
counts measured on a CPU are those a GPU would launch.
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

GEMM_OPS = {"mm", "addmm", "bmm", "baddbmm", "_addmm_activation"}
GEMV_OPS = {"mv", "addmv", "addmv_"}  # matrix-vector products: (op, rows, inner, 1)
VIEW_OPS = {"view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select",
            "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind",
            "chunk", "narrow", "unflatten", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as c: ...`` then ``c.total``, ``c.kernels`` (ops that are not views), ``c.counts``,
    ``c.gemms`` (``(op, m, k, n, dtype)`` of every matrix product, matrix-vector ones with n = 1)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.gemms = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if name == "linear":  # a kernel of its own in some modes (CPU inference mode): x (.., k) W^T, W (n x k)
            x, w = args[0], args[1]
            self.gemms.append((name, x.numel() // max(1, x.shape[-1]), x.shape[-1], w.shape[0], x.dtype))
        elif name in GEMV_OPS:
            a = args[0] if name == "mv" else args[1]
            self.gemms.append((name, a.shape[0], a.shape[1], 1, a.dtype))
        elif name in GEMM_OPS:
            a, b = (args[1], args[2]) if name in ("addmm", "baddbmm", "_addmm_activation") else (args[0], args[1])
            self.gemms.append((name, a.shape[-2], a.shape[-1], b.shape[-1], a.dtype))
        return func(*args, **kwargs)

    @property
    def total(self):
        return sum(self.counts.values())

    @property
    def kernels(self):
        return sum(v for k, v in self.counts.items() if k not in VIEW_OPS)

    def misaligned_gemms(self, multiple=8):
        """GEMMs with an inner (k) or output (m, n) size that is not a multiple of ``multiple``."""
        return [g for g in self.gemms if any(d % multiple for d in g[1:4])]


def count_ops(fn):
    with OpCounter() as c:
        fn()
    return c


def saved_activation_bytes(fn, params):
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, ``params`` excluded (each storage
    once): the activation memory a training step keeps between forward and backward."""
    skip = {p.data_ptr() for p in params}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
