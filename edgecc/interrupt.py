"""Interrupts (SIGINT, SIGTERM) that end a command cleanly, and folders left by killed compiles.

The CLI installs :func:`installed` around a command. Its handler records the first signal and
raises :class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread. TVM's C++ code can
swallow that exception (the compile goes on) or turn it into a ``RuntimeError``, so:

* the recorded signal is checked again at every progress step and before a package is renamed
  into place (:func:`check`); the CLI reports any failure after a signal as an interrupt;
* a watchdog thread, woken by the signal even while TVM's C++ code runs with the GIL released,
  waits :data:`GRACE_SECONDS` for the main thread to unwind; if it has not, it removes the
  folders registered with :func:`cleanup_on_abort` and ends the process with exit code 130;
* the rename that publishes a package is a commit point (:func:`commit`): a signal arriving
  while or after it happens is recorded but aborts nothing, so the exit code tells the truth
  (0: the new package is in place; 130: the earlier package, if any, is untouched).

SIGKILL cannot be handled: scratch folders carry the pid of their process in their name
(:func:`pid_prefix`) and later compiles remove those of dead processes
(:func:`remove_stale`). Limit: pids are those of this machine; a folder shared with another
machine could hold a live process's scratch folder whose pid is dead here (not handled).

Without :func:`installed` (the Python API) nothing changes: Python's own ``KeyboardInterrupt``
applies and :func:`check` never raises.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

GRACE_SECONDS = 5.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130

_lock = threading.RLock()
_received: int | None = None
_committing = False
_committed = False
_cleanup: set[Path] = set()


class Interrupted(KeyboardInterrupt):
    """A SIGINT or SIGTERM arrived; the command stops without publishing anything."""


def received() -> int | None:
    """The number of the first signal received while installed, or None."""
    return _received


def committed() -> bool:
    """Whether a package was renamed into place during this command."""
    return _committed


def check() -> None:
    """Raise :class:`Interrupted` if a signal arrived and nothing was committed yet."""
    if _received is not None and not _committed:
        raise Interrupted(signal.Signals(_received).name)


def _handler(signum: int, frame: object) -> None:
    global _received
    first = _received is None
    if first:
        _received = signum
    if first and not (_committing or _committed):
        raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def commit() -> Iterator[None]:
    """Around the rename that publishes a result: check for a signal first; afterwards signals
    abort nothing. Holds the lock the watchdog takes before it aborts."""
    global _committing, _committed
    with _lock:
        _committing = True
        try:
            check()
            yield
            _committed = True
        finally:
            _committing = False


@contextlib.contextmanager
def cleanup_on_abort(path: Path) -> Iterator[None]:
    """Register ``path`` for removal should the watchdog end the process."""
    with _lock:
        _cleanup.add(Path(path))
    try:
        yield
    finally:
        with _lock:
            _cleanup.discard(Path(path))


def _watchdog(read_fd: int, done: threading.Event) -> None:
    """Wait for a signal (a byte on the wakeup pipe); abort if the main thread does not react."""
    wanted = {int(s) for s in SIGNALS}
    while True:  # the wakeup fd also gets the numbers of other signals Python handles
        try:
            got = os.read(read_fd, 64)
        except OSError:
            return
        if done.is_set() or not got:
            return
        if wanted & set(got):
            break
    if done.wait(GRACE_SECONDS):
        return
    with _lock:  # not during a commit; afterwards the main thread finishes on its own
        if _committed or done.is_set():
            return
        for path in sorted(_cleanup, key=lambda p: len(p.parts), reverse=True):
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.write(2, b"edgecc: interrupted\n")
        os._exit(EXIT_INTERRUPTED)


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """Handle SIGINT/SIGTERM as described in the module docstring (main thread only)."""
    global _received, _committed, _committing
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received, _committed, _committing = None, False, False
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    done = threading.Event()
    # The watchdog thread must not take the signals itself: block them while it starts.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        watchdog = threading.Thread(target=_watchdog, args=(read_fd, done), daemon=True)
        watchdog.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        done.set()
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(old_fd)
        with contextlib.suppress(OSError):
            os.write(write_fd, b"\0")  # wake the watchdog so that it ends
        watchdog.join(1.0)
        os.close(write_fd)
        os.close(read_fd)


def pid_prefix(prefix: str) -> str:
    """``prefix`` followed by this process's pid, for a scratch folder's name."""
    return f"{prefix}{os.getpid()}-"


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale(folder: Path, pattern: str) -> list[Path]:
    """Remove entries of ``folder`` named by ``pattern`` (a regex with a ``pid`` group) whose
    process is dead; returns them. Errors (a folder we may not write) are ignored."""
    removed = []
    regex = re.compile(pattern)
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = regex.fullmatch(entry.name)
        if m and not alive(int(m.group("pid"))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            if not entry.exists():
                removed.append(entry)
    return removed
