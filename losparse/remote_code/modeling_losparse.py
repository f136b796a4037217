"""LoSparse compact models for ``transformers`` (``trust_remote_code=True``); needs only torch and transformers.

A folder written by LoSparse's ``utils.export_compact`` holds this file, ``config.json`` (``model_type``
``"losparse"``: the source model's config under ``base_config``, its class under ``base_architecture``, the
compressed layers under ``losparse_layers``) and ``model.safetensors``. Loading builds the source architecture
from its config, puts a :class:`LoSparseCompactLinear` at each compressed layer with the stored shapes, and
loads the weights strictly. The model returned is a subclass of the source class (``generate``, pipelines,
``save_pretrained``, ``push_to_hub`` work as for it)::

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
"""
import logging
import os
import shutil
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import transformers
from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "losparse_model.safetensors"  # not model.safetensors: the source class alone must not load it
CONFIG_NAME = "config.json"


class LoSparseConfig(PretrainedConfig):
    """The source model's config (``base_config``, a dict with its ``model_type``) plus the compressed layers."""

    model_type = "losparse"

    def __init__(self, base_config=None, base_architecture=None, losparse_layers=None, losparse_tied=None,
                 losparse=None, **kwargs):
        self.base_config = dict(base_config or {})
        self.base_architecture = base_architecture
        self.losparse_layers = dict(losparse_layers or {})
        self.losparse_tied = dict(losparse_tied or {})
        self.losparse = dict(losparse or {})
        super().__init__(**kwargs)

    def to_base_config(self):
        """The source model's config object (e.g. a ``LlamaConfig``)."""
        d = dict(self.base_config)
        model_type = d.pop("model_type", None)
        if not model_type or not self.base_architecture or not self.losparse_layers:
            raise ValueError(f"{CONFIG_NAME}: a LoSparse config needs base_config (with its model_type), "
                             "base_architecture and losparse_layers; the file was edited or is incomplete")
        try:
            config_class = type(transformers.AutoConfig.for_model(model_type))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{CONFIG_NAME}: base model_type {model_type!r} is unknown to transformers "
                             f"{transformers.__version__}; the folder was written with transformers "
                             f"{self.base_config.get('transformers_version')}") from e
        return config_class.from_dict(d)


class LoSparseCompactLinear(nn.Module):
    """``y = x R^T L^T + b`` plus the kept part of S (LoSparse's "fused" form, r and k padded to multiples of 8).

    ``left`` = L (out x r), ``right`` = R (r x in). Row form (``kept_rows`` = k): ``sparse_weight_pruned`` = the
    k kept rows of S (k x in) at output positions ``nonzero_idx``: one GEMM by ``[R; S_kept]``, one by L, one
    ``index_add_``. Column form (``kept_cols`` = k): ``sparse_weight_pruned_cols`` = the k kept columns of S
    (out x k) at input positions ``nonzero_col_idx``: ``y += x[:, idx] S_cols^T``. Neither: ``y = x R^T L^T + b``.
    """

    def __init__(self, in_features, out_features, rank, kept_rows=0, has_bias=True, device=None, dtype=None,
                 kept_cols=0):
        super().__init__()
        if kept_rows and kept_cols:
            raise ValueError("LoSparseCompactLinear: kept_rows and kept_cols exclude each other")
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.kept_rows, self.kept_cols = kept_rows, kept_cols
        self.right = nn.Linear(in_features, rank, bias=False, **kw)
        self.left = nn.Linear(rank, out_features, bias=False, **kw)
        if kept_rows:
            self.sparse_weight_pruned = nn.Parameter(torch.empty(kept_rows, in_features, **kw))
            self.register_buffer("nonzero_idx", torch.arange(kept_rows, device=device))
        if kept_cols:
            self.sparse_weight_pruned_cols = nn.Parameter(torch.empty(out_features, kept_cols, **kw))
            self.register_buffer("nonzero_col_idx", torch.arange(kept_cols, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if has_bias else None
        self._cache = None

    def extra_repr(self):
        kept = f"kept_cols={self.kept_cols}" if self.kept_cols else f"kept_rows={self.kept_rows}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"{kept}, bias={self.bias is not None}")

    def _apply(self, fn, *args, **kwargs):  # .to() / .half(): the padded copies are rebuilt on next use
        self._cache = None
        return super()._apply(fn, *args, **kwargs)

    def _sources(self):
        S = self.sparse_weight_pruned if self.kept_rows else self.sparse_weight_pruned_cols
        return [t for t in (self.left.weight, self.right.weight, S) if t is not None]

    @staticmethod
    def _stamp(t):  # inference tensors (built under torch.inference_mode) have no version counter
        return (weakref.ref(t), None if t.is_inference() else t._version, t.data_ptr(), tuple(t.shape), t.dtype)

    def _padded(self):
        """The padded tensors the forward multiplies by, cached while the weights are the same tensors, unmodified
        (weak references and version counters) and no gradient is needed. Call :meth:`refresh` after editing
        weights through ``.data``."""
        src = self._sources()
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in src)
        if not grad and self._cache is not None and all(
                ref() is t and stamp == self._stamp(t)[1:] for (ref, *stamp), t in zip(self._cache[0], src)):
            return self._cache[1]
        L, R = self.left.weight, self.right.weight
        r = L.shape[1]
        r8 = -(-r // 8) * 8
        with torch.inference_mode(False):
            if not grad:
                L, R = L.detach(), R.detach()
            lpad = torch.cat([L, L.new_zeros(L.shape[0], r8 - r)], dim=1)
            if self.kept_cols:
                S = self.sparse_weight_pruned_cols if grad else self.sparse_weight_pruned_cols.detach()
                d = (torch.cat([R, R.new_zeros(r8 - r, R.shape[1])]).t(), lpad.t(), S.t(), r8)
            elif self.kept_rows:
                S = self.sparse_weight_pruned if grad else self.sparse_weight_pruned.detach()
                k = S.shape[0]
                k8 = -(-k // 8) * 8
                rs = torch.cat([R, R.new_zeros(r8 - r, R.shape[1]), S, S.new_zeros(k8 - k, S.shape[1])])
                d = (rs.t(), lpad.t(), None, r8)
            else:
                d = (R.t(), L.t(), None, r)
        if not grad:
            self._cache = ([self._stamp(t) for t in src], d)
        return d

    def refresh(self):
        """Forget the padded copies (after an edit of the weights that PyTorch does not version, e.g. ``.data``)."""
        self._cache = None

    def forward(self, x):
        if not (self.kept_rows or self.kept_cols):
            return F.linear(F.linear(x, self.right.weight), self.left.weight, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        first_t, l_t, s_t, r8 = self._padded()
        if x2.shape[0] == 1 and x2.device.type == "cpu" and not torch.is_autocast_enabled("cpu") and not (
                torch.is_grad_enabled() and (x2.requires_grad or first_t.requires_grad)):
            return self._one_token(x2[0], first_t, l_t, s_t, r8).view(*shape[:-1], self.out_features)
        t = torch.mm(x2, first_t)
        h = t[:, :r8]
        y = torch.mm(h, l_t) if self.bias is None else torch.addmm(self.bias, h, l_t)
        if self.kept_cols:  # out of place: under autocast y is bf16/fp16, an in-place product would not cast
            y = torch.addmm(y, x2.index_select(1, self.nonzero_col_idx), s_t)
        else:
            y.index_add_(1, self.nonzero_idx, t[:, r8:r8 + self.kept_rows])
        return y.view(*shape[:-1], self.out_features)

    def _one_token(self, v, first_t, l_t, s_t, r8):
        """One token on the CPU (decode): matrix-vector products, which oneDNN runs at up to 1.5x the bandwidth of
        a GEMM with one column in bf16."""
        t = torch.mv(first_t.t(), v)
        y = torch.mv(l_t.t(), t[:r8]) if self.bias is None else torch.addmv(self.bias, l_t.t(), t[:r8])
        if self.kept_cols:
            return y.addmv_(s_t.t(), v.index_select(0, self.nonzero_col_idx))
        return y.index_add_(0, self.nonzero_idx, t[r8:r8 + self.kept_rows])


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------------------------
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
_SUBCLASSES = {}


def _file(name_or_path, filename, hub, required=True):
    if os.path.isdir(name_or_path):
        path = Path(name_or_path, hub.get("subfolder") or "", filename)
        if path.is_file():
            return str(path)
        if required:
            raise OSError(f"{path}: missing; a LoSparse compact folder needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        return None
    from transformers.utils import cached_file
    return cached_file(name_or_path, filename, _raise_exceptions_for_missing_entries=required, **hub)


def _losparse_class(entry, base_cls):
    """The source class with :meth:`_LoSparseSaving.save_pretrained`, named as the entry class (``auto_map``), so
    pipelines recognise it."""
    key = (entry.__name__, base_cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(entry.__name__, (_LoSparseSaving, base_cls),
                                {"__module__": __name__, "__qualname__": entry.__name__, "__doc__": entry.__doc__})
    return _SUBCLASSES[key]


def _build(entry, config, dtype=None, empty=False, **build_kwargs):
    """The source architecture with a :class:`LoSparseCompactLinear` at each compressed layer; ``empty``: weights left
    uninitialised (they are loaded next), else the source model's random initialisation (compact layers: zero)."""
    if not isinstance(config, LoSparseConfig):
        raise ValueError(f"expected a LoSparseConfig, got {type(config).__name__}")
    base_config = config.to_base_config()
    base_cls = getattr(transformers, config.base_architecture, None)
    if base_cls is None:
        raise ValueError(f"{CONFIG_NAME}: base_architecture {config.base_architecture!r} is not in transformers "
                         f"{transformers.__version__} (written with {config.base_config.get('transformers_version')})")
    from contextlib import nullcontext
    from transformers.initialization import no_init_weights
    with no_init_weights() if empty else nullcontext():  # empty: dense weights that are replaced are never paged in
        model = _losparse_class(entry, base_cls)._from_config(base_config, dtype=dtype, **build_kwargs)
    for name, e in config.losparse_layers.items():
        if e.get("form") == "dense":
            continue  # stored as the layer's own weight
        if e.get("form") not in ("losparse", "losparse_cols", "low_rank"):
            raise ValueError(f"{CONFIG_NAME}: losparse_layers[{name!r}] has form {e.get('form')!r}; allowed: "
                             "'losparse', 'losparse_cols', 'low_rank', 'dense'")
        try:
            old = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"{CONFIG_NAME}: losparse_layers names {name!r}, which {base_cls.__name__} lacks") from err
        like = next(old.parameters())
        new = LoSparseCompactLinear(int(e["in_features"]), int(e["out_features"]), int(e["rank"]),
                                    int(e["kept_rows"]) if e["form"] == "losparse" else 0, bool(e["has_bias"]),
                                    device=like.device, dtype=like.dtype,
                                    kept_cols=int(e["kept_cols"]) if e["form"] == "losparse_cols" else 0)
        if not empty:
            with torch.no_grad():
                for t in new.parameters():
                    t.zero_()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    model.losparse_config = config
    return model


def _check_and_fill(model, sd, config, weights_file):
    """Fill tied keys, then refuse missing / unexpected / mis-shaped tensors and bad kept-row indices."""
    where = Path(weights_file).name
    for k, src in config.losparse_tied.items():
        if src not in sd:
            raise ValueError(f"{where}: tied key {k!r} points to {src!r}, which the file lacks")
        sd.setdefault(k, sd[src])
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs {CONFIG_NAME} {tuple(own[k].shape)}"
              for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{where} does not match {CONFIG_NAME} (edited or mixed-up files?)"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{title} ({len(keys)}): " + ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else ""))
        raise ValueError("\n".join(parts))
    for name, m in model.named_modules():
        if isinstance(m, LoSparseCompactLinear) and (m.kept_rows or m.kept_cols):
            key, k, n, what = ((".nonzero_idx", m.kept_rows, m.out_features, "row") if m.kept_rows else
                               (".nonzero_col_idx", m.kept_cols, m.in_features, "column"))
            idx = sd[name + key]
            if (idx.dtype.is_floating_point or idx.dtype == torch.bool or (idx.numel() and (
                    int(idx.min()) < 0 or int(idx.max()) >= n)) or idx.unique().numel() != idx.numel()):
                raise ValueError(f"{where}: {name}{key} must hold {k} distinct {what} indices in "
                                 f"[0, {n}); found {idx.tolist()[:10]}...")


class _LoSparseSaving:
    """Mixed into the loaded model's class: ``save_pretrained`` writes a folder that loads again the same way."""

    def save_pretrained(self, save_directory, is_main_process=True, state_dict=None, push_to_hub=False, **kwargs):
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True) is not supported here; call model.push_to_hub(repo)")
        if not is_main_process:
            return
        from safetensors.torch import save_file
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        sd = dict(state_dict if state_dict is not None else self.state_dict())
        layers, tied, seen = {}, {}, {}
        for name, m in self.named_modules():
            if isinstance(m, LoSparseCompactLinear):
                layers[name] = {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
                                "has_bias": m.bias is not None, "kept_rows": m.kept_rows,
                                "form": "losparse" if m.kept_rows else "low_rank"}
                if m.kept_cols:
                    layers[name].update(form="losparse_cols", kept_cols=m.kept_cols, kept_rows=m.out_features)
        old = self.losparse_config
        layers.update({n: e for n, e in old.losparse_layers.items() if e.get("form") == "dense"})
        flat = {}
        for k, v in sd.items():
            key = (v.data_ptr(), tuple(v.shape), v.dtype) if v.numel() else None
            if key is not None and key in seen:
                tied[k] = seen[key]
                continue
            if key is not None:
                seen[key] = k
            flat[k] = v.detach().contiguous().cpu().clone()
        save_file(flat, str(out / WEIGHTS_NAME), metadata={"format": "pt", "losparse": "1"})
        base = self.config.to_dict()
        config = LoSparseConfig(base_config=base, base_architecture=old.base_architecture, losparse_layers=layers,
                                losparse_tied=tied, losparse=old.losparse, auto_map=dict(old.auto_map),
                                architectures=list(old.architectures or []))
        config.save_pretrained(str(out))
        shutil.copyfile(__file__, out / Path(__file__).name)
        card = getattr(self, "losparse_model_card", None)  # the loaded folder's README.md (push_to_hub shows it)
        if card and not (out / "README.md").exists():
            (out / "README.md").write_text(card)
        if getattr(self, "generation_config", None) is not None and self.can_generate():
            self.generation_config.save_pretrained(str(out))


class LoSparsePreTrainedModel(PreTrainedModel):
    """Entry point named in ``auto_map``; ``from_pretrained`` returns an instance of a subclass of the source
    class (e.g. ``LlamaForCausalLM``) of the same name as the entry class."""

    config_class = LoSparseConfig
    base_model_prefix = "losparse"

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is built by from_pretrained / from_config, not instantiated")

    @classmethod
    def _from_config(cls, config, **kwargs):
        return _build(cls, config, dtype=kwargs.get("dtype", kwargs.get("torch_dtype")),
                      **{k: kwargs[k] for k in ("attn_implementation",) if k in kwargs})

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        from safetensors.torch import load_file
        name = str(pretrained_model_name_or_path)
        hub = {k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None}
        if not isinstance(config, LoSparseConfig):
            config = LoSparseConfig.from_pretrained(_file(name, CONFIG_NAME, hub))
        weights_file = _file(name, WEIGHTS_NAME, hub)
        try:
            sd = load_file(weights_file)
        except Exception as e:
            raise ValueError(f"{weights_file}: not a readable safetensors file ({e})") from e
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if dtype in (None, "auto"):
            dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        model = _build(cls, config, dtype=dtype, empty=True,
                       **{k: kwargs[k] for k in ("attn_implementation",) if k in kwargs})
        _check_and_fill(model, sd, config, weights_file)
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, strict=True)
        if config.losparse_tied and hasattr(model, "tie_weights"):
            model.tie_weights()
        gen_file = _file(name, "generation_config.json", hub, required=False)
        if gen_file and model.can_generate():
            model.generation_config = transformers.GenerationConfig.from_pretrained(os.path.dirname(gen_file))
        device = kwargs.get("device_map")
        if isinstance(device, (str, torch.device, int)) and str(device) != "auto":
            model.to(device)
        elif device is not None:
            logger.warning("LoSparse: device_map=%r is not supported; the model stays on the CPU (use .to())", device)
        card_file = _file(name, "README.md", hub, required=False)
        model.losparse_model_card = Path(card_file).read_text() if card_file else None
        model.name_or_path = name
        return model.eval()


class LoSparseModel(LoSparsePreTrainedModel):
    """A LoSparse compact model loaded through ``AutoModel``."""


class LoSparseForCausalLM(LoSparsePreTrainedModel):
    """A LoSparse compact model loaded through ``AutoModelForCausalLM``."""


class LoSparseForSequenceClassification(LoSparsePreTrainedModel):
    """A LoSparse compact model loaded through ``AutoModelForSequenceClassification``."""


class LoSparseForQuestionAnswering(LoSparsePreTrainedModel):
    """A LoSparse compact model loaded through ``AutoModelForQuestionAnswering``."""


class LoSparseForSeq2SeqLM(LoSparsePreTrainedModel):
    """A LoSparse compact model loaded through ``AutoModelForSeq2SeqLM``."""


class LoSparseForTokenClassification(LoSparsePreTrainedModel):
    """A LoSparse compact model loaded through ``AutoModelForTokenClassification``."""


class LoSparseForMaskedLM(LoSparsePreTrainedModel):
    """A LoSparse compact model loaded through ``AutoModelForMaskedLM``."""
