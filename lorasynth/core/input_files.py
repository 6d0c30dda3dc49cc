"""Opening input files: regular files only, checked on the open descriptor, read with a bound.

Part of :mod:`lorasynth.core.safe_io` (which re-exports every name here): the one door every
untrusted file comes through.

Every reader opens a path through :func:`open_input`. The path is ``stat``-ed first (so a
FIFO, a device, a folder or a missing file is named as such without being opened), then opened
with ``O_NONBLOCK`` (a FIFO swapped in after the check still cannot block the open) and
``O_NOFOLLOW`` where a link is not expected, and the *open descriptor* is ``fstat``-ed again:
what is read is the regular file that was checked, never what the path points to a moment
later. Reads stop at the size ``fstat`` reported (:func:`read_input_bytes`), so a file that
grows while it is read, or a ``/dev/zero`` link, never makes a read unbounded.

A caller that checks a hash and then parses does both on the same bytes
(:func:`read_input_bytes` + ``hashlib``), or hashes while it copies from the same descriptor
(:func:`copy_input`); nothing is hashed on one open and parsed on another.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

from lorasynth.errors import FormatError

CHUNK = 1 << 20


def kind_problem(mode: int, what: str) -> str | None:
    """Why a file of ``mode`` cannot be read as a regular ``what`` (None: it is a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return f"is a directory, not a {what}"
    if stat.S_ISFIFO(mode):
        return f"is a FIFO (named pipe), not a regular {what}"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return f"is a device, not a regular {what}"
    if stat.S_ISSOCK(mode):
        return f"is a socket, not a regular {what}"
    if stat.S_ISLNK(mode):
        return f"is a symbolic link, not a regular {what} (links are not followed here)"
    return f"is not a regular {what}"


def _os_error(path: Path, what: str, error: type[Exception], e: OSError, follow_links: bool) -> Exception:
    if isinstance(e, FileNotFoundError):
        return error(f"{path}: no such {what}")
    if isinstance(e, NotADirectoryError):
        return error(f"{path}: no such {what} (a part of the path is a file, not a folder)")
    if isinstance(e, PermissionError):
        return error(f"{path}: permission denied (cannot read this {what})")
    if e.errno == errno.ELOOP:
        if not follow_links:
            return error(f"{path}: is a symbolic link, not a regular {what} (links are not followed here)")
        return error(f"{path}: too many levels of symbolic links (a link loop?)")
    return error(f"{path}: cannot read this {what}: {e.strerror or e}")


def check_input_file(path: str | os.PathLike, what: str = "file", error: type[Exception] = FormatError,
                     follow_links: bool = True) -> int:
    """Check that ``path`` is a regular, readable file; return its size.

    Raises ``error`` (a LorasynthError) with a message that names what the path really is:
    missing, a directory, a FIFO, a device, a socket, a link (``follow_links=False``), or not
    readable. A check only: readers use :func:`open_input`, which checks the open file again.
    """
    path = Path(path)
    try:
        st = os.stat(path) if follow_links else os.lstat(path)
    except OSError as e:
        raise _os_error(path, what, error, e, follow_links) from None
    why = kind_problem(st.st_mode, what)
    if why is not None:
        raise error(f"{path}: {why}")
    return st.st_size


@contextmanager
def open_input(path: str | os.PathLike, what: str = "file", error: type[Exception] = FormatError,
               follow_links: bool = True) -> Iterator[tuple[IO[bytes], int]]:
    """``(binary file, size)`` of a regular file, checked on the open descriptor.

    ``follow_links=False`` refuses a symbolic link as the last path component (``O_NOFOLLOW``).
    Every problem is one ``error`` line naming ``path``.
    """
    path = Path(path)
    check_input_file(path, what, error, follow_links)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise _os_error(path, what, error, e, follow_links) from None
    try:
        st = os.fstat(fd)
        why = kind_problem(st.st_mode, what)
        if why is not None:  # swapped after the check
            raise error(f"{path}: {why}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


def read_input_bytes(path: str | os.PathLike, what: str = "file", limit: int | None = None,
                     error: type[Exception] = FormatError, follow_links: bool = True,
                     mutable: bool = False) -> bytes | bytearray:
    """All bytes of a checked regular file (at most ``limit``: larger files are refused).

    Reads exactly the size the open file had; a file that grows or shrinks meanwhile is refused.
    ``mutable=True`` returns a ``bytearray`` (tensors can be views of it without a copy).
    """
    with open_input(path, what, error, follow_links) as (f, size):
        if limit is not None and size > limit:
            raise error(f"{path}: {what} is {size} bytes, more than the {limit} a {what} may hold")
        try:
            if mutable:
                data = bytearray(size)
                got = f.readinto(data)
                extra = f.read(1)
            else:
                data = f.read(size + 1)
                got, extra = min(len(data), size), data[size:]
        except OSError as e:
            raise error(f"{path}: cannot read this {what}: {e.strerror or e}") from None
        if got != size or extra:
            raise error(f"{path}: {what} changed while it was read; try again")
        return data


def _chunks(f: IO[bytes], size: int, path: Path, what: str, error: type[Exception]) -> Iterator[bytes]:
    """The ``size`` bytes of ``f`` in chunks; a file that changes length meanwhile is an ``error``."""
    left = size
    try:
        while left > 0:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
        extra = f.read(1)
    except OSError as e:
        raise error(f"{path}: cannot read this {what}: {e.strerror or e}") from None
    if left or extra:
        raise error(f"{path}: {what} changed while it was read; try again")


def input_sha256(path: str | os.PathLike, what: str = "file", error: type[Exception] = FormatError,
                 follow_links: bool = True) -> str:
    """Hex SHA-256 of a checked regular file, read in chunks up to its ``fstat`` size."""
    path = Path(path)
    h = hashlib.sha256()
    with open_input(path, what, error, follow_links) as (f, size):
        for chunk in _chunks(f, size, path, what, error):
            h.update(chunk)
    return h.hexdigest()


def copy_input(src: str | os.PathLike, out: IO[bytes], what: str = "file", error: type[Exception] = FormatError,
               follow_links: bool = False) -> str:
    """Copy the regular file ``src`` into the open binary file ``out``; the hex SHA-256 of what was copied.

    Links are refused unless ``follow_links``: a copy meant for sharing never carries the contents of a
    file a link points at. The hash is of the bytes written, read from the one descriptor.
    """
    src = Path(src)
    h = hashlib.sha256()
    with open_input(src, what, error, follow_links) as (f, size):
        for chunk in _chunks(f, size, src, what, error):
            h.update(chunk)
            out.write(chunk)
    return h.hexdigest()
