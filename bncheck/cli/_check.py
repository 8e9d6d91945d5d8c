"""``bncheck check``: train/test mismatch of every BN layer on data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from bncheck.cli import (
    ArchKwargsOpt,
    ArchOpt,
    ChannelOrderOpt,
    CheckpointKeyOpt,
    Common,
    CropOpt,
    DataKwargsOpt,
    DataOpt,
    FailOnOpt,
    FormatOpt,
    IgnoreOpt,
    LayoutOpt,
    MaxBatchesOpt,
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
from bncheck.errors import InputError


@app.command()
def check(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="model files (.onnx, .pt2, .pt/.pth/.bin, .safetensors) or folders: one "
            "--data serves them all",
            show_default=False,
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
    synthetic: Annotated[
        bool,
        typer.Option("--synthetic", help="seeded N(0, 1) input instead of data (pipeline test)"),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="samples per batch")] = 32,
    max_samples: Annotated[
        int | None, typer.Option("--max-samples", help="use at most this many samples")
    ] = None,
    max_batches: MaxBatchesOpt = None,
    report: Annotated[
        str | None,  # not Path: Path("out/") drops the slash that says "a folder"
        typer.Option(
            "--report",
            metavar="<path>",
            help="also write a self-contained HTML page with charts (bncheck[report])",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task",
            metavar="<task>",
            help="what the outputs are: classify (class scores: top-1 agreement is judged too) "
            "| other (relative L2 alone; the default). Also task in [tool.bncheck]",
        ),
    ] = None,
    fmt: FormatOpt = None,
    fail_on: FailOnOpt = None,
    select: SelectOpt = None,
    ignore: IgnoreOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    trust_pickle: TrustOpt = False,
    checkpoint_key: CheckpointKeyOpt = None,
    input_shape: ShapeOpt = None,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare each BN layer's running statistics with the statistics it sees on data.

    Exit 1 when findings reach --fail-on (default: error, i.e. a diverging layer, BN401).
    Thresholds come from [tool.bncheck.thresholds]: kl, max-share, output-rel-l2,
    top1-agreement.
    """
    params = dict(locals())  # for data_spec(): --data and its options
    from bncheck.api._check import check as run_check
    from bncheck.report import check as rep
    from bncheck.rules_data import CheckThresholds

    opts = common(
        fmt, fail_on, select, ignore, arch, arch_kwargs, trust_pickle, input_shape, verbose, quiet,
        checkpoint_key=checkpoint_key, model=models[0] if len(models) == 1 else None,
    )  # fmt: skip
    where = f"{opts.config.source or 'pyproject.toml'}: [tool.bncheck.thresholds]"
    thresholds = CheckThresholds.from_mapping(opts.config.get("thresholds"), source=where)
    if report is not None:
        from bncheck.report import check_html

        check_html.check_report_path(report)  # fail before the work, not after it
    spec = data_spec(params, opts.config)
    open_options = dict(opts.open_options)
    check_options = dict(
        data=spec,
        synthetic=synthetic,
        batch_size=batch_size,
        max_samples=max_samples,
        max_batches=max_batches,
        thresholds=thresholds,
        input_shapes=open_options.pop("input_shapes", None),
        select=opts.select,
        ignore=opts.ignore,
        task=task or opts.config.get("task"),
    )
    if len(models) > 1 or models[0].is_dir():
        if report is not None:
            raise InputError("--report writes one model's page: give one model with it")
        _check_many(models, opts, {**check_options, **open_options})
    show_bar = opts.format == "text" and not opts.quiet and sys.stderr.isatty()
    with progress_bar(show_bar, "checking") as progress:
        result = run_check(models[0], progress=progress, **check_options, **open_options)
    if report is not None:
        written = check_html.write_html(result, report)
        if not opts.quiet:
            print(f"bncheck: wrote {written}", file=sys.stderr)
    render(rep, result, opts, verbose=opts.verbose, show_info=bool(opts.select))
    raise typer.Exit(exit_code_for(result.findings, opts.fail_on))


def _check_many(models: list[Path], opts: Common, options: dict[str, Any]) -> NoReturn:
    """``check`` over several models on one dataset: a section per model, a total, and the
    worst exit code; a model that cannot be read or run is said at once and the rest go on."""
    from bncheck import api
    from bncheck.cli._runs import render_run, say_error

    cfg = opts.config
    table = cfg.get("arch") if isinstance(cfg.get("arch"), dict) else None
    arch = options.pop("arch", None) or table
    run = api.check_paths(
        models,
        include=cfg.get("include", []),
        exclude=cfg.get("exclude", []),
        arch=arch,
        root=cfg.root,
        on_error=say_error(opts),
        **options,
    )
    render_run(run, opts)
