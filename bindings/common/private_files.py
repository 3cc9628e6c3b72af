"""Files bitempered trusts from disk: the autotuner's cache and the CPU C kernel's library.

Issue 28: never act on what another user could have written (a shared or copied cache folder, a
library planted under a predictable name in a temporary folder). A file is trusted only if it is
a regular file of this user's that no other user may write, in a folder of this user's that no
other user may write. Files are opened without following a link and without blocking (a FIFO),
and the checks are made on the open file, so the bytes read are the bytes checked.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_FOLDER_MODE = 0o700  # folders bitempered creates: no other user may write (or read) them


def ownership_problem(info: os.stat_result) -> str:
    """'' if this user owns the file (or folder) and no other user may write it, else why not."""
    if not hasattr(os, "geteuid"):  # no POSIX owners (Windows): nothing to check
        return ""
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not this user (uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by other users ({stat.filemode(info.st_mode)}; chmod go-w it)"
    return ""


def folder_problem(folder: Path) -> str:
    """'' if ``folder`` may hold trusted files (or does not exist yet), else why not."""
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        return ""
    except OSError as error:
        return f"cannot read it ({error.strerror or error})"
    return ownership_problem(info) if stat.S_ISDIR(info.st_mode) else "not a folder"


def read_private(path: Path) -> bytes:
    """The bytes of ``path`` if it is trusted (module docstring); else OSError saying why not
    (FileNotFoundError when it does not exist; the message does not repeat the path)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    with os.fdopen(os.open(path, flags), "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError("not a regular file")
        problem = ownership_problem(info)
        folder = folder_problem(path.parent)
        if problem or folder:
            raise OSError(problem or f"folder {path.parent}: {folder}")
        return file.read()


def make_private_folder(folder: Path) -> None:
    """Creates ``folder`` (and its parents) for trusted files; OSError if it exists and is not private."""
    folder.mkdir(mode=PRIVATE_FOLDER_MODE, parents=True, exist_ok=True)
    problem = folder_problem(folder)  # someone else may have made it first
    if problem:
        raise OSError(f"folder {folder}: {problem}")
