"""``bncheck optimize``: recalibrate? → fold → verify → bench, one report."""

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
    DynamicDimsOpt,
    FailOnOpt,
    FormatOpt,
    IgnoreOpt,
    InPlaceOpt,
    LayoutOpt,
    MeanOpt,
    QuietOpt,
    ResizeOpt,
    ScaleOpt,
    SelectOpt,
    ShapeOpt,
    StdOpt,
    TrustOpt,
    VerboseOpt,
    app,
    common,
    data_spec,
    exit_code_for,
    progress_bar,
    render,
)
from bncheck.cli._bench import (
    BatchOpt,
    DeviceOpt,
    ThreadsOpt,
    parse_batch_sizes,
)
from bncheck.errors import ExitCode


@app.command()
def optimize(
    model: Annotated[Path, typer.Argument(help="model file to optimize")],
    output: Annotated[
        str,  # not Path: Path("out/") drops the slash that says "a folder"
        typer.Option(
            "-o",
            "--output",
            metavar="<path>",
            help="where to write: .onnx, or .pt2 for PyTorch models",
        ),
    ],
    data: DataOpt = None,
    data_kwargs: DataKwargsOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    scale: ScaleOpt = None,
    channel_order: ChannelOrderOpt = None,
    layout: LayoutOpt = None,
    max_samples: Annotated[
        int | None,
        typer.Option("--max-samples", help="use at most this many samples of --data (each pass)"),
    ] = None,
    calib_batch_size: Annotated[
        int, typer.Option("--calib-batch-size", help="batch size of the recalibration passes")
    ] = 32,
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help=".npy of class indices for --data: accuracy before/after"),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="keep a recalibration that lowered accuracy (BN405 stays)"),
    ] = False,
    affine: Annotated[
        bool, typer.Option("--affine", help="turn BNs that cannot fold into a scale and shift")
    ] = False,
    no_bench: Annotated[bool, typer.Option("--no-bench", help="skip the latency comparison")] = (
        False
    ),
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    batch_size: BatchOpt = None,
    time_budget: Annotated[
        float, typer.Option("--time-budget", help="seconds of timed calls per model")
    ] = 0.5,
    rounds: Annotated[
        int | None,
        typer.Option(
            "--rounds",
            help="interleaved rounds of the input and the optimized model in the latency "
            "comparison (default 20)",
        ),
    ] = None,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    fail_on: FailOnOpt = None,
    select: SelectOpt = None,
    ignore: IgnoreOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: CheckpointKeyOpt = None,
    dynamic_dims: DynamicDimsOpt = None,
    input_shape: ShapeOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Recalibrate (with --data), fold, verify, and time the result against the input.

    Exit 1, and no file written, when the folded model does not compute the same outputs,
    or when recalibration lowered accuracy on --data with --labels (BN405, unless --force);
    otherwise by --fail-on on the recalibration's findings and those that remain in the
    written model.
    """
    params = dict(locals())  # for data_spec(): --data and its options
    from bncheck.api._optimize import optimize as run_optimize
    from bncheck.report import optimize as rep
    from bncheck.rules_data import RecalibrateThresholds

    opts = common(
        fmt, fail_on, select, ignore, arch, arch_kwargs, trust_pickle, input_shape, verbose, quiet,
        checkpoint_key=checkpoint_key, dynamic_dims=dynamic_dims, model=model,
    )  # fmt: skip
    where = f"{opts.config.source or 'pyproject.toml'}: [tool.bncheck.thresholds]"
    thresholds = RecalibrateThresholds.from_mapping(opts.config.get("thresholds"), source=where)
    spec = data_spec(params, opts.config)
    show_bar = opts.format == "text" and not opts.quiet and sys.stderr.isatty()
    with progress_bar(show_bar, "timing") as progress:
        result = run_optimize(
            model,
            output,
            data=spec,
            calib_batch_size=calib_batch_size,
            labels=labels,
            force=force,
            thresholds=thresholds,
            affine=affine,
            run_bench=not no_bench,
            device=device,
            threads=threads,
            batch_sizes=parse_batch_sizes(batch_size),
            time_budget_s=time_budget,
            rounds=rounds,
            select=opts.select,
            ignore=opts.ignore,
            in_place=in_place,
            progress=progress,
            **opts.open_options,
        )
    render(rep, result, opts)
    if result.refused or not result.passed:
        raise typer.Exit(ExitCode.FINDINGS)
    raise typer.Exit(exit_code_for(result.findings, opts.fail_on))
