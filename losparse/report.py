"""The compression report: ``compression_report`` / ``CompressionReport`` (ranks, kept rows, forms, parameter
counts and file sizes)."""
from pathlib import Path

from .common import unwrap
from .layer import LinearLoSparse


def _sparse_stored(layer_entry):
    """Stored parameters of a report entry's S: its kept rows, or kept columns for the column form."""
    return layer_entry.get("sparse_params", layer_entry["kept_rows"] * layer_entry["in_features"])


class CompressionReport:
    """What STEP 1 replaced and what is left of it. ``str(report)`` is a printable table."""

    def __init__(self, layers, model_params, model_params_dense_equivalent, model_params_in_memory, files=None):
        self.layers = layers
        self.dense_params = sum(l["out_features"] * l["in_features"] for l in layers)
        self.low_rank_params = sum(l["rank"] * (l["out_features"] + l["in_features"]) for l in layers)
        self.sparse_params = sum(_sparse_stored(l) for l in layers)  # kept rows, or columns where fewer
        self.effective_ratio = ((self.low_rank_params + self.sparse_params) / self.dense_params
                                if self.dense_params else 1.0)
        self.model_params = model_params
        self.model_params_dense_equivalent = model_params_dense_equivalent
        self.model_params_in_memory = model_params_in_memory
        self.files = files or {}
        self.file_size_bytes = sum(self.files.values()) if files else None

    def as_dict(self):
        keys = ("layers", "dense_params", "low_rank_params", "sparse_params", "effective_ratio", "model_params",
                "model_params_dense_equivalent", "model_params_in_memory", "files", "file_size_bytes")
        return {k: getattr(self, k) for k in keys}

    def table(self):
        lines = [f"{'layer':<60} {'out':>6} {'in':>6} {'rank':>5} {'rows':>6} {'ratio':>7}  path"]
        for l in self.layers:
            ratio = (l["rank"] * (l["out_features"] + l["in_features"]) + _sparse_stored(l)) / \
                    (l["out_features"] * l["in_features"])
            lines.append(f"{l['name'][-60:]:<60} {l['out_features']:>6} {l['in_features']:>6} {l['rank']:>5} "
                         f"{l['kept_rows']:>6} {ratio:>7.2%}  {l.get('path', '')}")
        lines += [
            f"substituted matrices: {len(self.layers)}, dense parameters {self.dense_params:,}",
            f"low-rank parameters {self.low_rank_params:,} + kept sparse parameters {self.sparse_params:,} "
            f"= {self.effective_ratio:.2%} of dense",
            f"whole model: {self.model_params:,} parameters stored compactly vs {self.model_params_dense_equivalent:,}"
            f" dense ({self.model_params / max(1, self.model_params_dense_equivalent):.2%}); "
            f"{self.model_params_in_memory:,} in memory now",
        ]
        if self.files:
            lines.append(f"files: {self.file_size_bytes / 2**20:.2f} MiB "
                         + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in self.files.items()))
        return "\n".join(lines)

    __str__ = table


def _layer_path(m):
    """How the layer runs inference: ``"uncompacted"``, ``"low_rank"`` (no S), or the compacted form(s) it took
    so far (:meth:`FastPath.describe`: ``"fused"``, ``"fused<=127,merged"``, ``"pending"``, ...)."""
    if not m.has_sparse:
        return "low_rank"
    if not m.is_compacted:
        return "uncompacted"
    return m.fast_path.describe()


def _report_entry(name, m):
    """One layer's line of :func:`compression_report`."""
    form, kept, stored = m.sparse_form()
    return {"name": name, "out_features": m.out_feature, "in_features": m.in_feature, "rank": m.reduced_rank,
            "kept_rows": m.kept_rows, "path": _layer_path(m), "sparse_form": form, "kept": kept,
            "sparse_params": stored}


def _parameter_counts(target):
    """``(compact, dense, in_memory)``: the parameters an export stores (each LoSparse layer in its compact form,
    or dense where that is smaller), the same model with dense matrices, and the parameters held now."""
    losparse = [m for m in target.modules() if isinstance(m, LinearLoSparse)]
    in_losparse = {id(p) for m in losparse for p in m.parameters()}
    unique = {id(p): p for p in target.parameters()}.values()
    in_memory = sum(p.numel() for p in unique)
    other = sum(p.numel() for p in unique if id(p) not in in_losparse)
    compact, dense = other, other
    for m in losparse:
        dense_layer = m.out_feature * m.in_feature + (m.out_feature if m.has_bias else 0)
        compact += min(m.num_parameters(compact=True), dense_layer)
        dense += dense_layer
    return compact, dense, in_memory


def compression_report(model, export_dir=None):
    """Per-layer shapes, ranks, kept rows and inference path, totals, and whole-model parameter counts.

    ``model_params`` counts what a compact export stores (L, R, kept rows of S, biases and every other
    parameter once); ``model_params_dense_equivalent`` the same model with dense matrices. With
    ``export_dir`` (an :func:`export_compact` directory) the sizes of its files are reported too.
    """
    target = unwrap(model)
    layers = [_report_entry(name, m) for name, m in target.named_modules() if isinstance(m, LinearLoSparse)]
    files = None
    if export_dir is not None:
        files = {f.name: f.stat().st_size for f in sorted(Path(export_dir).iterdir()) if f.is_file()}
    return CompressionReport(layers, *_parameter_counts(target), files)
