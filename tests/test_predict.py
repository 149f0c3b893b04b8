"""`dlrun predict` for tables and language models, from the run directory alone (issue 12):
model.json holds the preprocessing, the training data is moved away before predicting, and the
validation inputs reproduce `dlrun eval`'s metrics exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_user_error, dlrun, train

TABLE = ["model=tabular", "data=csv", "data.bs=32", "trainer.epochs=2", "model.layers=[32,16]"]


def people_csv(path: Path, n: int = 600, seed: int = 0) -> Path:
    """A small census-like table: categories, numbers with gaps, a date, a class target."""
    rng = np.random.default_rng(seed)
    job = rng.choice(["clerk", "nurse", "pilot", "farmer"], n)
    age = rng.integers(18, 70, n).astype(float)
    hours = rng.normal(40, 8, n).round(1)
    hours[rng.random(n) < 0.1] = np.nan
    signed = pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 700, n), unit="D")
    score = (job == "pilot") * 2 + (age > 45) + np.nan_to_num(hours, nan=40) / 40 + rng.normal(0, 0.5, n)
    df = pd.DataFrame(
        {
            "Id": np.arange(1000, 1000 + n),
            "job": job,
            "age": age,
            "hours": hours,
            "signed": signed.strftime("%Y-%m-%d"),
            "income": np.where(score > 2, "high", "low"),
        }
    )
    df.to_csv(path, index=False)
    return path


PEOPLE = [
    "data.y_name=income",
    "data.cat_names=[job]",
    "data.cont_names=[age,hours]",
    "data.date_names=[signed]",
]


def evaluate(run: Path) -> dict[str, float]:
    from dlrun.evaluate import evaluate_run

    return evaluate_run(str(run), device="cpu")


def validation_rows(run: Path, path: Path, out: Path) -> Path:
    """The run's validation rows, written as they are in the training file (its own lines)."""
    from dlrun.config import load_saved
    from dlrun.data.tabular import load_table

    is_valid = load_table(load_saved(run).data).is_valid
    lines = path.read_text().splitlines()
    out.write_text("\n".join([lines[0]] + [lines[i + 1] for i in np.flatnonzero(is_valid)]) + "\n")
    return out


def predict(run: Path, source: Path, *args: str) -> tuple[pd.DataFrame | None, dict]:
    """`dlrun predict` in this process (the command line itself is tested by the acceptance
    test and the exit-code checks): the written CSV and the --json summary."""
    from dlrun.predict import main

    summary = source.parent / "summary.json"
    out = source.parent / "out.csv"
    main([str(run), str(source), "-o", str(out), "--json", str(summary), *args])
    return pd.read_csv(out, dtype=str, keep_default_na=False), json.loads(summary.read_text())


def refused(*args: str, match: str) -> None:
    """`dlrun predict ARGS` stops with a user error (exit 2 on the command line) matching `match`."""
    from dlrun.errors import DlrunError
    from dlrun.predict import main

    with pytest.raises(DlrunError, match=match):
        main([str(a) for a in args])


@pytest.fixture(scope="module")
def people_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict, Path]:
    """A trained table run, its validation rows as a CSV, eval's metrics, and the moved-away data."""
    tmp = tmp_path_factory.mktemp("people")
    data = people_csv(tmp / "people.csv")
    run = tmp / "run"
    train(run, *TABLE, f"data.path={data}", *PEOPLE)
    valid = validation_rows(run, data, tmp / "valid.csv")
    metrics = evaluate(run)
    moved = tmp / "moved"
    moved.mkdir()
    shutil.move(data, moved / data.name)  # the run must not need its training data any more
    return run, valid, metrics, moved / data.name


def test_model_json_holds_the_preprocessing(people_run) -> None:
    run, *_ = people_run
    doc = json.loads((run / "model.json").read_text())
    prep = doc["preprocess"]
    assert doc["model"]["name"] == "tabular" and prep["family"] == "table"
    assert prep["levels"]["job"] == ["#unknown#", "clerk", "farmer", "nurse", "pilot"]
    assert "signed_year" in prep["levels"] and "hours_na" in prep["levels"]
    assert set(prep["fill"]) == {"age", "hours", "signed_elapsed"}
    assert prep["classes"] == ["high", "low"] and prep["y_name"] == "income"


def test_table_predict_reproduces_eval_without_the_training_data(people_run) -> None:
    run, valid, metrics, _ = people_run
    summary_path, out_path = valid.parent / "cli.json", valid.parent / "cli.csv"
    proc = dlrun("predict", str(run), str(valid), "-o", str(out_path), "--json", str(summary_path))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    out, summary = pd.read_csv(out_path, dtype=str), json.loads(summary_path.read_text())
    assert summary["metrics"]["accuracy"] == metrics["accuracy"]
    assert summary["metrics"]["valid_loss"] == metrics["valid_loss"]
    assert len(out) == len(pd.read_csv(valid))
    assert list(out.columns) == ["income", "prob_high", "prob_low"]
    probs = out[["prob_high", "prob_low"]].astype(float).sum(axis=1)
    assert np.allclose(probs, 1.0, atol=1e-5)


def test_submission_with_id_reordered_and_extra_columns(people_run, tmp_path: Path) -> None:
    run, valid, _, _ = people_run
    df = pd.read_csv(valid, dtype=str, keep_default_na=False)
    base, _ = predict(run, valid, "--id", "Id", "--no-probs")
    assert list(base.columns) == ["Id", "income"]
    assert base["Id"].tolist() == df["Id"].tolist()
    # Columns in another order, an extra column, the target absent: the same predictions.
    shuffled = df.drop(columns=["income"]).assign(note="x")[["note", "hours", "signed", "Id", "job", "age"]]
    shuffled.to_csv(tmp_path / "test.csv", index=False)
    again, summary = predict(run, tmp_path / "test.csv", "--id", "Id", "--no-probs")
    assert again.equals(base)
    assert summary["metrics"] == {}


def test_unseen_categories_and_missing_numbers(people_run, tmp_path: Path) -> None:
    run, valid, _, _ = people_run
    prep = json.loads((run / "model.json").read_text())["preprocess"]
    df = pd.read_csv(valid, dtype=str, keep_default_na=False).head(5).drop(columns=["income"])
    rows = pd.concat([df.head(1)] * 4, ignore_index=True)
    rows.loc[1, "job"] = "astronaut"  # never seen in training: #unknown#
    rows.loc[2, "job"] = "juggler"  # also unseen: the same prediction as the row above
    rows.loc[3, "age"] = ""  # a gap (age had none in training): the training median
    rows.to_csv(tmp_path / "odd.csv", index=False)
    median = rows.copy()
    median.loc[3, "age"] = repr(prep["fill"]["age"])
    median.to_csv(tmp_path / "median.csv", index=False)
    odd, _ = predict(run, tmp_path / "odd.csv")
    filled, _ = predict(run, tmp_path / "median.csv")
    assert odd.iloc[1].equals(odd.iloc[2])
    assert odd.iloc[3].equals(filled.iloc[3])
    assert not odd.iloc[0].equals(odd.iloc[1])


def test_missing_column_is_refused(people_run, tmp_path: Path) -> None:
    run, valid, _, _ = people_run
    pd.read_csv(valid).drop(columns=["hours"]).to_csv(tmp_path / "no_hours.csv", index=False)
    proc = dlrun("predict", str(run), str(tmp_path / "no_hours.csv"))
    assert_user_error(proc, "lacks the column(s) 'hours'", "add")


def test_bad_values_are_refused_by_row(people_run, tmp_path: Path) -> None:
    run, valid, _, _ = people_run
    df = pd.read_csv(valid, dtype=str)
    df.loc[3, "age"] = "forty"
    df.to_csv(tmp_path / "bad.csv", index=False)
    refused(run, tmp_path / "bad.csv", match="'forty'.*data row 4")
    refused(run, valid, "--id", "Idd", match="--id Idd.*did you mean 'Id'")


def test_unseen_class_in_the_target_is_left_out_of_the_metrics(people_run, tmp_path: Path) -> None:
    run, valid, _, _ = people_run
    df = pd.read_csv(valid, dtype=str)
    df.loc[0, "income"] = "middle"
    df.to_csv(tmp_path / "classes.csv", index=False)
    out, summary = predict(run, tmp_path / "classes.csv")
    assert len(out) == len(df)
    assert any("never saw" in note for note in summary["notes"])


def test_regression_with_log_target_predicts_on_the_original_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 400
    df = pd.DataFrame({"shop": rng.choice(list("abc"), n), "promo": rng.integers(0, 2, n)})
    df["sales"] = (
        100 * (1 + df.promo) * df.shop.map({"a": 1, "b": 2, "c": 4}) * rng.uniform(0.9, 1.1, n)
    ).round(2)
    df.to_csv(tmp_path / "sales.csv", index=False)
    run = tmp_path / "run"
    train(
        run, *TABLE, f"data.path={tmp_path / 'sales.csv'}", "data.y_name=sales", "data.cat_names=[shop]",
        "data.cont_names=[promo]", "data.log_y=true", "trainer.epochs=3", "optimizer.lr=3e-2",
    )  # fmt: skip
    valid = validation_rows(run, tmp_path / "sales.csv", tmp_path / "valid.csv")
    metrics = evaluate(run)
    (tmp_path / "sales.csv").unlink()
    out, summary = predict(run, valid)
    assert summary["metrics"] == metrics
    predicted, actual = out["sales"].astype(float), pd.read_csv(valid)["sales"]
    assert ((predicted - actual) ** 2).mean() ** 0.5 == pytest.approx(metrics["rmse"], rel=1e-4)
    assert predicted.min() > 20  # the original scale, not the log
    zero = pd.read_csv(valid)
    zero.loc[2, "sales"] = 0
    zero.to_csv(tmp_path / "zero.csv", index=False)
    refused(run, tmp_path / "zero.csv", match="needs a positive target, but 'sales' is 0 in data row 3")


def test_a_run_without_model_json_gets_a_clear_error(people_run, tmp_path: Path) -> None:
    run, valid, _, _ = people_run
    old = tmp_path / "old_run"
    shutil.copytree(run, old)
    (old / "model.json").unlink()
    assert_user_error(dlrun("predict", str(old), str(valid)), "has no model.json", "train it again")
    (old / "model.json").write_text("{not json")
    refused(old, valid, match="model.json.*damaged")


@pytest.mark.parametrize(
    "field, value",
    [("fill", {"age": "abc"}), ("levels", {"job": [1, 2]}), ("classes", "ab"), ("task", None), ("bs", "x")],
)
def test_a_tampered_model_json_is_refused(people_run, tmp_path: Path, field: str, value) -> None:
    run, valid, _, _ = people_run
    bad = tmp_path / "tampered"
    shutil.copytree(run, bad)
    doc = json.loads((bad / "model.json").read_text())
    prep = doc["preprocess"]
    prep[field] = {**prep[field], **value} if isinstance(value, dict) else value
    (bad / "model.json").write_text(json.dumps(doc))
    refused(bad, valid, match="model.json.*damaged")


def test_predict_user_errors(people_run, tmp_path: Path) -> None:
    run, valid, _, _ = people_run
    refused(run, tmp_path / "nope.csv", match="does not exist")
    refused(tmp_path / "nowhere", valid, match="does not exist")
    assert_user_error(dlrun("predict", str(run)), "usage: dlrun predict")
    refused(run, valid, "--bs", "0", match="--bs 0")
    refused(run, valid, "-o", tmp_path, match="is a folder")


# --- language models ------------------------------------------------------------------

LM = ["model=rnn", "model.emb_sz=16", "model.n_hid=32", "data=text", "data.bs=4", "data.bptt=16"]


def test_text_predict_reproduces_eval_perplexity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydoc_data.topics import topics

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    text = "\n".join(topics[k] for k in list(topics)[:8])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text(text[:8000], encoding="utf-8")
    (corpus / "valid.txt").write_text(text[8000:10000], encoding="utf-8")
    run = tmp_path / "run"
    train(run, *LM, f"data.path={corpus}", "trainer.epochs=1")
    metrics = evaluate(run)
    shutil.copy(corpus / "valid.txt", tmp_path / "valid.txt")
    shutil.rmtree(corpus)
    from dlrun.predict import main

    main([str(run), str(tmp_path / "valid.txt"), "--json", str(tmp_path / "s.json")])
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["metrics"]["perplexity"] == metrics["perplexity"]
    assert summary["metrics"]["bpc"] == metrics["bpc"]
    written = pd.read_csv(summary["output"])
    assert written["perplexity"].iloc[0] == pytest.approx(metrics["perplexity"])
    (tmp_path / "one.txt").write_text("a", encoding="utf-8")
    refused(run, tmp_path / "one.txt", match="at least 2")
