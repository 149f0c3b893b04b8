"""`dlrun interpret RUN_DIR`: confusion matrix, most confused pairs and top losses (images and
tables), predicted vs actual and residuals (regression tables), refusals."""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dlrun.interpret import MAX_LEVELS
from tests.conftest import assert_user_error, dlrun, summary, train


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("digits") / "run"
    train(run, "trainer.epochs=1")
    return run


@pytest.fixture(scope="module")
def penguins_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("penguins") / "run"
    train(run, "model=tabular", "trainer.epochs=1")
    return run


def interpret(capsys: pytest.CaptureFixture, *args: str) -> str:
    """`dlrun interpret ARGS` through the console script's entry function (in this process: a
    quarter of the time of a new one); returns what it printed."""
    from dlrun.cli import main

    with pytest.raises(SystemExit) as done:
        main(["interpret", *args])
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.out + printed.err
    return printed.out


def eval_accuracy(run: Path) -> float:
    """The accuracy `dlrun eval RUN_DIR` prints: the best epoch's, as summary.json keeps it
    (test_train checks the two agree; reading it here saves rebuilding the run once more)."""
    return summary(run)["best"]["accuracy"]


def confusion(folder: Path) -> pd.DataFrame:
    return pd.read_csv(folder / "confusion.csv", index_col=0, dtype={0: str})


def assert_png(path: Path) -> None:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
        im.verify()


def assert_consistent(folder: Path, n_valid: int, accuracy: float) -> pd.DataFrame:
    """confusion.csv counts every validation item once, its diagonal is eval's accuracy, and
    most_confused.csv is its off-diagonal, most frequent first."""
    cm = confusion(folder)
    assert list(cm.index.astype(str)) == list(cm.columns)
    counts = cm.to_numpy()
    assert counts.sum() == n_valid
    assert np.trace(counts) / counts.sum() == pytest.approx(accuracy, abs=1e-12)
    pairs = pd.read_csv(folder / "most_confused.csv", dtype={"actual": str, "predicted": str})
    assert pairs["count"].tolist() == sorted(pairs["count"], reverse=True)
    assert pairs["count"].sum() == counts.sum() - np.trace(counts)
    for a, p, k in pairs.itertuples(index=False):
        assert a != p and cm.loc[a, p] == k
    return cm


def test_digits_confusion_most_confused_and_top_loss_grid(digits_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "interp"
    printed = interpret(capsys, str(digits_run), "-o", str(out), "--top", "5")
    cm = assert_consistent(out, round(1797 * 0.2), eval_accuracy(digits_run))
    assert list(cm.columns) == [str(d) for d in range(10)]
    assert (
        f"wrote confusion.csv, confusion.png, most_confused.csv, top_losses.png, top_losses.csv in {out}"
        in printed.replace("\n", "")
    )
    assert "accuracy" in printed and "validation images" in printed
    worst = pd.read_csv(out / "top_losses.csv", dtype={"actual": str, "predicted": str})
    assert list(worst.columns) == ["item", "actual", "predicted", "loss", "probability"]
    assert len(worst) == 5 and worst["loss"].is_monotonic_decreasing
    # loss is -log p(actual), probability p(predicted), the largest: more than p(actual) just
    # where the prediction is wrong (the CSV's 6 digits allow a little slack).
    p_actual = np.exp(-worst["loss"])
    assert (worst["probability"] >= p_actual - 1e-4).all()
    assert ((worst["actual"] != worst["predicted"]) == (worst["probability"] > p_actual + 1e-4)).all()
    for name in ("confusion.png", "top_losses.png"):
        assert_png(out / name)


def test_penguins_confusion_and_worst_rows_as_in_the_file(penguins_run: Path, capsys) -> None:
    interpret(capsys, str(penguins_run), "--top", "7")
    out = penguins_run / "interpret"
    n_valid = summary(penguins_run)["split"]["valid"]["rows"]
    assert n_valid == 69
    cm = assert_consistent(out, n_valid, eval_accuracy(penguins_run))
    assert list(cm.columns) == ["Adelie", "Chinstrap", "Gentoo"]
    assert_png(out / "confusion.png")
    assert not (out / "top_losses.png").exists()
    worst = pd.read_csv(out / "top_losses.csv", dtype=str, keep_default_na=False)
    assert list(worst.columns) == [
        "row", "species", "island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm",
        "body_mass_g", "sex", "actual", "predicted", "loss", "probability",
    ]  # fmt: skip
    loss = worst["loss"].astype(float)
    assert len(worst) == 7 and loss.is_monotonic_decreasing and (loss > 0).all()
    assert (worst["species"] == worst["actual"]).all()
    # `row` is the row's place in the file: the values next to it are the file's own.
    path = Path(str(importlib.resources.files("palmerpenguins") / "data" / "penguins.csv"))
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for _, row in worst.iterrows():
        original = table.iloc[int(row["row"]) - 1]
        assert original["island"] == row["island"] and original["species"] == row["species"]
        for col in ("bill_length_mm", "body_mass_g"):
            assert (original[col] in ("", "NA")) == (row[col] == "")
            if row[col]:
                assert float(original[col]) == float(row[col])


def test_regression_table_pred_vs_actual_and_residuals_by_level(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(0)
    n = 300
    store = [f"s{i}" for i in rng.integers(0, 25, n)]  # the largest categorical column: 25 levels
    x = rng.normal(size=n).round(3)
    sales = (50 + 10 * x + np.array([int(s[1:]) for s in store]) + rng.normal(size=n)).round(2)
    path = tmp_path / "sales.csv"
    pd.DataFrame({"store": store, "kind": ["a", "b", "c"] * 100, "x": x, "sales": sales}).to_csv(
        path, index=False
    )
    run = tmp_path / "run"
    train(
        run, "model=tabular", "data=csv", f"data.path={path}", "data.y_name=sales",
        "data.cat_names=[store,kind]", "data.cont_names=[x]", "data.log_y=true", "trainer.epochs=1",
    )  # fmt: skip
    printed = interpret(capsys, str(run), "--top", "4")
    out = run / "interpret"
    for name in ("pred_vs_actual.png", "residuals.png"):
        assert_png(out / name)
    assert not (out / "confusion.csv").exists()
    levels = pd.read_csv(out / "residuals.csv")
    assert list(levels.columns) == ["store", "count", "mean_residual", "rmse"]
    assert levels["count"].is_monotonic_decreasing and levels["count"].sum() == 60
    assert set(levels["store"]) <= set(store) and len(levels) > MAX_LEVELS
    # The levels' rmse put together is the run's rmse on the original scale (exp of log_y).
    best = summary(run)["best"]
    overall = math.sqrt((levels["count"] * levels["rmse"] ** 2).sum() / levels["count"].sum())
    assert overall == pytest.approx(best["rmse"], rel=1e-4)
    worst = pd.read_csv(out / "top_losses.csv")
    assert list(worst.columns) == ["row", "store", "kind", "x", "sales", "actual", "predicted", "loss"]
    assert len(worst) == 4 and worst["loss"].is_monotonic_decreasing
    assert np.allclose(worst["actual"], worst["sales"])
    assert np.allclose(worst["loss"], (np.log(worst["actual"]) - np.log(worst["predicted"])) ** 2, rtol=1e-3)
    assert f"rmse {best['rmse']:.4f}" in printed


def test_text_runs_are_pointed_to_predict(tmp_path: Path) -> None:
    corpus = tmp_path / "book.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog.\n" * 200, encoding="utf-8")
    run = tmp_path / "run"
    train(
        run, "model=rnn", "data=text", f"data.path={corpus}", "model.emb_sz=8", "model.n_hid=16",
        "data.bs=8", "data.bptt=16", "trainer.epochs=1", "trainer.limit_batches=2",
    )  # fmt: skip
    r = dlrun("interpret", str(run))
    assert_user_error(r, "is a language model", f"dlrun predict {run} FILE.txt", "perplexity")
    assert not (run / "interpret").exists()


def test_user_errors(digits_run: Path, tmp_path: Path) -> None:
    assert_user_error(dlrun("interpret", str(tmp_path / "nope")), "nope does not exist")
    assert_user_error(dlrun("interpret", str(digits_run), "--top", "0"), "--top 0 is not allowed")
    assert_user_error(dlrun("interpret"), "usage: dlrun interpret RUN_DIR")
    unfinished = tmp_path / "unfinished"
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text((digits_run / ".hydra" / "config.yaml").read_text())
    assert_user_error(dlrun("interpret", str(unfinished)), "has no best.pt")
    a_file = tmp_path / "taken"
    a_file.write_text("")
    assert_user_error(dlrun("interpret", str(digits_run), "-o", str(a_file)), "is a file")


def test_a_large_confusion_matrix_shows_the_most_confused_classes() -> None:
    from dlrun.interpret import MAX_CLASSES, most_confused, shown_classes

    n = 30
    cm = np.diag(np.full(n, 10))
    cm[3, 7] = 5
    cm[25, 2] = 1
    assert shown_classes(cm[:20, :20]) == list(range(20))
    shown = shown_classes(cm)
    assert len(shown) == MAX_CLASSES and shown == sorted(shown) and {2, 3, 7, 25} <= set(shown)
    classes = [f"c{i}" for i in range(n)]
    assert most_confused(cm, classes) == [["c3", "c7", 5], ["c25", "c2", 1]]


def test_image_files_are_named_in_top_losses(tmp_path: Path) -> None:
    import torch

    from dlrun.data import TensorBatches
    from dlrun.data.imagefolder import ImageFiles, LoaderBatches
    from dlrun.interpret import valid_files

    items = [(tmp_path / "cat" / "a.jpg", 0), (tmp_path / "dog" / "b.jpg", 1)]
    files = LoaderBatches(
        ImageFiles(items, 16, train=False), bs=2, shuffle=False, seed=0, drop_last=False,
        device=torch.device("cpu"), mean=[0.5] * 3, std=[0.2] * 3, num_workers=0, split="valid",
    )  # fmt: skip
    assert valid_files(files) == [str(p) for p, _ in items]
    assert valid_files(TensorBatches(torch.zeros(2, 1, 8, 8), torch.zeros(2), 2, shuffle=False)) is None
