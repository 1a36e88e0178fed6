"""Rules on input and output paths, checked before any work."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OverlappingPathsError


def check_disjoint(source: str | os.PathLike, target: str | os.PathLike, source_flag: str, target_flag: str) -> None:
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
