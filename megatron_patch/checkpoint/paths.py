"""Rules on input and output paths, checked before any work: the one place every tool that writes asks.

``check_outputs`` is what an entry point calls: each output must name a place (an empty value is the current
directory to ``Path``: ``--save ""`` replaced the directory the user ran in), and must not be, contain or lie inside
any input (after resolving links). ``check_not_cwd`` guards the writers that replace a whole directory
(``atomic.atomic_output_dir``): whatever the flag, the directory a command runs in is never replaced.
``check_inside`` keeps a path that a file read from a checkpoint names (a DCP ``relative_path``, an ``hf_assets``
link) inside that checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import CheckpointError, ConfigError, OverlappingPathsError

PathLike = str | os.PathLike


def check_disjoint(source: PathLike, target: PathLike, source_flag: str, target_flag: str) -> None:
    """Refuse a ``target`` that equals ``source``, lies inside it or contains it (after resolving symlinks).

    Writing the output replaces the target atomically: with an overlap that would delete the input (or a file the
    job is still reading) and still exit 0.
    """
    src, dst = Path(source).resolve(), Path(target).resolve()
    if src == dst:
        relation = "is the same path as"
    elif src in dst.parents:
        relation = "lies inside"
    elif dst in src.parents:
        relation = "contains"
    else:
        return
    raise OverlappingPathsError(f"{target_flag} {target} {relation} {source_flag} {source}: writing it would destroy "
                                f"the input; choose a {target_flag} outside {source_flag}")


def check_output_path(target: PathLike | None, flag: str) -> Path:
    """``target`` as a Path; ConfigError when it is empty or blank (``Path("")`` is the current directory)."""
    if target is None or not str(os.fspath(target)).strip():
        raise ConfigError(f"{flag} is empty: name the output path (an empty path is the current directory, "
                          "which would be written into or replaced)")
    return Path(target)


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Mapping[str, PathLike | None] | None = None) -> None:
    """The path rule of every writer: each output (flag -> path) names a place and overlaps no input (flag ->
    path; inputs that are None are not given and skipped)."""
    for target_flag, target in outputs.items():
        check_output_path(target, target_flag)
        for source_flag, source in (inputs or {}).items():
            if source is not None and str(os.fspath(source)).strip():
                check_disjoint(source, target, source_flag, target_flag)


def check_not_cwd(target: PathLike) -> None:
    """Refuse replacing a directory that is, or contains, the current working directory (or is the root)."""
    dst, cwd = Path(target).resolve(), Path.cwd().resolve()
    if dst == cwd or dst in cwd.parents:
        relation = "is" if dst == cwd else "contains"
        raise OverlappingPathsError(f"output directory {target} {relation} the current directory {cwd}: replacing "
                                    "it would delete the directory this command runs in; choose another output")


def check_inside(path: PathLike, root: PathLike, what: str) -> Path:
    """``path`` resolved (links followed); CheckpointError unless it lies inside ``root`` (resolved too)."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise CheckpointError(f"{what} leads to {resolved}, outside {root}; refusing to read or copy it "
                              "(a crafted checkpoint, or a link to replace with the file itself)")
    return resolved
