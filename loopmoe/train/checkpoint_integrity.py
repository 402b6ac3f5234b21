"""Checkpoint integrity: every file of a step with its size and blake2b digest (``manifest.json``, written
inside the step before its rename), checked at resume and load, so a damaged step is named (with the newest
intact one) instead of failing as an EOFError; ``checkpoint.resume`` latest | latest_intact | none."""
from __future__ import annotations

import hashlib
import json
import logging
import os

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


def verify_step(step_dir: str) -> str | None:
    """None if every file of ``step_dir`` matches its manifest, else what is wrong with the first bad file.
    A step saved before manifests existed (no manifest.json) is taken as intact."""
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        if not os.path.isdir(step_dir):
            return f"{step_dir} is missing"
        log.warning("checkpoint: %s has no %s (saved by an older version); its files are not verified",
                    step_dir, MANIFEST)
        return None
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{path} is unreadable ({type(e).__name__}: {e})"
    for rel, want in files.items():
        p = os.path.join(step_dir, rel)
        if not os.path.exists(p):
            return f"{p} is missing"
        size = os.path.getsize(p)
        if size != want["size"]:
            return f"{p} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if file_digest(p) != want["blake2b"]:
            return f"{p} has the right size but the wrong blake2b digest (bytes changed on disk)"
    return None


def _step_of(tag: str) -> int | str:
    try:
        return int(tag.split("_")[1])
    except (IndexError, ValueError):  # latest edited by hand
        return tag


def resolve_resume(ckpt_dir: str, mode: str) -> str | None:
    """The step tag to resume from (None: start fresh) for ``checkpoint.resume`` = ``mode``:
    "none" -> None; "latest" -> the step ``latest`` names, CheckpointError if it is damaged (naming the
    file and the newest intact earlier step); "latest_intact" -> the newest intact step at or before it,
    with a WARNING when that is not the one ``latest`` names."""
    if mode == "none" or not os.path.isdir(ckpt_dir):
        return None
    latest = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(latest):
        return None
    with open(latest) as f:
        tag = f.read().strip()
    damage = verify_step(os.path.join(ckpt_dir, tag))  # also "missing" when latest names no directory
    if damage is None:
        return tag
    earlier = sorted((t for t in os.listdir(ckpt_dir) if t.startswith("step_") and t < tag), reverse=True)
    intact = next((t for t in earlier if verify_step(os.path.join(ckpt_dir, t)) is None), None)
    if mode == "latest_intact" and intact is not None:
        log.warning("checkpoint: step %d is DAMAGED (%s); checkpoint.resume=latest_intact: resuming from the "
                    "newest intact step %d instead, the steps after it will be trained again",
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
