"""What every command shares: the user's-mistake exception, socket path checks, stop on signal.

A mistake a user can fix (a bad config, a busy socket path, a port in use) is raised
as `UserError` wherever it is found; `vmbus.cli.main` turns it into one line on
stderr and exit status 2, unwrapping trio's ExceptionGroups on the way. Nothing here
prints.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PROBE_TIMEOUT_S = 2.0  # connecting to a socket file to see whether anyone listens


class UserError(Exception):
    """A mistake the user can fix; the message is the whole story (one line, no traceback)."""


def _first_line(text: str) -> str:
    return " ".join(text.split())


def os_reason(exc: OSError) -> str:
    """The kernel's words for an OSError, without Python's '[Errno n]' decoration."""
    return exc.strerror or str(exc) or type(exc).__name__


def describe_bind_error(path: str, exc: OSError, *, what: str = "socket") -> str:
    """Why a unix socket could not be created at `path`, with the fix."""
    parent = os.path.dirname(os.path.abspath(path))
    if isinstance(exc, FileNotFoundError) or exc.errno == errno.ENOENT:
        if not os.path.isdir(parent):
            return f"cannot create {what} {path}: directory {parent} does not exist (create it)"
    if isinstance(exc, NotADirectoryError):
        return f"cannot create {what} {path}: a part of {parent} is not a directory"
    if isinstance(exc, PermissionError):
        return f"cannot create {what} {path}: permission denied (choose a writable directory)"
    if exc.errno == errno.ENAMETOOLONG or "too long" in str(exc):
        return f"cannot create {what} {path}: the path is too long for a unix socket (108 bytes)"
    if exc.errno == errno.EADDRINUSE:
        return f"cannot create {what} {path}: the path is in use"
    return f"cannot create {what} {path}: {os_reason(exc)}"


def claim_socket_path(path: str, kind: int = socket.SOCK_SEQPACKET, *, what: str) -> None:
    """Make `path` free for a new unix socket, or raise UserError.

    A socket file nobody listens on (left by a process that died) is removed; a socket
    a live process listens on, or any other kind of file, is refused: never steal a
    running service's socket, never delete a user's file.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"cannot use {path} for the {what}: {os_reason(exc)}") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise UserError(
            f"{path} exists and is not a socket: refusing to replace it for the {what} "
            "(remove it or choose another path)"
        )
    probe = socket.socket(socket.AF_UNIX, kind)
    probe.settimeout(PROBE_TIMEOUT_S)  # a live listener with a full backlog makes us wait
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # stale: nobody listens
        return
    except (TimeoutError, BlockingIOError):
        pass  # someone listens, just busy: in use
    except OSError as exc:
        if exc.errno != errno.EPROTOTYPE:  # a live socket of another type: still in use
            raise UserError(f"cannot use {path} for the {what}: {os_reason(exc)}") from exc
    finally:
        probe.close()
    raise UserError(
        f"{path}: another process is listening there; refusing to take over its socket "
        "(stop it, or choose another path)"
    )


def describe_connect_error(path: str, exc: OSError) -> str:
    """Why connecting to a unix socket at `path` failed, naming the path."""
    if isinstance(exc, FileNotFoundError):
        return f"nobody listens on {path}: no such socket"
    if isinstance(exc, ConnectionRefusedError):
        try:
            is_socket = stat.S_ISSOCK(os.stat(path).st_mode)
        except OSError:
            is_socket = True
        if not is_socket:
            return f"cannot connect to {path}: not a socket"
        return f"nobody listens on {path}: the socket file is stale (its process is gone)"
    if isinstance(exc, PermissionError):
        return f"cannot connect to {path}: permission denied"
    if exc.errno == errno.EPROTOTYPE:
        return f"cannot connect to {path}: a socket of another kind (not the one expected here)"
    if exc.errno == errno.ENOTSOCK or isinstance(exc, (NotADirectoryError, IsADirectoryError)):
        return f"cannot connect to {path}: not a socket"
    return f"cannot connect to {path}: {os_reason(exc)}"


def check_writable(path: str, what: str) -> None:
    """Refuse, before a run that may take minutes, an output path that cannot be written.

    Nothing is truncated: an existing file is opened for update and left as it is; a
    new one is tried as a temporary file beside it (catches read-only file systems,
    which a permission check alone does not)."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise UserError(f"{what} {path} is a directory; name a file")
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {what} {path}: directory {parent} does not exist")
    try:
        if os.path.exists(target):
            with open(target, "r+b"):
                pass
        else:
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".vmbusd-bench-")
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise UserError(f"cannot write {what} {path}: cannot create a file there ({why})") from exc


class Stopped:
    """Which signal stopped a run (None: it finished on its own)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""


async def run_until_signalled(fn: Callable[[], Awaitable[T]], stopped: Stopped) -> T | None:
    """Run `fn` until it returns or SIGTERM/SIGINT arrives (then cancel it, so its
    cleanup runs, and record the signal in `stopped`). Returns fn's result, or None."""
    result: T | None = None
    error: Exception | None = None
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    stopped.signum = signum
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            try:
                result = await fn()
            except Exception as exc:  # re-raised below as itself, not in a group
                error = exc
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return result


class Interrupted(BaseException):
    """SIGTERM or SIGINT outside trio (the synchronous commands: bench)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.summary = ""  # what was cut short: set by whoever catches it on the way out

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def raise_interrupted(signum: int, _frame: object) -> None:
    """A signal handler: turn SIGTERM/SIGINT into `Interrupted`, so `finally` blocks run."""
    raise Interrupted(signum)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for e in exc.exceptions:
            out.extend(_leaves(e))
        return out
    return [exc]


def user_message(exc: BaseException) -> str | None:
    """The one line for an exception that is the user's to fix, or None for a bug.

    A UserError, or an OSError about a named file (the user's path); a trio
    ExceptionGroup counts when every leaf does (its leaves' lines, once each).
    """
    leaves = _leaves(exc)
    lines: list[str] = []
    for leaf in leaves:
        if isinstance(leaf, UserError):
            line = _first_line(str(leaf))
        elif isinstance(leaf, OSError) and leaf.filename is not None and leaf.strerror:
            # open()/stat() of a path the user named: the path and the kernel's reason
            line = f"{leaf.filename}: {leaf.strerror}"
        else:
            return None
        if line not in lines:
            lines.append(line)
    return "; ".join(lines) if lines else None


def stop_signal(exc: BaseException) -> Interrupted | KeyboardInterrupt | None:
    """An exception (or group) that is only a stop request: SIGINT (KeyboardInterrupt)
    or a signal turned into `Interrupted`."""
    leaves = _leaves(exc)
    found: Interrupted | KeyboardInterrupt | None = None
    for leaf in leaves:
        if isinstance(leaf, (Interrupted, KeyboardInterrupt)):
            found = found or leaf
        elif not isinstance(leaf, trio.Cancelled):
            return None
    return found
