"""Atomic, verified checkpoints in the run directory.

A checkpoint is a directory `checkpoints/step_XXXXXXXX/` that becomes visible only when complete:
everything is written into `step_XXXXXXXX.tmp/` and then renamed. A crash mid-save leaves a `.tmp`
directory that is ignored (and removed at the next start or save), never a broken `step_*` directory.
Pruning renames a checkpoint to `.deleting-step_*` before removing it, so a crash mid-prune never leaves
a half-deleted checkpoint that looks complete.
Files: `model.pt`, `optim.pt` (state dicts), `rng_rank{r}.pt` (torch RNG, per rank), `state.json`
(step, data position, token count, python/numpy RNG, and what wrote it), `recipe.yaml` (the recipe that
wrote it), DeepSpeed's shards under `zero/` for ZeRO-n, and `manifest.json`: the sha256 and size of
every other file, written last (after all files are complete) and checked before a checkpoint is used.

Trust: nothing here unpickles arbitrary objects. Every `.pt` file of a checkpoint (ours and DeepSpeed's)
is vetted with torch's weights-only unpickler, allowing exactly the tensor containers torch writes plus
the three DeepSpeed types its ZeRO shards hold (`LossScaler`, `ZeroStageEnum`, `fragment_address`),
before any library (DeepSpeed's loaders use `weights_only=False`) reads it.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "lctrain-manifest/1"
_NAME = re.compile(r"^step_(\d{8})$")
# Leftovers of a killed save, prune or ZeRO conversion (removed by `clean_stale`).
_STALE = re.compile(r"^(step_\d{8}\.tmp|\.deleting-step_\d{8}.*|\.universal-.*)$")


class CheckpointError(ValueError):
    pass


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CKPT_DIR)


def list_checkpoints(run_dir: str) -> list[str]:
    """Completed checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n) and os.path.isfile(os.path.join(root, n, "state.json")))
    return [os.path.join(root, n) for n in names]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def staging_dir(run_dir: str, step: int) -> str:
    """A fresh temp directory for the checkpoint of `step` (stale ones from crashes are removed)."""
    root = checkpoint_root(run_dir)
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f"step_{step:08d}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def clean_stale(run_dir: str) -> list[str]:
    """Remove what killed saves, prunes and ZeRO conversions left in `checkpoints/`; returns the names.
    Only call it while holding the run directory's lock (a live trainer may be writing them)."""
    root = checkpoint_root(run_dir)
    found = sorted(n for n in os.listdir(root) if _STALE.match(n)) if os.path.isdir(root) else []
    for n in found:
        path = os.path.join(root, n)
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return found


def _remove(ckpt: str):
    """Delete a checkpoint: first renamed out of sight (atomic), so a crash mid-delete leaves no half
    checkpoint that `list_checkpoints` would take for a complete one."""
    gone = os.path.join(os.path.dirname(ckpt), ".deleting-" + os.path.basename(ckpt))
    shutil.rmtree(gone, ignore_errors=True)
    os.replace(ckpt, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _kept(ckpt: str) -> bool:
    """Marked `keep` in its state.json (e.g. where a wsd decay starts: the branch point to extend a run)."""
    try:
        with open(os.path.join(ckpt, "state.json")) as f:
            return json.load(f).get("keep") is True
    except (OSError, ValueError, AttributeError):
        return False


def step_of(ckpt: str) -> int:
    return int(os.path.basename(ckpt)[len("step_"):])


def publish(tmp: str, keep_last: int) -> str:
    """Make a staged checkpoint visible (atomic rename), then drop older ones beyond keep_last.

    The manifest must already be written (`write_manifest`). The new checkpoint counts as the newest
    verified one (its manifest was computed from its files, whose sizes are checked again here): it
    and the keep_last - 1 checkpoints before it are kept; checkpoints of later steps (an abandoned
    branch) are never pruned here. Nothing is pruned if the new checkpoint fails the size check."""
    final = tmp[: -len(".tmp")]
    _fsync_dir(tmp)
    if os.path.exists(final):          # re-saving the same step (e.g. end of run after a periodic save)
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(final))
    verify_checkpoint(final, hashes=False)
    older = [c for c in list_checkpoints(os.path.dirname(os.path.dirname(final)))
             if step_of(c) < step_of(final) and not _kept(c)]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        _remove(old)
    return final


def _fsync_dir(path: str):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def host_rng_state() -> dict:
    np_state = np.random.get_state()
    return {"python": _listify(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def set_host_rng_state(state: dict):
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (list, tuple)) else x


def save_rng(tmp: str, rank: int):
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(tmp, f"rng_rank{rank}.pt"))


def load_rng(ckpt: str, rank: int):
    path = os.path.join(ckpt, f"rng_rank{rank}.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {ckpt}: no RNG state for rank {rank} (saved with a different world size?)")
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# state.json: field -> (required, check, what it must be). Validated like a recipe: one line naming
# the file and the field.
def _nonneg(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _pos(v):
    return _nonneg(v) and v >= 1


def _py_rng(v):
    return (isinstance(v, list) and len(v) == 3 and _nonneg(v[0]) and isinstance(v[1], list) and len(v[1]) == 625
            and all(_nonneg(x) for x in v[1]))


def _np_rng(v):
    return (isinstance(v, list) and len(v) == 5 and v[0] == "MT19937" and isinstance(v[1], list) and len(v[1]) == 624
            and all(_nonneg(x) for x in v[1]) and _nonneg(v[2]) and _nonneg(v[3]) and isinstance(v[4], (int, float)))


_STATE_FIELDS = {
    "step": (True, _nonneg, "an integer >= 0"),
    "consumed": (True, _nonneg, "an integer >= 0"),
    "tokens": (True, _nonneg, "an integer >= 0"),
    "nonfinite_in_row": (True, _nonneg, "an integer >= 0"),
    "skipped_steps": (True, _nonneg, "an integer >= 0"),
    "python": (True, _py_rng, "python's random state [version, 625 integers, gauss]"),
    "numpy": (True, _np_rng, "numpy's MT19937 state [\"MT19937\", 624 integers, pos, has_gauss, gauss]"),
    "world_size": (False, _pos, "an integer >= 1"),
    "dp_size": (False, _pos, "an integer >= 1"),
    "sp_size": (False, _pos, "an integer >= 1"),
    "global_batch": (False, _pos, "an integer >= 1"),
    "seq_len": (False, _pos, "an integer >= 1"),
    "total_steps": (False, _pos, "an integer >= 1"),
    "seed": (False, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "keep": (False, lambda v: isinstance(v, bool), "true or false"),
    "zero_stage": (False, lambda v: v in (0, 1, 2, 3) and not isinstance(v, bool), "0, 1, 2 or 3"),
    "format": (False, lambda v: v in ("torch", "deepspeed"), '"torch" or "deepspeed"'),
}


def _read_json(path: str, what: str):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {what} ({str(e).splitlines()[0]})") from None


def read_state(ckpt: str) -> dict:
    """The checkpoint's state.json, validated: CheckpointError naming the file and the field."""
    path = os.path.join(ckpt, "state.json")
    st = _read_json(path, "checkpoint state")
    if not isinstance(st, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(st).__name__}")
    for key, (required, ok, what) in _STATE_FIELDS.items():
        if key not in st:
            if required:
                raise CheckpointError(f"{path}: field '{key}' is missing")
        elif not ok(st[key]):
            raise CheckpointError(f"{path}: field '{key}' must be {what}, got {json.dumps(st[key])[:60]}")
    return st


def write_state(tmp: str, state: dict):
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f, indent=1)


# --- integrity: content hashes ---------------------------------------------------------------------
def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (manifests; the exported-tokenizer cache)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(ckpt: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ckpt):
        dirnames.sort()
        for n in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, n), ckpt)
            if rel != MANIFEST:
                out.append(rel)
    return out


def _hash_all(ckpt: str, rels: list[str]) -> list[str]:
    # hashlib releases the GIL on large buffers: files are hashed in parallel (I/O or SHA bound)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(rels), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda r: file_sha256(os.path.join(ckpt, r)), rels))


def write_manifest(tmp: str) -> dict:
    """Hash every file of a complete staged checkpoint into `manifest.json` (written last, fsynced).
    The files are hashed after they are written (read back from the page cache: one extra sequential
    read of the checkpoint, in parallel over files)."""
    rels = _files(tmp)
    digests = _hash_all(tmp, rels)
    manifest = {"format": MANIFEST_FORMAT, "hash": "sha256",
                "files": {r: {"bytes": os.path.getsize(os.path.join(tmp, r)), "sha256": d} for r, d in zip(rels, digests)}}
    for r in rels:
        _fsync_file(os.path.join(tmp, r))
    path = os.path.join(tmp, MANIFEST)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def _fsync_file(path: str):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(ckpt: str) -> Optional[dict]:
    """The validated manifest, or None for a checkpoint written before manifests existed."""
    path = os.path.join(ckpt, MANIFEST)
    if not os.path.exists(path):
        return None
    m = _read_json(path, "checkpoint manifest")
    if not isinstance(m, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(m).__name__}")
    if m.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: field 'format' must be {MANIFEST_FORMAT!r}, got {json.dumps(m.get('format'))[:60]}")
    files = m.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path}: field 'files' must be an object of file -> {{bytes, sha256}}")
    for rel, e in files.items():
        ok = (isinstance(e, dict) and _nonneg(e.get("bytes")) and isinstance(e.get("sha256"), str)
              and re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) is not None)
        if not ok or os.path.isabs(rel) or ".." in rel.split(os.sep):
            raise CheckpointError(f"{path}: field 'files.{rel}' must be {{\"bytes\": int, \"sha256\": 64 hex digits}} "
                                  f"with a relative path")
    return m


def verify_checkpoint(ckpt: str, hashes: bool = True) -> bool:
    """Check the checkpoint's files against its manifest: present, same size, same sha256 (sizes only
    with hashes=False), and no file the manifest does not list. False for a checkpoint without a
    manifest (written by an older lctrain: not verifiable); CheckpointError naming the file otherwise."""
    m = read_manifest(ckpt)
    if m is None:
        return False
    files = m["files"]
    for rel in _files(ckpt):
        if rel not in files:
            raise CheckpointError(f"checkpoint {ckpt}: {rel} is not in its manifest (added after the save): refusing it")
    for rel, e in files.items():
        p = os.path.join(ckpt, rel)
        if not os.path.isfile(p):
            raise CheckpointError(f"checkpoint {ckpt}: {rel} is missing (listed in its manifest)")
        if os.path.getsize(p) != e["bytes"]:
            raise CheckpointError(f"checkpoint {ckpt}: {rel} is corrupt ({os.path.getsize(p)} bytes, the manifest "
                                  f"says {e['bytes']})")
    if hashes:
        rels = list(files)
        for rel, d in zip(rels, _hash_all(ckpt, rels)):
            if d != files[rel]["sha256"]:
                raise CheckpointError(f"checkpoint {ckpt}: {rel} is corrupt (its sha256 differs from the manifest's)")
    return True


# --- trust: no arbitrary unpickling ----------------------------------------------------------------
def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed's ZeRO shards pickle (checked on DeepSpeed 0.19: optimizer
    states hold the loss scaler, the stage enum and fragment addresses). Imported only when vetting a
    checkpoint that has shards; none of them runs code when unpickled (plain attributes, an enum, a
    dataclass)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except Exception:                     # no DeepSpeed: only plain tensor containers are allowed
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]


def vet_pickle(path: str, allow: list = ()) -> None:
    """Refuse (CheckpointError, one line naming the file and the offending global) a torch file that
    holds anything but tensors, containers, primitives and the `allow`ed types. Uses torch's
    weights-only unpickler (memory-mapped for zip files: tensor data is not read)."""
    import torch
    try:
        with torch.serialization.safe_globals(list(allow)):
            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        bad = []
        try:
            bad = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            pass
        allowed = {f"{t.__module__}.{t.__qualname__}" for t in allow}
        bad = [b for b in bad if b not in allowed]
        if bad:
            raise CheckpointError(f"{path}: refusing to load it: it pickles {bad[0]}, which a weights-only load "
                                  f"does not allow (it could run code)") from None
        text = " ".join(str(e).split())
        detail = text.split("WeightsUnpickler error:")[-1].strip()[:120] if text else type(e).__name__
        raise CheckpointError(f"checkpoint {os.path.dirname(path)}: cannot load {os.path.basename(path)} (damaged or "
                              f"not a weights-only torch file: {detail})") from None


def vet_checkpoint(ckpt: str) -> None:
    """Vet every `.pt` file of a checkpoint (see `vet_pickle`) before anything loads it."""
    rels = [r for r in _files(ckpt) if r.endswith((".pt", ".pth", ".bin"))]
    allow = _deepspeed_safe_globals() if any(r.startswith("zero" + os.sep) for r in rels) else []
    for rel in rels:
        vet_pickle(os.path.join(ckpt, rel), allow)


def check_checkpoint(ckpt: str) -> bool:
    """Verify (manifest) then vet (pickles) a checkpoint before use; returns whether it had a manifest."""
    verified = verify_checkpoint(ckpt)
    vet_checkpoint(ckpt)
    return verified


# --- a full disk ----------------------------------------------------------------------------------
def no_space(e: BaseException, path: str) -> bool:
    """Whether a write failure is a full device (or quota): errno ENOSPC/EDQUOT anywhere in the chain,
    or torch's "unexpected pos" (its zip writer's view of a short write) with the device nearly full."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if "unexpected pos" in str(e) or "iostream error" in str(e):
        try:
            st = os.statvfs(path)
            return st.f_bavail * st.f_frsize < 64 * 2 ** 20
        except OSError:
            return False
    return False


def load_tensor_file(ckpt: str, name: str, map_location="cpu"):
    path = os.path.join(ckpt, name)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {ckpt}: missing {name}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt}: cannot load {name} ({str(e).splitlines()[0]})") from None


def tensor_shapes(ckpt: str, name: str) -> dict:
    """{key: shape} of a state-dict file, memory-mapped (no tensor data read)."""
    path = os.path.join(ckpt, name)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt}: cannot load {name} ({str(e).strip().splitlines()[0][:120]})") from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"checkpoint {ckpt}: {name} is not a state dict")
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def resolve_checkpoint(path: str, check: bool = True) -> str:
    """A checkpoint directory from a run dir (its latest) or a checkpoint dir itself; with check,
    verified against its manifest and vetted (`check_checkpoint`) before it is returned."""
    if os.path.isfile(os.path.join(path, "state.json")):
        found = path
    else:
        found = latest_checkpoint(path) if os.path.isdir(path) else None
    if found is None:
        raise CheckpointError(f"no checkpoint found at {path}")
    if check:
        check_checkpoint(found)
    return found
