"""Recordings of several processes (``torch.distributed``, DDP) merged into one.

Each rank of a data-parallel run watches its own replica and records the gradients of its own
local loss ``L_r`` on its own share of the batch. DDP averages the parameter gradients over the
``R`` ranks, so the objective the optimizer follows is ``L̄ = (1/R)·Σ_r L_r``. The merged
recording describes that objective:

* per-timestep state norms (and attention depth-flow norms): the states of rank ``r``'s samples
  receive ``∂L̄/∂h = (1/R)·∂L_r/∂h``, and the Frobenius norm over the whole global batch is
  ``sqrt(Σ_r n_r²) / R`` — squares summed over ranks, never norms averaged. With a mean loss and
  equal local batches this is exactly what one process computes on the global batch.
* parameter norms: DDP's all-reduced gradient is the same on every rank; it is read once, from
  the destination rank (watch() reads ``p.grad`` after DDP's all-reduce under DDP).
* missing data: a site, state or time position that a rank did not record (different site sets,
  shorter sequences; NaN in its recording) contributes nothing to the sum; where no rank has it the
  merged value is NaN (the usual right-padding). An infinite norm stays infinite. Non-finite
  gradients are also kept as events, each tagged with its ``rank``. Steps are matched by their
  step index.
* probe measures and per-step attention statistics (entropy, rank residual, …) are statistics of
  one batch; the merged recording keeps the destination rank's and says so in its notes.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import GradscopeError
from ..recording import Recording

__all__ = ["merge_recordings", "gather_recording"]


def merge_recordings(recordings: Sequence[Recording], *, primary: int = 0,
                     world_size: Optional[int] = None) -> Recording:
    """Merge the recordings of the ranks of one data-parallel run (see the module docstring).

    Args:
        recordings: one :class:`Recording` per rank, in rank order.
        primary: index of the rank whose parameter norms, probe measures and attention statistics
            are kept (the destination of :meth:`Scope.gather`).
        world_size: ``R`` in ``sqrt(Σ n_r²)/R``; defaults to ``len(recordings)``.

    Example:
        >>> import torch, gradscope
        >>> from gradscope.capture.distributed import merge_recordings
        >>> rnn = torch.nn.RNN(2, 4)
        >>> recs = []
        >>> for part in torch.randn(6, 4, 2).double().chunk(2, dim=1):   # two "ranks"
        ...     with gradscope.watch(rnn.double()) as scope:
        ...         rnn(part)[0].pow(2).mean().backward()
        ...     recs.append(scope.recording)
        >>> merge_recordings(recs).grad_norms("l0").shape
        (1, 6)
    """
    recs = list(recordings)
    if not recs or not all(isinstance(r, Recording) for r in recs):
        raise GradscopeError(
            f"merge_recordings() expects a non-empty sequence of Recordings (one per rank), got "
            f"{[type(r).__name__ for r in recs] if recs else 'an empty sequence'}.")
    if not 0 <= primary < len(recs):
        raise GradscopeError(f"primary={primary} is not a rank index in [0, {len(recs)}).")
    R = len(recs) if world_size is None else int(world_size)
    if R < 1:
        raise GradscopeError(f"world_size must be >= 1, got {world_size!r}.")
    first = recs[primary]

    # steps: the union of step indices, sorted
    steps = np.array(sorted(set().union(*(r.steps.tolist() for r in recs))), dtype=np.int64)
    row_of = {int(s): i for i, s in enumerate(steps)}
    S = len(steps)

    # sites: the primary's first, then any others in rank order
    sites: Dict[str, Dict] = {}
    for r in [first] + recs:
        for s in r.sites:
            sites.setdefault(s, r.site_info(s))

    notes: List[str] = []
    differing = sorted({s for r in recs for s in r.sites} - set.intersection(*(set(r.sites) for r in recs)))
    if differing:
        notes.append(f"merged {len(recs)} ranks whose site sets differ ({', '.join(differing)} missing on "
                     f"some ranks): a missing rank contributes nothing to those sites' norms.")

    grads: Dict[Tuple[str, str], np.ndarray] = {}
    seq_lens: Dict[str, np.ndarray] = {}
    lens_differ = False
    for site, info in sites.items():
        for state in info["states"]:
            parts = []
            for r in recs:
                if site not in r.sites:
                    continue
                a = r.grad_norms(site, state)
                if a.shape[1]:
                    parts.append((r, a))
            T = max((a.shape[1] for _, a in parts), default=0)
            sq = np.zeros((S, T))
            seen = np.zeros((S, T), dtype=bool)
            for r, a in parts:
                rows = [row_of[int(s)] for s in r.steps]
                ok = ~np.isnan(a)  # NaN: padding or not recorded there; an infinite norm stays inf
                sq[rows, :a.shape[1]] += np.where(ok, a, 0.0) ** 2
                seen[rows, :a.shape[1]] |= ok
            merged = np.sqrt(sq) / R
            merged[~seen] = np.nan
            grads[(site, state)] = merged
        lens = np.zeros(S, dtype=np.int64)
        per_rank = []
        for r in recs:
            if site in r.sites:
                rows = [row_of[int(s)] for s in r.steps]
                sl = r.seq_lens(site)
                per_rank.append(sl)
                lens[rows] = np.maximum(lens[rows], sl)
        if len({tuple(x.tolist()) for x in per_rank}) > 1:
            lens_differ = True
        seq_lens[site] = lens
    if lens_differ:
        notes.append("ranks ran different sequence lengths; each step's merged norms cover the longest, "
                     "shorter ranks contribute nothing past their end (NaN where no rank reached).")

    # parameters: the all-reduced gradient is the same on every rank; take the primary's
    params = {}
    prow = [row_of[int(s)] for s in first.steps]
    for name, a in first.param_grad_norms().items():
        full = np.full(S, np.nan)
        full[prow] = a
        params[name] = full
    # update and weight norms: DDP keeps the weights identical on every rank; the primary's too
    upd, wts = {}, {}
    for name, a in first.update_norms().items():
        upd[name], wts[name] = np.full(S, np.nan), np.full(S, np.nan)
        upd[name][prow], wts[name][prow] = a, first.weight_norms()[name]

    # measures: the primary's as they are (in a DDP run every rank records the same steps)
    measures = first.measures()
    if measures:
        notes.append(f"probe measures and per-step attention statistics are rank {primary}'s "
                     f"(statistics of that rank's batch); state and parameter norms cover all {R} ranks.")

    events = []
    for rank, r in enumerate(recs):
        for e in r.events:
            events.append(dict(e, rank=rank))
    unsupported, seen_u = [], set()
    for r in recs:
        for u in r.unsupported:
            k = (u.get("module"), u.get("reason"))
            if k not in seen_u:
                seen_u.add(k)
                unsupported.append(u)
    for r in recs:
        for n in r.notes:
            if n not in notes:
                notes.append(n)
    meta = dict(first.meta, merged_ranks=len(recs), world_size=R, primary_rank=primary)
    return Recording(sites=sites, steps=steps, grads=grads, seq_lens=seq_lens, params=params,
                     events=events, unsupported=unsupported, notes=notes, meta=meta,
                     measures=measures, measure_meta=first.measure_meta, update_norms=upd, weight_norms=wts)


def gather_recording(rec: Recording, *, dst: int = 0, group=None) -> Optional[Recording]:
    """Collect every rank's ``rec`` on rank ``dst`` and merge them there; ``None`` on other ranks.

    A collective: every rank of ``group`` must call it. Recordings travel in their saved form
    (npz + JSON, no pickle) as byte tensors; with the NCCL backend they go through the current
    CUDA device (``torch.cuda.set_device(local_rank)`` first, as DDP needs anyway).
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise GradscopeError(
            "gather() needs an initialised torch.distributed process group (none is): call "
            "torch.distributed.init_process_group(...) in every process first (torchrun sets up the "
            "environment for it). In a single process use scope.recording instead.")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if not isinstance(dst, int) or isinstance(dst, bool) or not 0 <= dst < world:
        raise GradscopeError(f"dst must be a rank in [0, {world}), got {dst!r}.")
    backend = str(dist.get_backend(group)).lower()
    dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    data = torch.frombuffer(bytearray(rec._to_bytes()), dtype=torch.uint8).to(dev)
    sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=dev), group=group)
    sizes = [int(s) for s in sizes]
    buf = torch.zeros(max(sizes), dtype=torch.uint8, device=dev)
    buf[:data.numel()] = data
    glob_dst = dst if group is None else dist.get_global_rank(group, dst)
    out = [torch.zeros_like(buf) for _ in range(world)] if rank == dst else None
    dist.gather(buf, gather_list=out, dst=glob_dst, group=group)
    if rank != dst:
        return None
    recs = [Recording._from_bytes(bytes(t[:n].cpu().numpy()), f"the recording of rank {i}")
            for i, (t, n) in enumerate(zip(out, sizes))]
    return merge_recordings(recs, primary=dst, world_size=world)
