"""``bncheck recalibrate``."""

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
    InPlaceOpt,
    LayoutOpt,
    MaxBatchesOpt,
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
    exit_code_for,
    progress_bar,
    render,
)
from bncheck.errors import ExitCode, InputError


@app.command()
def recalibrate(
    model: Annotated[Path, typer.Argument(help="model file to recalibrate")],
    output: Annotated[
        str | None,  # not Path: Path("out/") drops the slash that says "a folder"
        typer.Option(
            "-o", "--output", metavar="<path>", help="where to write (same format as MODEL)"
        ),
    ] = None,
    data: DataOpt = None,
    data_kwargs: DataKwargsOpt = None,
    resize: ResizeOpt = None,
    crop: CropOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    scale: ScaleOpt = None,
    channel_order: ChannelOrderOpt = None,
    layout: LayoutOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="batch size (≥ 16 advised)")] = 32,
    max_samples: Annotated[
        int,
        typer.Option(
            "--max-samples",
            help="use at most this many samples (10^3–10^4 is enough for precise BN)",
        ),
    ] = 4096,
    max_batches: MaxBatchesOpt = None,
    mode: Annotated[
        str, typer.Option("--mode", help="exact (population statistics) | ema (moving average)")
    ] = "exact",
    momentum: Annotated[
        float | None, typer.Option("--momentum", help="EMA momentum (PyTorch convention)")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help=".npy of class indices: accuracy before/after")
    ] = None,
    no_compare: Annotated[
        bool, typer.Option("--no-compare", help="skip the before/after mismatch passes")
    ] = False,
    force: Annotated[
        bool,
        typer.Option("--force", help="write the model even when accuracy fell (BN405 stays)"),
    ] = False,
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
    fail_on: FailOnOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: CheckpointKeyOpt = None,
    dynamic_dims: DynamicDimsOpt = None,
    input_shape: ShapeOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Replace BN running statistics by exact population statistics of the data.

    Mean and unbiased variance of each BN's input over the data (BNs in batch-statistics mode).

    Written in MODEL's format after the pass. torchrun --nproc_per_node N -m bncheck … shards it.

    With --labels, when accuracy on the data falls by more than accuracy-drop points (default
    1; thresholds table of tool.bncheck in pyproject.toml) nothing is written and the exit code
    is 1 (BN405); --force writes it, and the exit code follows --fail-on. Without labels,
    outputs that change by more than output-change (relative L2, default 0.25) warn (BN406).
    """
    params = dict(locals())  # for data_spec(): --data and its options
    from bncheck import api
    from bncheck.distributed import world
    from bncheck.report import recalibrate as rep
    from bncheck.rules_data import RecalibrateThresholds

    opts = common(
        fmt, fail_on, None, None, arch, arch_kwargs, trust_pickle, input_shape, verbose, quiet,
        checkpoint_key=checkpoint_key, dynamic_dims=dynamic_dims, model=model,
    )  # fmt: skip
    where = f"{opts.config.source or 'pyproject.toml'}: [tool.bncheck.thresholds]"
    thresholds = RecalibrateThresholds.from_mapping(opts.config.get("thresholds"), source=where)
    if output is None and not in_place:
        raise InputError("give -o OUT (or --in-place to overwrite the model)")
    spec = data_spec(params, opts.config)
    if spec is None:
        raise InputError("recalibrate needs calibration data: give --data")
    show = opts.format == "text" and not opts.quiet and sys.stderr.isatty()
    with progress_bar(show, "recalibrating") as progress:
        result = api.recalibrate(
            model,
            model if in_place and output is None else output,
            data=spec,
            batch_size=batch_size,
            max_samples=max_samples,
            max_batches=max_batches,
            mode=mode,
            momentum=momentum,
            labels=labels,
            compare=not no_compare,
            force=force,
            thresholds=thresholds,
            in_place=in_place,
            progress=progress,
            **opts.open_options,
        )
    if world()[0] != 0:
        raise typer.Exit(ExitCode.OK)  # under torchrun rank 0 reports
    render(rep, result, opts)
    if result.refused:  # nothing written: never a success, whatever --fail-on says
        raise typer.Exit(ExitCode.FINDINGS)
    raise typer.Exit(exit_code_for(result.findings, opts.fail_on))
