"""Load every PyTorch format safely: validate before allocating, never unpickle without consent.

Formats (``kind`` comes from ``bncheck.backends.sniff``):

- ``pt2``: ``torch.export.load`` silently retries a failed safe load with full unpickling, so the
  archive is validated first (no compiled members, no pickled weights/constants, a sample-inputs
  pickle that passes ``weights_only=True`` on its own, raw tensors that fit their records).
- ``torch_zip`` / ``pickle``: ``torch.load(weights_only=True)``, never retried without it unless
  the user passed ``--trust-pickle``.
- ``safetensors``: header checked against the file size, then ``safetensors.torch.load_file``.
- ``torchscript``: runs code by design, so only with ``--trust-pickle``.

A training checkpoint may hold several state dicts (``{'epoch', 'net', 'ema', 'optimizer'}``,
Lightning's ``{'state_dict', …}``): ``--checkpoint-key`` picks one; without it the only one,
or the only one whose keys fit ``--arch``, is taken, and anything else is refused with the list.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bncheck.backends.torch.arch import build_arch, load_into
from bncheck.backends.torch.checkpoint import pick_state_dict, state_dicts
from bncheck.errors import InputError, UnsafeInputError, first_line

# Decompressed bytes a model file may expand to. Generous for real checkpoints, small enough that
# a crafted header cannot make us allocate without bound.
MAX_TOTAL_BYTES = int(os.environ.get("BNCHECK_MAX_MODEL_BYTES", 64 * 2**30))
# torch.save and torch.export.save store members uncompressed; a deflated member expanding more
# than this is a zip bomb, not a checkpoint.
MAX_RATIO = 100
_RATIO_MIN_BYTES = 1 << 20
_COMPILED_SUFFIXES = (".so", ".dll", ".dylib", ".pyd", ".o", ".a", ".cubin", ".ptx", ".hsaco")
_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_TRUST_HINT = (
    "loading it could run code. Re-run with --trust-pickle only if you trust its source, "
    "or save a state dict or a .pt2"
)


@dataclass
class Loaded:
    """What a file held: an eager module and/or an ExportedProgram, and the format name."""

    format: str  # pt2 | state_dict | safetensors | torchscript | pickle
    module: Any  # torch.nn.Module (ep.module() for .pt2)
    exported: Any = None  # torch.export.ExportedProgram for .pt2
    example_shape: Any = None  # example_input_shape of the --arch factory or its module
    notes: list[str] = field(default_factory=list)  # which checkpoint entry, prefixes stripped


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's logging and warnings (export and load chatter on stderr)."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


# ---------------------------------------------------------------------------------------- zips


def check_zip_sizes(path: Path, zf: zipfile.ZipFile, file_size: int, what: str = "") -> None:
    """Refuse a zip whose declared contents could not come from this file (zip bomb, lying header).

    Checks each member: stored members must declare ``file_size == compress_size``; deflated ones
    must expand at most ``MAX_RATIO``× (above 1 MiB); every member must lie inside the file; the
    sum of uncompressed sizes must stay under ``MAX_TOTAL_BYTES``.
    """
    where = f"{path}{what}"
    total = 0
    for info in zf.infolist():
        if info.header_offset + info.compress_size > file_size:
            raise InputError(
                f"{where}: zip member {info.filename!r} lies beyond the end of the file"
            )
        if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            raise InputError(
                f"{where}: zip member {info.filename!r} declares {info.file_size} bytes but "
                f"stores {info.compress_size} (damaged or crafted archive)"
            )
        if info.file_size > _RATIO_MIN_BYTES and info.file_size > MAX_RATIO * max(
            info.compress_size, 1
        ):
            raise InputError(
                f"{where}: zip member {info.filename!r} would expand to {info.file_size} bytes "
                f"from {info.compress_size} (compression ratio above {MAX_RATIO}: zip bomb?)"
            )
        total += info.file_size
    if total > MAX_TOTAL_BYTES:
        raise InputError(
            f"{where}: archive expands to {total} bytes, more than the {MAX_TOTAL_BYTES}-byte cap "
            "(set BNCHECK_MAX_MODEL_BYTES to raise it)"
        )


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: damaged zip archive ({exc})") from None


# ----------------------------------------------------------------------------------------- pt2


def validate_pt2(path: Path, *, trust_pickle: bool) -> None:
    """Check a torch.export archive before ``torch.export.load`` touches it.

    Always: sizes (see ``check_zip_sizes``), one root folder, configs that parse, raw tensors whose
    declared extent fits their record. Unless ``trust_pickle``: no compiled members, no weights
    or constants stored as pickles or custom objects, sample inputs loadable with
    ``weights_only=True``. Raises InputError / UnsafeInputError naming the member.
    """
    size = path.stat().st_size
    with _open_zip(path) as zf:
        check_zip_sizes(path, zf, size)
        names = zf.namelist()
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            # torch.export.load falls back to an older, pickle-based layout read from top-level
            # members; a genuine archive keeps everything under one folder.
            raise InputError(f"{path}: .pt2 archive members are not under one root folder")
        rel = {n.split("/", 1)[1]: n for n in names}

        def refuse(member: str, why: str) -> None:
            if not trust_pickle:
                raise UnsafeInputError(f"{path}: member {member!r} {why}; {_TRUST_HINT}")

        for r in rel:
            if r.startswith("data/aotinductor/") or r.lower().endswith(_COMPILED_SUFFIXES):
                refuse(r, "is compiled code")
        models = [r[len("models/") : -len(".json")] for r in rel if _is_model_json(r)]
        if "model" not in models:
            raise InputError(f"{path}: .pt2 archive holds no exported program 'models/model.json'")
        for model in models:
            for kind, prefix in (("weights", "data/weights/"), ("constants", "data/constants/")):
                legacy = f"{prefix}{model}.pt"
                if legacy in rel:
                    _check_weights_only(path, zf, rel[legacy], legacy, refuse)
                cfg_name = f"{prefix}{model}_{kind}_config.json"
                if cfg_name in rel:
                    _check_payload_config(path, zf, rel, prefix, cfg_name, refuse)
                elif legacy not in rel:
                    raise InputError(f"{path}: .pt2 archive lacks {cfg_name!r}")
            sample = f"data/sample_inputs/{model}.pt"
            if sample in rel:
                _check_weights_only(path, zf, rel[sample], sample, refuse)


def _is_model_json(r: str) -> bool:
    return r.startswith("models/") and r.endswith(".json") and r.count("/") == 1


def _check_weights_only(path: Path, zf: zipfile.ZipFile, member: str, r: str, refuse: Any) -> None:
    import torch

    data = zf.read(member)
    if data[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as inner:
                check_zip_sizes(path, inner, len(data), f" (member {r!r})")
        except zipfile.BadZipFile:
            raise InputError(f"{path}: member {r!r} is a damaged zip") from None
    try:
        with quiet_torch():
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        refuse(r, f"holds pickled Python objects ({_unpickling_detail(exc)})")
    except Exception as exc:
        raise InputError(f"{path}: member {r!r} cannot be read ({first_line(exc)})") from None


def _check_payload_config(
    path: Path, zf: zipfile.ZipFile, rel: dict[str, str], prefix: str, cfg: str, refuse: Any
) -> None:
    from torch._export.serde.schema import ScalarType
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    try:
        config = json.loads(zf.read(rel[cfg]))["config"]
        items = list(config.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{path}: member {cfg!r} is not a valid payload config") from None
    for fqn, meta in items:
        try:
            name = meta["path_name"]
            if meta.get("use_pickle") or not name.startswith(("weight_", "tensor_")):
                refuse(f"{prefix}{name}", f"stores {fqn!r} as a pickle")
                continue
            tm = meta["tensor_meta"]
            sizes = [int(s["as_int"]) for s in tm["sizes"]]
            strides = [int(s["as_int"]) for s in tm["strides"]]
            offset = int(tm["storage_offset"]["as_int"])
            if len(sizes) != len(strides):
                raise ValueError("sizes and strides differ in length")
            elsize = _SERIALIZE_TO_TORCH_DTYPE[ScalarType(tm["dtype"])].itemsize
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: {cfg!r}: entry {fqn!r} is malformed") from None
        member = rel.get(prefix + name)
        if member is None:
            raise InputError(f"{path}: {cfg!r}: {fqn!r} points to missing member {name!r}")
        record = zf.getinfo(member).file_size
        if any(s < 0 for s in sizes + strides) or offset < 0:
            raise InputError(f"{path}: {cfg!r}: {fqn!r} has negative sizes or strides")
        extent = (
            0
            if 0 in sizes
            else offset + 1 + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True))
        )
        numel = 1
        for s in sizes:
            numel *= s
        # An empty record makes torch allocate zeros of the declared size.
        need = extent * elsize if record else numel * elsize
        if (record and need > record) or (not record and need > _RATIO_MIN_BYTES):
            raise InputError(
                f"{path}: {cfg!r}: {fqn!r} declares {need} bytes but its record holds {record}"
            )


# ------------------------------------------------------------------------------- torch.load


def _unpickling_detail(exc: BaseException) -> str:
    found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    if found:
        return "e.g. " + found[0]
    return first_line(exc)


def _torch_load(path: Path, *, trust_pickle: bool) -> Any:
    import torch

    try:
        with quiet_torch():
            return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UnsafeInputError(
                f"{path}: holds pickled Python objects ({_unpickling_detail(exc)}); {_TRUST_HINT}"
            ) from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable PyTorch file ({first_line(exc)})") from None
    try:
        with quiet_torch():
            return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as exc:
        raise InputError(f"{path}: could not be unpickled ({first_line(exc)})") from None


# --------------------------------------------------------------------------------- safetensors


def validate_safetensors(path: Path) -> None:
    """Check the header: length inside the file, JSON object, every tensor's offsets inside the
    data section and matching ``prod(shape) * dtype size``."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path}: safetensors file shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise InputError(
                f"{path}: safetensors header length {n} runs past the end of the {size}-byte file"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InputError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
            elsize = _SAFETENSORS_DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{path}: safetensors entry {name!r} is malformed") from None
        if not (0 <= begin <= end <= data_size) or end - begin != numel * elsize:
            raise InputError(
                f"{path}: safetensors tensor {name!r} offsets [{begin}, {end}] do not fit "
                f"its shape {shape} / dtype {dtype} inside the file"
            )


# ----------------------------------------------------------------------------------------- entry


def load_torch(
    path: Path,
    *,
    kind: str,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    trust_pickle: bool,
    checkpoint_key: str | None = None,
) -> Loaded:
    """Load ``path`` (identified as ``kind`` by its bytes) into a module / ExportedProgram;
    ``checkpoint_key`` picks the state dict of a checkpoint holding several."""
    import torch

    if kind == "pt2":
        validate_pt2(path, trust_pickle=trust_pickle)
        try:
            with quiet_torch(), open(path, "rb") as f:
                ep = torch.export.load(f)
        except Exception as exc:
            raise InputError(f"{path}: not a loadable .pt2 archive ({first_line(exc)})") from None
        with quiet_torch():
            module = ep.module()
        return Loaded("pt2", module, ep)
    if kind == "torchscript":
        if not trust_pickle:
            raise UnsafeInputError(
                f"{path}: a TorchScript archive; TorchScript runs code when loaded. Re-run with "
                "--trust-pickle only if you trust its source, or save a state dict or a .pt2"
            )
        with _open_zip(path) as zf:
            check_zip_sizes(path, zf, path.stat().st_size)
        try:
            with quiet_torch():
                return Loaded("torchscript", torch.jit.load(str(path), map_location="cpu"))
        except Exception as exc:
            raise InputError(
                f"{path}: not a loadable TorchScript file ({first_line(exc)})"
            ) from None
    if kind == "safetensors":
        validate_safetensors(path)
        from safetensors.torch import load_file

        try:
            state: dict[str, Any] | None = load_file(str(path), device="cpu")
        except Exception as exc:
            raise InputError(
                f"{path}: not a readable safetensors file ({first_line(exc)})"
            ) from None
        return _from_state(path, state, arch, arch_kwargs, "safetensors", checkpoint_key)
    if kind not in ("torch_zip", "pickle"):
        raise InputError(f"{path}: not a PyTorch file ({kind})")
    if kind == "torch_zip":
        with _open_zip(path) as zf:
            check_zip_sizes(path, zf, path.stat().st_size)
    obj = _torch_load(path, trust_pickle=trust_pickle)
    if isinstance(obj, torch.nn.Module):
        return Loaded("pickle", obj)
    # A trusted checkpoint may hold the pickled model itself ({'model': Module, 'epoch': …}).
    modules = {k: v for k, v in obj.items() if isinstance(v, torch.nn.Module)} if isinstance(
        obj, Mapping
    ) else {}  # fmt: skip
    if modules and not state_dicts(obj) and (checkpoint_key in modules or len(modules) == 1):
        key = checkpoint_key if checkpoint_key in modules else next(iter(modules))
        return Loaded("pickle", modules[key], notes=[f"model taken from checkpoint entry {key!r}"])
    return _from_state(path, obj, arch, arch_kwargs, "state_dict", checkpoint_key)


def _from_state(
    path: Path,
    obj: Any,
    arch: str | None,
    kwargs: dict[str, Any] | None,
    fmt: str,
    checkpoint_key: str | None,
) -> Loaded:
    if not arch:
        found = [p for p, _ in state_dicts(obj) if p]
        what = f"a checkpoint with state dicts under {', '.join(map(repr, found))}" if found else (
            "a state dict"
        )  # fmt: skip
        if not found:
            pick_state_dict(path, obj, checkpoint_key)  # says what the file holds instead
        raise InputError(f"{path}: {what}; pass --arch pkg.module:factory")
    model, shape = build_arch(arch, kwargs)
    key, state = pick_state_dict(path, obj, checkpoint_key, model.state_dict())
    notes = [f"state dict taken from checkpoint entry {key!r}"] if key else []
    stripped = load_into(path, model, state, arch)
    if stripped:
        notes.append(f"key prefix {''.join(stripped)!r} stripped to match --arch {arch}")
    # A state dict records no train/eval mode; judge the weights as a deployed model.
    model.eval()
    return Loaded(fmt, model, example_shape=shape, notes=notes)
