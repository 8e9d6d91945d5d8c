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
from pathlib import Path
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
    # Help text is plain text: rich markup would eat every bracketed word
    # ("[tool.bncheck.thresholds]", "bncheck[report]") and show flags with a <bool> metavar.
    rich_markup_mode=None,
    context_settings={"max_content_width": 100},
)

FAIL_ON = ("error", "warning", "info", "never")

# ---- shared option types ------------------------------------------------------------------
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar="<format>",
        help="text | json | github | markdown (inspect also: sarif | junit)",
    ),
]
FailOnOpt = Annotated[
    str | None,
    typer.Option(
        "--fail-on",
        metavar="<severity>",
        help="exit 1 on findings at or above: error | warning | info | never",
    ),
]
SelectOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--select",
        metavar="<codes>",
        help="only these rule codes or prefixes (comma-separated or repeated)",
    ),
]
IgnoreOpt = Annotated[
    list[str] | None,
    typer.Option("--ignore", metavar="<codes>", help="skip these rule codes or prefixes"),
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
        "--input-shape",
        metavar="<shape>",
        help="input shape 1,3,224,224, or name=1,3,224,224 per input (repeat)",
    ),
]
DynamicDimsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--dynamic-dims",
        metavar="<dims>",
        help="dims kept dynamic in a written .pt2/.onnx besides the batch: 2,3 or height,width "
        "(name=2,3 per input; repeat)",
    ),
]
CheckpointKeyOpt = Annotated[
    str | None,
    typer.Option(
        "--checkpoint-key",
        metavar="<key>",
        help="the entry of a checkpoint holding several state dicts (ema)",
    ),
]
InPlaceOpt = Annotated[bool, typer.Option("--in-place", help="allow -o to overwrite the input")]
MaxBatchesOpt = Annotated[
    int | None, typer.Option("--max-batches", help="use at most this many batches")
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="data: .npy, .npz, .pt, an image or a folder of images, or pkg.module:function "
        "(your own code yielding batches; named here only, never from pyproject.toml)",
    ),
]
DataKwargsOpt = Annotated[
    str | None,
    typer.Option("--data-kwargs", help="JSON object of keyword arguments for a --data function"),
]
# Image preprocessing (a folder of images); defaults from [tool.bncheck.data].
ResizeOpt = Annotated[
    int | None,
    typer.Option("--resize", help="images: shorter side to N, bilinear (torchvision Resize(N))"),
]
CropOpt = Annotated[
    str | None, typer.Option("--crop", help="images: centre crop N, or H,W (after --resize)")
]
MeanOpt = Annotated[
    str | None, typer.Option("--mean", help="images: per-channel mean a,b,c (after --scale)")
]
StdOpt = Annotated[str | None, typer.Option("--std", help="images: per-channel std a,b,c")]
ScaleOpt = Annotated[
    float | None, typer.Option("--scale", help="images: divide pixels by this (default 255)")
]
ChannelOrderOpt = Annotated[
    str | None, typer.Option("--channel-order", help="images: rgb (default) | bgr (OpenCV)")
]
LayoutOpt = Annotated[
    str | None,
    typer.Option("--layout", help="images: nchw | nhwc (default: as the model input wants)"),
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


_DIM_NAMES = {"batch": 0, "n": 0, "depth": -3, "d": -3, "height": -2, "h": -2, "width": -1, "w": -1}


def parse_dynamic_dims(values: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    """``2,3`` → {"": (2, 3)}; ``x=height,width`` → {"x": (-2, -1)} (names count from the end
    of an N…HW input: depth, height, width; batch is 0)."""
    if not values:
        return None
    dims: dict[str, tuple[int, ...]] = {}
    for v in values:
        name, _, spec = v.rpartition("=")
        axes = []
        for part in (p.strip().lower() for p in spec.split(",") if p.strip()):
            if part in _DIM_NAMES:
                axes.append(_DIM_NAMES[part])
                continue
            try:
                axes.append(int(part))
            except ValueError:
                raise InputError(
                    f"--dynamic-dims {v!r}: give dim numbers (2,3) or height, width, depth"
                ) from None
        if not axes:
            raise InputError(f"--dynamic-dims {v!r}: no dims given")
        dims[name.strip()] = tuple(axes)
    return dims


def _env_trust() -> bool:
    return os.environ.get("BNCHECK_TRUST_PICKLE", "").strip().lower() in ("1", "true", "yes")


def _config_arch(cfg: Config, model: Path | None) -> str | None:
    """``arch`` from the pyproject: one factory, or the first glob of its table that matches
    ``model`` (relative to the pyproject's folder); None for a table without a model."""
    value = cfg.get("arch")
    if isinstance(value, str) or value is None:
        return value
    if model is None:
        return None
    from bncheck.api._walk import first_match, relative

    return first_match(relative(model, cfg.root), value)


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
    *,
    formats: tuple[str, ...] = ("text", "json", "github", "markdown"),
    checkpoint_key: str | None = None,
    dynamic_dims: list[str] | None = None,
    model: Path | None = None,
) -> Common:
    """The shared options, merged: command line > ``[tool.bncheck]`` > defaults. With
    ``model``, an ``arch`` table in the pyproject (``{"glob" = "factory"}``) gives that model's
    factory (first match); commands over several models resolve it per model instead."""
    from bncheck.config import load_config

    cfg = load_config()
    for w in cfg.warnings:
        print(f"bncheck: warning: {w}", file=sys.stderr)
    if fmt is None and cfg.get("format") in ("sarif", "junit") and cfg.get("format") not in formats:
        # `format = "sarif"` in the pyproject is meant for inspect; other commands print text.
        fmt = "text"
    fmt = fmt or cfg.get("format", "text")
    if fmt not in formats:
        raise InputError(f"--format {fmt!r}: choose {', '.join(formats[:-1])} or {formats[-1]}")
    fail_on = fail_on or cfg.get("fail-on", "error")
    if fail_on not in FAIL_ON:
        raise InputError(f"--fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON)}")
    kwargs = json_object(arch_kwargs, "--arch-kwargs")
    shapes = parse_input_shapes(input_shape) or parse_input_shapes(cfg.get("input-shape"))
    loading: dict[str, Any] = {}  # only when given: not every api function takes them
    if checkpoint_key:
        loading["checkpoint_key"] = checkpoint_key
    if dynamic_dims:
        loading["dynamic_dims"] = parse_dynamic_dims(dynamic_dims)
    return Common(
        format=fmt,
        fail_on=fail_on,
        select=_split(select) or list(cfg.get("select", [])),
        ignore=_split(ignore) or list(cfg.get("ignore", [])),
        open_options={
            "arch": arch or _config_arch(cfg, model),
            "arch_kwargs": kwargs,
            "trust_pickle": trust_pickle or _env_trust(),
            "input_shapes": shapes,
            **loading,
        },
        verbose=verbose,
        quiet=quiet,
        config=cfg,
    )


def json_object(text: str | None, option: str) -> dict[str, Any] | None:
    """``text`` parsed as a JSON object (keyword arguments), None when not given."""
    import json

    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{option} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"{option} must be a JSON object")
    return value


# The command parameters data_spec() reads, with the option each one is.
DATA_PARAMS = {
    "resize": "--resize",
    "crop": "--crop",
    "mean": "--mean",
    "std": "--std",
    "scale": "--scale",
    "channel_order": "--channel-order",
    "layout": "--layout",
}


def data_spec(params: dict[str, Any], cfg: Config) -> Any:
    """``--data`` and its options as a ``bncheck.data.DataSpec`` (None without ``--data``).

    ``params`` are the command's parameters (its ``locals()``): ``data``, ``data_kwargs``,
    those of ``DATA_PARAMS`` and, where the command has it, ``max_samples``. Image options:
    command line > ``[tool.bncheck.data]`` > defaults; those given on the command line are
    refused for data they do not apply to (an .npy, a hook)."""
    from bncheck.data import DataSpec
    from bncheck.data.options import image_options

    given = {option: params.get(name) for name, option in DATA_PARAMS.items()}
    explicit = frozenset(k for k, v in given.items() if v is not None)
    data, data_kwargs = params.get("data"), params.get("data_kwargs")
    if data is None:
        if explicit or data_kwargs:
            first = sorted(explicit)[0] if explicit else "--data-kwargs"
            raise InputError(f"{first} applies to --data, which is not given")
        return None
    where = f"{cfg.source or 'pyproject.toml'}: [tool.bncheck.data]"
    return DataSpec(
        data,
        images=image_options(given, cfg.get("data") or {}, where),
        kwargs=json_object(data_kwargs, "--data-kwargs"),
        max_samples=params.get("max_samples"),
        explicit=explicit,
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


def internal_error(exc: Exception, verbose: bool) -> ExitCode:
    """The last line of defence (see the module docstring): one line, exit 2, never 1."""
    if verbose:
        import traceback

        traceback.print_exc()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    print(
        f"bncheck: internal error: {type(exc).__name__}: {first} "
        "(re-run with -v for the traceback)",
        file=sys.stderr,
    )
    return ExitCode.ERROR


def _click_command(name: str | None) -> Any:
    """The click group typer builds from ``app``, holding only the command ``name`` when it is
    one: typer builds the parameters of every registered command (~0.03 s a run) though one
    runs. Anything else (``--help``, ``--version``, a typo) gets them all."""
    registered = app.registered_commands
    chosen = [
        c for c in registered if typer.main.get_command_name(c.name or c.callback.__name__) == name
    ]
    if not chosen:
        return typer.main.get_command(app)
    app.registered_commands = chosen
    try:
        return typer.main.get_command(app)
    finally:
        app.registered_commands = registered


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with 0 / 1 / 2 / 130; never let an exception pick the code."""
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in args or "--verbose" in args
    command = _click_command(args[0] if args else None)
    if not args:
        args = ["--help"]
        usage_only = True
    else:
        usage_only = False
    from bncheck.interrupt import interruptible, was_interrupted

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
    except Exception as exc:
        # Ctrl-C that surfaced as another error: an import it cut short (the SIGINT handler
        # recorded it, whether or not the error chains the KeyboardInterrupt)
        if was_interrupted():
            print("bncheck: interrupted", file=sys.stderr)
            code = ExitCode.INTERRUPTED
            interrupted_said = True
        elif isinstance(exc, BncheckError):
            if verbose:
                import traceback

                traceback.print_exc()
            print(f"bncheck: error: {exc}", file=sys.stderr)
            code = exc.exit_code
        else:
            code = internal_error(exc, verbose)
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
