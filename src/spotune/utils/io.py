"""Atomic file writing: a crash or a full disk never leaves a half-written file under the real name.

Temporaries are hidden names beside their target, ``.<name>.p<pid>-<random>.tmp``: the PID says which
process made one, so :func:`remove_stale_temporaries` can tell a leftover of a killed process from the
work in progress of a live one. They get the modes the umask gives an ordinary file or folder
(0644 / 0755 under umask 022), not ``mkstemp``'s 0600 / ``mkdtemp``'s 0700: a webui or ComfyUI server
running as another user must be able to read what spotune exports.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from spotune.errors import SpotuneError

logger = logging.getLogger(__name__)

# ``.<name>.p<pid>-<mkstemp's random part>.tmp`` and ``.<name>.p<pid>-<random>.old`` (an output
# renamed aside while its replacement moves in).
_TEMP_RE = re.compile(r"^\..+\.p(?P<pid>\d+)-[A-Za-z0-9_]+\.(tmp|old)$")


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux ``/proc``)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


def _temp_prefix(target: Path) -> str:
    return f".{target.name}.p{os.getpid()}-"


def make_temp_file(target: str | Path, suffix: str = ".tmp") -> Path:
    """An empty hidden file beside ``target`` with the umask's file mode (0644 under umask 022)."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=suffix, dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(name)


def make_temp_dir(target: str | Path, suffix: str = ".tmp") -> Path:
    """An empty hidden folder beside ``target`` with the umask's folder mode (0755 under umask 022)."""
    target = Path(target)
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=suffix, dir=target.parent))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder


def apply_umask_modes(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes the umask gives new files.

    Needed after the writing too: safetensors' ``save_file`` (and so ``save_pretrained``) creates its
    files mode 0600 whatever the umask.
    """
    path = Path(path)
    mask = current_umask()
    items = [path] + (list(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for item in items:
        if item.is_symlink():
            continue
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def aside_name(target: str | Path) -> Path:
    """A hidden name beside ``target`` to move an old output to while its replacement moves in."""
    target = Path(target)
    return target.with_name(f"{_temp_prefix(target)}{os.urandom(4).hex()}.old")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries in ``folder`` (not recursive) whose process is no longer alive.

    Only names this module makes are touched; a temporary of a live process (this one included) is
    kept. PIDs are those of this machine: a folder shared between hosts is the run lock's business.

    Returns:
        The paths removed (each is also logged).
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for child in sorted(folder.iterdir()):
        match = _TEMP_RE.match(child.name)
        if not match or _pid_alive(int(match.group("pid"))):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
        logger.info("removed %s, left behind by process %s that no longer runs", child, match.group("pid"))
        removed.append(child)
    return removed


# How a full disk shows through libraries that do not raise OSError (safetensors wraps Rust's io::Error).
_DISK_FULL_TEXT = ("No space left on device", "StorageFull", "Disk quota exceeded", "QuotaExceeded")


class DiskFullError(SpotuneError, OSError):
    """The disk filled up while spotune wrote a file; what was there before is unchanged."""

    def __str__(self) -> str:  # the message alone (OSError would prefix "[Errno 28]" once errno is set)
        return str(self.args[0]) if self.args else "no space left on the device"


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(exc) for text in _DISK_FULL_TEXT)


def _free_space(path: Path) -> str:
    """Free space on the disk holding ``path`` (or its nearest existing parent), e.g. ``"12.0 MiB"``."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown space"


def disk_full_error(path: Path, what: str | None = None) -> DiskFullError:
    """A :class:`DiskFullError` naming ``path`` (and ``what`` inside it) and the space left there."""
    inside = f" ({what})" if what else ""
    error = DiskFullError(
        f"no space left on the device while writing {path}{inside}: {_free_space(path.parent)} free there. "
        "Nothing written before was changed (files are written under temporary names and renamed when "
        "complete); free some space and run again"
    )
    error.errno, error.filename = errno.ENOSPC, str(path)
    return error


def disk_full_from(exc: BaseException, path: str | Path, staging: str | Path | None = None) -> DiskFullError | None:
    """The one-line error for ``exc`` met while writing ``path``, or ``None`` when ``exc`` is not a full disk.

    Every writer that stages its output under a temporary name (:func:`atomic_path`, :func:`atomic_directory`,
    the export's staged output) turns a full disk into this, whichever library met it (safetensors and
    ``save_pretrained`` raise their own types with the OS's text).

    Args:
        path: the output being made (named in the message, not the temporary).
        staging: the temporary folder being filled; a file inside it that the error names is named too.
    """
    if not _is_disk_full(exc):
        return None
    inner, what = getattr(exc, "filename", None), None
    if inner and staging is not None:
        with contextlib.suppress(ValueError):
            relative = Path(inner).relative_to(staging)
            what = str(relative) if str(relative) != "." else None
    return disk_full_error(Path(path), what)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it into place.

    On any exception the temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_file(path)
    try:
        yield tmp
        apply_umask_modes(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = None if isinstance(exc, DiskFullError) else disk_full_from(exc, path)
        if full is not None:
            raise full from exc
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Save ``tensors`` (made contiguous, on CPU) as safetensors atomically; metadata values are strings."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_directory(path: str | Path, resumable_as: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success rename it to ``path``.

    ``path`` must not exist yet (callers decide about overwriting before calling). On failure the
    temporary folder is deleted, so no half-written folder ever carries the final name.

    Args:
        resumable_as: build in this fixed folder instead of a new temporary one, and keep it when a Ctrl-C or
            a SIGTERM stops the body (any other failure deletes it), so that a later call continues from what
            it holds (e.g. a training run's checkpoints). Its name is the caller's to choose and clean.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    if resumable_as is not None:
        tmp = Path(resumable_as)
        tmp.mkdir(exist_ok=True)  # mkdir applies the umask itself
    else:
        tmp = make_temp_dir(path)
    try:
        yield tmp
        apply_umask_modes(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as fh:
                    os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        if resumable_as is not None and isinstance(exc, KeyboardInterrupt):
            raise  # kept for the next call to continue
        shutil.rmtree(tmp, ignore_errors=True)
        full = disk_full_from(exc, path, tmp)  # names the folder being made, not the temporary just removed
        if full is not None:
            raise full from exc
        raise
