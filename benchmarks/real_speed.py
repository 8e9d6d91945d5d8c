"""bncheck's commands against what a user's own script needs for the same job (the floor).

Each row runs a bncheck command and its floor as fresh processes, alternating, ``--repeat``
times; the ratio of each pair (bncheck / floor, measured back to back so machine load hits both
alike) gives the median and the spread (min–max over the pairs). Peak RSS is each process's
own maximum resident set (``wait4``). Start-up rows report the difference in seconds.

Models are built here (nothing is downloaded): ResNet-50 and MobileNetV2 from
``benchmarks/models.py`` with randomised BN, exported with BN kept; VGG-11-BN at 64² (531 MB);
a MobileNetV2 built without BN as the 0-BN ``.pt2``. ``--detection PATH`` and ``--onnx PATH``
put real ONNX files in place of the built ones.

    OMP_NUM_THREADS=1 python benchmarks/real_speed.py --repeat 3
"""

from __future__ import annotations

import argparse
import compileall
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


# Linux counts a child's peak RSS from the parent's at fork (exec keeps the larger of the two
# high-water marks), and this script holds torch and the built models: a child started from it
# would report at least this process's size. GNU time is a small parent that reports its own
# child's peak, so every row gets the command's own figure.
GNU_TIME = "/usr/bin/time"


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit code of ``cmd`` as a fresh process."""
    timed = os.access(GNU_TIME, os.X_OK)
    full = [GNU_TIME, "-f", "peak-kb %M", *cmd] if timed else cmd
    t = time.perf_counter()
    proc = subprocess.Popen(full, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.stderr and proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} exited {code}: {err.strip()[-500:]}")
    peak_kb = float(usage.ru_maxrss)
    if timed:
        lines = [x for x in err.splitlines() if x.startswith("peak-kb ")]
        peak_kb = float(lines[-1].split()[1]) if lines else peak_kb
    return wall, peak_kb / 1024, code


def py(code: str) -> list[str]:
    return [PY, "-c", code]


def bncheck(*args: str) -> list[str]:
    return [PY, "-m", "bncheck", *args]


# --------------------------------------------------------------------------------- fixtures


def build_fixtures(work: Path, detection: str | None, onnx_model: str | None) -> dict[str, str]:
    """Write the models the rows use into ``work`` (skipped when already there)."""
    sys.path.insert(0, str(HERE))
    import torch
    from models import mobilenet_v2, randomize_bn, resnet50, vgg11_bn

    from bncheck.sample_export import export_onnx_keep_bn, export_pt2

    torch.manual_seed(0)
    paths = {
        "sd": work / "mobilenet_v2.pt",
        "onnx": Path(onnx_model) if onnx_model else work / "resnet50.onnx",
        "det": Path(detection) if detection else work / "resnet50_640.onnx",
        "zero": work / "mobilenet_v2_nobn.pt2",
        "vgg": work / "vgg11_bn_64.onnx",
    }
    if not paths["sd"].exists():
        torch.save(randomize_bn(mobilenet_v2()).state_dict(), paths["sd"])
    if not paths["onnx"].exists() or not paths["det"].exists():
        r50 = randomize_bn(resnet50())
        if not paths["onnx"].exists():
            export_onnx_keep_bn(r50, torch.randn(2, 3, 224, 224), paths["onnx"], ["logits"])
        if not paths["det"].exists():
            export_onnx_keep_bn(r50, torch.randn(2, 3, 640, 640), paths["det"], ["logits"])
    if not paths["zero"].exists():
        export_pt2(mobilenet_v2(norm=False).eval(), torch.randn(2, 3, 224, 224), paths["zero"])
    if not paths["vgg"].exists():
        vgg = randomize_bn(vgg11_bn())
        export_onnx_keep_bn(vgg, torch.randn(2, 3, 64, 64), paths["vgg"], ["logits"])
    return {k: str(v) for k, v in paths.items()}


def onnx_input_shape(path: str) -> tuple[str, list[int]]:
    import onnx

    m = onnx.load(path, load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    vi = next(i for i in m.graph.input if i.name not in inits)
    dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
    return vi.name, dims


# ------------------------------------------------------------------------------------- rows


def rows(f: dict[str, str], out: Path) -> list[tuple[str, list[str], list[str], str, str]]:
    """(label, bncheck command, floor command, kind, goal); kind: startup | wall | rss."""
    arch = ["--arch", "models:mobilenet_v2"]
    build = (
        "import sys, torch; sys.path.insert(0, {here!r}); import models; "
        "m = models.mobilenet_v2(); m.load_state_dict(torch.load({sd!r}, weights_only=True)); "
        "m.eval(); x = torch.randn(1, 3, 224, 224)\n"
        "with torch.no_grad(): m(x)\n"
    ).format(here=str(HERE), sd=f["sd"])
    export = (
        "import warnings, contextlib, io; warnings.simplefilter('ignore')\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    torch.onnx.export(m, (x,), {out!r}, dynamo=True, "
        "dynamic_shapes=({{0: torch.export.Dim('batch')}},))\n"
    ).format(out=str(out / "floor_mbv2.onnx"))
    name, shape = onnx_input_shape(f["det"])
    two_sessions = (
        "import onnx, numpy as np, onnxruntime as ort\n"
        f"m = onnx.load({f['det']!r}); b = m.SerializeToString()\n"
        f"x = {{{name!r}: np.random.rand(*{shape!r}).astype(np.float32)}}\n"
        "for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,) * 2:\n"
        "    so = ort.SessionOptions(); so.graph_optimization_level = level\n"
        "    ort.InferenceSession(b, so, providers=['CPUExecutionProvider']).run(None, x)\n"
    )
    return [
        ("`bncheck --version`", bncheck("--version"), py("pass"), "startup", "+0.15 s"),
        ("`bncheck --help`", bncheck("--help"), py("pass"), "startup", "+0.15 s"),
        (
            f"`inspect` an ONNX model ({Path(f['onnx']).name})",
            bncheck("inspect", f["onnx"], "-q"),
            py(f"import onnx, numpy, rich, typer; onnx.load({f['onnx']!r})"),
            "wall",
            "≤ 1.3×",
        ),
        (
            "`inspect` a state dict (MobileNetV2)",
            bncheck("inspect", f["sd"], *arch, "-q"),
            py(build),
            "wall",
            "≤ 1.3×",
        ),
        (
            "`fold` a state dict (MobileNetV2, 224²) to `.onnx`",
            # a state dict has no shape: a written model must not be fixed to a guessed one
            bncheck(
                "fold",
                f["sd"],
                *arch,
                "--input-shape",
                "1,3,224,224",
                "-o",
                str(out / "mbv2.onnx"),
                "-q",
            ),
            py(build + export),
            "wall",
            "≤ 1.3×",
        ),
        (
            f"`fold` a detection-size ONNX ({Path(f['det']).name}, {'×'.join(map(str, shape))})",
            bncheck("fold", f["det"], "-o", str(out / "det.onnx"), "-q"),
            py(two_sessions),
            "rss",
            "≤ 3×, ≤ 3×",
        ),
        (
            "`fold` a model with nothing to fold (`.pt2`, 0 BN)",
            bncheck("fold", f["zero"], "-o", str(out / "zero.pt2"), "-q"),
            py(f"import torch; torch.export.load({f['zero']!r})"),
            "wall",
            "≤ 1.5×",
        ),
        (
            "`fold` a 531 MB ONNX (VGG-11-BN at 64²)",
            bncheck("fold", f["vgg"], "-o", str(out / "vgg.onnx"), "-q"),
            py(f"import onnx; onnx.save(onnx.load({f['vgg']!r}), {str(out / 'floor_vgg.onnx')!r})"),
            "rss",
            "≤ 2×",
        ),
    ]


def measure(bn: list[str], floor: list[str], repeat: int, env: dict[str, str], out: Path):
    def fresh(cmd: list[str]) -> tuple[float, float, int]:
        # every run writes a new file, as a user's first run does (a rerun over an earlier
        # output also flushes it to disk before the rename: bncheck.atomic)
        for p in out.iterdir():
            p.unlink()
        return run(cmd, env)

    pairs = []
    for i in range(repeat):
        # alternate which goes first, so a drift in machine load does not favour either
        if i % 2 == 0:
            b, f = fresh(bn), fresh(floor)
        else:
            f, b = fresh(floor), fresh(bn)
        pairs.append((b, f))
    return pairs


def fmt_row(label: str, kind: str, goal: str, pairs) -> str:
    bw = statistics.median(b[0] for b, _ in pairs)
    fw = statistics.median(f[0] for _, f in pairs)
    if kind == "startup":
        diffs = [b[0] - f[0] for b, f in pairs]
        now = f"+{statistics.median(diffs):.2f} s [{min(diffs):+.2f}, {max(diffs):+.2f}]"
        return f"| {label} | {bw:.2f} s | {fw:.2f} s | {now} | {goal} |"
    ratios = [b[0] / f[0] for b, f in pairs]
    now = f"{statistics.median(ratios):.2f}× [{min(ratios):.2f}, {max(ratios):.2f}]"
    bcell, fcell = f"{bw:.2f} s", f"{fw:.2f} s"
    if kind == "rss":
        rb = statistics.median(b[1] for b, _ in pairs)
        rf = statistics.median(f[1] for _, f in pairs)
        now += f", RSS {rb / rf:.2f}×"
        bcell += f", {rb:.0f} MB"
        fcell += f", {rf:.0f} MB"
    codes = {b[2] for b, _ in pairs}
    note = "" if codes == {0} else f" (exit {sorted(codes)})"
    return f"| {label}{note} | {bcell} | {fcell} | {now} | {goal} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="alternating pairs per row")
    ap.add_argument("--work", type=Path, help="folder for the built models (kept, reused)")
    ap.add_argument("--detection", help="a real detection ONNX for the 'fold' RSS row")
    ap.add_argument("--onnx", help="a real ONNX model for the 'inspect' row")
    ap.add_argument("--only", nargs="*", type=int, help="row numbers (1-based)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.gettempdir()) / "bncheck-real-speed"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(tempfile.mkdtemp(prefix="bncheck-real-speed-out-"))
    # bncheck as a user has it installed: byte-compiled, like the floors' packages
    compileall.compile_dir(str(ROOT / "bncheck"), quiet=1)
    f = build_fixtures(work, args.detection, args.onnx)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    import onnxruntime
    import torch

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; "
        f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}; OMP_NUM_THREADS={env['OMP_NUM_THREADS']}; "
        f"{args.repeat} alternating pairs per row"
    )
    print()
    print("| run | bncheck (median) | the floor (median) | now: median ratio [min, max] | goal |")
    print("|---|---:|---:|---|---|")
    for i, (label, bn, floor, kind, goal) in enumerate(rows(f, out), 1):
        if args.only and i not in args.only:
            continue
        print(fmt_row(label, kind, goal, measure(bn, floor, args.repeat, env, out)), flush=True)


if __name__ == "__main__":
    main()
