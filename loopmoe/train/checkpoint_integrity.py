"""Checkpoint integrity: every file of a step with its size and blake2b digest (``manifest.json``, written
inside the step before its rename), checked at resume and load, so a damaged step is named (with the newest
intact one) instead of failing as an EOFError; ``checkpoint.resume`` latest | latest_intact | none.

At resume the check is split across the ranks (``resolve_resume(..., group)``): each rank digests its share
of the files, balanced by bytes, and one all_gather gives every rank every share's findings, so the job
reads a step once (a 9B step is ~121 GB: 32 ranks each reading all of it was ~3.9 TB per requeue) and every
rank stops with the same error. Without a group (analysis, export, one process) one process reads it all."""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
from dataclasses import dataclass, field

import torch.distributed as dist

log = logging.getLogger(__name__)

LATEST = "latest"  # the file naming the newest complete step directory (see checkpoint.py)

# ---------------------------------------------------------------------------------------------------
# Manifest: every file's size and digest, so a damaged step is named instead of failing as an EOFError


MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is damaged or cannot be resumed; the message names the step, the file and the way out."""


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    """Every file under ``step_dir`` (relative paths, sorted), the manifest excepted."""
    out = []
    for root, _, names in os.walk(step_dir):
        out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(f for f in out if f != MANIFEST)


def _entry(step_dir: str, rel: str) -> dict:
    path = os.path.join(step_dir, rel)
    return {"size": os.path.getsize(path), "blake2b": file_digest(path)}


# ---------------------------------------------------------------------------------------------------
# Verification, split across ranks: each rank digests its share of the files (balanced by bytes), one
# all_gather tells every rank what every share found, so every rank reaches the same verdict


@dataclass
class StepCheck:
    """What verifying one step found. ``damage`` is the same on every rank of the group."""
    damage: list[str]  # what is wrong, one line per damaged file in manifest order (empty: intact)
    hashed: list[str] = field(default_factory=list)  # the files THIS rank read and digested
    bytes_per_rank: list[int] = field(default_factory=list)  # bytes each rank of the group digested


def share_files(sizes: dict[str, int], world: int) -> list[list[str]]:
    """The files split into ``world`` shares of about equal bytes (digest time goes with bytes, and a
    step is a few multi-GB shards beside many small files): largest first, each to the share with the
    fewest bytes so far (ties: lowest rank). Greedy, so no share exceeds total/world + the largest file.
    It depends only on the manifest, so every rank computes the same shares without talking."""
    heap = [(0, r) for r in range(world)]  # (bytes so far, rank)
    shares: list[list[str]] = [[] for _ in range(world)]
    for rel in sorted(sizes, key=lambda f: (-sizes[f], f)):
        load, r = heapq.heappop(heap)
        shares[r].append(rel)
        heapq.heappush(heap, (load + sizes[rel], r))
    return shares


def _read_manifest(step_dir: str) -> tuple[dict[str, dict] | None, str | None]:
    """(files, None); (None, None) for a step saved before manifests existed; (None, what is wrong)."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        if not os.path.isdir(step_dir):
            return None, f"{step_dir} is missing"
        log.warning("checkpoint: %s has no %s (saved by an older version); its files are not verified",
                    step_dir, MANIFEST)
        return None, None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        for want in files.values():  # a malformed entry is the manifest's fault, not a file's
            int(want["size"]), str(want["blake2b"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"
    return files, None


def _check_file(step_dir: str, rel: str, want: dict) -> str | None:
    """None if the file matches its manifest entry, else what is wrong (an I/O error included: every
    rank must reach the collective, so nothing here may raise)."""
    p = os.path.join(step_dir, rel)
    try:
        if not os.path.exists(p):
            return f"{p} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return f"{p} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if file_digest(p) != want["blake2b"]:
            return f"{p} has the right size but the wrong blake2b digest (bytes changed on disk)"
    except OSError as e:
        return f"{p} is unreadable ({type(e).__name__}: {e})"
    return None


def _rank_world(group) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


def _all_gather(obj, group) -> list:
    """Every rank's ``obj``, in group-rank order ([obj] without a group)."""
    if group is None:
        return [obj]
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_step(step_dir: str, group=None) -> StepCheck:
    """Verify ``step_dir`` against its manifest. ``group`` None: this process digests every file.
    With a process group: COLLECTIVE, every rank of ``group`` calls it with the same ``step_dir``; each
    digests its share (share_files) and one all_gather merges the findings, so every rank returns the same
    ``damage``. A rank that cannot read the manifest reports that instead of hashing (the others still
    hash theirs and meet it in the all_gather: no rank is left waiting)."""
    rank, world = _rank_world(group)
    files, problem = _read_manifest(step_dir)
    sizes = {rel: int(want["size"]) for rel, want in (files or {}).items()}
    mine = share_files(sizes, world)[rank]
    found = {rel: msg for rel in mine if (msg := _check_file(step_dir, rel, files[rel])) is not None}
    parts = _all_gather((problem, found, sum(sizes[r] for r in mine), len(mine)), group)
    problems = [p for p, _, _, _ in parts if p is not None]
    if problems:  # the manifest (or the directory) is the damage: nothing to merge per file
        damage = [problems[0]]
    else:
        merged = {rel: msg for _, f, _, _ in parts for rel, msg in f.items()}
        damage = [merged[rel] for rel in sizes if rel in merged]  # manifest order, the same on every rank
    per_rank = [b for _, _, b, _ in parts]
    if world > 1 and rank == 0 and files is not None:
        log.info("checkpoint: %s verified by %d ranks, each its share: %d files, %.2f GiB in all, at most "
                 "%.2f GiB per rank (files per rank %s)", os.path.basename(step_dir), world, len(sizes),
                 sum(per_rank) / 2**30, max(per_rank) / 2**30, [n for _, _, _, n in parts])
    return StepCheck(damage, mine, per_rank)


def describe_damage(damage: list[str]) -> str | None:
    """One line for a step's damaged files (None: intact): the first in full, how many more and which."""
    if not damage:
        return None
    if len(damage) == 1:
        return damage[0]
    rest = [d.split(" ", 1)[0] for d in damage[1:]]  # each line starts with the file's path
    shown = ", ".join(rest[:3]) + (f", ... ({len(rest) - 3} more)" if len(rest) > 3 else "")
    return f"{damage[0]} (and {len(rest)} more damaged file(s): {shown})"


def verify_step(step_dir: str, group=None) -> str | None:
    """None if every file of ``step_dir`` matches its manifest, else what is wrong (the first bad file in
    manifest order, and the others named). A step saved before manifests existed (no manifest.json) is
    taken as intact. ``group``: split the digests across its ranks (collective, see check_step)."""
    return describe_damage(check_step(step_dir, group).damage)


def _step_of(tag: str) -> int | str:
    try:
        return int(tag.split("_")[1])
    except (IndexError, ValueError):  # latest edited by hand
        return tag


def _candidates(ckpt_dir: str, group) -> tuple[str | None, list[str]]:
    """(the tag ``latest`` names or None, the earlier step tags newest first), as group rank 0 reads them:
    every rank then checks the same steps in the same order (one collective per step), even if a rank's
    view of the directory lagged behind."""
    tag, earlier = None, []
    latest = os.path.join(ckpt_dir, LATEST)
    if os.path.isdir(ckpt_dir) and os.path.exists(latest):
        with open(latest) as f:
            tag = f.read().strip()
        earlier = sorted((t for t in os.listdir(ckpt_dir) if t.startswith("step_") and t < tag), reverse=True)
    if group is None:
        return tag, earlier
    box = [(tag, earlier)]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def resolve_resume(ckpt_dir: str, mode: str, group=None) -> str | None:
    """The step tag to resume from (None: start fresh) for ``checkpoint.resume`` = ``mode``:
    "none" -> None; "latest" -> the step ``latest`` names, CheckpointError if it is damaged (naming the
    file and the newest intact earlier step); "latest_intact" -> the newest intact step at or before it,
    with a WARNING when that is not the one ``latest`` names. ``group``: every step's digests are split
    across its ranks (collective: every rank calls it and gets the same answer, or the same error)."""
    if mode == "none":
        return None
    tag, earlier = _candidates(ckpt_dir, group)
    if tag is None:
        return None
    damage = verify_step(os.path.join(ckpt_dir, tag), group)  # also "missing" when latest names no directory
    if damage is None:
        return tag
    intact = next((t for t in earlier if verify_step(os.path.join(ckpt_dir, t), group) is None), None)
    if mode == "latest_intact" and intact is not None:
        log.warning("checkpoint: step %s is DAMAGED (%s); checkpoint.resume=latest_intact: resuming from the "
                    "newest intact step %s instead, the steps after it will be trained again",
                    _step_of(tag), damage, _step_of(intact))
        return intact
    way_out = (f"the newest intact earlier step is {_step_of(intact)}: resume from it with "
               f"checkpoint.resume=latest_intact" if intact is not None else
               "no earlier step is intact: start fresh with checkpoint.resume=none or another checkpoint.dir")
    raise CheckpointError(f"checkpoint step {_step_of(tag)} in {ckpt_dir} is damaged: {damage}; {way_out}")


def _write_manifest(work: str, rank: int) -> None:
    """Collective, after every rank's files are on disk: each rank digests the files it wrote (megatron's
    ``__{rank}_*.distcp`` shards, its RNG file), rank 0 gathers them, digests the rest and writes the
    manifest (temporary name, then rename) inside the step directory, before the step is renamed."""
    all_files = _files(work)
    mine = [f for f in all_files if os.path.basename(f).startswith(f"__{rank}_") or f == f"rng_rank{rank}.pt"]
    entries = {rel: _entry(work, rel) for rel in mine}
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, entries)
        entries = {k: v for part in gathered for k, v in part.items()}
    if rank == 0:
        for rel in all_files:  # metadata, common state, config, files of another naming
            if rel not in entries:
                entries[rel] = _entry(work, rel)
        _write_atomic(os.path.join(work, MANIFEST), json.dumps({"files": entries}, indent=1, sort_keys=True))


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
