"""Atomic file writes: the one place that writes a temporary file and renames it into place.

Every file centerprompt writes (checkpoints, adapters, splits, synthetic volumes, predictions,
reports) goes through :func:`atomic_path`, so an interrupted run never leaves a half-written file
under the final name. This module is the lowest layer: it imports nothing from centerprompt.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def atomic_path(path: str | Path, *, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The block creates the file (``open(tmp, "wb")``, ``torch.save``, ``nib.save``, ...); it is
    given the usual permissions (0666 under the umask) before the rename, whatever the writer chose. The
    temporary name is ``.NAME.<pid>-<random>.tmp``, hidden and unique per process and call; with
    ``keep_suffix=True`` it also ends in ``path``'s suffixes (``.nii.gz``), for writers that pick
    the format from the name (nibabel). On any error the temporary file is removed; one on a full
    disk becomes ``OSError("no space left on device: PATH")``, whatever the writer raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + ("".join(path.suffixes) if keep_suffix else "")
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    try:
        yield tmp
        # Readable as the user's other files are: some writers (safetensors' save_file) create 0600.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as err:
        # Writers report a full disk their own way (torch.save: a RuntimeError from its zip writer,
        # "unexpected pos"); name it once, for the file meant to be written.
        if (isinstance(err, OSError) and err.errno == errno.ENOSPC) or _nearly_full(path.parent):
            raise OSError(f"no space left on device: {path}") from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


FULL_DISK_BYTES = 1 << 20  # a write that failed with less than this free is taken for a full disk


def _nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def bars(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a progress bar the caller wants or not: when wanted, shown only on a
    terminal (None: tqdm checks), so logs and CI output do not fill with bar updates, and never
    under tqdm's own ``TQDM_DISABLE`` (which ``centerprompt --quiet`` sets)."""
    return None if progress and not os.environ.get("TQDM_DISABLE") else True


def terminal_bars() -> bool:
    """Whether a library that always draws its bar when asked (MONAI's caching) should be asked:
    only on a terminal, and not under ``TQDM_DISABLE`` (``--quiet``)."""
    return sys.stderr.isatty() and not os.environ.get("TQDM_DISABLE")


_TMP_NAME = re.compile(r"\..+\.(\d+)-[0-9a-f]{8}\.tmp.*")  # atomic_path's temporary names, with the writer's pid


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files of :func:`atomic_path` in ``folder`` whose writer no longer runs.

    A process killed mid-write (SIGKILL, power loss) cannot remove its temporary file; its name
    carries the writer's pid, so a file whose writer is gone is known stale, while a live writer's
    file (another process working in the same folder) is left alone.
    """
    removed = []
    for p in Path(folder).glob(".*.tmp*"):
        m = _TMP_NAME.fullmatch(p.name)
        if m and p.is_file() and not _running(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


LOCK_FILE = ".lock"  # in a run folder: holds the writing process's pid while a job runs


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder/.lock`` (``flock``, exclusive) while a job writes the folder.

    A second writer is refused at once, naming the holder's pid (two runs into one folder would
    interleave their logs and metrics and leave one's model under the other's summary). The lock
    goes with the descriptor, also when the process is killed; the small file stays. Local file
    systems only (flock).
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"{folder}: another centerprompt process (pid {holder}) is writing this folder; wait "
                             "for it to finish, or give another --out.") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield folder
    finally:
        os.close(fd)


def check_output(path: str | Path, kind: str) -> Path:
    """Refuse, before any work, an output a command could not write: ``kind="folder"`` that exists
    as a file, ``kind="file"`` that exists as a folder, or a place whose nearest existing folder is
    a file or not writable (missing folders are created when writing). One line naming the path."""
    path = Path(path)
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}.")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a folder; give a folder for this output.")
    if kind == "file" and path.is_dir():
        raise ValueError(f"{path}: is a folder; give a file name for this output.")
    parent = path if kind == "folder" else path.parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{path}: cannot be written: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot be written: no permission to write in {existing}.")
    try:  # what permissions do not tell: a read-only or virtual file system (/proc), for root too
        os.rmdir(tempfile.mkdtemp(prefix=".centerprompt-probe-", dir=existing))
    except OSError as err:
        raise ValueError(f"{path}: cannot be written: nothing can be created in {existing} ({err.strerror}).") from None
    return path


def link_problem(path: str | Path) -> str | None:
    """Why nothing can be read through ``path`` if it is a symbolic link that leads nowhere: a loop
    or a dangling link (both otherwise surface as "No such file" or a RuntimeError); else None."""
    path = Path(path)
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop (following it leads back to itself)"
        if err.errno == errno.ENOENT:
            return f"is a symbolic link to a missing file ({os.readlink(path)})"
    return None


def _resolved(path: str | Path, arg: str) -> Path:
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as err:  # Python 3.11 raises RuntimeError on a link loop
        raise ValueError(f"{path} (given as {arg}): {link_problem(path) or err}") from None


def check_not_input(out: str | Path, inputs: Mapping[str, str | Path]) -> Path:
    """Refuse an output that is an input, holds one, or lies inside an input folder (``inputs``:
    the argument that names it, e.g. ``"--data"``, to its path). A run clears and rewrites its
    output, so any of these would overwrite or delete what the command reads (a base model, the
    labels of the data folder). Paths are compared resolved, so links and ``..`` do not hide it."""
    target = _resolved(out, "--out")
    for arg, path in inputs.items():
        source = _resolved(path, arg)
        if target == source:
            raise ValueError(f"{out}: is the input given as {arg}; write the output somewhere else.")
        if target in source.parents:
            raise ValueError(f"{out}: holds the input given as {arg} ({path}), which this command would overwrite "
                             "or delete; give a new folder.")  # fmt: skip
        if source in target.parents and source.is_dir():
            raise ValueError(f"{out}: lies inside the input folder given as {arg} ({path}); nothing is written "
                             "into an input, give a folder outside it.")  # fmt: skip
    return Path(out)


def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of ``path``, or ValueError naming the file and ``what`` it should be (a binary
    or otherwise undecodable file would otherwise surface as a bare codec error)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text file ({what}): byte {err.start} is not UTF-8.") from None


def jsonable(obj: Any) -> Any:
    """Plain JSON values, as :func:`write_json` writes them: NaN/inf -> None, numpy -> Python,
    tuples -> lists, paths -> str (so a value compares equal to what was read back from its file)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(obj: Any, path: str | Path) -> Path:
    """Atomic JSON file (indent 2) with NaN/inf as null: strict JSON that other tools can read."""
    path = Path(path)
    text = json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))
    return path
