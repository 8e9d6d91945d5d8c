"""``bncheck bench``: latency of one model, or of two interleaved (A/B)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from bncheck.cli import (
    ArchKwargsOpt,
    ArchOpt,
    ChannelOrderOpt,
    CheckpointKeyOpt,
    CropOpt,
    DataKwargsOpt,
    DataOpt,
    FormatOpt,
    LayoutOpt,
    MeanOpt,
    QuietOpt,
    ResizeOpt,
    ScaleOpt,
    ShapeOpt,
    StdOpt,
    TrustOpt,
    VerboseOpt,
    app,
    common,
    data_spec,
    progress_bar,
    render,
)
from bncheck.errors import ExitCode, InputError

DeviceOpt = Annotated[str, typer.Option("--device", help="cpu | cuda")]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="intra-op threads (torch and onnxruntime)")
]
BatchOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--batch-size",
        metavar="<sizes>",
        help="batch size; several (1,8 or repeated) give one row each",
    ),
]
BudgetOpt = Annotated[
    float | None,
    typer.Option("--time-budget", help="seconds of timed calls per engine and batch size"),
]
RoundsOpt = Annotated[
    int | None,
    typer.Option(
        "--rounds",
        help="with --vs: interleaved A/B rounds (default 20); alone: a fixed number of timed "
        "calls instead of --time-budget",
    ),
]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="warm-up calls before timing")]


def parse_ratio(option: str, value: str | None) -> float | None:
    """``1.1`` → 1.1 (a ratio B/A); ``10%`` → 1.1 (a slowdown in percent)."""
    if value is None:
        return None
    text = value.strip()
    try:
        ratio = 1.0 + float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise InputError(
            f"{option} {value!r}: give a ratio B/A such as 1.1, or a percentage such as 10%"
        ) from None
    return ratio


def parse_batch_sizes(values: list[str] | None) -> tuple[int, ...]:
    """``["1,8", "32"]`` → ``(1, 8, 32)``; one line of error for anything else."""
    if not values:
        return (1,)
    out: list[int] = []
    for v in values:
        for part in v.split(","):
            if not part.strip():
                continue
            try:
                n = int(part)
            except ValueError:
                raise InputError(f"--batch-size {v!r}: give integers, e.g. 1,8,32") from None
            if n < 1:
                raise InputError(f"--batch-size {v!r}: batch sizes must be at least 1")
            out.append(n)
    return tuple(dict.fromkeys(out)) or (1,)


@app.command()
def bench(
    model: Annotated[Path, typer.Argument(help="model file (A)")],
    vs: Annotated[
        Path | None, typer.Option("--vs", help="second model (B): A and B run interleaved")
    ] = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = None,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch models: time torch.compile instead of eager")
    ] = False,
    no_optimize: Annotated[
        bool,
        typer.Option(
            "--no-optimize", help="onnxruntime at ORT_DISABLE_ALL instead of its default level"
        ),
    ] = False,
    time_budget: BudgetOpt = None,
    rounds: RoundsOpt = None,
    warmup: WarmupOpt = 10,
    data: DataOpt = None,
    data_kwargs: DataKwargsOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    scale: ScaleOpt = None,
    channel_order: ChannelOrderOpt = None,
    layout: LayoutOpt = None,
    fail_if_slower: Annotated[
        str | None,
        typer.Option(
            "--fail-if-slower",
            metavar="RATIO",
            help="with --vs: exit 1 when B/A is above RATIO (1.1, or 10%) even at the low end "
            "of the 95% interval; verdicts are judged against it (default margin 1.02)",
        ),
    ] = None,
    fmt: FormatOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: CheckpointKeyOpt = None,
    input_shape: ShapeOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Latency, percentiles, throughput and memory; with --vs, the ratio B/A and its 95% CI.

    The verdict follows the interval: B slower / B faster when it lies beyond the threshold,
    no difference when it lies within, inconclusive when it straddles; a noisy timer is flagged.
    Exit 1 with --fail-if-slower when the whole interval lies above the ratio given.
    """
    params = dict(locals())  # for data_spec(): --data and its options
    from bncheck.api._bench import DEFAULT_TIME_BUDGET_S
    from bncheck.api._bench import bench as run_bench
    from bncheck.report import bench as rep

    opts = common(
        fmt, None, None, None, arch, arch_kwargs, trust_pickle, input_shape, verbose, quiet,
        checkpoint_key=checkpoint_key,
    )  # fmt: skip
    open_options = dict(opts.open_options)
    input_shapes = open_options.pop("input_shapes", None)
    show_bar = opts.format == "text" and not opts.quiet and sys.stderr.isatty()
    with progress_bar(show_bar, "timing") as progress:
        result = run_bench(
            model,
            vs=vs,
            device=device,
            threads=threads,
            batch_sizes=parse_batch_sizes(batch_size),
            input_shapes=input_shapes,
            compile=compile,
            optimize=not no_optimize,
            time_budget_s=DEFAULT_TIME_BUDGET_S if time_budget is None else time_budget,
            rounds=rounds,
            warmup=warmup,
            data=data_spec(params, opts.config),
            fail_if_slower=parse_ratio("--fail-if-slower", fail_if_slower),
            progress=progress,
            **open_options,
        )
    render(rep, result, opts)
    raise typer.Exit(ExitCode.FINDINGS if result.failed else ExitCode.OK)
