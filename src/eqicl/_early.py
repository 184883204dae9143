"""SIGINT / SIGTERM while eqicl is being imported (it imports jax: seconds) are noted and
delivered once the import is done.

Left alone, a KeyboardInterrupt raised during the import can land inside one of jax's
garbage-collection callbacks, where Python ignores it ("Exception ignored in
_xla_gc_callback"): the Ctrl-C was lost and the run went on to its end."""

import signal
import threading

_noted: list[int] = []
_previous: dict = {}


def _note(signum, frame):
    _noted.append(signum)


def start() -> None:
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            _previous[s] = signal.signal(s, _note)


def finish() -> None:
    """Restore the handlers and deliver the first signal noted, if any, to them."""
    for s, h in _previous.items():
        signal.signal(s, h)
    _previous.clear()
    if _noted:
        signal.raise_signal(_noted.pop(0))
