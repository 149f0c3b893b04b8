"""The tabular family: data=csv / penguins, model=tabular, experiment=adult, dlrun embeddings.

Tables are small CSV files written into tmp_path, plus the real UCI Adult file from the
shared data folder where a test needs a real table (skipped when it is not there).
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, SHARED_DATA, dlrun
from conftest import compose as config

from dlrun.errors import DlrunError

ADULT = SHARED_DATA / "adult" / "adult.data"
CPU = torch.device("cpu")


def build_data(*overrides: str):
    from dlrun.family import build_data

    return build_data(config("model=tabular", *overrides), CPU)


def table_arrays(*overrides: str) -> dict:
    """The processed train/valid arrays of the table `dlrun train model=tabular OVERRIDES` reads."""
    from dlrun.data.tabular import load_table

    return load_table(config("model=tabular", *overrides).data).arrays()


def sales_csv(tmp_path: Path) -> Path:
    """A small sales table: a store (category), a promo flag (number), a date, positive sales."""
    rng = np.random.default_rng(0)
    dates = pd.date_range("2015-01-01", periods=60, freq="D")
    rows = []
    for d in dates:
        for store in ("a", "b", "c"):
            promo = int(rng.integers(0, 2))
            base = {"a": 100, "b": 200, "c": 400}[store]
            sales = base * (1.5 if promo else 1.0) * (1 + 0.05 * d.day_of_week)
            rows.append(
                {"Date": d.strftime("%Y-%m-%d"), "Store": store, "Promo": promo, "Sales": round(sales, 2)}
            )
    path = tmp_path / "sales.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


SALES = (
    "data=csv",
    "data.y_name=Sales",
    "data.cat_names=[Store]",
    "data.cont_names=[Promo]",
    "data.date_names=[Date]",
    "data.valid_by=Date",
    "data.log_y=true",
    "data.bs=16",
)


# --- dates, log target, RMSPE --------------------------------------------------


def test_date_parts_match_the_calendar():
    from dlrun.data.tabular import date_parts

    dates = pd.to_datetime(pd.Series(["2015-07-31", "2015-01-01", "2014-12-31", "2015-03-31"]))
    cats, conts = date_parts(dates, "Date")
    part = lambda name: cats[f"Date_{name}"].tolist()
    assert part("year") == [2015, 2015, 2014, 2015]
    assert part("month") == [7, 1, 12, 3]
    assert part("week") == [31, 1, 1, 14]  # ISO weeks: 2014-12-31 is in week 1 of 2015
    assert part("day") == [31, 1, 31, 31]
    assert part("dayofweek") == [4, 3, 2, 1]  # Monday is 0
    assert part("dayofyear") == [212, 1, 365, 90]
    assert part("is_month_end") == [1, 0, 1, 1]
    assert part("is_month_start") == [0, 1, 0, 0]
    assert part("is_quarter_end") == [0, 0, 1, 1]
    assert part("is_quarter_start") == [0, 1, 0, 0]
    assert part("is_year_end") == [0, 0, 1, 0]
    assert part("is_year_start") == [0, 1, 0, 0]
    assert conts["Date_elapsed"].tolist()[1] == 1420070400.0  # 2015-01-01 00:00 UTC


def test_sales_table_with_dates_log_target_and_rmspe(tmp_path):
    overrides = (*SALES, f"data.path={sales_csv(tmp_path)}")
    data = build_data(*overrides)
    facts = data.facts
    assert facts.task == "regression" and facts.log_y and facts.n_out == 1
    assert "Date_year" in facts.cat_names and "Date_dayofweek" in facts.cat_names
    assert list(facts.cont_names) == ["Promo", "Date_elapsed"]
    a = table_arrays(*overrides)
    # Validation is the most recent 20% of the days (12 of 60 days, 3 stores each).
    assert len(a["y_valid"]) == 36 and len(a["y_train"]) == 144
    elapsed = facts.cont_names.index("Date_elapsed")
    assert a["cont_valid"][:, elapsed].min() > a["cont_train"][:, elapsed].max()
    # The target is stored as log(sales).
    assert np.allclose(np.exp(a["y_train"]).min(), 100.0, rtol=1e-5)

    # Metrics are on the original scale: targets 100 and 200, predictions 110 and 180.
    metrics = data.metrics()
    assert metrics.monitor == "rmspe"
    y = torch.log(torch.tensor([100.0, 200.0]))
    out = torch.log(torch.tensor([[110.0], [180.0]]))
    metrics.update(out, y)
    got = metrics.compute(valid_loss=0.0)
    assert got["rmspe"] == pytest.approx(0.1, rel=1e-5)  # errors of +10% and -10%
    assert got["rmse"] == pytest.approx(math.sqrt((10**2 + 20**2) / 2), rel=1e-5)
    assert got["mae"] == pytest.approx(15.0, rel=1e-5)


def test_sales_run_reports_rmspe_and_the_date_range_of_each_split(tmp_path):
    run = tmp_path / "run"
    r = dlrun(
        "train",
        "model=tabular",
        *SALES,
        "data.valid_last=12D",  # the same 12 of 60 days as valid_pct=0.2
        f"data.path={sales_csv(tmp_path)}",
        "trainer.epochs=4",
        "trainer.progress=false",
        f"hydra.run.dir={run}",
    )
    assert r.returncode == 0, r.stderr
    assert "train split: rows 144, first_date 2015-01-01, last_date 2015-02-17" in r.stdout
    assert "valid split: rows 36, first_date 2015-02-18, last_date 2015-03-01" in r.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["split"] == {
        "train": {"rows": 144, "first_date": "2015-01-01", "last_date": "2015-02-17"},
        "valid": {"rows": 36, "first_date": "2015-02-18", "last_date": "2015-03-01"},
    }
    assert summary["monitor"] == "rmspe"
    # The head starts at the mean log target, so four epochs already land near 0.5 (without that: ~1).
    assert 0 < summary["best"]["rmspe"] < 0.6 and "rmse" in summary["best"] and "mae" in summary["best"]


@pytest.mark.parametrize(
    "period, days",
    [("14D", 14), (14, 14), ("2W", 14), ("W-MON", 7), ("1MS", 28), ("1ME", 28), ("48h", 2)],
)
def test_valid_last_is_the_last_period_of_whole_days(tmp_path, period, days):
    """60 days from 2015-01-01 to 2015-03-01, 3 rows a day; a month back from 2015-03-02 is 2015-02-02."""
    from dlrun.data.tabular import load_table

    path = sales_csv(tmp_path)
    table = load_table(config("model=tabular", *SALES, f"data.path={path}", f"data.valid_last={period}").data)
    dates = pd.to_datetime(pd.read_csv(path)["Date"])
    assert table.is_valid.sum() == 3 * days
    assert dates[table.is_valid].min() == pd.Timestamp("2015-03-01") - pd.Timedelta(days=days - 1)
    assert dates[~table.is_valid].max() < dates[table.is_valid].min()  # no day is split
    assert table.split["valid"]["last_date"] == "2015-03-01"


def test_valid_last_user_errors(tmp_path):
    path = sales_csv(tmp_path)
    with pytest.raises(DlrunError, match="data.valid_last=14D needs data.valid_by: name the date column"):
        build_data(*SALES, f"data.path={path}", "data.valid_by=null", "data.valid_last=14D")
    with pytest.raises(
        DlrunError, match="data.valid_by=Store is not a date column: list it in data.date_names"
    ):
        build_data(*SALES, f"data.path={path}", "data.valid_by=Store", "data.valid_last=14D")
    msg = r"covers every date of Date \(2015-01-01 to 2015-03-01\), which leaves no rows for training"
    for period in ("60D", "10000000000D"):  # the second reaches past pandas' last date
        with pytest.raises(DlrunError, match=msg):
            build_data(*SALES, f"data.path={path}", f"data.valid_last={period}")
    # A value that is no period is refused with the other config values, before any work (exit 2).
    r = dlrun("train", "model=tabular", *SALES, f"data.path={path}", "data.valid_last=3B", "trainer.epochs=1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "data.valid_last='3B' is not allowed" in r.stderr and "42D, 6W, 2MS" in r.stderr


# --- reading: text codes among numbers, a header the recipe does not expect -----


def test_a_column_of_numbers_with_a_few_text_codes_is_read_as_one_set_of_levels(tmp_path):
    """A holiday column of `0` and codes `a`, `b`, `c`: pandas reads a large file in chunks of
    262,144 rows and, left to guess, types it as numbers in the first chunk and text after."""
    from dlrun.data.tabular import load_table

    path = tmp_path / "holidays.csv"
    n = 270_000
    codes = np.full(n, "0", dtype=object)
    codes[263_000:269_000:10] = np.resize(["a", "b", "c"], 600)
    x = np.arange(n) % 7
    pd.DataFrame({"holiday": codes, "x": x, "y": x % 2}).to_csv(path, index=False)
    with pytest.warns(pd.errors.DtypeWarning):
        guessed = pd.read_csv(path)["holiday"]
    assert {type(v) for v in guessed} == {int, str}  # the problem this test is about

    overrides = ("data=csv", f"data.path={path}", "data.y_name=y", "data.cat_names=[holiday]")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DtypeWarning either
        table = load_table(config("model=tabular", *overrides, "data.cont_names=[x]").data)
    assert table.levels["holiday"] == ["#unknown#", "0", "a", "b", "c"]
    assert (table.cat[:, 0] == pd.Series(codes).map({"0": 1, "a": 2, "b": 3, "c": 4}).to_numpy()).all()

    # The same column as a number is an error that names it and its first text value.
    msg = r"column 'holiday' has the non-numeric value 'a' in data row 263001"
    with pytest.raises(DlrunError, match=msg):
        build_data(*overrides[:3], "data.cont_names=[holiday]")


def test_numeric_codes_read_as_text_keep_numeric_order(tmp_path):
    from dlrun.data.tabular import fit_levels

    assert fit_levels(pd.Series(["10", "2", "b", None, "1", "a"], dtype=str)) == [
        "#unknown#", "1", "2", "10", "a", "b", "#na#"
    ]  # fmt: skip
    assert fit_levels(pd.Series([0, "0", "a"], dtype=object)) == ["#unknown#", "0", "a"]


ADULT_NAMES = (
    "age,workclass,fnlwgt,education,education-num,marital-status,occupation,relationship,race,sex,"
    "capital-gain,capital-loss,hours-per-week,native-country,salary"
)
ADULT_ROWS = [
    "39, State-gov, 77516, Bachelors, 13, Never-married, Adm-clerical, Not-in-family, White, Male, "
    "2174, 0, 40, United-States, <=50K",
    "50, Self-emp-not-inc, 83311, Bachelors, 13, Married-civ-spouse, Exec-managerial, Husband, White, "
    "Male, 0, 0, 13, United-States, >50K",
]


def test_a_header_the_recipe_does_not_expect_says_how_to_read_it(tmp_path):
    """experiment=adult reads a file without a header (data.header=false, data.names set)."""
    rows = "\n".join(ADULT_ROWS * 20) + "\n"
    same = write(tmp_path, ADULT_NAMES.replace(",", ", ") + "\n" + rows, "same.csv")
    msg = r"same.csv looks like a header \(it lists the names of data.names\).*set data.header=true"
    with pytest.raises(DlrunError, match=msg):
        build_data("experiment=adult", f"data.path={same}")
    # A header with names of its own (Kaggle's adult.csv): text where the next line has numbers.
    own = ADULT_NAMES.replace("-", ".").replace("salary", "income")
    other = write(tmp_path, own + "\n" + rows, "other.csv")
    msg = r"it has text where the next line has numbers, in age, fnlwgt, education-num, hours-per-week"
    with pytest.raises(DlrunError, match=msg):
        build_data("experiment=adult", f"data.path={other}")
    # With data.header=true the recipe's names rename the header's; all 40 rows are data.
    a = table_arrays("experiment=adult", f"data.path={other}", "data.header=true", "data.valid_pct=0.25")
    assert len(a["y_train"]) + len(a["y_valid"]) == 40
    # A header of another width: data.names=null is how to use it.
    wider = write(tmp_path, "id," + own + "\n" + "\n".join(f"{i}, {r}" for i, r in enumerate(ADULT_ROWS)))
    with pytest.raises(DlrunError, match=r"data.names lists 15 columns but .* has 16: data.names=null uses"):
        build_data("experiment=adult", f"data.path={wider}", "data.header=true")
    r = dlrun("train", "experiment=adult", f"data.path={same}", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "looks like a header" in r.stderr and "Traceback" not in r.stderr


# --- processing: missing values, unseen levels, statistics from training -------


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_numbers_unseen_levels_and_training_statistics(tmp_path):
    from dlrun.data.tabular import MISSING, UNKNOWN, process

    df = pd.DataFrame(
        {
            "color": ["red", "blue", None, "red", "green"],
            "size": [1.0, None, 3.0, 5.0, 100.0],
            "y": ["p", "q", "p", "q", "p"],
        }
    )
    dcfg = {"y_name": "y", "cat_names": ["color"], "cont_names": ["size"], "valid_by": "is_valid"}
    df["is_valid"] = [False, False, False, False, True]
    table = process(df, _dcfg(dcfg))
    assert table.cat_names == ["color", "size_na"] and table.cont_names == ["size"]
    # Levels from the training rows only: green appears only in validation -> #unknown# (index 0).
    assert table.levels["color"] == [UNKNOWN, "blue", "red", MISSING]
    assert table.cat[:, 0].tolist() == [2, 1, 3, 2, 0]
    assert table.cat[:, 1].tolist() == [1, 2, 1, 1, 1]  # size_na: False, True, False, ...
    # The gap is filled with the training median (3), then standardised with training mean/std.
    train = np.array([1.0, 3.0, 3.0, 5.0])
    expected = (np.array([1.0, 3.0, 3.0, 5.0, 100.0]) - train.mean()) / train.std()
    assert np.allclose(table.cont[:, 0], expected, rtol=1e-6)
    assert table.classes == ["p", "q"] and table.y.tolist() == [0, 1, 0, 1, 0]


def _dcfg(keys: dict):
    from omegaconf import OmegaConf

    base = OmegaConf.load(REPO / "configs" / "data" / "csv.yaml")
    return OmegaConf.merge(base, keys)


def test_penguins_is_the_default_tabular_data():
    data = build_data()
    facts = data.facts
    assert list(facts.classes) == ["Adelie", "Chinstrap", "Gentoo"]
    assert list(facts.cat_names[:2]) == ["island", "sex"]
    x, y = next(data.train.epoch(0))
    assert x[0].dtype == torch.int64 and x[1].dtype == torch.float32 and len(y) == 32


def test_adult_reads_with_its_separator_and_na_marker():
    if not ADULT.is_file():
        pytest.skip(f"{ADULT} not available")
    facts = build_data("experiment=adult", f"data.path={ADULT}").facts
    assert list(facts.classes) == ["<=50K", ">50K"]
    assert facts.levels["workclass"][-1] == "#na#"  # "?" read as missing
    assert "Private" in facts.levels["workclass"]  # ", " separators: no leading spaces
    a = table_arrays("experiment=adult", f"data.path={ADULT}")
    assert len(a["y_train"]) + len(a["y_valid"]) == 32561 and len(a["y_valid"]) == 6512


# --- the model ------------------------------------------------------------------


def test_embedding_sizes_dropout_and_y_range(tmp_path):
    from dlrun.family import build_model
    from dlrun.models.tabular import emb_size

    assert [emb_size(n) for n in (2, 10, 43, 10**6)] == [2, 6, 13, 600]
    cfg = config("model=tabular", "+model.emb_szs.island=5", "regularization.dropout=[0.1,0.2]")
    from dlrun.family import build_data as build

    data = build(cfg, CPU)
    model = build_model(cfg, data.facts)
    widths = model.embeds.widths
    assert widths[0] == 5 and widths[1] == emb_size(data.facts.n_levels[1])
    assert [m.p for m in model.layers if isinstance(m, torch.nn.Dropout)] == [0.1, 0.2]
    x, _ = next(data.valid.epoch(0))
    assert model.eval()(x).shape == (len(x[0]), 3)

    bad = config("model=tabular", "regularization.dropout=[0.1,0.2,0.3]")
    with pytest.raises(DlrunError, match="one per layer"):
        build_model(bad, build(bad, CPU).facts)
    with pytest.raises(DlrunError, match="regression only"):
        c = config("model=tabular", "model.y_range=[0,1]")
        build_model(c, build(c, CPU).facts)


# --- training and embeddings through the CLI -------------------------------------


def test_one_embedding_table_matches_per_column_lookups_and_loads_the_old_layout():
    from dlrun.models.tabular import TabularNet

    def net() -> TabularNet:
        return TabularNet(
            n_levels=[4, 7, 3],
            emb_szs=[2, 5, 3],
            n_cont=1,
            layers=[6],
            dropout=[0.0],
            emb_dropout=0.0,
            n_out=2,
        )

    torch.manual_seed(0)
    model = net().eval()
    tables = model.embeds.tables()
    assert [tuple(t.shape) for t in tables] == [(4, 2), (7, 5), (3, 3)]
    cat = torch.tensor([[0, 6, 2], [3, 1, 0], [2, 2, 1]])
    expected = torch.cat([tables[i][cat[:, i]] for i in range(3)], 1)
    assert torch.equal(model.embeds(cat), expected)
    # the padding a narrower column leaves in the one table gets no gradient
    model.embeds(cat).sum().backward()
    grad, used = model.embeds.weight.grad, torch.zeros_like(model.embeds.weight, dtype=torch.bool)
    for start, n, w in zip(model.embeds.starts, [4, 7, 3], [2, 5, 3]):
        used[start : start + n, :w] = True
    assert grad[~used].abs().sum() == 0 and grad[used].abs().sum() > 0

    # a state dict saved before the one table (one embeds.N.weight per column) still loads
    old = {k: v for k, v in model.state_dict().items() if k != "embeds.weight"}
    old |= {f"embeds.{i}.weight": t.clone() for i, t in enumerate(tables)}
    other = net().eval()
    other.load_state_dict(old)
    x = (cat, torch.randn(3, 1))
    assert torch.equal(other(x), model(x))
    assert "embeds.weight" in other.upgrade_state_dict(old)
    wrong = old | {"embeds.1.weight": torch.zeros(7, 4)}
    with pytest.raises(RuntimeError, match="embeds"):
        net().load_state_dict(wrong)


def test_penguins_trains_to_high_accuracy_and_embeddings_compare(tmp_path):
    run = tmp_path / "run"
    r = dlrun("train", "model=tabular", "trainer.progress=false", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["accuracy"] >= 0.95

    r = dlrun("embeddings", str(run), "--max-rows", "200", "--knn-rows", "100")
    assert r.returncode == 0, r.stderr
    island = pd.read_csv(run / "embeddings" / "island.csv")
    assert island["level"].tolist() == ["#unknown#", "Biscoe", "Dream", "Torgersen"]
    assert island.shape[1] == 1 + 3  # level + emb_size(4) = 3 numbers
    table = pd.read_csv(run / "embeddings" / "comparison.csv")
    assert table["model"].tolist()[-1] == "neural network (this run)"
    assert table["with_embeddings"].iloc[-1] == pytest.approx(summary["best"]["accuracy"])
    assert (table["without_embeddings"].iloc[:3] > 0.8).all() and (table["with_embeddings"] > 0.8).all()
    assert "random forest" in r.stdout and "learned embeddings" in r.stdout
    # 200 of the 275 training rows, the same for codes and embeddings; k-NN on 100 of those.
    assert table["train_rows"].tolist()[:3] == [100, 200, 200]
    assert (
        "on 200 of 275 training rows, scored on 69 of 69 validation rows (a sample: --max-rows)" in r.stdout
    )
    for model in ("k-NN (k=10)", "random forest", "gradient boosting"):  # each fit's time, as it ends
        assert re.search(rf"{re.escape(model)}, learned embeddings: accuracy [0-9.]+ in [0-9.]+ s", r.stdout)
    assert (table["seconds_with_embeddings"].iloc[:3] >= 0).all()


@pytest.mark.slow
def test_adult_reaches_85_percent(tmp_path):
    if not ADULT.is_file():
        pytest.skip(f"{ADULT} not available")
    run = tmp_path / "adult"
    r = dlrun(
        "train",
        "experiment=adult",
        f"data.path={ADULT}",
        "seed=0",
        "trainer.progress=false",
        f"hydra.run.dir={run}",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "summary.json").read_text())["best"]["accuracy"] >= 0.85


# --- user mistakes ----------------------------------------------------------------


def test_column_not_in_file_lists_the_columns(tmp_path):
    path = write(tmp_path, "a,b,label\n1,x,p\n2,y,q\n3,x,p\n")
    msg = r"'bb' is not in the table \(did you mean 'b'\?\); its columns are: a, b, label"
    with pytest.raises(DlrunError, match=msg):
        build_data("data=csv", f"data.path={path}", "data.y_name=label", "data.cat_names=[bb]", "data.bs=1")


def test_missing_file_exits_2(tmp_path):
    r = dlrun(
        "train",
        "model=tabular",
        "data=csv",
        f"data.path={tmp_path / 'nope.csv'}",
        "data.y_name=y",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert r.returncode == 2
    assert "nope.csv does not exist" in r.stderr and "Traceback" not in r.stderr


def test_path_not_set():
    with pytest.raises(DlrunError, match="data.path is not set"):
        build_data("data=csv", "data.y_name=y")


def test_non_numeric_value_in_continuous_column_names_row_and_column(tmp_path):
    path = write(tmp_path, "a,b,label\n1,x,p\n2,y,q\nthree,x,p\n")
    with pytest.raises(DlrunError, match=r"column 'a' has the non-numeric value 'three' in data row 3"):
        build_data("data=csv", f"data.path={path}", "data.y_name=label", "data.cont_names=[a]")


def test_target_with_missing_values(tmp_path):
    path = write(tmp_path, "a,label\n1,p\n2,\n3,q\n4,p\n")
    with pytest.raises(DlrunError, match=r"data.y_name='label' is missing in 1 rows \(first: data row 2\)"):
        build_data("data=csv", f"data.path={path}", "data.y_name=label", "data.cont_names=[a]")


def test_id_like_categorical_is_a_warning(tmp_path, caplog):
    path = write(tmp_path, "id,a,label\n" + "".join(f"r{i},{i % 3},{'pq'[i % 2]}\n" for i in range(20)))
    with caplog.at_level(logging.WARNING):
        data = build_data(
            "data=csv",
            f"data.path={path}",
            "data.y_name=label",
            "data.cat_names=[id]",
            "data.cont_names=[a]",
            "data.bs=4",
        )
    assert "'id' has a different value in every training row" in caplog.text
    assert data.facts.n_levels == [17]  # 16 training ids + #unknown#


def test_bad_valid_by_and_log_y_on_classes(tmp_path):
    path = write(tmp_path, "a,flag,label\n1,maybe,p\n2,no,q\n3,yes,p\n")
    with pytest.raises(DlrunError, match="true/false column"):
        build_data(
            "data=csv", f"data.path={path}", "data.y_name=label", "data.cont_names=[a]", "data.valid_by=flag"
        )
    with pytest.raises(DlrunError, match="regression target"):
        build_data(
            "data=csv",
            f"data.path={path}",
            "data.y_name=label",
            "data.cont_names=[a]",
            "data.log_y=true",
            "data.task=classification",
        )


@pytest.mark.parametrize("model", ["tabular", "rnn"])
def test_model_on_the_wrong_data_family_exits_2(model, tmp_path):
    if not (REPO / "configs" / "model" / f"{model}.yaml").is_file():
        pytest.skip(f"model={model} not in this tree")
    r = dlrun("train", f"model={model}", "data=digits", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    if model == "tabular":
        assert "data=csv, data=penguins" in r.stderr
    assert "cannot train on data=digits" in r.stderr


def test_embeddings_needs_one_run_dir_and_sensible_options(tmp_path):
    from dlrun.embeddings import main

    with pytest.raises(DlrunError, match="usage: dlrun embeddings RUN_DIR"):
        main([])
    with pytest.raises(DlrunError, match="does not exist"):
        main([str(tmp_path / "nowhere")])
    with pytest.raises(DlrunError, match="usage: dlrun embeddings RUN_DIR"):
        main([str(tmp_path), "--max-rows", "many"])
    with pytest.raises(DlrunError, match="--max-rows -5 is not allowed: give a number of rows, or 0 for all"):
        main([str(tmp_path), "--max-rows", "-5"])
