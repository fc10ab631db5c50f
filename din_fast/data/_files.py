"""Reading local data files: locating them, streaming their lines with a progress bar, and
errors that name the file and the line."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterator, Sequence, Tuple

from tqdm.auto import tqdm

# Lines are handed out in blocks so that the progress bar is updated once per block.
_PROGRESS_EVERY = 1 << 16


class DataFileError(ValueError):
    """A malformed line of a data file; the message names the file and the 1-based line."""

    def __init__(self, path: Path, line_number: int, problem: str):
        super().__init__(f"{path}:{line_number}: {problem}")
        self.path = path
        self.line_number = line_number


def locate(directory, names: Sequence[str], data_set: str, source: str) -> Tuple[Path, ...]:
    """The paths of ``names`` in ``directory`` (each may also be gzipped, ``name + ".gz"``).

    Raises:
        FileNotFoundError: naming every missing file, the folder and where the files come from.
    """
    folder = Path(directory).expanduser()
    found, missing = [], []
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                found.append(candidate)
                break
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(
            f"{data_set}: missing {', '.join(missing)} in {folder.resolve()}. din_fast never downloads data: get "
            f"{' and '.join(names)} (plain or .gz) from {source} and put them in that folder.")
    return tuple(found)


def read_lines(path: Path, description: str) -> Iterator[Tuple[int, str]]:
    """Yields ``(1-based line number, line without its newline)`` of a text file (plain or
    gzip), streaming it with a progress bar over the bytes read."""
    opener = gzip.open if path.suffix == ".gz" else open
    total = os.path.getsize(path)
    with opener(path, "rb") as raw, tqdm(total=total, unit="B", unit_scale=True, desc=description,
                                          leave=False) as progress:
        compressed = raw.fileobj if isinstance(raw, gzip.GzipFile) else raw
        for number, line in enumerate(raw, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFileError(path, number, f"not UTF-8 ({err.reason})") from None
            yield number, text.rstrip("\r\n")
            if number % _PROGRESS_EVERY == 0:
                progress.update(compressed.tell() - progress.n)
        progress.update(total - progress.n)
