"""dlrun export: ONNX and TorchScript files that compute what the PyTorch model computes, from the
run directory alone; the README's onnxruntime snippet for a table; user errors."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, assert_user_error, dlrun, prose, train

from dlrun import export, saved
from dlrun.errors import DlrunError

# Loading a TorchScript file is deprecated too (the README says so); the tests still load them.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
ONNX_MISSING = "ONNX round trips need onnxruntime: pip install 'dlrun[export]'"
BS = 5  # rows run through the exported files: not the export's example batch (dynamic axis)
TOL = 1e-4  # fp32, max abs difference against PyTorch
TINY_LM = [  # tests/test_rnn.py's tiny char model: one epoch in well under a second
    "model=rnn",
    "model.emb_sz=16",
    "model.n_hid=48",
    "data.bs=16",
    "data.bptt=32",
    "trainer.epochs=1",
    "optimizer.lr=1e-2",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("digits") / "run"
    train(run, "trainer.epochs=1", "trainer.limit_batches=3")
    return run


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("penguins") / "run"
    train(run, "model=tabular", "trainer.epochs=1")
    return run


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 20 KB of real English prose from the bundled corpus, as a user's .txt file."""
    return prose(tmp_path_factory.mktemp("corpus"), 12, 20_000)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    run = tmp_path_factory.mktemp("lm") / "run"
    train(run, *TINY_LM, "data=text", f"data.path={corpus}")
    return run


def penguin_rows(n: int) -> pd.DataFrame:
    """Raw rows of the bundled penguins table, as a user's test CSV holds them (no species)."""
    from palmerpenguins import load_penguins

    return load_penguins().drop(columns="species").iloc[::37].head(n)


def digits_batch(run: Path, n: int) -> np.ndarray:
    """Real digits, prepared as model.json says: pixels in [0, 1], then (x - mean) / std."""
    from sklearn.datasets import load_digits

    prep = json.loads((run / "model.json").read_text())["preprocess"]
    x = load_digits().images[:n, None].astype(np.float32) / 16
    return ((x - prep["mean"][0]) / prep["std"][0]).astype(np.float32)


def lm_batch(run: Path, n: int, t: int) -> np.ndarray:
    """`n` windows of `t` characters of real text, as token ids of the run's vocabulary."""
    from pydoc_data.topics import topics

    from dlrun.data.text import vocab_from

    vocab = vocab_from(json.loads((run / "model.json").read_text())["preprocess"]["vocab"])
    text = topics[list(topics)[20]]
    return np.stack([vocab.encode(list(text[i * t : (i + 1) * t])).numpy() for i in range(n)])


def inputs_for(run: Path, family: str) -> dict[str, np.ndarray]:
    """A batch of BS real inputs of the family, named as the exported graph names them."""
    if family == "digits":
        return {"images": digits_batch(run, BS)}
    if family == "table":
        from dlrun.data.tabular import saved_prep

        prep = saved_prep(json.loads((run / "model.json").read_text())["preprocess"])
        cat, cont = prep.features(penguin_rows(BS))
        return {"cat": cat, "cont": cont}
    return {"ids": lm_batch(run, BS, 32)}


def pytorch_outputs(run: Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """What the run's own model (not the export's wrapper) gives, from a fresh state."""
    model = saved.load(run, device="cpu").model
    x = [torch.from_numpy(v) for v in inputs.values()]
    with torch.no_grad():
        if hasattr(model, "reset_state"):
            model.reset_state()
        return model(tuple(x) if len(x) == 2 else x[0]).numpy()


RUNS = {"digits": "digits_run", "table": "table_run", "lm": "lm_run"}


@pytest.mark.parametrize("family", list(RUNS))
def test_onnx_file_computes_what_pytorch_does(family: str, request, tmp_path: Path, capsys) -> None:
    ort = pytest.importorskip("onnxruntime", reason=ONNX_MISSING)
    run = request.getfixturevalue(RUNS[family])
    export.main([str(run), "-o", str(tmp_path)])
    shown = capsys.readouterr().out
    assert json.loads((tmp_path / "model.json").read_text()) == json.loads((run / "model.json").read_text())

    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    inputs = inputs_for(run, family)
    assert [i.name for i in session.get_inputs()] == list(inputs)
    assert all(isinstance(i.shape[0], str) for i in session.get_inputs())  # a dynamic batch axis
    (got,) = session.run(None, inputs)
    want = pytorch_outputs(run, inputs)
    assert got.shape == want.shape and got.shape[0] == BS != export.EXAMPLE_BS
    assert np.abs(got - want).max() < TOL
    for name, value in inputs.items():
        assert re.search(
            rf"input\s+{name}\s+{value.dtype}\s+\[N, {', '.join(map(str, value.shape[1:]))}\]", shown
        )
    if family == "lm":
        assert session.get_outputs()[0].name == "logits" and "T is fixed at 32" in shown


@pytest.mark.parametrize("family", list(RUNS))
def test_torchscript_file_computes_what_pytorch_does(family: str, request, tmp_path: Path) -> None:
    run = request.getfixturevalue(RUNS[family])
    export.main([str(run), "--format", "torchscript", "-o", str(tmp_path), "--weights", "last"])
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    inputs = inputs_for(run, family)
    with torch.no_grad():
        got = scripted(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    # --weights last: checkpoint.pt, the same weights as best.pt after one epoch
    assert np.abs(got - pytorch_outputs(run, inputs)).max() < TOL


def test_torchscript_rnn_takes_any_length(lm_run: Path, tmp_path: Path) -> None:
    export.main([str(lm_run), "--format", "torchscript", "-o", str(tmp_path)])
    ids = lm_batch(lm_run, 3, 7)
    got = torch.jit.load(str(tmp_path / "model.pt"))(torch.from_numpy(ids))
    assert torch.allclose(got, torch.from_numpy(pytorch_outputs(lm_run, {"ids": ids})), atol=TOL)


def test_export_into_the_run_directory_itself(table_run: Path) -> None:
    before = (table_run / "model.json").read_text()
    export.main([str(table_run), "--format", "torchscript", "-o", str(table_run)])
    assert (table_run / "model.pt").is_file() and (table_run / "model.json").read_text() == before
    (table_run / "model.pt").unlink()


def test_readme_snippet_runs_an_exported_table_model(
    table_run: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The README's snippet, as written: raw CSV rows -> cat/cont by the exported JSON -> onnxruntime."""
    pytest.importorskip("onnxruntime", reason=ONNX_MISSING)
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Export to ONNX or TorchScript") :]
    snippet = re.search(r"```python\n(.*?)```", section, re.S)[1]
    export_dir = tmp_path / "runs" / "penguins" / "export"
    export.main([str(table_run), "-o", str(export_dir)])
    rows = penguin_rows(8)
    rows.loc[rows.index[0], "island"] = "Atlantis"  # a level unseen in training
    rows.loc[rows.index[1], "bill_length_mm"] = None  # a missing number
    rows.to_csv(tmp_path / "test.csv", index=False)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    printed = capsys.readouterr().out

    from dlrun.data.tabular import read_inputs, saved_prep

    prep = saved_prep(json.loads((table_run / "model.json").read_text())["preprocess"])
    cat, cont = prep.features(read_inputs(tmp_path / "test.csv", prep))
    logits = pytorch_outputs(table_run, {"cat": cat, "cont": cont})
    assert printed.strip() == str([prep.classes[i] for i in logits.argmax(1)])


def test_regression_head_keeps_its_log_scale_and_y_range(table_run: Path, tmp_path: Path) -> None:
    """A regression net with model.y_range: the sigmoid into the range is inside the exported graph."""
    ort = pytest.importorskip("onnxruntime", reason=ONNX_MISSING)
    doc = copy.deepcopy(json.loads((table_run / "model.json").read_text()))
    doc["preprocess"] |= {"task": "regression", "classes": [], "log_y": True, "y_mean": 8.3, "y_name": "mass"}
    doc["model"]["model"]["y_range"] = [7.5, 9.0]
    net, facts = saved.build(doc)
    model = saved.Saved(table_run, doc, net.eval(), facts, torch.device("cpu"))
    sig = export.signature(model, "onnx")
    assert [t.name for t in sig.outputs] == ["prediction"]
    assert any("exp(prediction) is mass" in n for n in sig.notes)
    export.write(sig, tmp_path / "model.onnx", "onnx", None, verbose=False)
    inputs = {"cat": np.zeros((BS, 6), np.int64), "cont": np.random.default_rng(0).normal(size=(BS, 4)) * 50}
    inputs["cont"] = inputs["cont"].astype(np.float32)
    (got,) = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, inputs)
    with torch.no_grad():
        want = net((torch.from_numpy(inputs["cat"]), torch.from_numpy(inputs["cont"]))).numpy()
    assert np.abs(got - want).max() < TOL
    assert ((got > 7.5) & (got < 9.0)).all()


# The other models of dlrun/models/, each exported both ways and run on a batch (about 60 s).
OTHER_MODELS = {
    "resnet": ["model=resnet", "trainer.epochs=1", "trainer.limit_batches=2"],
    "gru": [*TINY_LM, "model.cell=gru"],
    "qrnn": [*TINY_LM, "model.cell=qrnn"],
    "transformer": [
        "model=transformer", "model.n_embd=16", "model.n_head=2", "model.n_layers=1",
        "data.bs=16", "data.bptt=32", "trainer.epochs=1",
    ],
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", list(OTHER_MODELS))
def test_other_models_export_both_ways(name: str, corpus: Path, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime", reason=ONNX_MISSING)
    run, family = tmp_path / "run", "digits" if name == "resnet" else "lm"
    train(run, *OTHER_MODELS[name], *([] if family == "digits" else ["data=text", f"data.path={corpus}"]))
    inputs = inputs_for(run, family)
    want = pytorch_outputs(run, inputs)
    export.main([str(run), "-o", str(tmp_path / "onnx")])
    (got,) = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx")).run(None, inputs)
    assert np.abs(got - want).max() < TOL
    if name == "qrnn":
        with pytest.raises(DlrunError, match="use --format onnx"):
            export.main([str(run), "--format", "torchscript", "-o", str(tmp_path / "ts")])
        return
    export.main([str(run), "--format", "torchscript", "-o", str(tmp_path / "ts")])
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "ts" / "model.pt"))(*map(torch.from_numpy, inputs.values()))
    assert np.abs(got.numpy() - want).max() < TOL


# --- user errors --------------------------------------------------------------------


def test_unknown_format_is_a_user_error(table_run: Path) -> None:
    assert_user_error(
        dlrun("export", str(table_run), "--format", "tflite"), "invalid choice", "usage: dlrun export"
    )


def test_run_dir_without_model_json(tmp_path: Path) -> None:
    with pytest.raises(DlrunError, match="has no model.json"):
        export.main([str(tmp_path)])


def test_output_that_is_a_file(table_run: Path, tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    with pytest.raises(DlrunError, match="is a file: give a folder"):
        export.main([str(table_run), "-o", str(tmp_path / "taken")])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "torchscript", "--opset", "18"], "--opset applies to --format onnx"),
        (["--opset", "13"], "writes opsets 18 to"),
    ],
)
def test_bad_opset(table_run: Path, args: list[str], message: str) -> None:
    with pytest.raises(DlrunError, match=message):
        export.main([str(table_run), *args])


def test_onnx_without_the_export_extra(table_run: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` now fails
    with pytest.raises(DlrunError, match=re.escape("pip install 'dlrun[export]'")):
        export.main([str(table_run), "-o", "unused"])


def test_export_failure_names_the_model_and_leaves_no_file(
    digits_run: Path, tmp_path: Path, monkeypatch
) -> None:
    def fail(*args, **kwargs):
        raise RuntimeError("unsupported operator aten::frobnicate")

    monkeypatch.setattr(torch.jit, "trace", fail)
    with pytest.raises(DlrunError, match="exporting the cnn model to TorchScript failed .*frobnicate"):
        export.main([str(digits_run), "--format", "torchscript", "-o", str(tmp_path)])
    assert not (tmp_path / "model.pt").exists()


def test_qrnn_torchscript_is_refused_with_the_way_out(lm_run: Path) -> None:
    doc = copy.deepcopy(json.loads((lm_run / "model.json").read_text()))
    doc["model"]["model"]["cell"] = "qrnn"
    net, facts = saved.build(doc)
    model = saved.Saved(lm_run, doc, net.eval(), facts, torch.device("cpu"))
    with pytest.raises(
        DlrunError, match=r"model.cell=qrnn\) cannot be written as TorchScript.*--format onnx"
    ):
        export.signature(model, "torchscript")
