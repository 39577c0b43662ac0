"""Split encrypted files into (file, segment range) tasks; pure Python, runs on the driver."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import format as fmt
from ..exceptions import ConfigError

__all__ = ["Split", "expand_paths", "plan_splits"]

#: Target plaintext bytes per task (Spark's own default for files is 128 MiB).
DEFAULT_SPLIT_SIZE = 64 << 20


@dataclass(frozen=True)
class Split:
    path: str
    first_segment: int
    end_segment: int  # exclusive
    segment_size: int
    plaintext_size: int  # of the whole file

    @property
    def start(self) -> int:
        return self.first_segment * self.segment_size

    @property
    def end(self) -> int:
        return min(self.end_segment * self.segment_size, self.plaintext_size)


def expand_paths(paths: str | os.PathLike[str] | list[str | os.PathLike[str]]) -> list[Path]:
    """Files named by ``paths``; directories contribute their visible regular files, recursively.

    Raises:
        ConfigError: a path does not exist or nothing is found.
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                found.extend(Path(root) / f for f in sorted(files) if not f.startswith((".", "_")))
        elif p.is_file():
            found.append(p)
        else:
            raise ConfigError(f"{p} does not exist")
    if not found:
        raise ConfigError(f"no files found in {', '.join(str(i) for i in items)}")
    return found


def plan_splits(files: list[Path], split_size: int = DEFAULT_SPLIT_SIZE) -> list[Split]:
    """Cut every file into splits of whole segments, about ``split_size`` plaintext bytes each.

    Headers are read (not authenticated: no key is needed here); executors authenticate them.
    Splits are ordered by size, largest first, then by path, as Spark orders file splits.
    """
    splits: list[Split] = []
    for path in files:
        with open(path, "rb") as handle:
            header = fmt.read_header(handle)
            size = os.fstat(handle.fileno()).st_size
        count, plain = fmt.segment_layout(header, size)
        per = max(1, split_size // header.segment_size)
        for first in range(0, count, per):
            splits.append(Split(str(path), first, min(first + per, count), header.segment_size, plain))
    splits.sort(key=lambda s: (-(s.end - s.start), s.path, s.first_segment))
    return splits
