"""Ctrl-C that ends a long run promptly, with exit 130 and nothing half-written.

``cli.main()`` turns ``KeyboardInterrupt`` into ``bncheck: interrupted`` and exit 130; this
module makes sure the interrupt arrives *soon* in every loop:

* PyTorch: Python's default SIGINT behaviour already raises ``KeyboardInterrupt`` at the next
  bytecode, i.e. between two ops of a forward pass. Nothing to do but not swallow it (never
  ``except BaseException`` without re-raising).
* onnxruntime: ``InferenceSession.run`` is one C++ call. CPython runs a Python signal handler
  only in the main thread, between bytecodes, so a Ctrl-C during a 10-second ``run`` would be
  seen after the run returns. onnxruntime stops a run early only when the ``RunOptions`` passed
  to it gets ``terminate = True`` from another thread; the run then raises
  ``Fail: Exiting due to terminate flag being set to true``. ``run_session`` therefore runs
  the session on a worker thread (onnxruntime releases the GIL during ``run``) while the main
  thread waits in short, interruptible joins; on SIGINT the handler installed by
  ``interruptible()`` sets ``terminate`` on every ``RunOptions`` registered through
  ``ort_run_options()``, and the termination error becomes ``KeyboardInterrupt``.

How command authors use it::

    from bncheck.interrupt import interruptible, run_session

    with interruptible():            # the CLI (or the api function) around the whole loop
        for batch in source:         # torch loops: nothing else needed
            outputs = run_session(session, names, batch)   # instead of session.run(...)

Statistics are committed, and files written, only after the loop ends, and saves are atomic
(temporary file + rename, the temporary file removed on ``BaseException``), so an interrupt
leaves no partial output. For ``bench``, whose runs last milliseconds, ``session.run`` may be
called directly: the interrupt lands between two runs (pass ``ort_run_options()`` anyway if a
single run can be long). ``interruptible()`` is a no-op outside the main thread (Python allows
signal handlers only there) and nests: only the outermost context installs the handler.
"""

from __future__ import annotations

import signal
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = ["interruptible", "is_termination", "ort_run_options", "run_session", "was_interrupted"]

# RunOptions handed out while a handler may fire; weak, so finished runs do not accumulate.
_live: weakref.WeakSet[Any] = weakref.WeakSet()
_depth = 0
_interrupted = threading.Event()
# How often the waiting main thread wakes up to let a pending signal handler run.
_POLL_S = 0.05
# How long to wait for onnxruntime to unwind after terminate is set before giving up on it.
_UNWIND_S = 5.0

TERMINATE_MESSAGE = "terminate flag"


def _handler(signum: int, frame: Any) -> None:
    _interrupted.set()
    for options in list(_live):
        options.terminate = True
    raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interruptible() -> Iterator[None]:
    """Install the SIGINT handler for the duration of the block; restore the previous one.

    On SIGINT: every RunOptions from :func:`ort_run_options` gets ``terminate = True`` (so an
    onnxruntime run in progress on another thread stops) and ``KeyboardInterrupt`` is raised in
    the main thread at the next bytecode.
    """
    global _depth
    if not _main_thread() or _depth > 0:
        _depth += _main_thread()
        try:
            yield
        finally:
            _depth -= _main_thread()
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _depth = 1
    _interrupted.clear()
    try:
        yield
    finally:
        _depth = 0
        signal.signal(signal.SIGINT, previous)


def was_interrupted() -> bool:
    """Whether SIGINT arrived during the current (or last) ``interruptible()`` block. An
    interrupt that lands inside a C extension's initialisation (``import numpy`` under load)
    surfaces as that import's own error ("initialization failed"), not ``KeyboardInterrupt``:
    the CLI asks here before calling such an error internal."""
    return _interrupted.is_set()


def active() -> bool:
    """Whether an ``interruptible()`` block is open in the main thread."""
    return _depth > 0


def ort_run_options() -> Any:
    """A fresh ``onnxruntime.RunOptions`` whose ``terminate`` flag the SIGINT handler sets.

    If an interrupt already happened in this block, the options come back terminated, so a
    run started after Ctrl-C stops at once.
    """
    import onnxruntime as ort

    options = ort.RunOptions()
    _live.add(options)
    if _interrupted.is_set() and active():
        options.terminate = True
    return options


def is_termination(exc: BaseException) -> bool:
    """Whether ``exc`` is onnxruntime's "Exiting due to terminate flag being set" failure."""
    return TERMINATE_MESSAGE in str(exc)


def run_session(
    session: Any,
    output_names: Sequence[str] | None,
    feeds: Mapping[str, Any],
    run_options: Any | None = None,
) -> list[Any]:
    """``session.run(output_names, feeds)`` that a Ctrl-C stops within ~0.1 s.

    Inside ``interruptible()`` in the main thread, the run happens on a worker thread and the
    main thread waits for it in :data:`_POLL_S` slices, so the SIGINT handler runs promptly;
    it terminates the run and the interrupt surfaces here as ``KeyboardInterrupt``.
    Elsewhere (no handler installed, or not the main thread) this is a plain ``session.run``,
    except that a terminated run still becomes ``KeyboardInterrupt``. Other onnxruntime errors
    propagate unchanged for the caller to translate.
    """
    options = run_options if run_options is not None else ort_run_options()
    _live.add(options)
    names = list(output_names) if output_names is not None else None
    if not (active() and _main_thread()):
        try:
            return list(session.run(names, dict(feeds), options))
        except Exception as exc:
            if options.terminate or is_termination(exc):
                raise KeyboardInterrupt from None
            raise
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["value"] = session.run(names, dict(feeds), options)
        except BaseException as exc:  # handed to the main thread, which re-raises it
            box["error"] = exc

    worker = threading.Thread(target=work, name="bncheck-ort-run", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(_POLL_S)
    except KeyboardInterrupt:
        options.terminate = True  # the handler did this already unless it was not ours
        worker.join(_UNWIND_S)
        raise
    if "error" in box:
        if options.terminate or is_termination(box["error"]):
            raise KeyboardInterrupt from None
        raise box["error"]
    return list(box["value"])
