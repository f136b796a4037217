"""Where the processes differ, for the ``Pruner``: one process (``Local``), DDP (``Replicated``) and FSDP2 row
shards (``RowShards``), behind one small interface picked from the parameters (``distribution_for``); and
``check_distributed_support``, which stops a run at start-up under modes LoSparse cannot prune (DeepSpeed, FSDP1,
Megatron-LM). The FSDP2 wiring of a model (sharding, checkpoints) is in ``losparse.fsdp2``.
"""
import os

import torch

from .common import clean_name, is_sharded, local_part
from .importance import expand_counts, reduce_scores


class Local:
    """One process: every matrix is whole here, every reduction is the identity."""

    def splits(self, p):
        """Whether the rows of parameter ``p`` are spread over the ranks."""
        return False

    def local(self, t):
        """The part of ``t`` this rank holds."""
        return t

    def sum_columns(self, cur, segments):
        """Complete, in place, the column sums of ``cur`` (this rank's rows' |S * G| summed per column)."""

    def columns(self, score, method, p):
        """One score per column of ``p`` from its element scores on this rank."""
        return reduce_scores(score, method, 0)

    def all_finite(self, finite):
        """Whether every rank's update is finite (a 0-dim bool tensor)."""
        return finite

    def agree(self, scores):
        """The scores every rank masks with."""
        return scores

    def multiplicities(self, segments, device):
        """``(weights, total)`` for the global k-th score: the multiplicity of every score :meth:`gather` returns
        (None when all are 1) and their sum, the number of entries of every masked matrix."""
        counts = [s.mult for s in segments]
        total = sum(s.size * c for s, c in zip(segments, counts))
        return (None if all(c == 1 for c in counts) else expand_counts(segments, counts, device)), total

    def gather(self, scores):
        """Every rank's ``scores``, concatenated in rank order."""
        return scores

    def full(self, t, segment):
        """The statistics of ``segment`` in the single-process layout (``state_dict``)."""
        return t

    def own(self, t, p, axis):
        """This rank's part of a single-process statistic ``t`` of ``p`` (``load_state_dict``)."""
        return t

    def whole_rows(self, t, p):
        """A per-row tensor ``t`` of this rank's rows of ``p``, completed with every rank's rows."""
        return t


class Replicated(Local):
    """DDP: every rank holds every matrix and the all-reduced gradients, so the statistics agree; at a mask step
    rank 0's scores are broadcast, so the masks can never drift apart (float noise, a non-deterministic kernel)."""

    def agree(self, scores):
        return broadcast_from_rank0(scores)


class RowShards(Local):
    """FSDP2 (``fully_shard``): masked matrices are ``DTensor`` row shards (``Shard(0)`` on a 1-D mesh). Statistics
    of rows stay where the rows are; column sums and aggregates are all-reduced; the global k-th score comes from
    every rank's aggregated scores with their multiplicities (scores every rank holds, of columns, count on rank 0
    only); ``state_dict`` gathers the rows into the single-process layout."""

    def __init__(self, group):
        self.group = group
        self.first = torch.distributed.get_rank(group) == 0

    def splits(self, p):
        return is_sharded(p)

    def local(self, t):
        return local_part(t)

    @staticmethod
    def _own_rows(segment):
        return segment.split and segment.axis != 0

    def sum_columns(self, cur, segments):
        parts = [(s.offset, s.size) for s in segments if s.split and s.axis == 0]
        if not parts:
            return
        sums = torch.cat([cur[off:off + size] for off, size in parts])
        torch.distributed.all_reduce(sums, group=self.group)
        for (off, size), part in zip(parts, sums.split([size for _, size in parts])):
            cur[off:off + size].copy_(part)

    def columns(self, score, method, p):
        if not is_sharded(p):
            return reduce_scores(score, method, 0)
        dist = torch.distributed
        if method in ("mean", "sum"):
            out, op = score.sum(dim=0), dist.ReduceOp.SUM
        else:
            op = dist.ReduceOp.MAX if method == "max" else dist.ReduceOp.MIN
            if score.shape[0] == 0:  # this rank holds no row
                out = score.new_full(score.shape[1:], float("-inf") if method == "max" else float("inf"))
            else:
                out = score.amax(dim=0) if method == "max" else score.amin(dim=0)
        out = out.contiguous()
        dist.all_reduce(out, op=op, group=self.group)
        return out / p.shape[0] if method == "mean" else out

    def all_finite(self, finite):
        flag = finite.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return flag.bool()

    def multiplicities(self, segments, device):
        counts = [s.mult if self.first or self._own_rows(s) else 0 for s in segments]
        weights = self.gather(expand_counts(segments, counts, device))
        return weights, int(weights.sum().item())

    def gather(self, scores):
        return all_gather_rows(scores, self.group)

    def full(self, t, segment):
        return all_gather_rows(t.contiguous(), self.group) if segment is not None and self._own_rows(segment) else t

    def own(self, t, p, axis):
        if is_sharded(p) and axis != 0 and t.dim() and t.shape[0] == p.shape[0]:
            start, end = row_range(p)
            return t[start:end]
        return t

    def whole_rows(self, t, p):
        return all_gather_rows(t.contiguous(), self.group) if is_sharded(p) else t


def distribution_for(named_params, masked=lambda name: True):
    """The distribution for parameters ``(name, parameter)`` whose ``masked(name)`` ones are pruned: FSDP2 row
    shards, DDP or one process. Other kinds of sharding are refused."""
    group = None
    for n, p in named_params:
        if is_sharded(p) and p.device_mesh.ndim == 1 and p.placements[0].is_shard(0):
            if group is None and masked(clean_name(n)):
                group = p.device_mesh.get_group()
            continue
        if hasattr(p, "ds_id") or hasattr(p, "ds_numel") or type(p).__name__ in ("FlatParameter", "DTensor") or \
                getattr(p, "_is_sharded", False):
            raise RuntimeError(
                f"Pruner: parameter {n!r} is sharded in a way LoSparse cannot prune (DeepSpeed ZeRO-3, FSDP1 flat "
                "parameters, tensor parallel or a 2-D mesh): use a single process or DDP (accelerate launch "
                "--multi_gpu), or FSDP2 (--fsdp2, or accelerate launch --use_fsdp --fsdp_version 2), whose "
                "row shards the Pruner handles; see utils.check_distributed_support.")
    if group is not None:
        return RowShards(group)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Replicated()
    return Local()


def distribution_kind(params):
    """What :func:`distribution_for` would pick for ``params``, cheaply (to notice a model sharded after the Pruner
    was built)."""
    if any(is_sharded(p) for _, p in params):
        return RowShards
    dist = torch.distributed
    return Replicated if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else Local


def all_gather_rows(t, group):
    """Concatenate, in rank order, every rank's ``t`` along dim 0 (the sizes may differ: padded for the gather)."""
    dist = torch.distributed
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(x) for x in sizes]
    padded = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
    padded[:t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded, group=group)
    return torch.cat([o[:k] for o, k in zip(out, sizes)])


def row_range(p):
    """``(start, end)``: the rows of an FSDP2 parameter (``Shard(0)``, ``torch.chunk`` sizes) this rank holds."""
    mesh = p.device_mesh
    world, rank, rows = mesh.size(), mesh.get_local_rank(), p.shape[0]
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    end = min(start + chunk, rows)
    if end - start != p.to_local().shape[0]:
        raise RuntimeError(f"unexpected FSDP2 shard: rank {rank} of {world} holds {p.to_local().shape[0]} of {rows} "
                           f"rows, expected {end - start}")
    return start, end


def broadcast_from_rank0(t):
    """Under torch.distributed, make every rank use rank 0's scores (masks can then never drift apart)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast(t, src=0)
    return t


SUPPORTED_DISTRIBUTED = ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_MUSA",
                         "MULTI_SDAA", "MULTI_HPU")


def check_distributed_support(accelerator):
    """Stop at start-up, with a message, under DeepSpeed, FSDP1 or Megatron-LM.

    Their shards hold parts of rows (flattened parameters, ZeRO partitions, tensor-parallel slices), so
    importance scores and row masks computed on a rank would be wrong. Supported: one process, data parallel
    (DDP) on one or several machines, and FSDP2 (Accelerate's FSDP plugin with ``fsdp_version: 2``, or the
    scripts' ``--fsdp2``), whose shards are whole rows.
    """
    dt = getattr(getattr(accelerator, "distributed_type", None), "value", str(accelerator.distributed_type))
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"WORLD_SIZE={world} but accelerate runs this process alone (distributed_type={dt}): the {world} "
            "processes would train independently and overwrite each other's output. On CPU launch with "
            "ACCELERATE_USE_CPU=1 (or `accelerate launch --cpu` with a multi-CPU config); on GPUs check that "
            "CUDA is visible to every process.")
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if dt == "FSDP" and getattr(plugin, "fsdp_version", 1) == 2:
        return
    if dt not in SUPPORTED_DISTRIBUTED:
        raise RuntimeError(
            f"LoSparse does not support accelerate distributed_type={dt}"
            f"{' with fsdp_version 1' if dt == 'FSDP' else ''}: DeepSpeed ZeRO, FSDP1 (flat parameters) and "
            "Megatron-LM split rows of the matrices across ranks, and pruning needs whole rows. Supported: a single "
            "process, data parallel with `accelerate launch --multi_gpu --num_processes N` (one or several "
            "machines; `--cpu` for CPU processes), or FSDP2 for models bigger than one GPU: `accelerate launch "
            "--use_fsdp --fsdp_version 2 ...` or the flag --fsdp2. For the full fine-tuning baseline use "
            "--no_losparse.")
