"""Signals sent to `dockyard run` reach the container's PID 1, as `docker run`
forwards them.

    with forward_signals(runtime, container_id, proc, tty=False):
        code = proc.wait()

SIGINT, SIGTERM, SIGHUP and SIGQUIT become `<runtime> kill ID SIG` (the
runtime's own way to signal the container's init; before the container
exists, or after it is gone, the runtime process itself gets the signal).
SIGWINCH, with a terminal, reaches the runtime straight from it (it shares
our process group then) and the runtime resizes the container's terminal;
without one it is forwarded to PID 1 like the others.
Without a terminal the runtime runs in its own process group (see
puller.runtime.run), so a Ctrl-C typed at the terminal reaches only us and is
forwarded once, not twice.

A PID 1 without a handler ignores SIGINT and SIGTERM (the kernel protects a
namespace's init; `--init` puts tini in front). So the third Ctrl-C in a row
kills the container, as a last resort that needs no second terminal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
KILL_AFTER_INTERRUPTS = 3


class SignalForwarder:
    def __init__(self, kill_argv, container_id: str, proc: subprocess.Popen):
        self.kill_argv = kill_argv          # kill_argv(signal_name) -> argv of `<runtime> kill ID SIG`
        self.container_id = container_id
        self.proc = proc
        self.interrupts = 0

    def forward(self, signum: int) -> None:
        if self.proc.poll() is not None:
            return
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= KILL_AFTER_INTERRUPTS:
                print(f"dockyard: {self.interrupts} interrupts: killing container {self.container_id}",
                      file=sys.stderr)
                signum = signal.SIGKILL
        name = signal.Signals(signum).name
        try:
            done = subprocess.run(self.kill_argv(name), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            done = False
        if not done:  # no container (yet, or any more): the runtime process decides
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)


@contextlib.contextmanager
def forward_signals(kill_argv, container_id: str, proc: subprocess.Popen, *, tty: bool,
                    translated: dict[int, int] | None = None):
    """`translated`: signals that reach the container as another ({SIGUSR2: SIGKILL} for a shim)."""
    forwarder = SignalForwarder(kill_argv, container_id, proc)
    previous = {}
    for signum in FORWARDED:
        previous[signum] = signal.signal(signum, lambda n, _frame: forwarder.forward(n))
    for signum, sent in (translated or {}).items():
        previous[signum] = signal.signal(signum, lambda _n, _frame, sent=sent: forwarder.forward(sent))
    if not tty:
        previous[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, lambda n, _frame: forwarder.forward(n))
    try:
        yield forwarder
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
