"""``bncheck recalibrate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from bncheck.cli import (
    ArchKwargsOpt,
    ArchOpt,
    CheckpointKeyOpt,
    DynamicDimsOpt,
    FormatOpt,
    InPlaceOpt,
    MaxBatchesOpt,
    QuietOpt,
    ShapeOpt,
    TrustOpt,
    VerboseOpt,
    app,
    common,
    progress_bar,
    render,
)
from bncheck.errors import ExitCode, InputError


@app.command()
def recalibrate(
    model: Annotated[Path, typer.Argument(help="model file to recalibrate")],
    data: Annotated[
        Path, typer.Option("--data", help="calibration data (.npy, .npz, .pt, images)")
    ],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="where to write (same format as MODEL)")
    ] = None,
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
    in_place: InPlaceOpt = False,
    fmt: FormatOpt = None,
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
    """
    from bncheck import api
    from bncheck.distributed import world
    from bncheck.report import recalibrate as rep

    opts = common(
        fmt, None, None, None, arch, arch_kwargs, trust_pickle, input_shape, verbose, quiet,
        checkpoint_key=checkpoint_key, dynamic_dims=dynamic_dims,
    )  # fmt: skip
    if output is None and not in_place:
        raise InputError("give -o OUT (or --in-place to overwrite the model)")
    show = opts.format == "text" and not opts.quiet and sys.stderr.isatty()
    with progress_bar(show, "recalibrating") as progress:
        result = api.recalibrate(
            model,
            model if in_place and output is None else output,
            data=data,
            batch_size=batch_size,
            max_samples=max_samples,
            max_batches=max_batches,
            mode=mode,
            momentum=momentum,
            labels=labels,
            compare=not no_compare,
            in_place=in_place,
            progress=progress,
            **opts.open_options,
        )
    if world()[0] != 0:
        raise typer.Exit(ExitCode.OK)  # under torchrun rank 0 reports
    render(rep, result, opts)
    raise typer.Exit(ExitCode.OK)
