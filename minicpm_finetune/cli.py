"""What every command shares: the project's error types, the one-line argument parser, the exit on bad input,
the atomic writer and the local-path rule.

Standard library only (so it also runs as a file, below, and adds no import to any command). A command's
``main`` is wrapped in :func:`command`: the project's own errors (:class:`FinetuneError` and its subclasses,
bad input the user can fix) end it with one ``error: ...`` line and exit status 2; any other exception is a
bug and keeps its traceback.

Run as a file it answers the shell scripts' one path question with the same rule, without importing the
package (which loads transformers)::

    python minicpm_finetune/cli.py check-model-path PATH   # exit 2 with one line unless a folder or a hub id
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import sys
import tempfile

EXIT_BAD_INPUT = 2  # every bad-input exit (docs/faults.md); 130 after Ctrl-C, 143 after SIGTERM in training


class FinetuneError(Exception):
    """Bad input the user can fix (a flag, a data record, an output folder, ...): reported as one line, exit 2."""


class ArgumentError(FinetuneError):
    """An impossible, missing or unreadable command-line argument."""


class OutputDirError(FinetuneError):
    """The output folder cannot take this run; the message says why and what to do."""


MAX_COUNT = 2**31 - 1  # token counts and lengths are 32-bit integers in Arrow and torch


def check_count(flag: str, value) -> None:
    """ArgumentError unless a count flag (a length, a number of tokens or samples) is None or 1..MAX_COUNT."""
    if value is not None and value <= 0:
        raise ArgumentError(f"{flag} must be positive, got {value}")
    if value is not None and value > MAX_COUNT:
        raise ArgumentError(f"{flag} must be at most {MAX_COUNT}, got {value}")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors raise ArgumentError (one line) instead of printing the whole usage."""

    def error(self, message):
        raise ArgumentError(message)


def print_error(message) -> None:
    """``error: message`` on stderr, from the first process only (every process of a distributed run sees it)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)


def fail(message) -> None:
    """End the command on bad input: one line (from the first process) and exit status 2."""
    print_error(message)
    sys.exit(EXIT_BAD_INPUT)


def command(main):
    """A command's main: the project's own errors become one line and exit status 2 (see the module docstring)."""

    @functools.wraps(main)
    def checked(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except FinetuneError as e:
            fail(e)

    return checked


def load_error(name: str, error: Exception) -> ArgumentError:
    """What transformers could not load (a hub id missing from the cache, a folder without weights), in one
    line: the first line of its message says what."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ArgumentError(f"cannot load {name}: {first}")


def looks_local(name: str) -> bool:
    """A path rather than a hub id ("owner/name")."""
    return name.startswith((".", "/", "~")) or os.path.exists(name) or name.count("/") != 1


@contextlib.contextmanager
def atomic_path(path: str, folder: bool = False):
    """Yield a fresh temporary sibling of ``path`` to write: a file name, or an empty folder (``folder``). When
    the block ends without an error its contents are flushed to disk and it is renamed to ``path`` (a folder
    replaces an empty one only); otherwise it is removed and ``path`` is untouched. Readers never see half of it."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(path)}.{os.getpid()}."
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent) if folder else os.path.join(parent, prefix + "tmp")
    try:
        yield tmp
        flush_to_disk(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
    _fsync(parent)  # the rename itself


def write_atomic(path: str, text) -> None:
    """Write UTF-8 text to ``path`` atomically (:func:`atomic_path`); ``text`` is a string or an iterable of
    strings (written one by one: a large file is never built whole)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        if isinstance(text, str):
            f.write(text)
        else:
            f.writelines(text)


def flush_to_disk(path: str) -> None:
    """fsync a file, or every file in a folder: written data is on disk before it is renamed into place."""
    if os.path.isfile(path):
        _fsync(path)
    for root, _, names in os.walk(path):
        for name in names:
            if not os.path.islink(os.path.join(root, name)):
                _fsync(os.path.join(root, name))


def _fsync(path: str) -> None:
    """Flush a file's (or a folder's entries') writes to disk; read-only is enough, so read-only files work."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_model_path(path: str) -> None:
    """A local model path must be a folder (a hub id is checked when it loads)."""
    if looks_local(path) and not os.path.isdir(path):
        raise ArgumentError(f"MODEL_PATH {path}: folder not found")


@command
def main(argv=None) -> int:
    parser = OneLineParser(prog="python minicpm_finetune/cli.py", description="the shell scripts' checks")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check-model-path", help="a local folder or a hub id").add_argument("path")
    args = parser.parse_args(argv)
    check_model_path(args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _existing_ancestor(path: str) -> str:
    """The nearest folder that exists at or above ``path``."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_output_path(path: str, flag: str = "--output_dir", folder: bool = True) -> None:
    """OutputDirError unless ``path`` is a folder (``folder``) or a file, or can be made as one, in a place
    this process can write in; ``flag`` names it in the message. Checked before anything is generated."""
    try:  # a name from non-UTF-8 bytes (surrogate escapes): trained to the end, every saver would then refuse it
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise OutputDirError(f"{flag} {path.encode('utf-8', 'surrogateescape')!r}: the name is not valid UTF-8 "
                             "(the files saved there could not be named); choose another") from None
    flag = f"{flag} {path}"
    if folder and os.path.exists(path) and not os.path.isdir(path):
        raise OutputDirError(f"{flag} is a file, not a folder")
    if not folder and os.path.isdir(path):
        raise OutputDirError(f"{flag} is a folder, not a file")
    existing = _existing_ancestor(path if folder else os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(existing):
        raise OutputDirError(f"{flag}: {existing} is a file, not a folder")
    try:  # a real write (access() says yes to root on a read-only file system); the file leaves no trace
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise OutputDirError(f"{flag}: cannot write in {existing} ({e.strerror})") from None


def true_or_false(text: str) -> bool:
    """An argparse type for flags that take true or false (argparse names it in its one-line error)."""
    if text.lower() not in ("true", "false"):
        raise ValueError(text)
    return text.lower() == "true"
