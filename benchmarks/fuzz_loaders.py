"""Fuzz the model loaders: mutated model files must end in a BncheckError, never a crash.

Each input is written to a temporary file and fed to ``bncheck.backends.open_model`` and then
``.info()``. Any exception that is not a ``BncheckError`` is a crash: it is printed and the
input is saved under ``--crashes``. Crashes do not stop the run; each distinct one (exception
type + innermost bncheck frame) is saved once, with a count of how often it was hit.

Engines:
- ``atheris`` (coverage-guided libFuzzer over bncheck's Python code; ``pip install atheris``),
  seeded with the valid sample model, used when installed;
- ``mutate``: a built-in structured mutator (byte flips, runs of random bytes, truncation,
  duplicated/removed chunks, protobuf-varint and zip-header aware edits) of the valid file.

Targets: ``onnx`` (sample_models/resnet.onnx), ``state_dict`` (sample_models/resnet.pt with
``--arch bncheck.samples:small_resnet``), ``safetensors`` (resnet.safetensors, same arch).

    python benchmarks/fuzz_loaders.py --target onnx --seconds 300 --crashes fuzz_crashes/

Prints one summary line per target: inputs tried, inputs per second, rejected cleanly, crashes.
Each worker runs in a subprocess so that an input that kills the interpreter (abort, OOM) is
recorded as a crash too and the run continues with a fresh worker.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
TARGETS = {
    "onnx": (SAMPLES / "resnet.onnx", ".onnx", None),
    "state_dict": (SAMPLES / "resnet.pt", ".pt", "bncheck.samples:small_resnet"),
    "safetensors": (SAMPLES / "resnet.safetensors", ".safetensors", "bncheck.samples:small_resnet"),
}
# A worker that ran this long on one input is stuck: the parent records a hang.
PER_INPUT_TIMEOUT_S = 30
# Address-space cap for a worker: an input that tries to allocate gigabytes fails fast and is
# reported (a MemoryError is not a BncheckError) instead of swapping the machine.
WORKER_MEMORY_BYTES = 6 << 30


# ---- the harness (runs in the worker) -----------------------------------------------------


class Harness:
    """Feeds one input to the loader and classifies the outcome."""

    def __init__(self, target: str, crashes: Path, workdir: Path) -> None:
        from bncheck.errors import BncheckError

        self.error_type = BncheckError
        self.seed_path, self.suffix, self.arch = TARGETS[target]
        self.crashes = crashes
        self.stats_file = workdir / "stats.json"
        self.tmp = workdir
        self.stats: dict = {"inputs": 0, "clean_errors": 0, "loaded": 0, "crashes": {}}
        self.last_flush = time.monotonic()
        # The input currently running: the parent saves it if the worker dies on it.
        self.current = self.tmp / "current.bin"

    def one(self, data: bytes) -> None:
        from bncheck.backends import open_model

        path = self.tmp / f"input{self.suffix}"
        path.write_bytes(data)
        self.current.write_bytes(data)
        self.stats["inputs"] += 1
        try:
            handle = open_model(path, arch=self.arch)
            handle.info()
            self.stats["loaded"] += 1
        except self.error_type as exc:
            # One line a user can act on: a message with a newline is a defect too.
            if "\n" in str(exc) or not str(exc).strip():
                self._crash(data, exc, kind="multi-line or empty error message")
            else:
                self.stats["clean_errors"] += 1
        except Exception as exc:  # classifying every escape is the point
            self._crash(data, exc)
        if time.monotonic() - self.last_flush > 2.0:
            self.flush()

    def _crash(self, data: bytes, exc: BaseException, kind: str | None = None) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "bncheck" in f.filename and "fuzz_loaders" not in f.filename]
        where = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        key = f"{kind or type(exc).__name__}@{where}"
        entry = self.stats["crashes"].setdefault(key, {"count": 0, "file": None})
        entry["count"] += 1
        if entry["file"] is None:
            digest = hashlib.sha1(data).hexdigest()[:12]
            out = self.crashes / f"crash-{digest}{self.suffix}"
            out.write_bytes(data)
            entry["file"] = str(out)
            entry["message"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"CRASH {key}: {entry['message']}\n  input saved to {out}", file=sys.stderr)
            traceback.print_exception(exc, file=sys.stderr)

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        self.stats_file.write_text(json.dumps(self.stats))


# ---- the built-in mutator ------------------------------------------------------------------


def mutate(seed: bytes, rng: random.Random) -> bytes:
    """1-4 random edits of ``seed``: the kinds of damage real files and attackers produce."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        n = len(data)
        if n == 0:
            data += rng.randbytes(rng.randint(1, 64))
            continue
        pos = rng.randrange(n)
        if op == 0:  # bit flip
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 1:  # a run of random bytes
            k = rng.randint(1, 32)
            data[pos : pos + k] = rng.randbytes(k)
        elif op == 2:  # truncation
            del data[pos:]
        elif op == 3:  # remove a chunk
            del data[pos : pos + rng.randint(1, 256)]
        elif op == 4:  # duplicate a chunk
            k = rng.randint(1, 256)
            data[pos:pos] = data[pos : pos + k]
        elif op == 5:  # an interesting integer (sizes, lengths, offsets) in little endian
            value = rng.choice([0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 2**31 - 1, 2**32 - 1, 2**40])
            width = rng.choice([1, 2, 4, 8])
            packed = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
            data[pos : pos + width] = packed
        elif op == 6:  # a huge protobuf varint (a length or dim of ~2^62)
            data[pos : pos + 1] = bytes([0xFF] * 8 + [0x3F])
        else:  # corrupt a zip local/central header size field if one is near
            hit = data.find(b"PK", pos)
            if hit >= 0 and hit + 30 <= len(data):
                field = rng.choice([18, 22, 24, 26, 28])
                struct.pack_into("<I", data, hit + min(field, len(data) - hit - 4), 2**32 - 1)
            else:
                data[pos] = rng.randrange(256)
    return bytes(data)


# ---- worker and parent ---------------------------------------------------------------------


def _import_loaders() -> None:
    """Import every loader module now, so atheris can instrument them before fuzzing."""
    import bncheck.backends
    import bncheck.backends.onnx
    import bncheck.backends.onnx.load
    import bncheck.backends.torch
    import bncheck.backends.torch.load  # noqa: F401


def worker(args: argparse.Namespace) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    if args.engine == "atheris":
        import atheris

        # Coverage feedback from bncheck's own code only: instrumenting torch is slow and
        # its C++ parsers are invisible to atheris anyway.
        with atheris.instrument_imports(include=["bncheck"]):
            _import_loaders()
    else:
        _import_loaders()
    h = Harness(args.target, Path(args.crashes), Path(args.workdir))
    deadline = time.monotonic() + args.seconds
    seed = h.seed_path.read_bytes()
    if args.engine == "atheris":
        # libFuzzer ends with exit(); flush from an atexit-free path: every input checks time.
        def test_one(data: bytes) -> None:
            h.one(data)
            if time.monotonic() > deadline:
                h.flush()
                os._exit(0)

        corpus = h.tmp / "corpus"
        corpus.mkdir()
        (corpus / "seed").write_bytes(seed)
        libfuzzer_args = [
            sys.argv[0],
            str(corpus),
            f"-max_len={len(seed) + 4096}",
            f"-seed={args.seed}",
            # Hangs are the parent's job (it kills a worker stuck PER_INPUT_TIMEOUT_S on one
            # input and restarts it); libFuzzer's own limit only backs that up.
            "-timeout=600",
            "-rss_limit_mb=0",
            "-print_final_stats=0",
        ]
        atheris.Setup(libfuzzer_args, test_one)
        atheris.Fuzz()
    rng = random.Random(args.seed)
    while time.monotonic() < deadline:
        h.one(mutate(seed, rng))
    h.flush()


def _merge(total: dict, part: dict) -> None:
    for k in ("inputs", "clean_errors", "loaded"):
        total[k] += part.get(k, 0)
    for key, entry in part.get("crashes", {}).items():
        if key in total["crashes"]:
            total["crashes"][key]["count"] += entry["count"]
        else:
            total["crashes"][key] = dict(entry)


def run_target(args: argparse.Namespace, target: str, seconds: float) -> dict:
    """Run workers for ``seconds``, restarting one that dies or hangs on an input."""
    crashes = Path(args.crashes)
    crashes.mkdir(parents=True, exist_ok=True)
    total = {"inputs": 0, "clean_errors": 0, "loaded": 0, "crashes": {}, "restarts": 0}
    start = time.monotonic()
    seed = args.seed
    while (left := seconds - (time.monotonic() - start)) > 5:
        with tempfile.TemporaryDirectory(prefix="bncheck-fuzz-") as td:
            work = Path(td)
            cmd = [sys.executable, __file__, "--worker", "--target", target, "--engine"]
            cmd += [args.engine, "--seconds", str(left), "--crashes", str(crashes)]
            cmd += ["--workdir", td, "--seed", str(seed)]
            proc = subprocess.Popen(cmd, stderr=None if args.verbose else subprocess.DEVNULL)
            current = work / "current.bin"
            rc: int | str | None = None
            while rc is None:
                try:
                    rc = proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    # The worker rewrites current.bin for every input: a stale one is a hang.
                    if current.exists() and time.time() - current.stat().st_mtime > (
                        PER_INPUT_TIMEOUT_S
                    ):
                        proc.kill()
                        proc.wait()
                        rc = "hang"
            stats = work / "stats.json"
            _merge(total, json.loads(stats.read_text()) if stats.exists() else {})
            if rc != 0:
                # The worker died on an input (abort, OOM kill, hang): keep what killed it.
                total["restarts"] += 1
                key = f"worker exit {rc}"
                entry = total["crashes"].setdefault(key, {"count": 0, "file": None})
                entry["count"] += 1
                if current.exists() and entry["file"] is None:
                    out = crashes / f"worker-{rc}-{target}{TARGETS[target][1]}"
                    out.write_bytes(current.read_bytes())
                    entry["file"] = str(out)
            seed += 1
    total["seconds"] = round(time.monotonic() - start, 1)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), default=None)
    parser.add_argument("--seconds", type=float, default=60.0, help="per target")
    parser.add_argument("--crashes", default="fuzz_crashes", help="folder for crashing inputs")
    parser.add_argument("--engine", choices=["auto", "atheris", "mutate"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="show worker stderr")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine == "auto":
        try:
            import atheris  # noqa: F401

            args.engine = "atheris"
        except ImportError:
            args.engine = "mutate"
    if args.worker:
        args.target = args.target[0]
        worker(args)
        return
    results = {}
    for target in args.target or ["onnx", "state_dict"]:
        r = run_target(args, target, args.seconds)
        results[target] = r
        print(
            f"{target}: {r['inputs']} inputs in {r['seconds']} s "
            f"({r['inputs'] / max(r['seconds'], 1e-9):.0f}/s, engine {args.engine}), "
            f"{r['clean_errors']} refused cleanly, {r['loaded']} loaded, "
            f"{sum(c['count'] for c in r['crashes'].values())} crashes "
            f"({len(r['crashes'])} distinct), {r['restarts']} worker restarts"
        )
        for key, c in r["crashes"].items():
            print(f"  {key} x{c['count']}: {c.get('message', '')} -> {c.get('file')}")
    summary = Path(args.crashes) / "summary.json"
    summary.write_text(json.dumps(results, indent=1, default=str))
    print(f"details: {summary}")


if __name__ == "__main__":
    main()
