"""Output that appears whole or not at all: a temporary sibling renamed into place, with the modes the umask gives."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> None:
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


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary sibling directory; on success it replaces ``path``, on any error it is removed.

    The output gets the modes the umask gives (not the 0700 / 0600 of temporary files).
    """
    path = Path(path).absolute()
    check_output_dir(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    finished = False
    try:
        yield temp
        finished = True
    finally:
        if not finished:  # an error or an interrupt: leave nothing behind
            shutil.rmtree(temp, ignore_errors=True)
    apply_umask_modes(temp)
    if path.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, trash / path.name)
        os.replace(temp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(temp, path)
