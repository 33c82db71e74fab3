"""Where results go: every output path is checked before the work starts, and written atomically.

1. `check_outputs(outputs, inputs=..., overwrite=...)` refuses, before any model loads, an output
   that is a directory, a link or any other non-regular file (a device node, a FIFO), one whose
   folder is missing or not writable, one equal to an input or to another output, and (unless
   `overwrite`) one that already exists.
2. `write_files({path: data})` writes each file to an unpredictable temporary beside it
   (`tempfile.mkstemp`: created exclusively, never through a planted link), then renames every
   temporary into place. A failure removes the temporaries and leaves every target as it was; the
   renames come last, so two runs' files are never mixed.
"""

from __future__ import annotations

import os
import stat
import tempfile
from functools import cache
from pathlib import Path
from typing import Mapping, Sequence

from mechscope.errors import OutputError


def check_outputs(
    outputs: Sequence[str | os.PathLike],
    *,
    inputs: Sequence[str | os.PathLike] = (),
    overwrite: bool = False,
    flag: str = "--out",
) -> list[Path]:
    """The outputs as Paths, once each is known to be writable without harm (see the module doc).
    `flag` names the option in the messages."""
    paths = [Path(p) for p in outputs]
    for i, path in enumerate(paths):
        for other in paths[:i]:
            if _same(path, other):
                raise OutputError(f"two outputs would both be written to {path}; give {flag} another name")
        for source in inputs:
            if _same(path, Path(source)):
                raise OutputError(f"{flag} {path} is also an input ({source}); writing it would destroy the "
                                  "input: choose another output path")
        refuse_non_regular(path, flag)
        if path.exists() and not overwrite:
            raise OutputError(f"{path} already exists; pass --overwrite to replace it, or choose another {flag}")
    for folder in {p.parent for p in paths}:  # one probe per folder
        check_folder(folder, flag)
    return paths


def refuse_non_regular(path: Path, flag: str = "--out") -> None:
    """An OutputError when `path` exists and is anything but a regular file (not followed if a link)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISREG(mode):
        return
    kind = ("a directory" if stat.S_ISDIR(mode) else "a symbolic link" if stat.S_ISLNK(mode)
            else "not a regular file (a device, FIFO or socket)")
    raise OutputError(f"{flag} {path} is {kind}; give the path of a file to create or replace")


def check_folder(folder: Path, flag: str = "--out") -> None:
    """An OutputError unless `folder` is an existing directory this process may write into."""
    folder = folder if str(folder) else Path(".")
    if not folder.exists():
        raise OutputError(f"{flag}: the folder {folder} does not exist; create it first or choose another path")
    if not folder.is_dir():
        raise OutputError(f"{flag}: {folder} is not a folder")
    try:  # a real try, not os.access: root passes every permission check yet not a read-only mount
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mechscope-probe-")
    except OSError as err:
        raise OutputError(f"{flag}: the folder {folder} is not writable ({err.strerror}); choose another "
                          "path") from None
    os.close(fd)
    os.unlink(probe)


def write_files(files: Mapping[str | os.PathLike, str | bytes]) -> list[Path]:
    """Write every file atomically and all together (see the module doc); text as UTF-8."""
    staged: list[tuple[str, Path]] = []
    try:
        for target, data in files.items():
            target = Path(target)
            refuse_non_regular(target, "output")
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            staged.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a result file is as any other
        for tmp, target in staged:
            os.replace(tmp, target)
    except OutputError:
        raise
    except OSError as err:  # a full disk, a folder gone or made read-only since the check, ...
        raise OutputError(f"cannot write {err.filename or 'the output'}: {err.strerror}") from err
    finally:
        for tmp, _ in staged:
            try:
                os.unlink(tmp)
            except FileNotFoundError:  # renamed into place
                pass
    return [target for _, target in staged]


def write_file(path: str | os.PathLike, data: str | bytes) -> Path:
    """One file, atomically (see `write_files`)."""
    return write_files({path: data})[0]


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b)


@cache
def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
