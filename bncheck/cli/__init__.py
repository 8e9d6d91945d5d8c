"""The ``bncheck`` command: parse options → one api call → report → exit code.

No math and no framework code here. ``main()`` catches every exception, because an uncaught
one exits 1, which CI reads as "findings": an internal error must be 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer

from bncheck import __version__
from bncheck.errors import BncheckError, ExitCode, InputError

# Only what --help and --version need is imported at start-up; the config reader, numpy (via
# layers), rich's console and each command's machinery load when a command runs.
if TYPE_CHECKING:
    from rich.console import Console

    from bncheck.config import Config
    from bncheck.layers import Finding

app = typer.Typer(
    name="bncheck",
    help="Inspect, check, recalibrate and fold the BatchNorm layers of PyTorch and ONNX models.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

FAIL_ON = ("error", "warning", "info", "never")

# ---- shared option types ------------------------------------------------------------------
FormatOpt = Annotated[str | None, typer.Option("--format", help="text | json | github | markdown")]
FailOnOpt = Annotated[
    str | None,
    typer.Option(
        "--fail-on", help="exit 1 on findings at or above: error | warning | info | never"
    ),
]
SelectOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--select", help="only these rule codes or prefixes (comma-separated or repeated)"
    ),
]
IgnoreOpt = Annotated[
    list[str] | None, typer.Option("--ignore", help="skip these rule codes or prefixes")
]
ArchOpt = Annotated[
    str | None,
    typer.Option("--arch", help="pkg.module:factory building the model a state dict loads into"),
]
ArchKwargsOpt = Annotated[
    str | None, typer.Option("--arch-kwargs", help="JSON object of keyword arguments for --arch")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="allow formats that can run code when loaded (pickled modules, TorchScript). "
        "Also BNCHECK_TRUST_PICKLE=1; never read from pyproject.toml",
    ),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape", help="input shape 1,3,224,224, or name=1,3,224,224 per input (repeat)"
    ),
]
InPlaceOpt = Annotated[bool, typer.Option("--in-place", help="allow -o to overwrite the input")]
MaxBatchesOpt = Annotated[
    int | None, typer.Option("--max-batches", help="use at most this many batches")
]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="more detail; tracebacks")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="only the summary line")]


@dataclass
class Common:
    """Options every command shares, merged: command line > [tool.bncheck] > defaults."""

    format: str
    fail_on: str
    select: list[str]
    ignore: list[str]
    open_options: dict[str, Any]
    verbose: bool
    quiet: bool
    config: Config


def _split(values: list[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def parse_input_shapes(values: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """``1,3,224,224`` → {"": (1,3,224,224)}; ``x=1,3,8,8`` → {"x": (1,3,8,8)}."""
    if not values:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for v in values:
        name, _, dims = v.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise InputError(
                f"--input-shape {v!r}: dims must be integers, e.g. 1,3,224,224"
            ) from None
        if not shape or any(d <= 0 for d in shape):
            raise InputError(f"--input-shape {v!r}: dims must be positive integers")
        shapes[name.strip()] = shape
    return shapes


def _env_trust() -> bool:
    return os.environ.get("BNCHECK_TRUST_PICKLE", "").strip().lower() in ("1", "true", "yes")


def common(
    fmt: str | None,
    fail_on: str | None,
    select: list[str] | None,
    ignore: list[str] | None,
    arch: str | None,
    arch_kwargs: str | None,
    trust_pickle: bool,
    input_shape: list[str] | None,
    verbose: bool,
    quiet: bool,
) -> Common:
    import json

    from bncheck.config import load_config

    cfg = load_config()
    for w in cfg.warnings:
        print(f"bncheck: warning: {w}", file=sys.stderr)
    fmt = fmt or cfg.get("format", "text")
    if fmt not in ("text", "json", "github", "markdown"):
        raise InputError(f"--format {fmt!r}: choose text, json, github or markdown")
    fail_on = fail_on or cfg.get("fail-on", "error")
    if fail_on not in FAIL_ON:
        raise InputError(f"--fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON)}")
    kwargs = None
    if arch_kwargs:
        try:
            kwargs = json.loads(arch_kwargs)
        except json.JSONDecodeError as exc:
            raise InputError(f"--arch-kwargs is not valid JSON ({exc.msg})") from None
        if not isinstance(kwargs, dict):
            raise InputError("--arch-kwargs must be a JSON object")
    shapes = parse_input_shapes(input_shape) or parse_input_shapes(cfg.get("input-shape"))
    return Common(
        format=fmt,
        fail_on=fail_on,
        select=_split(select) or list(cfg.get("select", [])),
        ignore=_split(ignore) or list(cfg.get("ignore", [])),
        open_options={
            "arch": arch or cfg.get("arch"),
            "arch_kwargs": kwargs,
            "trust_pickle": trust_pickle or _env_trust(),
            "input_shapes": shapes,
        },
        verbose=verbose,
        quiet=quiet,
        config=cfg,
    )


def exit_code_for(findings: list[Finding], fail_on: str) -> int:
    """0 when nothing reaches --fail-on, 1 otherwise (ruff's convention)."""
    if fail_on == "never":
        return ExitCode.OK
    from bncheck.layers import Severity

    threshold = Severity(fail_on).rank
    hit = any(f.severity.rank >= threshold for f in findings)
    return ExitCode.FINDINGS if hit else ExitCode.OK


def console() -> Console:
    # Off a terminal (CI logs, pipes) rich would wrap at 80 columns; 120 keeps a row a line.
    from rich.console import Console

    width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "120"))
    return Console(highlight=False, soft_wrap=False, width=width)


def render(rep: Any, result: Any, opts: Common, **text_options: Any) -> None:
    """Print ``result`` in the chosen format with its report module ``rep`` (each report module
    has ``to_json``, ``render_github``, ``render_markdown``, ``summary_line``, ``render_text``)."""
    if opts.format == "json":
        emit(rep.to_json(result))
    elif opts.format == "github":
        emit(rep.render_github(result))
    elif opts.format == "markdown":
        emit(rep.render_markdown(result))
    elif opts.quiet:
        emit(rep.summary_line(result))
    else:
        rep.render_text(result, console(), **text_options)


def emit(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


@contextmanager
def progress_bar(
    enabled: bool, label: str = "batches"
) -> Iterator[Callable[[int, int | None], None] | None]:
    """A rich progress bar on stderr, or None (off a TTY, in json/github/markdown, with -q)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield update


# ---- commands -----------------------------------------------------------------------------


def _version_callback(value: bool) -> None:
    if value:
        emit(f"bncheck {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="print version"),
    ] = False,
) -> None:
    pass


# Each command lives in its own module and registers itself on `app` when imported.
from bncheck.cli import (  # noqa: E402, F401
    _bench,
    _check,
    _fold,
    _inspect,
    _optimize,
    _recalibrate,
)

# ---- entry point --------------------------------------------------------------------------


def _from_interrupt(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by Ctrl-C: a KeyboardInterrupt inside a compiled module's
    import (commands import torch and onnxruntime when they start) surfaces as
    ``ImportError: initialization failed`` raised from it."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with 0 / 1 / 2 / 130; never let an exception pick the code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args or "--verbose" in args
    command = typer.main.get_command(app)
    if not args:
        args = ["--help"]
        usage_only = True
    else:
        usage_only = False
    from bncheck.interrupt import interruptible

    interrupted_said = False
    try:
        with interruptible():  # Ctrl-C also stops an onnxruntime run in flight
            rv = command.main(args=args, prog_name="bncheck", standalone_mode=False)
        code = rv if isinstance(rv, int) else ExitCode.OK
    except typer.Exit as exc:
        code = exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("bncheck: interrupted", file=sys.stderr)
        code = ExitCode.INTERRUPTED
        interrupted_said = True
    except typer.TyperException as exc:  # usage errors: bad option, missing argument
        print(f"bncheck: error: {exc.format_message()}", file=sys.stderr)
        code = ExitCode.ERROR
    except BncheckError as exc:
        if verbose:
            import traceback

            traceback.print_exc()
        print(f"bncheck: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except Exception as exc:  # the last line of defence: see the module docstring
        if _from_interrupt(exc):
            print("bncheck: interrupted", file=sys.stderr)
            code, interrupted_said = ExitCode.INTERRUPTED, True
        else:
            if verbose:
                import traceback

                traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(
                f"bncheck: internal error: {type(exc).__name__}: {first} "
                "(re-run with -v for the traceback)",
                file=sys.stderr,
            )
            code = ExitCode.ERROR
    if code == ExitCode.INTERRUPTED:
        if not interrupted_said:
            # typer turns KeyboardInterrupt into Exit(130), returned (not raised) silently.
            print("bncheck: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        if argv is None:  # the real program, not a caller embedding main()
            # An onnxruntime run stopped by its terminate flag can leave native threads that
            # abort the process during interpreter shutdown ("terminate called without an
            # active exception"). Writes are atomic and their temp files are already gone, so
            # leave without running finalizers.
            os._exit(int(ExitCode.INTERRUPTED))
    sys.stdout.flush()
    # A bare `bncheck` is a usage error (help, then 2), as with ruff.
    sys.exit(int(ExitCode.ERROR if usage_only else code))
