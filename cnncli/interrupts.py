"""Ctrl-C, SIGTERM and SIGHUP: a request to stop that the training loop honours after the current step.

The CLI installs the handler first thing, before JAX is imported or anything compiles, so a signal is
never lost: one that arrives during start-up stops the command at once (and if JAX's code swallows the
exception, as its gc callbacks do, the recorded request still stops the training loop before its first
step). While the loop trains (`stepping`), the first signal only records the request: the loop
checkpoints the step it is on and exits with 128 + the signal's number (130 for Ctrl-C, 143 for
SIGTERM, the preemption signal of Slurm, Kubernetes and cloud VMs). A second signal stops at once,
except while a checkpoint is being written: that waits for the write (cnncli.run.checkpoint).
"""

import contextlib
import signal
import sys
import threading

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupt(KeyboardInterrupt):
    """A signal stopped the command; its exit status is 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + signum


class _State:
    installed = False
    received: int | None = None  # the first signal since install() or the last reset()
    stepping = False


def install() -> None:
    """Handle the stop signals in this process (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in SIGNALS:
        signal.signal(s, _handle)
    _State.installed = True
    _State.received = None
    sys.unraisablehook = _quiet_when_swallowed


def _quiet_when_swallowed(unraisable, _default=sys.unraisablehook) -> None:
    """An Interrupt raised inside a callback that cannot propagate it (JAX's gc callback) is not printed as
    "Exception ignored ... Traceback": the request it carries is recorded, and the loop honours it."""
    if isinstance(unraisable.exc_value, Interrupt):
        return
    _default(unraisable)


def _handle(signum, frame) -> None:
    first = _State.received is None
    if first:
        _State.received = signum
    if _State.stepping and first:
        return  # the loop stops after the current step
    raise Interrupt(signum)


def requested() -> int | None:
    """The signal that asked to stop (None when none did)."""
    return _State.received


def describe(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


@contextlib.contextmanager
def stepping():
    """While training: a first signal sets the request instead of raising (installs the handler if the
    CLI did not, e.g. when the loop runs in a library or a test)."""
    owned = not _State.installed and threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in SIGNALS} if owned else {}
    if owned:
        install()
    _State.stepping = True
    try:
        yield
    finally:
        _State.stepping = False
        _State.received = None  # the loop has acted on it (a checkpoint and Interrupted)
        if owned:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            _State.installed = False
