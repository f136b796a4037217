"""The small helpers every part of LoSparse uses, at the bottom of the import graph (imports nothing of the package).

- ``logger``: the ``losparse`` logger every module writes to;
- FSDP2 tensors: ``is_sharded`` (a ``DTensor``?), ``local_part`` (this rank's rows);
- module plumbing: ``unwrap`` (DDP / ``torch.compile`` wrappers), ``clean_name`` (their prefixes in parameter names),
  ``set_submodule``, ``refuse_sharded`` (whole-model operations that need the full weights).
"""
import logging

from torch import nn

try:  # FSDP2 parameters
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # pragma: no cover  (torch 2.4)
    try:
        from torch.distributed._tensor import DTensor as _DTensor
    except ImportError:
        _DTensor = None


logger = logging.getLogger("losparse")


def is_sharded(t):
    """Whether ``t`` is a ``DTensor`` (a parameter, gradient or result of FSDP2's ``fully_shard``)."""
    return _DTensor is not None and isinstance(t, _DTensor)


def local_part(t):
    """The part of ``t`` this rank holds: the local rows of an FSDP2 ``DTensor``, any other tensor itself."""
    return t.to_local() if is_sharded(t) else t


_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def clean_name(n):
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if n.startswith(p):
                n, changed = n[len(p):], True
    return n


def unwrap(model):
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def refuse_sharded(model, what):
    if any(is_sharded(p) for p in model.parameters()):
        raise ValueError(f"{what}: the model is sharded (FSDP2 DTensors hold only this rank's rows); gather it first "
                         "with utils.fsdp2_full_model(model), called on every rank")


def set_submodule(root, name, new):
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
