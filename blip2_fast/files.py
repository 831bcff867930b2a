"""Opening untrusted files: regular files only, size-capped reads, strict UTF-8 JSON.

Checkpoint directories and image paths come from users and from the hub. A FIFO, a device or a
directory where a file is expected would block forever or fail obscurely inside `open()` / `read()`.
`open_regular` opens without blocking, checks what it opened (`fstat` on the open descriptor, so
nothing can be swapped in between the check and the read) and refuses anything but a regular file.
`parse_json` turns every way a JSON file can be broken (not UTF-8, not JSON, nested past the
interpreter's recursion limit, integers of thousands of digits, duplicate keys where they matter)
into one exception naming the file.
"""
from __future__ import annotations

import json
import os
import stat


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match the model's config."""


# Larger than any real config.json, shard index or generation_config.json (a 100B-parameter index
# is ~2 MB); a bigger file is refused before it is read, and before its parse could build gigabytes
# of Python objects.
MAX_JSON_BYTES = 16 * 2**20

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path, what: str, error: type[Exception] = CheckpointError):
    """`path` opened for binary reading; `error` naming the file if it is missing, unreadable, or not
    a regular file (a directory, FIFO, device, socket). Symlinks are followed: the Hugging Face
    cache links every snapshot file to a blob."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever
        fd = os.open(os.fspath(path), _OPEN_FLAGS)
    except FileNotFoundError:
        broken = os.path.islink(path)
        raise error(f"{path}: {what} {'is a dangling symlink' if broken else 'does not exist'}") from None
    except OSError as e:
        raise error(f"{path}: cannot open {what} ({e.strerror or type(e).__name__})") from None
    except ValueError:  # a NUL byte in the name
        raise error(f"{path!r}: not a usable file name for the {what}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{path}: {what} is {_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes, where: str, *, strict: bool = False, error: type[Exception] = CheckpointError):
    """JSON from `data` (strict UTF-8, no BOM). strict=True also refuses what the JSON standard does
    not allow and Python's parser accepts: duplicate keys and the NaN / Infinity literals. Every
    failure is `error`, naming `where`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    hooks = {"object_pairs_hook": _no_duplicates, "parse_constant": _no_constant} if strict else {}
    try:
        return json.loads(text, **hooks)
    except _DuplicateKey as e:
        raise error(f"{where}: key {e.args[0]!r} appears twice in one JSON object; ambiguous, refused") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to be a real file") from None
    except ValueError as e:  # JSONDecodeError, integers past Python's digit limit, NaN under strict
        raise error(f"{where}: not valid JSON ({e})") from None


def read_json(path, what: str, *, max_bytes: int = MAX_JSON_BYTES, error: type[Exception] = CheckpointError):
    """The JSON value in regular file `path`, at most `max_bytes` long; `error` naming the file otherwise."""
    with open_regular(path, what, error) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"{path}: {what} is larger than {max_bytes} bytes, far beyond any real one; refused")
    return parse_json(data, str(path), error=error)


def check_directory_files(path, error: type[Exception] = CheckpointError) -> None:
    """Refuse a checkpoint directory holding a FIFO, device or socket where a file belongs, before
    code that does not check (transformers' tokenizer and processor loading) could block on it.
    Directories inside are left alone; symlinks are judged by what they point to."""
    for entry in os.scandir(path):
        try:
            mode = os.stat(entry.path).st_mode
        except OSError:  # dangling link: whoever needs the file reports it missing
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise error(f"{entry.path}: {_kind(mode)}, not a regular file, in checkpoint directory {path}")
