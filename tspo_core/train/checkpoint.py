"""RL training checkpoints on `torch.distributed.checkpoint` (DCP), surviving crashes and changes of world size.

A checkpoint directory holds
- `state/`: the DCP checkpoint of the model and the optimizer, one shard file per rank that wrote it
  (`__<rank>_0.distcp`) and `.metadata`. Under LoRA the model part is the trainable adapters alone (the frozen base
  is the run's starting checkpoint). DCP reshards on load: a checkpoint written by N ranks resumes on M;
  `sha256-rank<r>.json` records the sha256 of each rank's shards, checked on resume;
- `trainer_state.pt`: step, fingerprint, LoRA settings, scheduler state and the world size that wrote it;
- `rng/rank<r>.pt`: every rank's RNG states (python, numpy, torch);
- `history.json` (per-step metrics so far; their wall-clock timings in `run_record.json`, outside DVC's hash) and
  the tokenizer.

It is written atomically: all ranks write into one temporary directory that rank 0 renames into place when every
rank has finished (`tspo_core.io.atomic_dir`), so the previous checkpoint stays loadable if a process dies, the
disk fills or the directory is unwritable mid-write. Nothing with a non-finite parameter is ever written. The
stage's final model is not a checkpoint: a plain HF directory written once from the gathered full state dict
(`tspo_core.train.rl.export_model`).
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tspo_core.errors import TSPOError
from tspo_core.io import atomic_dir
from tspo_core.runinfo import merge_history, read_run_record, split_history, write_run_record

STATE_FILE = "trainer_state.pt"
HISTORY_FILE = "history.json"
DCP_DIR = "state"
RNG_DIR = "rng"


class CheckpointError(TSPOError):
    """A checkpoint that cannot be written or loaded (the message names the directory or file)."""


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


def _state_dicts(model, optimizer, trainable_only: bool):
    """(model, optimizer) state dicts as DCP saves and loads them; with `trainable_only` the parameters that
    require gradients alone (a tied output head shares a frozen weight under another name: left out too)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(trainable_only))
    if trainable_only:
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trainable}
    return model_sd, optim_sd


warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
"""DCP's note for every single-process save and load (world size 1 is an intended use here)."""


def _initialized() -> bool:
    """A process group is set up (else DCP reads and writes in this process alone)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _collective(dist):
    return dist is not None and dist.world > 1


def save_checkpoint(path: str | Path, model, optimizer, tokenizer, state: dict[str, Any], history: list[dict],
                    dist=None, trainable_only: bool = False) -> None:
    """Atomically replace `path` with a checkpoint of `model` and `optimizer` (DCP, every rank its shard) and the
    trainer `state` (rank 0); every rank of `dist` must call it. Refuses NaN/inf weights."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    path = Path(path)
    rank = dist.rank if dist is not None else 0
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:  # every rank holds a shard of every parameter: each sees a non-finite one
        raise CheckpointError(f"{path}: refusing to checkpoint non-finite parameters ({bad[:3]} ...)")
    model_sd, optim_sd = _state_dicts(model, optimizer, trainable_only)
    try:
        with atomic_dir(path) if rank == 0 else _nothing() as tmp:
            tmp = _broadcast(tmp, dist)
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / DCP_DIR),
                     no_dist=not _initialized())
            _write_checksums(tmp / DCP_DIR, rank)
            (tmp / RNG_DIR).mkdir(exist_ok=True)
            torch.save(rng_state(), tmp / RNG_DIR / f"rank{rank}.pt")
            if rank == 0:
                tokenizer.save_pretrained(tmp)
                torch.save({**state, "world_size": dist.world if dist is not None else 1}, tmp / STATE_FILE)
                save_history(tmp, history)
            if _collective(dist):
                dist.barrier()  # every shard written before rank 0 renames the directory into place
    except (OSError, RuntimeError, CheckpointException) as err:
        # a full disk surfaces as OSError from plain writes, RuntimeError from torch.save's zip writer and
        # CheckpointException (a BaseException) from DCP's writers
        raise CheckpointError(f"{path}: cannot write checkpoint ({str(err)[:500]}); the previous one is "
                              "intact") from err


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _broadcast(tmp: Path | None, dist) -> Path:
    """Rank 0's temporary directory, on every rank."""
    if not _collective(dist):
        return tmp
    import torch.distributed as tdist

    box = [str(tmp) if tmp is not None else None]
    tdist.broadcast_object_list(box, src=0)
    return Path(box[0])


def load_checkpoint(path: str | Path, model, optimizer, dist=None, trainable_only: bool = False) -> None:
    """Load the model and optimizer of checkpoint `path` (resharded to this world size) and this rank's RNG state
    (rank r of a larger world than wrote it keeps its own). A shard that cannot be read fails naming its file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = Path(path)
    model_sd, optim_sd = _state_dicts(model, optimizer, trainable_only)
    sd = {"model": model_sd, "optimizer": optim_sd}
    _verify_checksums(path / DCP_DIR, dist)
    try:
        dcp.load(sd, checkpoint_id=str(path / DCP_DIR), no_dist=not _initialized())
    except (CheckpointException, Exception) as err:
        raise CheckpointError(_unreadable(path / DCP_DIR, err)) from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"],
                   options=_options(trainable_only))
    rng = path / RNG_DIR / f"rank{dist.rank if dist is not None else 0}.pt"
    if rng.is_file():
        set_rng_state(torch.load(rng, weights_only=False))


CHECKSUMS = "sha256-rank{rank}.json"


def _write_checksums(dcp_dir: Path, rank: int) -> None:
    """sha256 of the shard files this rank wrote (`__<rank>_*.distcp`): DCP stores raw tensor bytes, so a shard
    damaged in place would otherwise load as wrong weights without any error."""
    sums = {f.name: _sha256(f) for f in sorted(dcp_dir.glob(f"__{rank}_*.distcp"))}
    (dcp_dir / CHECKSUMS.format(rank=rank)).write_text(json.dumps(sums), encoding="utf-8")


def _sha256(f: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _verify_checksums(dcp_dir: Path, dist=None) -> None:
    """Every shard against its recorded sha256, the files split over the ranks; the first bad one fails on every
    rank with one line naming it."""
    expected: dict[str, str] = {}
    for f in sorted(dcp_dir.glob(CHECKSUMS.format(rank="*"))):
        try:
            expected.update(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{f}: cannot resume: unreadable shard checksums ({err})") from None
    rank, world = (dist.rank, dist.world) if _collective(dist) else (0, 1)
    bad = []
    for i, (name, digest) in enumerate(sorted(expected.items())):
        f = dcp_dir / name
        if i % world == rank and (not f.is_file() or _sha256(f) != digest):
            bad.append(f"{f}: cannot resume: checkpoint shard " + ("missing" if not f.is_file() else
                                                                 "corrupt (its sha256 differs from the one "
                                                                 "recorded when it was written)"))
    if world > 1:
        import torch.distributed as tdist

        everyone: list = [None] * world
        tdist.all_gather_object(everyone, bad)
        bad = [b for part in everyone for b in part]
    if bad:
        raise CheckpointError(bad[0])


def _unreadable(dcp_dir: Path, err: BaseException) -> str:
    """One line naming what of `dcp_dir` cannot be read: a missing or truncated shard (its size against the
    extents `.metadata` records), else the metadata, else DCP's own first line."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(dcp_dir)).read_metadata()
    except Exception as meta_err:  # noqa: BLE001 - any failure means the same thing: unreadable metadata
        return f"{dcp_dir / '.metadata'}: cannot resume: unreadable checkpoint metadata ({meta_err!s:.200})"
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = dcp_dir / name
        if not f.is_file() or f.stat().st_size < size:
            have = f.stat().st_size if f.is_file() else "missing"
            return f"{f}: cannot resume: checkpoint shard truncated or missing ({have} of {size} bytes)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    shards = ", ".join(str(dcp_dir / n) for n in sorted(need))
    return f"{shards}: cannot resume: a checkpoint shard is corrupt ({first[:200]})"


def copy_checkpoint_files(ckpt_dir: str | Path, dest: str | Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the plain files of directory `ckpt_dir` into the directory `dest`, except the trainer state and
    `skip`."""
    for f in Path(ckpt_dir).iterdir():
        if f.is_file() and f.name not in (STATE_FILE, *skip):
            shutil.copy2(f, Path(dest) / f.name)


def save_history(directory: str | Path, history: list[dict]) -> None:
    """The per-step history into `directory`: `history.json` without the wall-clock timings (the same bytes for
    the same run), the timings in the directory's run record (`tspo_core.runinfo`, outside DVC's hash)."""
    rows, timings = split_history(history)
    (Path(directory) / HISTORY_FILE).write_text(json.dumps(rows), encoding="utf-8")
    write_run_record(directory, {"history_timings": timings})


def load_history(directory: str | Path) -> list[dict]:
    """The history `save_history` wrote, timings merged back where the run record has them."""
    rows = json.loads((Path(directory) / HISTORY_FILE).read_text(encoding="utf-8"))
    return merge_history(rows, read_run_record(directory).get("history_timings"))


def load_trainer_state(path: str | Path) -> tuple[dict[str, Any], list[dict]]:
    path = Path(path)
    try:
        state = torch.load(path / STATE_FILE, weights_only=False)
        history = load_history(path)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint: {err}") from err
    return state, history


def read_tensors(path: str | Path) -> dict[str, Any]:
    """The whole DCP state of checkpoint `path` as plain tensors, in one process (inspection and tests)."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(Path(path) / DCP_DIR), str(Path(d) / "state.pt"))
        return torch.load(Path(d) / "state.pt", weights_only=False)
