"""Tests for bncheck.data.hook: batches from the user's own function (``--data mod:fn``)."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bncheck.data import DataSpec, open_data
from bncheck.errors import InputError
from bncheck.layers import TensorSpec

ONE = [TensorSpec("x", ("batch", 3, 4, 4), "float32")]
TWO = [TensorSpec("image", (None, 3, 4, 4), "float32"), TensorSpec("meta", ("batch", 5), "float32")]
X = np.random.default_rng(0).normal(size=(50, 3, 4, 4)).astype(np.float32)
UNEVEN = (7, 1, 13, 2, 11)

HOOKS = '''
import numpy as np

X = np.random.default_rng(0).normal(size=(50, 3, 4, 4)).astype(np.float32)
calls = []


def uneven(sizes=(7, 1, 13, 2, 11), n=50):
    """X in batches of uneven sizes, as (x, label) tuples."""
    calls.append(n)
    i = k = 0
    while i < n:
        s = sizes[k % len(sizes)]
        yield X[i : i + s], np.zeros(len(X[i : i + s]), np.int64)
        i, k = i + s, k + 1


def as_list():
    return [X[:20], X[20:]]


def boom(at=2):
    for i in range(5):
        if i == at:
            raise ValueError("disk on fire")
        yield X[i * 4 : i * 4 + 4]


def not_iterable():
    return 42


def nothing():
    return iter(())


def shapes():
    yield X[:8]
    yield X[8:16, :, :3]


not_callable = 3
'''


@pytest.fixture
def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "my_hooks.py").write_text(HOOKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("my_hooks", None)
    yield tmp_path
    sys.modules.pop("my_hooks", None)


def batches(src) -> list[np.ndarray]:
    return [b["x"] for b in src]


def test_uneven_hook_batches_are_recut_to_the_batch_size(hooks) -> None:
    src = open_data("my_hooks:uneven", inputs=ONE, batch_size=8)
    assert src.format == "hook" and not src.sized  # counted by the pass, not before it
    got = batches(src)
    # The same batches as the .npy route with --batch-size 8: 6 of 8, then 2.
    assert [len(b) for b in got] == [8, 8, 8, 8, 8, 8, 2]
    np.testing.assert_array_equal(np.concatenate(got), X)
    ref = open_data(_npy(hooks, X), inputs=ONE, batch_size=8)
    for a, b in zip(got, batches(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert src.sized and src.num_samples == 50 and src.num_batches == 7
    assert src.description == (
        "data hook my_hooks:uneven: 50 samples of x (3, 4, 4) float32, batches of 8 "
        "(the hook's batches held 1 to 13 samples)"
    )
    np.testing.assert_array_equal(np.concatenate(batches(src)), X)  # a second pass: the same


def _npy(folder: Path, arr: np.ndarray) -> Path:
    path = folder / "ref.npy"
    np.save(path, arr)
    return path


def test_max_samples_max_batches_and_a_fixed_batch(hooks) -> None:
    src = open_data("my_hooks:uneven", inputs=ONE, batch_size=8, max_samples=21)
    got = batches(src)
    assert [len(b) for b in got] == [8, 8, 5] and src.num_samples == 21
    np.testing.assert_array_equal(np.concatenate(got), X[:21])
    src = open_data("my_hooks:uneven", inputs=ONE, batch_size=8, max_batches=2)
    assert [len(b) for b in batches(src)] == [8, 8]
    fixed = [TensorSpec("x", (6, 3, 4, 4), "float32")]  # the model runs batches of 6 only
    src = open_data("my_hooks:uneven", inputs=fixed)
    assert [len(b) for b in batches(src)] == [6] * 8  # the last 2 samples left out


def test_stops_reading_the_hook_at_max_samples(hooks) -> None:
    pulled = []

    def endless():
        i = 0
        while True:
            pulled.append(i)
            yield X[i % 50 : i % 50 + 1]
            i += 1

    src = open_data(endless, inputs=ONE, batch_size=4, max_samples=10)
    assert sum(len(b) for b in batches(src)) == 10
    assert len(pulled) == 10  # streamed: no batch read past the cap, nothing read ahead


def test_count_before_the_pass_when_a_caller_needs_it(hooks) -> None:
    import my_hooks

    src = open_data("my_hooks:uneven", inputs=ONE, batch_size=16)
    assert my_hooks.calls == [50]  # opened once to check the first batch
    assert src.bounds == [(0, 16), (16, 32), (32, 48), (48, 50)]  # a counting pass
    assert "data hook my_hooks:uneven: counted its samples in a pass of their own" in src.notes
    assert len(batches(src)) == 4
    assert my_hooks.calls == [50, 50]  # the counting pass reused the first call's iterator


def test_sharded_copy_yields_its_own_batches(hooks) -> None:
    src = open_data("my_hooks:uneven", inputs=ONE, batch_size=8)
    view = copy.copy(src)
    view.bounds = src.bounds[1::2]  # as distributed.shard() does for rank 1 of 2
    got = batches(view)
    assert [len(b) for b in got] == [8, 8, 8]
    np.testing.assert_array_equal(got[0], X[8:16])
    np.testing.assert_array_equal(got[2], X[40:48])


def test_kinds_of_batches(hooks) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.from_numpy(X), torch.arange(50)), batch_size=9)
    for data in (
        loader,  # a DataLoader as is: [x, y] lists of tensors
        lambda: ({"x": X[i : i + 10], "label": np.arange(10)} for i in range(0, 50, 10)),
        "my_hooks:as_list",  # a list returned
        X,  # one array: the whole data set
        DataSpec(lambda n: [X[:n]], kwargs={"n": 50}),
    ):
        src = open_data(data, inputs=ONE, batch_size=16)
        np.testing.assert_array_equal(np.concatenate(batches(src)), X)
    src = open_data(
        lambda: [{"image": X[:8], "meta": np.ones((8, 5)), "label": np.arange(8)}],
        inputs=TWO,
    )
    assert [b["meta"].dtype for b in src] == [np.float32]
    assert any("keys not used by the model: label" in n for n in src.notes)
    bf16 = [torch.from_numpy(X).to(torch.bfloat16)]
    got = np.concatenate(batches(open_data(lambda: bf16, inputs=ONE)))
    np.testing.assert_array_equal(got, bf16[0].float().numpy())


def test_numpy_hook_does_not_import_torch(hooks) -> None:
    code = textwrap.dedent(
        """
        import sys
        from bncheck.data import open_data
        from bncheck.layers import TensorSpec
        src = open_data("my_hooks:uneven", inputs=[TensorSpec("x", (None, 3, 4, 4), "float32")])
        assert sum(len(b["x"]) for b in src) == 50
        print("torch" in sys.modules)
        """
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=hooks, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": f"{root}:{hooks}", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_mod:fn", r"^--data 'no_such_mod:fn': cannot import 'no_such_mod' \(No module"),
        ("my_hooks:missing", r"^--data 'my_hooks:missing': module 'my_hooks' has no attribute"),
        ("my_hooks:not_callable", r"^--data 'my_hooks:not_callable': 'not_callable' is not call"),
        (
            "my_hooks:not_iterable",
            r"^data hook my_hooks:not_iterable: returned a int, which is not",
        ),
        ("my_hooks:nothing", r"^data hook my_hooks:nothing: yielded no batches$"),
        (
            "my_hooks:boom",
            r"^data hook my_hooks:boom: raised ValueError: disk on fire \(at batch 2",
        ),
        (
            "my_hooks:shapes",
            r"^data hook my_hooks:shapes: batch 1 has samples of shape \(3, 3, 4\)",
        ),
    ],
)
def test_hook_errors(hooks, target: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        list(open_data(target, inputs=ONE, batch_size=4))


def test_hook_batches_that_do_not_fit(hooks) -> None:
    with pytest.raises(
        InputError, match=r"has shape \(N, 4, 4\) \(rank 3\), the model wants \(batch, 3, 4, 4\)"
    ):
        open_data(lambda: [X[:, 0]], inputs=ONE)
    with pytest.raises(InputError, match=r"dim 2 is 5, not 4"):
        open_data(lambda: [np.zeros((2, 3, 5, 4))], inputs=ONE)
    with pytest.raises(InputError, match=r"batch 0 is one array but the model has 2 inputs"):
        open_data(lambda: [X], inputs=TWO)
    with pytest.raises(InputError, match=r"batch 0 has no key 'meta' .*its keys: image, x"):
        open_data(lambda: [{"image": X, "x": X}], inputs=TWO)
    with pytest.raises(InputError, match=r"batch 0 gives a str for input 'x'"):
        open_data(lambda: [("abc", 1)], inputs=ONE)
    with pytest.raises(InputError, match=r"holds float32 data; the model wants integers"):
        open_data(lambda: [X], inputs=[TensorSpec("x", (None, 3, 4, 4), "int64")])
    nan = X[:8].copy()
    nan[5, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match=r"has NaN or Inf in samples 4\.\.7 \(batch 1\), first at "
                       r"sample 5"):  # fmt: skip
        list(open_data(lambda: [nan[:3], nan[3:]], inputs=ONE, batch_size=4))
    with pytest.raises(InputError, match=r"keyword arguments are for a data hook function"):
        open_data(DataSpec([X], kwargs={"n": 1}), inputs=ONE)


def test_a_hook_must_give_the_same_samples_every_pass(hooks) -> None:
    rounds = iter([30, 50])
    src = open_data(lambda: [X[: next(rounds)]], inputs=ONE, batch_size=16)
    assert len(batches(src)) == 2
    with pytest.raises(InputError, match=r"gave 50 samples in this pass and 30 in an earlier one"):
        batches(src)


def test_image_options_are_refused_for_a_hook(hooks) -> None:
    spec = DataSpec("my_hooks:uneven", explicit=frozenset({"--resize"}))
    with pytest.raises(InputError, match=r"--resize preprocess a folder of images, not a hook"):
        open_data(spec, inputs=ONE)
    spec = DataSpec(_npy(hooks, X), explicit=frozenset({"--mean", "--crop"}))
    with pytest.raises(InputError, match=r"ref\.npy: --crop, --mean preprocess images; this is"):
        open_data(spec, inputs=ONE)


STATE_DICT_HOOKS = """
import numpy as np
from torch import nn

calls = []


def make():  # no example_input_shape: the state dict alone says nothing of the input
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 12 * 20, 5),
    )


def batches(n=3):
    calls.append(n)
    rng = np.random.default_rng(0)
    for _ in range(n):
        yield rng.normal(size=(4, 3, 12, 20)).astype(np.float32), np.zeros(4)
"""


def test_a_state_dict_takes_its_input_shape_from_the_hooks_first_batch(
    run_cli, tmp_path, monkeypatch
) -> None:
    # Without it the model was traced at a guessed 32x32 and the hook's 12x20 samples were
    # refused (check), or fold asked for --input-shape "or --data" when --data was given.
    import onnx
    import torch

    (tmp_path / "sd_hooks.py").write_text(STATE_DICT_HOOKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("sd_hooks", None)
    import sd_hooks

    torch.save(sd_hooks.make().state_dict(), tmp_path / "m.pt")
    args = ["--arch", "sd_hooks:make", "--data", "sd_hooks:batches"]
    r = run_cli("fold", "m.pt", *args, "-o", "m.onnx", "-q")
    assert r.code == 0, r.err
    dims = onnx.load(tmp_path / "m.onnx").graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in dims][1:] == [3, 12, 20]
    assert not dims[0].dim_value  # the batch stays dynamic
    r = run_cli("check", "m.pt", *args, "--fail-on", "never", "--format", "json")
    assert r.code == 0, r.err
    assert "12 samples" in r.out or '"samples": 12' in r.out
    # a model given its shape does not call the hook to peek
    before = len(sd_hooks.calls)
    r = run_cli("check", "m.pt", *args, "--input-shape", "1,3,12,20", "--fail-on", "never", "-q")
    assert r.code == 0, r.err
    peeks = len(sd_hooks.calls) - before
    sys.modules.pop("sd_hooks", None)
    assert peeks == 1  # one pass, no peek
