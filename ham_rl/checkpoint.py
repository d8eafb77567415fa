"""Checkpoint files that load without running code from the file, written atomically, with a checksum of their tensors.

A checkpoint holds tensors and plain data only (dicts, lists, tuples, numbers, strings, None): :func:`save_checkpoint`
refuses anything else, and :func:`load_checkpoint` reads with ``torch.load(weights_only=True)``, whose unpickler
builds only those types, so a file crafted to execute code on unpickling is rejected before anything runs. Env
objects are not pickled either: ``ham_rl.envs.env_state`` stores their state as plain data. A SHA-256 over every
tensor's bytes (in traversal order) is stored beside the data and checked on load.

Checkpoints of the earlier format (``ham_rl-ppo-v1``, pickled env objects) can only be read by unpickling them: that
is refused with a message naming the one explicit way to convert a file you trust::

    python -m ham_rl.checkpoint convert runs/<run>/checkpoints/last.pt --trust-checkpoint
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "CheckpointError", "load_checkpoint", "save_checkpoint", "tensor_checksum"]

#: format tag stored in every checkpoint; a file without it is rejected
CHECKPOINT_FORMAT = "ham_rl-ppo-v2"
#: the earlier format, whose env objects were pickled
LEGACY_FORMAT = "ham_rl-ppo-v1"
_PLAIN = (type(None), bool, int, float, str)


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, corrupted or of another format."""


def _tensors(data: Any, path: str = "checkpoint") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in ``data`` with its path, in a fixed order; raises TypeError at anything that is not plain data."""
    if isinstance(data, torch.Tensor):
        yield path, data
    elif isinstance(data, dict):
        for key, value in data.items():
            if type(key) not in _PLAIN:
                raise TypeError(f"{path} has a key of type {type(key).__name__}; checkpoints hold plain keys only")
            yield from _tensors(value, f"{path}[{key!r}]")
    elif isinstance(data, list | tuple) and type(data) in (list, tuple):
        for i, value in enumerate(data):
            yield from _tensors(value, f"{path}[{i}]")
    elif type(data) not in _PLAIN:
        raise TypeError(
            f"{path} is a {type(data).__name__}; checkpoints hold tensors, dicts, lists, tuples, numbers, strings and None"
        )


def tensor_checksum(data: Any) -> str:
    """SHA-256 (hex) over the dtype, shape and bytes of every tensor in ``data``, in traversal order."""
    digest = hashlib.sha256()
    for path, t in _tensors(data):
        t = t.detach().cpu().contiguous()
        digest.update(f"{path}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` (plain data and tensors), the format tag and the checksum to ``path`` atomically: readers see the
    old file or the new one, never half.

    :raises TypeError: if ``data`` holds anything but tensors and plain data (nothing is written)
    """
    path = Path(path)
    body = {"format": CHECKPOINT_FORMAT, **data}
    checksum = tensor_checksum(body)  # also checks that everything is plain
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({**body, "checksum": checksum}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete ``*.pt.*.tmp`` files a killed writer left in ``folder`` (the checkpoint they were to replace is intact)."""
    folder = Path(folder)
    stale = sorted(folder.glob("*.pt.*.tmp")) if folder.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, without unpickling anything but tensors and plain data.

    :raises CheckpointError: (one line) when the file is missing, corrupted, of the old format or not a ham_rl checkpoint
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"corrupt checkpoint {path}: not a torch.save archive")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        refusal = next((line.strip() for line in str(e).splitlines() if "WeightsUnpickler error" in line), None)
        if refusal is None or "Unsupported" not in refusal:
            raise CheckpointError(f"corrupt checkpoint {path}: {refusal or _one_line(e)}") from None
        if _is_legacy(path):
            raise CheckpointError(
                f"{path} is a {LEGACY_FORMAT} checkpoint, which holds pickled objects that loading would execute; if you "
                f"trust its source, convert it once with `python -m ham_rl.checkpoint convert {path} --trust-checkpoint`"
            ) from None
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, refused unread ({refusal})") from None
    except Exception as e:  # noqa: BLE001 - any other failure to read means a damaged file
        raise CheckpointError(f"corrupt checkpoint {path}: {_one_line(e)}") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    stored = data.pop("checksum", None)
    try:
        actual = tensor_checksum(data)
    except TypeError as e:  # e.g. pickled bytes planted inside: never unpickled, refused
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint: {e}") from None
    if stored != actual:
        raise CheckpointError(f"corrupt checkpoint {path}: its tensor data does not match the checksum stored with it")
    return data


def _is_legacy(path: Path) -> bool:
    """True if the file's pickle names the old format tag (read as bytes, not unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return pkl is not None and LEGACY_FORMAT.encode() in archive.read(pkl)
    except (zipfile.BadZipFile, OSError):
        return False


def convert_legacy(path: str | os.PathLike, trust: bool = False) -> Path:
    """Rewrite a ``ham_rl-ppo-v1`` checkpoint in the current format, in place. Unpickles the file: only with ``trust``."""
    if not trust:
        raise CheckpointError("converting unpickles the file and runs whatever it holds: pass --trust-checkpoint to confirm")
    # only the conversion needs these (the same encoders the trainer's state_dict uses)
    from ham_rl.agents.rng_state import numpy_rng_to_plain, python_rng_to_plain
    from ham_rl.envs import VecEnv
    from ham_rl.envs.env_state import encode_envs

    path = Path(path)
    data = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(data, dict) or data.get("format") != LEGACY_FORMAT:
        raise CheckpointError(f"{path} is not a {LEGACY_FORMAT} checkpoint")
    ppo = data["ppo"]
    venv = ppo["venv"]
    venv.update(encode_envs(pickle.loads(venv["envs"]), pickle.loads(venv["obs"])))
    for name in VecEnv.COUNTERS:
        venv[name] = torch.from_numpy(venv[name].copy())
    ppo["next_obs"], ppo["next_start"] = torch.from_numpy(ppo["next_obs"]), torch.from_numpy(ppo["next_start"])
    rng = ppo["rng"]
    rng["numpy"], rng["python"] = numpy_rng_to_plain(rng["numpy"]), python_rng_to_plain(rng["python"])
    ppo["ep_returns"], ppo["ep_lengths"] = [float(r) for r in ppo["ep_returns"]], [int(n) for n in ppo["ep_lengths"]]
    num_envs, feature_dim = venv["features"].shape
    # v1 runs kept no episode context: the first update after the conversion starts one
    empty = {"obs": torch.zeros(0, num_envs, feature_dim), "starts": torch.zeros(0, num_envs, dtype=torch.bool), "states": []}
    ppo.setdefault("context", empty)
    data.pop("format")
    return save_checkpoint(data, path)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ham_rl.checkpoint convert PATH --trust-checkpoint``: rewrite an old checkpoint in the safe format."""
    parser = argparse.ArgumentParser(prog="python -m ham_rl.checkpoint", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="rewrite a ham_rl-ppo-v1 checkpoint (unpickles it: trusted files only)")
    convert.add_argument("path", type=Path)
    convert.add_argument("--trust-checkpoint", action="store_true", help="confirm that the file may run code on loading")
    args = parser.parse_args(argv)
    try:
        out = convert_legacy(args.path, trust=args.trust_checkpoint)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"converted {out} to {CHECKPOINT_FORMAT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
