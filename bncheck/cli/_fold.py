"""``bncheck fold``."""

from __future__ import annotations

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
    FormatOpt,
    InPlaceOpt,
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
    render,
)
from bncheck.errors import ExitCode


@app.command()
def fold(
    model: Annotated[Path, typer.Argument(help="model file to fold")],
    output: Annotated[
        str | None,  # not Path: Path("out/") drops the slash that says "a folder"
        typer.Option(
            "-o",
            "--output",
            metavar="<path>",
            help="where to write: .onnx, or .pt2 for PyTorch models",
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
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="skip the equivalence check")
    ] = False,
    verify_whole: Annotated[
        bool,
        typer.Option(
            "--verify-whole",
            help="compare the outputs even where the fold leaves most of the weights in an "
            "unchanged tail (by default the tensors that tail reads are compared)",
        ),
    ] = False,
    affine: Annotated[
        bool, typer.Option("--affine", help="turn BNs that cannot fold into a scale and shift")
    ] = False,
    rtol: Annotated[
        float | None,
        typer.Option(
            "--rtol",
            help="pass when each output's max|Δ| ≤ atol + rtol·max|ref| (default: derived "
            "from the dtype and the model's own rounding spread)",
        ),
    ] = None,
    atol: Annotated[
        float | None, typer.Option("--atol", help="absolute part of that bound (default 0)")
    ] = None,
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
    """Fold BN into neighbouring Conv/ConvTranspose/Linear layers and verify the result.

    Exit 1, and no file written, when the folded model does not compute the same outputs.
    """
    params = dict(locals())  # for data_spec(): --data and its options
    from bncheck import api
    from bncheck.report import fold as rep

    opts = common(
        fmt, None, None, None, arch, arch_kwargs, trust_pickle, input_shape, verbose, quiet,
        checkpoint_key=checkpoint_key, dynamic_dims=dynamic_dims, model=model,
    )  # fmt: skip
    result = api.fold(
        model,
        output,
        data=data_spec(params, opts.config),
        verify=not no_verify,
        verify_whole=verify_whole,
        affine=affine,
        rtol=rtol,
        atol=atol,
        in_place=in_place,
        **opts.open_options,
    )
    render(rep, result, opts)
    raise typer.Exit(ExitCode.OK if result.passed else ExitCode.FINDINGS)
