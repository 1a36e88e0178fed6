"""Output that appears whole or not at all: a temporary sibling renamed into place, with the modes the umask gives."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .paths import check_not_cwd


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
    """An output directory that may be replaced: absent, empty or ``overwrite``; never the directory the command
    runs in or one holding it (``Path("")`` is that directory: an empty ``--save`` once replaced it)."""
    check_not_cwd(path)
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"output directory {path} exists and is not empty (pass --overwrite to replace it)")


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def apply_umask_modes(root: str | os.PathLike) -> None:
    """Give ``root`` and everything under it the modes a plain ``mkdir`` / ``open`` would have given.

    Temporary files and directories (``mkstemp``, ``mkdtemp``) are created 0600 / 0700, so a checkpoint written
    through one and renamed into place would be private to its owner; on a shared cluster filesystem colleagues
    and serving jobs under another uid must be able to read it, as they can any file the user writes.
    """
    mask = current_umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def _temp_prefix(path: Path, kind: str) -> str:
    """``.<name>.tmp-<pid>@<host>-`` (or ``.old-``): the writer's pid and host in the name let a later run tell
    the leftovers of a killed writer from a live one's work in progress (on a shared filesystem, only pids of
    this host can be checked)."""
    return f".{path.name}.{kind}-{os.getpid()}@{socket.gethostname()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Remove the ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` siblings of ``path`` whose writer is dead.

    A writer killed with SIGKILL cannot clean up after itself; the next run for the same output does it. Siblings
    of a live pid (another run writing the same output right now), of another host, and names without a pid are
    left alone. Returns what was removed.
    """
    path = Path(path).absolute()
    removed = []
    if not path.parent.is_dir():
        return removed
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        start = f".{path.name}.{kind}-"
        for sibling in path.parent.glob(glob.escape(start) + "*"):
            writer = sibling.name[len(start):].rpartition("-")[0]  # mkdtemp's random tail has no '-'
            pid, _, writer_host = writer.partition("@")
            if (pid.isdigit() and writer_host == host and int(pid) != os.getpid() and not _pid_alive(int(pid))
                    and sibling.is_dir() and not sibling.is_symlink()):
                shutil.rmtree(sibling, ignore_errors=True)
                removed.append(sibling)
    return removed


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``path``, on any error it is removed.

    The output gets the modes the umask gives (not the 0700 / 0600 of temporary files). Siblings left by a writer
    that was killed (SIGKILL, power loss) are removed first.
    """
    path = Path(path).absolute()
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    temp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path, "tmp"), dir=path.parent))
    finished = False
    try:
        yield temp
        finished = True
    finally:
        if not finished:  # an error or an interrupt: leave nothing behind
            shutil.rmtree(temp, ignore_errors=True)
    apply_umask_modes(temp)
    if path.exists():
        trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(path, "old"), dir=path.parent))
        os.replace(path, trash / path.name)
        os.replace(temp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(temp, path)
