"""Compacted inference: the forms a compacted layer's forward can take, their cost model, and the per-layer cache.

Each form is a plain function ``(x2, derived tensors, kept indices, bias) -> y`` (``COMPACT_FORWARDS``); ``derive``
builds the tensors a form multiplies by from the layer's L, R and kept part of S; ``path_costs`` predicts each
form's time from the shapes (FLOPs, bytes moved, kernels), ``TimedChoices`` measures it instead. ``FastPath`` is one
layer's inference state (settings, cached derived tensors and their validity, the prepared buffers); the layer
(``losparse.layer``) owns one and calls it. Nothing here knows the layer's class: it reads its tensors.
"""
import time
import weakref

import torch
import torch.nn.functional as F

# Forms of a compacted layer's inference forward (x2: tokens x in; y: tokens x out); :func:`derive` builds the
# tensors each one multiplies by. Row form (S keeps k rows at output positions idx):
# "fused":      T = x [R; S_kept]^T, one GEMM; y = T[:, :r] L^T + b; y[:, idx] += T[:, r:r+k].
# "transposed": T' = [R; S_kept] x^T; y' = L T'[:r] + b; y'[idx] += T'[r:r+k] (contiguous rows); y = y'^T
#               copied to row-major.
# "onehot":     T = x [R; S_kept]^T; y = T [L | P]^T + b, P the one-hot columns of idx: two GEMMs, no scatter.
# "merged":     y = x (L R + S)^T + b with the dense weight (as fast as the dense layer; costs its memory).
# Column form (S keeps k columns at input positions idx, ``sparse_weight_pruned_cols`` out x k):
# "fused":      y = (x R^T) L^T + b, then y += x[:, idx] S_cols^T (a gather and an accumulating GEMM).
# "transposed": the same on x^T; y copied to row-major.
# "onehot":     T = x [R; E]^T with E the one-hot rows of idx (the gather as part of the GEMM);
#               y = T [L | S_cols]^T + b: two GEMMs.
# "merged":     as for rows.
COMPACT_PATHS = ("fused", "transposed", "onehot", "merged")
PREFER_CHOICES = ("speed", "memory")
PATH_CHOICES = ("cost", "timed")


def check_prefer(prefer):
    if prefer not in PREFER_CHOICES:
        raise ValueError(f"prefer={prefer!r}: allowed values are {', '.join(map(repr, PREFER_CHOICES))}")


def _ceil8(n):
    return -(-n // 8) * 8


def derive(layer, path):
    """Tensors that ``path`` multiplies by, from the current weights of the compacted ``layer`` (no gradient).

    Row form: ``rs`` = ``[R; 0; S_kept; 0]`` with r and k rounded up to multiples of 8 (zero rows), so the
    GEMMs' inner and output sizes stay multiples of 8; ``L`` gets matching zero columns. Column form:
    ``R`` and ``L`` padded the same way, ``S_cols`` as it is (``onehot``: ``[R; 0; E; 0]`` and
    ``[L | 0 | S_cols | 0]``). ``merged`` is the dense ``L R + S``.
    """
    L, R = layer.left.weight.detach(), layer.right.weight.detach()
    cols = layer.sparse_weight_pruned_cols is not None
    S = (layer.sparse_weight_pruned_cols if cols else layer.sparse_weight_pruned).detach()
    idx = layer.kept_index()
    r, k = layer.reduced_rank, idx.numel()
    if path == "merged":
        acc = torch.promote_types(L.dtype, torch.float32)  # bf16/fp16 weights: summed in fp32
        with torch.autocast(L.device.type, enabled=False):  # built in the weights' dtype, cast (if) at the GEMM
            w = torch.mm(L.to(acc), R.to(acc))
        return {"w": w.index_add_(1 if cols else 0, idx, S.to(acc)).to(L.dtype)}
    r8, k8 = _ceil8(r), _ceil8(k)
    lpad = torch.cat([L, L.new_zeros(L.shape[0], r8 - r)], dim=1)
    b_col = None if layer.bias is None else layer.bias.detach()[:, None]
    if cols:
        rpad = torch.cat([R, R.new_zeros(r8 - r, R.shape[1])])
        if path == "onehot":  # E[j, idx[j]] = 1: x E^T = x[:, idx]
            onehot = R.new_zeros(k8, R.shape[1])
            onehot[torch.arange(k, device=idx.device), idx] = 1
            return {"rs_t": torch.cat([rpad, onehot]).t(),
                    "lp_t": torch.cat([lpad, S, S.new_zeros(S.shape[0], k8 - k)], dim=1).t(), "r8": r8, "k": k}
        if path == "transposed":
            return {"r": rpad, "l": lpad, "s": S, "b_col": b_col, "r8": r8, "k": k, "cols": True}
        return {"r_t": rpad.t(), "l_t": lpad.t(), "s_t": S.t(), "r8": r8, "k": k, "cols": True}
    rs = torch.cat([R, R.new_zeros(r8 - r, R.shape[1]), S, S.new_zeros(k8 - k, S.shape[1])])
    if path == "onehot":  # [L | P] with P[idx[j], j] = 1: the sparse rows' add becomes part of the GEMM
        onehot = L.new_zeros(L.shape[0], k8)
        onehot[idx, torch.arange(k, device=idx.device)] = 1
        return {"rs_t": rs.t(), "lp_t": torch.cat([lpad, onehot], dim=1).t(), "r8": r8, "k": k}
    if path == "transposed":
        return {"rs": rs, "l": lpad, "b_col": b_col, "r8": r8, "k": k}
    return {"rs_t": rs.t(), "l_t": lpad.t(), "r8": r8, "k": k}


def _one_token(x):
    """Whether ``x`` (tokens x in) is one token on the CPU outside autocast: then the forms run matrix-vector
    products (``torch.mv``), which oneDNN runs at up to 1.5x the bandwidth of a GEMM with one column in bf16."""
    return x.shape[0] == 1 and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")


def _addmv(bias, w, v):
    return torch.mv(w, v) if bias is None else torch.addmv(bias, w, v)


def _fwd_token(x, d, idx, bias):
    """One token, rows or columns of S (see :func:`_one_token`): the fused and transposed forms' products as
    matrix-vector products on the same tensors (``rs``/``l`` or their transposed views)."""
    v = x[0]
    if d.get("cols"):
        r = d["r"] if "r" in d else d["r_t"].t()
        l_ = d["l"] if "l" in d else d["l_t"].t()
        y = _addmv(bias, l_, torch.mv(r, v))
        if d["k"]:
            y.addmv_(d["s"] if "s" in d else d["s_t"].t(), v.index_select(0, idx))
        return y[None]
    t = torch.mv(d["rs"] if "rs" in d else d["rs_t"].t(), v)
    y = _addmv(bias, d["l"] if "l" in d else d["l_t"].t(), t[:d["r8"]])
    if d["k"]:
        y.index_add_(0, idx, t[d["r8"]:d["r8"] + d["k"]])
    return y[None]


def _fwd_fused(x, d, idx, bias):
    if _one_token(x):
        return _fwd_token(x, d, idx, bias)
    if d.get("cols"):
        y = torch.mm(torch.mm(x, d["r_t"]), d["l_t"]) if bias is None else \
            torch.addmm(bias, torch.mm(x, d["r_t"]), d["l_t"])
        # out of place: under autocast y is bf16/fp16 and an in-place product would not cast its operands
        return torch.addmm(y, x.index_select(1, idx), d["s_t"]) if d["k"] else y
    t = torch.mm(x, d["rs_t"])
    h = t[:, :d["r8"]]
    y = torch.mm(h, d["l_t"]) if bias is None else torch.addmm(bias, h, d["l_t"])
    if d["k"]:
        y.index_add_(1, idx, t[:, d["r8"]:d["r8"] + d["k"]])
    return y


def _fwd_transposed(x, d, idx, bias):
    if _one_token(x):
        return _fwd_token(x, d, idx, bias)
    if d.get("cols"):
        h = torch.mm(d["r"], x.t())
        y = torch.mm(d["l"], h) if bias is None else torch.addmm(d["b_col"], d["l"], h)
        if d["k"]:  # out of place, as in the fused form
            y = torch.addmm(y, d["s"], x.index_select(1, idx).t())
        return y.t().contiguous()
    t = torch.mm(d["rs"], x.t())
    h = t[:d["r8"]]
    y = torch.mm(d["l"], h) if bias is None else torch.addmm(d["b_col"], d["l"], h)
    if d["k"]:
        y.index_add_(0, idx, t[d["r8"]:d["r8"] + d["k"]])
    return y.t().contiguous()  # a transposed view would push later ops (attention, views) off their fast paths


def _fwd_onehot(x, d, idx, bias):
    if _one_token(x):
        return _addmv(bias, d["lp_t"].t(), torch.mv(d["rs_t"].t(), x[0]))[None]
    t = torch.mm(x, d["rs_t"])
    return torch.mm(t, d["lp_t"]) if bias is None else torch.addmm(bias, t, d["lp_t"])


def _fwd_merged(x, d, idx, bias):
    if _one_token(x):
        return _addmv(bias, d["w"], x[0])[None]
    return F.linear(x, d["w"], bias)


COMPACT_FORWARDS = {"fused": _fwd_fused, "transposed": _fwd_transposed, "onehot": _fwd_onehot,
                     "merged": _fwd_merged}
# Cost model (seconds) per device type: FLOP/s, bytes/s, fixed cost per kernel, cost factor of a scattered
# (strided) element update relative to a streamed one, and the rate of the factored forms' GEMMs (thin inner or
# output sizes: r, r + k) relative to the dense one's, from 7B-shape blocks' prefill (bench_scale.py): fp32 on a
# CPU about 85 % (the compacted forms pay below about 85 % kept; above, the dense product is as fast); "cpu-16":
# 16-bit weights on a CPU, whose bf16 matrix units (AMX, AVX512-BF16) run a dense GEMM at several times the fp32
# rate but thin ones at about 60 % of that (the compacted forms pay from about 60 % kept down).
_MACHINE = {"cpu": (1.0e11, 2.0e10, 4e-6, 4.0, 0.85), "cpu-16": (1.0e12, 2.0e10, 4e-6, 4.0, 0.6),
            "cuda": (4.0e14, 2.5e12, 6e-6, 16.0, 1.0)}


def _machine(device_type, elt):
    if device_type == "cuda":
        return _MACHINE["cuda"]
    return _MACHINE["cpu-16" if elt <= 2 else "cpu"]


def path_costs(in_f, out_f, r, k, n, elt, device_type, cols=False):
    """Predicted seconds of each path of :data:`COMPACT_PATHS` for ``n`` tokens (FLOPs + bytes moved + kernels).

    ``cols``: the column form (k kept columns of S). ``elt``: bytes per element (2: bf16/fp16, whose CPU rates
    differ: ``_MACHINE["cpu-16"]``). Deterministic: a function of the shapes, the element size and the device type
    only, so every process of a distributed run picks the same forms.
    """
    flops, bw, kernel, scatter, thin = _machine(device_type, elt)
    r8, k8 = _ceil8(r), _ceil8(k)
    rk = r8 + k8
    x, y = n * in_f, n * out_f
    merged = (2 * n * in_f * out_f) / flops + elt * (x + in_f * out_f + y) / bw + kernel
    flops *= thin  # the factored forms' GEMMs
    onehot = (2 * n * in_f * rk + 2 * n * rk * out_f) / flops + elt * (x + rk * in_f + 2 * n * rk + out_f * rk + y) \
        / bw + 2 * kernel
    if cols:  # x R^T, (.) L^T + b, gather x[:, idx], += x_idx S_cols^T
        gemms = (2 * n * in_f * r8 + 2 * n * r8 * out_f + 2 * n * k * out_f) / flops
        moved = x + r8 * in_f + 2 * n * r8 + out_f * r8 + y + (scatter * n * k + n * k + k * out_f + 2 * y if k else 0)
        fused = gemms + elt * moved / bw + (4 if k else 2) * kernel
        return {"merged": merged, "fused": fused, "transposed": fused + elt * 2 * y / bw + kernel, "onehot": onehot}
    first_f = 2 * n * in_f * rk  # x [R; S]^T
    first_b = x + rk * in_f + n * rk
    add = n * k * 3  # read z, read and write y
    return {
        "merged": merged,
        "fused": (first_f + 2 * n * r8 * out_f) / flops
        + elt * (first_b + n * r8 + out_f * r8 + y + scatter * add) / bw + (3 if k else 2) * kernel,
        "transposed": (first_f + 2 * n * r8 * out_f) / flops
        + elt * (first_b + n * r8 + out_f * r8 + y + add + 2 * y) / bw + (3 if k else 2) * kernel,
        "onehot": onehot,
    }


def time_forms(layer, x2, candidates, reps=3):
    """Milliseconds of ``reps`` calls of each candidate form on ``x2`` (CUDA events on CUDA, a clock elsewhere)."""
    times = {}
    for path in candidates:
        d = layer.fast_path.derived(layer, path)
        fn, idx = COMPACT_FORWARDS[path], layer.kept_index()
        fn(x2, d, idx, layer.bias)  # warm-up
        if x2.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn(x2, d, idx, layer.bias)
            end.record()
            end.synchronize()
            times[path] = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(x2, d, idx, layer.bias)
            times[path] = 1e3 * (time.perf_counter() - t0)
    return times


def _rank0_choice(index, device):
    """Under torch.distributed, every rank takes rank 0's ``index`` (one broadcast; all ranks must call it)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return index
    t = torch.tensor([index], dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())


class TimedChoices:
    """The forms chosen by timing (``layer.path_choice = "timed"``), one per shape class.

    Shape class: device, dtype, in/out features, r and k rounded up to multiples of 8 (k: to a power of two),
    row or column form, bias, token bucket and candidates; the layers of a class share one timing. One object
    is shared by the layers of a model (:func:`prune`, :func:`load_checkpoint` and :func:`load_compact` hand one
    to all the layers of the model they work on; a layer compacted on its own has its own), so the memo lives
    and dies with the model. Rank 0 times, every rank takes its choice (all ranks run the same forms).
    """

    def __init__(self):
        self.chosen = {}

    def choose(self, layer, x2, candidates, reps=3):
        cols, k = layer.sparse_weight_pruned_cols is not None, layer.kept_index().numel()
        key = (x2.device.type, x2.dtype, layer.in_feature, layer.out_feature, _ceil8(layer.reduced_rank),
               _ceil8(k).bit_length(), cols, layer.bias is not None, max(1, x2.shape[0]).bit_length(), candidates)
        if key not in self.chosen:
            dist = torch.distributed
            first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
            index = 0
            if first:
                times = time_forms(layer, x2, candidates, reps)
                index = candidates.index(min(candidates, key=times.__getitem__))
            device = x2.device if x2.is_cuda else torch.device("cpu")
            self.chosen[key] = candidates[_rank0_choice(index, device)]
        return self.chosen[key]


def _tensor_stamp(t):
    """What changes when a tensor is re-pointed (``.data =``, ``.to()``), reshaped, or modified in place through
    itself or a view (its version).

    An in-place edit through ``.data`` bumps no version counter (PyTorch gives ``.data`` its own), and neither
    do FSDP2's re-gathers or ``torch.autograd._unsafe_preserve_version_counter``: see
    :meth:`LinearLoSparse.refresh`. Inference tensors have no version counter.
    """
    return None if t.is_inference() else t._version, t.data_ptr(), t.shape


def _sources_key(layer):
    """The layer's source tensors (by weak reference: a new tensor at a freed address is not taken for the old
    one) with their stamps (:func:`_tensor_stamp`)."""
    return tuple((weakref.ref(t), _tensor_stamp(t)) for t in layer.source_tensors())


def _key_holds(layer, key):
    """Whether ``key`` (from :func:`_sources_key`) still describes the layer's source tensors."""
    sources = layer.source_tensors()
    return key is not None and len(key) == len(sources) and all(
        ref() is t and stamp == _tensor_stamp(t) for (ref, stamp), t in zip(key, sources))


_PREPARED_PREFIX = "_prepared_"  # prepared tensors: non-persistent buffers of the layer, _prepared_<key of derive>


class FastPath:
    """A compacted layer's inference state, in one object per layer (``layer.fast_path``).

    - settings: ``prefer``, ``compact_path``, ``path_choice``, ``cache_derived`` (set through the layer's
      properties of those names, which call :meth:`refresh`);
    - the cache: ``tensors`` (form -> what :func:`derive` built), ``key`` (the source tensors and their stamps
      they were built from, :func:`_sources_key`), ``paths`` (token bucket -> chosen form);
    - the choice: the cost model (:func:`path_costs`), or with ``path_choice = "timed"`` ``timings``
      (:class:`TimedChoices`, shared by the layers of a model); ``last_path``, the latest call's form;
    - the prepared form (:func:`prepare_for_inference`): ``prepared`` (the form, or None), ``prepared_meta`` (its
      non-tensor entries) and ``prepared_key``; its tensors are the layer's non-persistent buffers
      ``_prepared_<name>``, so they follow ``.to()`` and a compiled graph reads them as inputs.

    Pickling and deep copies keep the settings, the shared timings and the prepared form, not the cache.
    """

    def __init__(self):
        self.prefer, self.compact_path, self.path_choice, self.cache_derived = "speed", None, "cost", True
        self.timings = TimedChoices()
        self.last_path = None
        self.prepared = self.prepared_meta = self.prepared_key = None
        self.forget()

    def forget(self):
        """Drop the derived tensors and the forms chosen per token bucket."""
        self.key, self.tensors, self.paths = None, {}, {}

    def __getstate__(self):
        state = dict(self.__dict__, prepared_key=None)  # weak references: the prepared buffers are re-derived
        state.update(key=None, tensors={}, paths={})
        return state

    # -- invalidation -------------------------------------------------------------------------------------
    def refresh(self, layer):
        """Forget the cache; re-derive the prepared buffers in place (see :meth:`LinearLoSparse.refresh`)."""
        self.forget()
        if self.prepared is not None:
            self.refresh_prepared(layer)

    def moved(self):
        """After ``.to()``/``.half()``: the cache is rebuilt and the prepared buffers re-derived on next use."""
        self.forget()
        self.prepared_key = None

    # -- choice ---------------------------------------------------------------------------------------------
    def path_for(self, layer, x2):
        """The form for this many tokens: ``compact_path`` if set, else the cheapest by :func:`path_costs`
        (deterministic, the same on every rank), or with ``path_choice = "timed"`` the fastest by one timing per
        shape class (:class:`TimedChoices`); the choice is kept per token bucket (powers of two)."""
        if self.compact_path is not None:
            return self.compact_path
        bucket = max(1, x2.shape[0]).bit_length()
        if bucket in self.paths:
            return self.paths[bucket]
        candidates = COMPACT_PATHS if self.prefer == "speed" else COMPACT_PATHS[:-1]
        compiling = torch.compiler.is_compiling()
        capturing = x2.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.path_choice == "timed" and not compiling and not capturing:
            path = self.timings.choose(layer, x2, candidates)
            keep = set(self.paths.values()) | {path}
            self.tensors = {p: d for p, d in self.tensors.items() if p in keep}  # only the chosen forms stay
        else:
            costs = path_costs(layer.in_feature, layer.out_feature, layer.reduced_rank,
                                layer.kept_index().numel(), 1 << (bucket - 1), x2.element_size(), x2.device.type,
                                cols=layer.sparse_weight_pruned_cols is not None)
            path = min(candidates, key=costs.__getitem__)
        if not compiling:
            self.paths[bucket] = path
        return path

    def path_for_tokens(self, layer, tokens):
        """The form the layer's own rule picks for ``tokens`` rows per call; leaves nothing cached."""
        w = layer.left.weight
        if w.is_cuda:  # a timed choice runs on real memory
            x2 = torch.zeros(tokens, layer.in_feature, device=w.device, dtype=w.dtype)
        else:  # the cost model reads only the shape, the element size and the device type
            x2 = torch.zeros((), device=w.device, dtype=w.dtype).expand(tokens, layer.in_feature)
        with torch.no_grad():
            path = self.path_for(layer, x2)
        self.forget()
        return path

    def describe(self):
        """The forms taken so far, by token count: ``"fused"``, ``"fused<=127,merged"`` (up to 127 tokens
        ``fused``, above ``merged``); ``"pending"`` before the first inference call."""
        if self.prepared is not None:  # prepare_for_inference: one form for every call
            return self.prepared
        if self.compact_path is not None:
            return self.compact_path
        paths = sorted(self.paths.items())
        if not paths:  # under torch.compile the choice is not stored; the latest call's is known
            return self.last_path or "pending"
        parts = [p if b == paths[-1][0] else f"{p}<={(1 << b) - 1}" for b, p in paths]
        runs = [parts[0]]
        for (b, p), part in zip(paths[1:], parts[1:]):  # one entry per run of the same path
            if p == runs[-1].split("<=")[0]:
                runs[-1] = part
            else:
                runs.append(part)
        return ",".join(runs)

    # -- derived tensors ------------------------------------------------------------------------------------
    def derived(self, layer, path):
        """The cached tensors of ``path``; all rebuilt when a source tensor was replaced or modified in place."""
        if not _key_holds(layer, self.key):
            self.tensors, self.key = {}, _sources_key(layer)
        if path not in self.tensors:
            with torch.inference_mode(False), torch.no_grad():
                self.tensors[path] = derive(layer, path)
        return self.tensors[path]

    def prepare(self, layer, path):
        """Hold ``path``'s tensors as the layer's buffers from now on (:func:`prepare_for_inference`)."""
        self.prepared = path
        self.refresh_prepared(layer)

    def refresh_prepared(self, layer):
        """Re-derive the prepared form's tensors into the layer's buffers: in place when shape, dtype and device
        hold (a compiled graph or a CUDA graph keeps reading the same storage), else as new buffers."""
        with torch.inference_mode(False), torch.no_grad():
            d = derive(layer, self.prepared)
            tensors = {key: t for key, t in d.items() if torch.is_tensor(t)}
            for name in [b for b in layer._buffers if b.startswith(_PREPARED_PREFIX)]:
                if name[len(_PREPARED_PREFIX):] not in tensors:  # another form's, from an earlier preparation
                    del layer._buffers[name]
            params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
            for key, t in tensors.items():
                name = _PREPARED_PREFIX + key
                if t.untyped_storage().data_ptr() in params:
                    t = t.clone()  # a view of a parameter (the bias column): a buffer of its own
                buf = layer._buffers.get(name)
                if buf is not None and buf.shape == t.shape and buf.dtype == t.dtype and buf.device == t.device:
                    buf.copy_(t)
                else:
                    layer.register_buffer(name, t, persistent=False)
        self.prepared_meta = {key: v for key, v in d.items() if key not in tensors}
        self.prepared_key = _sources_key(layer)

    def _prepared_tensors(self, layer, x2):
        """The prepared form's tensors (buffers); eager calls re-derive stale ones first."""
        if not torch.compiler.is_compiling() and not (x2.is_cuda and torch.cuda.is_current_stream_capturing()):
            if not _key_holds(layer, self.prepared_key):
                self.refresh_prepared(layer)
        d = dict(self.prepared_meta)
        d.update({name[len(_PREPARED_PREFIX):]: t for name, t in layer._buffers.items()
                  if name.startswith(_PREPARED_PREFIX)})
        return d

    # -- the forward -----------------------------------------------------------------------------------------
    def forward(self, layer, x):
        """Inference of a compacted layer: x flattened to 2-D (the bias stays in the GEMM), one form of
        :data:`COMPACT_PATHS` run on derived tensors: the prepared buffers, else the cached tensors of the form
        chosen for this token bucket, reused while L, R, S, the bias and the kept indices are the same tensors,
        unmodified. Under ``torch.compile`` (and with ``cache_derived = False``) they are derived on every call,
        inside the graph."""
        shape = x.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, shape[-1])
        if self.prepared is not None:
            path, d = self.prepared, self._prepared_tensors(layer, x2)
        else:
            path = self.path_for(layer, x2)
            if torch.compiler.is_compiling() or not self.cache_derived:
                d = derive(layer, path)
            else:
                d = self.derived(layer, path)
        self.last_path = path
        y = COMPACT_FORWARDS[path](x2, d, layer.kept_index(), layer.bias)
        return y if x.dim() == 2 else y.view(*shape[:-1], layer.out_feature)
