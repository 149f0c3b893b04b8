"""Tabular data: a CSV table (or the bundled penguins table) as categorical codes and
normalised continuous columns, whole on the training device.

Processing follows the fast.ai course (Rossmann, Adult):
- date columns (`data.date_names`) become parts (year, month, week, day, day of week,
  day of year, month/quarter/year start and end) used as categories, and `elapsed`
  (seconds since 1970) used as a number;
- a missing number is filled with the training median and flagged in a `<col>_na`
  categorical column;
- every categorical column gets index 0 for a level never seen in training (`#unknown#`)
  and, when training has missing values, a level of its own for them (`#na#`);
- normalisation statistics and category levels come from the training rows only;
- categorical and date columns are read as text, as the file writes them (a column of `0` and
  a few codes `a`, `b` is one set of levels however pandas would have typed it);
- validation is a random `valid_pct`, the latest `valid_pct` or last period (`valid_last`) of
  a date column's days, or the rows a true/false column marks.

x is `(cat LongTensor [N, n_cat], cont FloatTensor [N, n_cont])`; y holds class
indices (classification) or the (optionally log) target (regression).
"""

from __future__ import annotations

import importlib.resources
import logging
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pandas.tseries import offsets
from pandas.tseries.frequencies import to_offset

from dlrun.data import TensorBatches
from dlrun.errors import DlrunError, closest
from dlrun.family import Data, Facts
from dlrun.losses import classification_loss
from dlrun.metrics import Accuracy
from dlrun.rules import BOOL, STR, Choice, Int, Rule

log = logging.getLogger(__name__)

UNKNOWN = "#unknown#"  # index 0 of every categorical column: a level unseen in training
MISSING = "#na#"  # a missing categorical value; a level of its own when training has one

# Date parts used as categories; `<date>_elapsed` is added as a continuous column.
DATE_PARTS = (
    "year", "month", "week", "day", "dayofweek", "dayofyear",
    "is_month_start", "is_month_end", "is_quarter_start", "is_quarter_end",
    "is_year_start", "is_year_end",
)  # fmt: skip

# Installed packages that ship a table dlrun knows (`data.package`); nothing else is ever
# imported for a config, since a run directory's config is data, not code.
BUNDLED_PACKAGES = ("palmerpenguins",)

DAY = pd.Timedelta(days=1)
# `data.valid_last` aliases counted in calendar months (`2MS`, `1QE`, `1YS`...): months in one.
MONTHS = (
    ((offsets.MonthBegin, offsets.MonthEnd, offsets.BusinessMonthBegin, offsets.BusinessMonthEnd), 1),
    ((offsets.QuarterBegin, offsets.QuarterEnd, offsets.BQuarterBegin, offsets.BQuarterEnd), 3),
    ((offsets.YearBegin, offsets.YearEnd, offsets.BYearBegin, offsets.BYearEnd), 12),
)
PERIODS = (
    "a number of days (42) or a pandas offset alias in whole days, weeks, months, quarters or years "
    "(42D, 6W, 2MS, 1QS, 1YE)"
)


def period(value: Any) -> pd.DateOffset:
    """`data.valid_last` as a calendar offset: whole days, or whole months (a quarter is three,
    a year twelve). An alias's anchor (`W-SUN`, month start or end) does not matter: the period
    is counted back from the day after the last date."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError("not a positive number of days")
        return pd.DateOffset(days=value)
    offset = to_offset(str(value))
    if offset.n < 1:
        raise ValueError("not a positive period")
    if isinstance(offset, offsets.Day):
        return pd.DateOffset(days=offset.n)
    if isinstance(offset, offsets.Week):
        return pd.DateOffset(days=7 * offset.n)
    if isinstance(offset, offsets.Tick) and offset.nanos % DAY.value == 0:
        return pd.DateOffset(days=offset.nanos // DAY.value)
    for kinds, months in MONTHS:
        if isinstance(offset, kinds):
            return pd.DateOffset(months=months * offset.n)
    raise ValueError("not whole days or months")


@dataclass(frozen=True)
class Period(Rule):
    """`data.valid_last`: null, a positive number of days, or an offset alias `period` reads."""

    kind: str = "period"
    nullable: bool = True

    def describe(self) -> str:
        return PERIODS + " or null"

    def accepts(self, value: Any) -> bool:
        if value is None:
            return True
        if isinstance(value, float) or not isinstance(value, (int, str)):
            return False
        try:
            period(value)
        except ValueError:
            return False
        return True


# The keys of configs/data/csv.yaml. Column lists may be empty, so they are checked against
# the file when it is read, not here.
RULES = {
    "data.path": Rule("str", nullable=True),
    "data.package": Choice(*BUNDLED_PACKAGES, nullable=True),
    "data.sep": STR,
    "data.header": BOOL,
    "data.skip_rows": Int(0),
    "data.task": Choice("auto", "classification", "regression"),
    "data.log_y": BOOL,
    "data.valid_by": Rule("str", nullable=True),
    "data.valid_last": Period(),
    "data.split_seed": Int(0),
}

# `task: auto` calls an integer target with at most this many values a class label.
MAX_AUTO_CLASSES = 20


# --- reading and checking the table ------------------------------------------


def table_path(dcfg: Any) -> Path:
    """The CSV file to read: `data.path`, inside the Python package `data.package` when that is set
    (the bundled penguins table ships with the palmerpenguins package)."""
    if dcfg.get("package"):
        if dcfg.package not in BUNDLED_PACKAGES:
            raise DlrunError(
                f"data.package={dcfg.package} is not a package with bundled data: use "
                f"data.package={' or '.join(BUNDLED_PACKAGES)}, or data.package=null and data.path=FILE"
            )
        try:
            path = Path(str(importlib.resources.files(str(dcfg.package)) / str(dcfg.path)))
        except ModuleNotFoundError:
            raise DlrunError(
                f"data.package={dcfg.package} is not installed: pip install {dcfg.package}"
            ) from None
        if not path.is_file():
            raise DlrunError(f"data.package={dcfg.package} has no file {dcfg.path}: reinstall it")
        return path
    if not dcfg.get("path"):
        raise DlrunError(
            "data.path is not set: point it at your CSV file, e.g. "
            "`dlrun train model=tabular data=csv data.path=table.csv data.y_name=target ...`"
        )
    path = Path(str(dcfg.path)).expanduser()
    if not path.exists():
        raise DlrunError(f"data.path={path} does not exist: check the path (relative to {Path.cwd()})")
    if not path.is_file():
        raise DlrunError(f"data.path={path} is not a file: data=csv reads one CSV table")
    return path


def read_table(dcfg: Any) -> pd.DataFrame:
    """Read the columns the config names, with its separator, header, column names and NA markers.

    Categorical and date columns (and a classification target) are read as text, as written:
    left to guess, pandas reads a large file in chunks and types a column of mostly numbers
    with a few codes (a holiday column of `0` and `a`) as numbers in some chunks and text in
    others, so that `0` becomes two levels. The other columns are typed by pandas (a
    continuous column that holds text is an error naming the value, in `numbers`)."""
    path = table_path(dcfg)
    sep = str(dcfg.get("sep", ","))
    # ", " (UCI Adult) is a comma followed by spaces: read it as "," and skip the spaces,
    # which keeps pandas' fast C parser (a multi-character separator forces the python one).
    options: dict[str, Any] = dict(
        sep=sep.strip() or sep, skipinitialspace=True, skiprows=int(dcfg.get("skip_rows") or 0) or None
    )
    header = bool(dcfg.get("header", True))
    first = first_rows(path, options, sep)
    names = [str(n) for n in dcfg.get("names") or []]
    if not header:
        why = looks_like_header(first, names, dcfg)
        if why:
            raise DlrunError(
                f"the first line of {path} looks like a header ({why}), but data.header=false reads it "
                f"as data: set data.header=true; data.names=null then takes the column names from "
                f"that line (data.names, when set, renames the columns)"
            )
    width = len(first.columns)
    if names and len(names) != width:
        fix = (
            "data.names=null uses the file's header, or give one name per column"
            if header
            else "give one name per column"
        )
        raise DlrunError(
            f"data.names lists {len(names)} columns but {path} has {width}: {fix} (check data.sep={sep!r})"
        )
    columns = unique_names(names or (list(first.iloc[0]) if header else range(width)))
    check_columns(columns, dcfg)
    used = {name for role in roles(dcfg).values() for name in role}
    text = set(_names(dcfg, "cat_names") + _names(dcfg, "date_names"))
    if str(dcfg.get("task")) == "classification":
        text.add(str(dcfg.y_name))
    na_values = [str(v) for v in dcfg.get("na_values") or []]
    return read_columns(path, 0 if header else None, columns, used, text, na_values, options, sep)


def read_columns(
    path: Path, header: int | None, columns: list[str], used: set[str], text: set[str],
    na_values: list[str], options: dict[str, Any], sep: str,
) -> pd.DataFrame:  # fmt: skip
    """The `used` columns of the file (named `columns`), those in `text` read as text, as written."""
    try:
        with warnings.catch_warnings():
            # A column pandas typed chunk by chunk is still read right: a continuous one that
            # holds text is an error naming the value (`numbers`), a target's levels are strings.
            warnings.simplefilter("ignore", pd.errors.DtypeWarning)
            df = pd.read_csv(
                path, header=header, names=columns, usecols=[c for c in columns if c in used],
                dtype={c: str for c in used & text}, na_values=na_values, **options,
            )  # fmt: skip
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise DlrunError(f"cannot read {path} as a CSV table (data.sep={sep!r}): {e}") from None
    if df.empty:
        raise DlrunError(f"{path} has no data rows")
    return df


def read_inputs(path: Path, prep: TablePrep, id_col: str | None = None, skip_rows: int = 0) -> pd.DataFrame:
    """Rows to predict (`dlrun predict`), read as the training file was (separator, missing-value
    markers, categorical and date columns as text). Columns are matched by name: in any order,
    extra ones ignored, the target optional; a missing input column is an error naming it. A
    training file without a header was read by `data.names`: so is INPUT, unless its first line
    names the columns."""
    read = prep.read
    sep = str(read.get("sep", ","))
    options: dict[str, Any] = dict(sep=sep.strip() or sep, skipinitialspace=True, skiprows=skip_rows or None)
    try:
        first = first_rows(path, options, sep)
    except DlrunError as e:
        raise DlrunError(
            f"{e} (lines above the table that are not part of it: skip them with --skip-rows N)"
        ) from None
    line = [str(v).strip() for v in first.iloc[0]]
    names = [str(n) for n in read.get("names") or []]
    needed = prep.cat_names + prep.cont_names + prep.date_names
    if read.get("header", True) or set(needed) <= set(line):
        columns = unique_names(line)
        if names and read.get("header", True) and len(names) == len(line):
            columns = names  # training renamed the file's columns with data.names: so does INPUT
        header: int | None = 0
    else:
        header = None
        columns = names if len(line) == len(names) else [n for n in names if n != prep.y_name]
        if len(columns) != len(line):
            raise DlrunError(
                f"{path} has {len(line)} columns and no header; the run read its file by data.names "
                f"({len(names)} columns, the target {prep.y_name!r} optional): give the same columns, "
                f"add a header line naming them, or skip the lines above the table with --skip-rows"
            )
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DlrunError(
            f"{path} lacks the column(s) {', '.join(map(repr, missing))} the model was trained on: add "
            f"them (empty cells are read as missing); the model needs {', '.join(needed)}"
        )
    if id_col is not None and id_col not in columns:
        near = closest(id_col, columns)
        hint = f" (did you mean {near!r}?)" if near else ""
        raise DlrunError(
            f"--id {id_col}: {path} has no such column{hint}; its columns are: {', '.join(columns)}"
        )
    used = set(needed) | {c for c in (prep.y_name, id_col) if c in columns}
    text = set(prep.cat_names + prep.date_names) | {c for c in (id_col,) if c}
    if prep.task == "classification":
        text.add(prep.y_name)
    na_values = [str(v) for v in read.get("na_values") or []]
    return read_columns(path, header, columns, used, text, na_values, options, sep)


def first_rows(path: Path, options: dict[str, Any], sep: str) -> pd.DataFrame:
    """The file's first two lines as text, read as the table will be (cheap: two rows)."""
    try:
        return pd.read_csv(path, header=None, nrows=2, dtype=str, keep_default_na=False, **options)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DlrunError(f"cannot read {path} as a CSV table (data.sep={sep!r}): {e}") from None
    except pd.errors.EmptyDataError:
        raise DlrunError(f"{path} is empty") from None


def unique_names(line: Any) -> list[str]:
    """Column names as pandas makes them from a header: `Unnamed: 3` for an empty one, `a.1` for
    the second `a`."""
    names: list[str] = []
    for i, value in enumerate(line):
        name = str(value).strip() or f"Unnamed: {i}"
        base, k = name, 0
        while name in names:
            k += 1
            name = f"{base}.{k}"
        names.append(name)
    return names


def looks_like_header(first: pd.DataFrame, names: list[str], dcfg: Any) -> str:
    """Why the first line of a file read without a header looks like one ("" when it does not):
    it equals data.names, it holds the target's name, or it has text in every continuous column
    where the next line has numbers."""
    line = [str(v).strip() for v in first.iloc[0]]
    if names and line == names:
        return "it lists the names of data.names"
    if not names:  # columns are named by position: nothing to compare the line with
        return ""
    y_name = dcfg.get("y_name")
    if y_name is not None and str(y_name) in line:
        return f"it holds {str(y_name)!r}, the name of data.y_name"
    if len(names) == len(line) and len(first) > 1:
        conts = [names.index(c) for c in _names(dcfg, "cont_names") if c in names]
        second = [str(v) for v in first.iloc[1]]
        if conts and all(not is_number(line[i]) and is_number(second[i]) for i in conts):
            return f"it has text where the next line has numbers, in {', '.join(names[i] for i in conts)}"
    return ""


def is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _names(dcfg: Any, key: str) -> list[str]:
    return [str(n) for n in (dcfg.get(key) or [])]


def roles(dcfg: Any) -> dict[str, list[str]]:
    """Config key -> the columns it names."""
    return {
        "data.y_name": [str(dcfg.y_name)] if dcfg.get("y_name") is not None else [],
        "data.cat_names": _names(dcfg, "cat_names"),
        "data.cont_names": _names(dcfg, "cont_names"),
        "data.date_names": _names(dcfg, "date_names"),
        "data.valid_by": [str(dcfg.valid_by)] if dcfg.get("valid_by") is not None else [],
    }


def check_columns(columns: list[str], dcfg: Any) -> None:
    """Every configured column is one of the table's `columns`, and plays one role only."""
    named = roles(dcfg)
    if not named["data.y_name"]:
        raise DlrunError(f"data.y_name is not set: name the target column (one of {', '.join(columns)})")
    for key, names in named.items():
        for name in names:
            if name not in columns:
                near = closest(name, columns)
                hint = f" (did you mean {near!r}?)" if near else ""
                raise DlrunError(
                    f"{key}: column {name!r} is not in the table{hint}; its columns are: {', '.join(columns)}"
                )
    seen: dict[str, str] = {}
    for key in ("data.y_name", "data.cat_names", "data.cont_names", "data.date_names"):
        for name in named[key]:
            if name in seen:
                raise DlrunError(f"column {name!r} is listed in both {seen[name]} and {key}: keep it in one")
            seen[name] = key
    if not (named["data.cat_names"] or named["data.cont_names"] or named["data.date_names"]):
        raise DlrunError("no input columns: list some in data.cat_names, data.cont_names or data.date_names")


def first_unparsed(raw: pd.Series, parsed: pd.Series) -> int | None:
    """The position of the first value that was there but did not parse, if any."""
    bad = (parsed.isna() & raw.notna()).to_numpy()
    return int(np.flatnonzero(bad)[0]) if bad.any() else None


def numbers(col: pd.Series, what: str) -> pd.Series:
    """A column as float64; a value that is not a number is an error naming its row."""
    num = pd.to_numeric(col, errors="coerce").astype("float64")
    row = first_unparsed(col, num)
    if row is not None:
        raise DlrunError(
            f"{what}: column {col.name!r} has the non-numeric value {col.iloc[row]!r} in data row {row + 1} "
            f"(rows counted from 1 after the header): fix the value, mark it as missing with "
            f"data.na_values, or list the column in data.cat_names"
        )
    return num


def parse_dates(col: pd.Series) -> pd.Series:
    """A column as datetimes; a value that is not a date is an error naming its row."""
    dates = pd.to_datetime(col, errors="coerce")
    row = first_unparsed(col, dates)
    if row is not None:
        raise DlrunError(
            f"data.date_names: column {col.name!r} has {col.iloc[row]!r} in data row {row + 1}, "
            f"which is not a date"
        )
    return dates


def date_parts(dates: pd.Series, name: str) -> tuple[dict[str, pd.Series], dict[str, pd.Series]]:
    """Split a datetime column into categorical parts and the continuous `elapsed` seconds."""
    d = dates.dt
    values = {
        "year": d.year, "month": d.month, "week": d.isocalendar().week, "day": d.day,
        "dayofweek": d.day_of_week, "dayofyear": d.day_of_year,
        "is_month_start": d.is_month_start, "is_month_end": d.is_month_end,
        "is_quarter_start": d.is_quarter_start, "is_quarter_end": d.is_quarter_end,
        "is_year_start": d.is_year_start, "is_year_end": d.is_year_end,
    }  # fmt: skip
    cats = {f"{name}_{part}": values[part].astype("Int64") for part in DATE_PARTS}
    epoch = pd.Timestamp("1970-01-01", tz=dates.dt.tz)
    elapsed = (dates - epoch).dt.total_seconds()
    return cats, {f"{name}_elapsed": elapsed}


def split_mask(df: pd.DataFrame, dcfg: Any, dates: dict[str, pd.Series]) -> np.ndarray:
    """Which rows are validation: a random `valid_pct`, the last period or the latest `valid_pct`
    of dates, or a flag column."""
    if dcfg.get("valid_last") is not None:
        return last_period(dcfg, dates)
    n = len(df)
    pct = float(dcfg.get("valid_pct", 0.2))
    by = dcfg.get("valid_by")
    if by is None:
        # A fixed seed (data.split_seed, not the run's seed) keeps validation comparable across runs.
        rng = np.random.default_rng(int(dcfg.get("split_seed", 42)))
        mask = np.zeros(n, dtype=bool)
        mask[rng.permutation(n)[: int(round(n * pct))]] = True
        return mask
    by = str(by)
    if by in dates:
        # Sales-like data: validation is the most recent period, whole days kept together.
        known = dates[by].dropna().sort_values()
        if known.empty:
            raise DlrunError(f"data.valid_by={by!r}: the date column has no dates")
        cutoff = known.iloc[min(len(known) - 1, int(len(known) * (1 - pct)))]
        return (dates[by] >= cutoff).fillna(False).to_numpy(dtype=bool)
    col = df[by]
    if col.dtype == bool:
        return col.to_numpy()
    words = col.astype("string").str.strip().str.lower()
    flags = words.map({"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False})
    if flags.isna().any():
        values = ", ".join(map(str, col.unique()[:6]))
        raise DlrunError(
            f"data.valid_by={by!r} must be a date column (listed in data.date_names) or a true/false "
            f"column marking validation rows; it holds {values}"
        )
    return flags.to_numpy(dtype=bool)


def last_period(dcfg: Any, dates: dict[str, pd.Series]) -> np.ndarray:
    """`data.valid_last`: the rows dated in the last period of `data.valid_by`, counted back from
    the day after the last date, so whole days stay together (42D: the last 42 days)."""
    what, by = f"data.valid_last={dcfg.valid_last}", dcfg.get("valid_by")
    if by is None:
        raise DlrunError(
            f"{what} needs data.valid_by: name the date column to count back on (one of data.date_names)"
        )
    if str(by) not in dates:
        raise DlrunError(
            f"{what} counts back on dates, but data.valid_by={by} is not a date column: list it in "
            f"data.date_names, or drop data.valid_last"
        )
    try:
        offset = period(dcfg.valid_last)
    except ValueError:
        raise DlrunError(f"{what} is not allowed: data.valid_last must be {PERIODS}") from None
    days = dates[str(by)].dt.normalize()
    first, last = days.min(), days.max()
    if pd.isna(last):
        raise DlrunError(f"data.valid_by={by!r}: the date column has no dates")
    try:
        start = last + DAY - offset
    except (OverflowError, pd.errors.OutOfBoundsDatetime):  # a period longer than pandas' dates
        start = first
    if start <= first:
        raise DlrunError(
            f"{what} covers every date of {by} ({first.date()} to {last.date()}), which leaves no rows "
            f"for training: choose a shorter period"
        )
    return (days >= start).to_numpy(dtype=bool)


def split_facts(is_valid: np.ndarray, dates: pd.Series | None) -> dict[str, dict[str, Any]]:
    """Rows in each split and, for a split by dates, each split's first and last date (ISO)."""
    facts = {}
    for split, rows in (("train", ~is_valid), ("valid", is_valid)):
        facts[split] = {"rows": int(rows.sum())}
        known = dates[rows].dropna() if dates is not None else ()
        if len(known):
            first, last = known.min().date(), known.max().date()
            facts[split] |= {"first_date": first.isoformat(), "last_date": last.isoformat()}
    return facts


def resolve_task(y: pd.Series, dcfg: Any) -> str:
    """`auto`: text or booleans, or integers with few values, are classes; other numbers regression."""
    task = str(dcfg.get("task", "auto"))
    if dcfg.get("log_y"):
        if task == "classification":
            raise DlrunError("data.log_y=true needs a regression target: set data.task=regression")
        return "regression"
    if task != "auto":
        return task
    if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        return "classification"
    whole = bool((y == y.round()).all())
    return "classification" if whole and y.nunique() <= MAX_AUTO_CLASSES else "regression"


# --- fitting on training rows, applying to both splits -----------------------


def as_levels(col: pd.Series) -> pd.Series:
    """Category values as strings (`2007`, not `2007.0`, for whole numbers read as floats)."""
    if pd.api.types.is_float_dtype(col) and bool((col.dropna() == col.dropna().round()).all()):
        col = col.astype("Int64")
    return col.astype("string")


def fit_levels(train: pd.Series) -> list[str]:
    """`#unknown#`, the training values in order, `#na#` if training has gaps. Each value is one
    level however the file typed it (`0` and `"0"`); numbers, also read as text, come in
    numeric order (`2` before `10`), before other text in alphabetical order."""
    values = pd.Series(train.dropna().unique(), dtype=train.dtype)
    if pd.api.types.is_numeric_dtype(values):
        names = as_levels(values.sort_values()).tolist()
    else:
        names = sorted(set(as_levels(values).tolist()), key=level_order)
    return [UNKNOWN, *names] + ([MISSING] if train.isna().any() else [])


def level_order(level: str) -> tuple[int, float, str]:
    """The sort key of a level: numbers by value first, then text."""
    try:
        return (0, float(level), level)
    except ValueError:
        return (1, 0.0, level)


def encode(col: pd.Series, levels: list[str]) -> np.ndarray:
    """Level indices; unseen values (and gaps unseen in training) map to 0, `#unknown#`."""
    codes = pd.Index(levels).get_indexer(as_levels(col).fillna(MISSING)).astype(np.int64)
    codes[codes < 0] = 0
    return codes


@dataclass
class Table:
    """The processed table, split, on the CPU: what the model, the loop and `dlrun embeddings` need."""

    cat: np.ndarray  # int64 [N, n_cat]
    cont: np.ndarray  # float32 [N, n_cont]
    y: np.ndarray  # int64 class indices or float32 targets
    is_valid: np.ndarray  # bool [N]
    cat_names: list[str]
    cont_names: list[str]
    levels: dict[str, list[str]]
    task: str
    log_y: bool
    classes: list[str] = field(default_factory=list)
    y_name: str = ""
    split: dict[str, dict[str, Any]] = field(default_factory=dict)  # `split_facts`
    prep: TablePrep | None = None  # how new rows are encoded the same way

    def arrays(self) -> dict[str, np.ndarray]:
        """Train and valid arrays: cat_train, cont_train, y_train, cat_valid, cont_valid, y_valid."""
        out = {}
        for split, rows in (("train", ~self.is_valid), ("valid", self.is_valid)):
            out[f"cat_{split}"], out[f"cont_{split}"], out[f"y_{split}"] = (
                self.cat[rows],
                self.cont[rows],
                self.y[rows],
            )
        return out


@dataclass
class TablePrep:
    """How raw rows become model inputs, fitted on the training rows and saved as plain JSON in
    the run directory (`model.json`), so that a trained model can be applied to new rows without
    its training data: the columns by role, each categorical column's levels in code order (date
    parts and `<col>_na` flags included), each number's fill value and normalisation, the target."""

    cat_names: list[str]  # the file's categorical columns
    cont_names: list[str]  # the file's continuous columns
    date_names: list[str]  # the file's date columns
    y_name: str
    task: str  # classification | regression
    classes: list[str]  # classification: the class of each output
    log_y: bool  # regression on log(y)
    y_mean: float | None  # regression: the training target's mean (log scale with log_y)
    fill: dict[str, float]  # number column -> training median (its gaps are filled with it)
    mean: dict[str, float]  # number column -> training mean and std after filling
    std: dict[str, float]
    flagged: list[str]  # number columns with a `<col>_na` flag column
    levels: dict[str, list[str]]  # model category column -> levels in code order
    read: dict[str, Any] = field(default_factory=dict)  # how the file was read: sep, header, names, na_values

    @property
    def model_cats(self) -> list[str]:
        """The model's categorical inputs, in order: file columns, date parts, `_na` flags."""
        return list(self.levels)

    @property
    def model_conts(self) -> list[str]:
        """The model's continuous inputs, in order: file columns, then each date's `_elapsed`."""
        return list(self.fill)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> TablePrep:
        """The preprocessing `to_json` wrote; ValueError when a field is missing or of another type."""
        prep = cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc or k != "read"})
        texts = lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        numbers_of = lambda d: isinstance(d, dict) and all(number(v) for v in d.values())
        ok = (
            all(
                texts(v)
                for v in (prep.cat_names, prep.cont_names, prep.date_names, prep.classes, prep.flagged)
            )
            and isinstance(prep.y_name, str)
            and prep.task in ("classification", "regression")
            and (prep.task == "regression" or len(prep.classes) >= 2)
            and isinstance(prep.log_y, bool)
            and (prep.y_mean is None or number(prep.y_mean))
            and all(numbers_of(d) and set(d) == set(prep.fill) for d in (prep.fill, prep.mean, prep.std))
            and isinstance(prep.levels, dict)
            and all(texts(v) and v[:1] == [UNKNOWN] for v in prep.levels.values())
            and isinstance(prep.read, dict)
        )
        if not ok:
            raise ValueError("a field of the table's preprocessing is missing or of the wrong type")
        return prep

    def features(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(cat codes int64 [N, n_cat], normalised numbers float32 [N, n_cont]) of raw rows: unseen
        levels are `#unknown#`, gaps filled with the training median and flagged."""
        dates = {name: parse_dates(df[name]) for name in self.date_names}
        return self.encode(df, dates)

    def encode(self, df: pd.DataFrame, dates: dict[str, pd.Series]) -> tuple[np.ndarray, np.ndarray]:
        return self.encode_columns(*derived_columns(df, dates, self.cat_names, self.cont_names), len(df))

    def encode_columns(
        self, cats: dict[str, pd.Series], conts: dict[str, pd.Series], n: int
    ) -> tuple[np.ndarray, np.ndarray]:
        cats, cont_cols = dict(cats), []
        for name in self.model_conts:
            col = conts[name]
            if name in self.flagged:
                cats[f"{name}_na"] = col.isna()
            filled = col.fillna(self.fill[name]).to_numpy(dtype=np.float64)
            cont_cols.append((filled - self.mean[name]) / self.std[name])
        codes = [encode(cats[name], levels) for name, levels in self.levels.items()]
        return (
            np.stack(codes, 1) if codes else np.zeros((n, 0), np.int64),
            np.stack(cont_cols, 1).astype(np.float32) if cont_cols else np.zeros((n, 0), np.float32),
        )

    def target(self, y_raw: pd.Series) -> np.ndarray:
        """The target as the model is trained on it: class indices (-1 for a class the run never
        saw) or float32 values (their log with `log_y`, where a value that is not positive is
        an error naming its row)."""
        if self.task == "classification":
            return pd.Index(self.classes).get_indexer(as_levels(y_raw)).astype(np.int64)
        y = numbers(y_raw, "data.y_name").to_numpy()
        if self.log_y:
            if (y <= 0).any():
                row = int(np.flatnonzero(y <= 0)[0])
                raise DlrunError(
                    f"data.log_y=true needs a positive target, but {self.y_name!r} is {y[row]:g} in data "
                    f"row {row + 1}: drop such rows or set data.log_y=false"
                )
            y = np.log(y)
        return y.astype(np.float32)


def derived_columns(
    df: pd.DataFrame, dates: dict[str, pd.Series], cat_names: list[str], cont_names: list[str]
) -> tuple[dict[str, pd.Series], dict[str, pd.Series]]:
    """The categorical and number columns before encoding: the file's, then each date's parts
    (categories) and elapsed seconds (a number)."""
    cats: dict[str, pd.Series] = {name: df[name] for name in cat_names}
    conts: dict[str, pd.Series] = {name: numbers(df[name], "data.cont_names") for name in cont_names}
    for name, d in dates.items():
        parts, elapsed = date_parts(d, name)
        cats.update(parts)
        conts.update(elapsed)
    return cats, conts


def fit_prep(
    cats: dict[str, pd.Series], conts: dict[str, pd.Series], dcfg: Any, train: np.ndarray
) -> TablePrep:
    """Fit the preprocessing of `derived_columns` on the training rows (a `<col>_na` flag exists
    when the column has gaps anywhere in the table)."""
    cats = dict(cats)
    fill, mean, std, flagged = {}, {}, {}, []
    for name, col in conts.items():
        gaps = col.isna()
        median = col[train].median()
        fill[name] = 0.0 if pd.isna(median) else float(median)
        filled = col.fillna(fill[name]).to_numpy(dtype=np.float64)
        if gaps.any():
            cats[f"{name}_na"] = gaps
            flagged.append(name)
        m, s = filled[train].mean(), filled[train].std()
        mean[name], std[name] = float(m), float(s) if s > 0 else 1.0

    levels = {}
    n_train = int(train.sum())
    for name, col in cats.items():
        levels[name] = fit_levels(col[train])
        if n_train > 1 and col[train].nunique() >= n_train:
            log.warning(
                f"categorical column {name!r} has a different value in every training row "
                f"({n_train}): an embedding cannot learn from it; it looks like an id (drop it) "
                f"or a number (move it to data.cont_names)"
            )
    read = {
        "sep": str(dcfg.get("sep", ",")),
        "header": bool(dcfg.get("header", True)),
        "names": _names(dcfg, "names") or None,
        "na_values": [str(v) for v in dcfg.get("na_values") or []],
    }
    return TablePrep(
        cat_names=_names(dcfg, "cat_names"), cont_names=_names(dcfg, "cont_names"),
        date_names=_names(dcfg, "date_names"), y_name=str(dcfg.y_name), task="", classes=[],
        log_y=bool(dcfg.get("log_y")), y_mean=None, fill=fill, mean=mean, std=std, flagged=flagged,
        levels=levels, read=read,
    )  # fmt: skip


def process(df: pd.DataFrame, dcfg: Any) -> Table:
    """Check, split and encode a raw table into a `Table` (statistics from training rows only)."""
    check_columns([str(c) for c in df.columns], dcfg)
    y_name = str(dcfg.y_name)
    dates = {name: parse_dates(df[name]) for name in _names(dcfg, "date_names")}
    is_valid = split_mask(df, dcfg, dates)
    train = ~is_valid
    if not train.any() or not is_valid.any():
        raise DlrunError(
            f"the split leaves {int(train.sum())} training and {int(is_valid.sum())} validation rows: "
            f"change data.valid_pct, data.valid_last or data.valid_by"
        )
    by = dcfg.get("valid_by")
    split = split_facts(is_valid, dates.get(str(by)) if by is not None else None)
    cats, conts = derived_columns(df, dates, _names(dcfg, "cat_names"), _names(dcfg, "cont_names"))
    prep = fit_prep(cats, conts, dcfg, train)
    cat, cont = prep.encode_columns(cats, conts, len(df))

    y_raw = df[y_name]
    if y_raw.isna().any():
        rows = np.flatnonzero(y_raw.isna().to_numpy())
        raise DlrunError(
            f"the target data.y_name={y_name!r} is missing in {len(rows)} rows "
            f"(first: data row {rows[0] + 1}): drop those rows from the file or fill them in"
        )
    prep.task = resolve_task(y_raw, dcfg)
    if prep.task == "classification":
        # Classes from all rows: a class seen only in validation still gets an output.
        prep.classes = fit_levels(y_raw)[1:]
        if len(prep.classes) < 2:  # every prediction would be right: accuracy 1.0 means nothing
            raise DlrunError(
                f"the target data.y_name={y_name!r} has one class ({prep.classes[0]!r}) in all {len(df)} "
                "rows: a classifier needs at least two; check data.y_name "
                "(or data.task=regression for a number)"
            )
    y = prep.target(y_raw)
    if prep.task == "regression":
        prep.y_mean = float(y[train].mean())

    return Table(
        cat=cat, cont=cont, y=y, is_valid=is_valid, cat_names=prep.model_cats, cont_names=prep.model_conts,
        levels=prep.levels, task=prep.task, log_y=prep.log_y, classes=prep.classes, y_name=y_name,
        split=split, prep=prep,
    )  # fmt: skip


def load_table(dcfg: Any) -> Table:
    """Read and process the table a data config describes."""
    return process(read_table(dcfg), dcfg)


def valid_frame(dcfg: Any) -> pd.DataFrame:
    """The validation rows as the file holds them (the columns the config names), in the order the
    validation batches hold them; the index is the row's position among the file's data rows."""
    df = read_table(dcfg)
    dates = {name: parse_dates(df[name]) for name in _names(dcfg, "date_names")}
    return df[split_mask(df, dcfg, dates)]


# --- loss, metrics, build ----------------------------------------------------


def mse_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of a one-output regression head against the (log) target."""
    return F.mse_loss(out.squeeze(-1).float(), y)


class Metrics:
    """Regression metrics on the original scale (exp of the prediction with `data.log_y`):
    rmse, mae, and rmspe (root mean squared percentage error, Rossmann's metric) when every
    validation target is positive. rmspe picks the best epoch with a log target, rmse otherwise."""

    def __init__(self, log_y: bool, percent: bool):
        self.log_y, self.percent = log_y, percent
        self.monitor, self.mode = ("rmspe" if log_y else "rmse"), "min"
        self.sq: Any = 0.0
        self.abs: Any = 0.0
        self.pct: Any = 0.0
        self.n = 0

    def update(self, out: Any, y: Any) -> None:
        pred, targ = out.detach().squeeze(-1).float(), y.float()
        if self.log_y:
            pred, targ = pred.exp(), targ.exp()
        err = pred - targ
        self.sq = self.sq + err.square().sum()
        self.abs = self.abs + err.abs().sum()
        if self.percent:
            self.pct = self.pct + (err / targ).square().sum()
        self.n += y.numel()

    def compute(self, valid_loss: float) -> dict[str, float]:
        n = max(self.n, 1)
        out = {"rmse": (float(self.sq) / n) ** 0.5, "mae": float(self.abs) / n}
        if self.percent:
            out["rmspe"] = (float(self.pct) / n) ** 0.5
        return out


@dataclass(frozen=True)
class TableFacts(Facts):
    """A table's columns as the tabular net sees them."""

    task: str  # classification | regression
    cat_names: tuple[str, ...]
    levels: dict[str, list[str]]  # each categorical column's levels, in code order
    cont_names: tuple[str, ...]
    classes: tuple[str, ...]  # classification: the class of each output
    log_y: bool  # regression on log(y)
    y_mean: float | None  # regression: the training target's mean (where the head starts)

    @property
    def n_levels(self) -> list[int]:
        return [len(self.levels[name]) for name in self.cat_names]


def table_facts(table: Table) -> TableFacts:
    """The facts a model is built from, from the processed table."""
    return prep_facts(table.prep)


def facts_from(inputs: dict[str, Any]) -> TableFacts:
    """The facts of a saved table model, from its `Data.inputs` (model.json)."""
    return prep_facts(saved_prep(inputs))


def saved_prep(inputs: dict[str, Any]) -> TablePrep:
    """The `TablePrep` in a saved model's `Data.inputs`."""
    fields = {f for f in TablePrep.__dataclass_fields__}
    return TablePrep.from_json({k: v for k, v in inputs.items() if k in fields})


def prep_facts(prep: TablePrep) -> TableFacts:
    """The facts a model is built from, from the saved preprocessing alone."""
    regression = prep.task == "regression"
    return TableFacts(
        n_out=1 if regression else len(prep.classes),
        task=prep.task,
        cat_names=tuple(prep.model_cats),
        levels=prep.levels,
        cont_names=tuple(prep.model_conts),
        classes=tuple(prep.classes),
        log_y=prep.log_y,
        y_mean=prep.y_mean,
    )


def loss_and_metrics(table: Table) -> tuple[Callable[[Any, Any], torch.Tensor], Callable[[], Any]]:
    """The loss and metrics of the table's validation rows (`scoring`)."""
    return scoring(table.task, table.log_y, table.y[table.is_valid])


def scoring(
    task: str, log_y: bool, y: np.ndarray
) -> tuple[Callable[[Any, Any], torch.Tensor], Callable[[], Any]]:
    """Cross-entropy and accuracy for classes; MSE and rmse/mae (rmspe when every target of `y`,
    the rows to be scored as the model sees them, is positive) for regression."""
    if task == "classification":
        return classification_loss, Accuracy
    percent = bool(((np.exp(y) if log_y else y) > 0).all())
    return mse_loss, lambda: Metrics(log_y, percent)


def build(cfg: Any, device: torch.device) -> Data:
    """The `Data` for a tabular data config: whole tensors on `device`, x = (cat, cont)."""
    table = load_table(cfg.data)
    a = table.arrays()

    def tensors(split: str) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        x = (torch.from_numpy(a[f"cat_{split}"]).to(device), torch.from_numpy(a[f"cont_{split}"]).to(device))
        return x, torch.from_numpy(a[f"y_{split}"]).to(device)

    bs = int(cfg.data.bs)
    # drop_last: a last batch of one row would break BatchNorm in training.
    train = TensorBatches(
        *tensors("train"), bs, shuffle=True, seed=int(cfg.get("seed", 0)), drop_last=True, split="train"
    )
    valid = TensorBatches(*tensors("valid"), bs, shuffle=False, split="valid")

    loss, metrics = loss_and_metrics(table)
    return Data(
        train=train,
        valid=valid,
        loss=loss,
        metrics=metrics,
        facts=table_facts(table),
        unit="rows",
        mixup="embeddings",
        split=table.split,
        inputs={"family": "table", "bs": bs, **table.prep.to_json()},
    )
