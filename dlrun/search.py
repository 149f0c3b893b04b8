"""Optuna search for `dlrun train -m hydra/sweeper=optuna`: the search space read with Hydra's
own override grammar, the study, and what a finished job tells it. The Hydra plugin
(hydra_plugins/dlrun_optuna_sweeper) runs the ask / launch / tell loop with these; the CLI
calls `check` before anything runs, so a bad expression is a user error, not a failed sweep.

Optuna is imported inside functions: it is an extra (`pip install 'dlrun[optuna]'`)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlrun import report, rundir, runs
from dlrun.errors import DlrunError, first_line

SAMPLERS = ("tpe", "random")
DIRECTIONS = ("minimize", "maximize")
STUDY_FILE = "optuna.db"  # in the sweep directory, unless hydra.sweeper.storage names another
INSTALL = "pip install 'dlrun[optuna]' (or pip install 'optuna>=4')"
# Job statuses that end a trial: a completed job gives a value; a diverged or failed one is a
# failed trial (what those settings do is known). A job with no summary.json, or one stopped by
# Ctrl-C, was cut short: its parameters are tried again.
ENDED = ("completed", "diverged", "failed")
TAGS = {"log": "a log scale", "int": "integers"}


def require_optuna() -> Any:
    """The optuna module, or a user error saying how to install it."""
    try:
        import optuna
    except ImportError as e:
        raise DlrunError(f"hydra/sweeper=optuna needs Optuna >= 4 ({first_line(e)}): {INSTALL}") from None
    if int(optuna.__version__.split(".")[0]) < 4:
        raise DlrunError(f"hydra/sweeper=optuna needs Optuna >= 4, this is {optuna.__version__}: {INSTALL}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # dlrun prints each job's end itself
    return optuna


@dataclass
class Space:
    """What the search varies (parameter -> Optuna distribution) and the overrides every trial gets."""

    distributions: dict[str, Any] = field(default_factory=dict)
    fixed: list[str] = field(default_factory=list)


def parse_space(params: Mapping[str, Any] | None, arguments: list[str] = ()) -> Space:  # type: ignore[assignment]
    """`hydra.sweeper.params` then the command line's overrides (a later one wins), read with
    Hydra's parser: `interval(a,b)`, `tag(log, interval(a,b))`, `tag(int, interval(a,b))`,
    `range(a,b[,step])`, `choice(a,b)` or `a,b` are searched; a plain value is fixed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    optuna = require_optuna()
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception as e:  # noqa: BLE001 - Hydra's parse error says where the expression breaks
        raise DlrunError(f"cannot read the search space: {first_line(e)}") from None
    distributions: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for o in overrides:
        key = o.get_key_element()
        distributions.pop(key, None)
        fixed.pop(key, None)
        if o.is_sweep_override():
            distributions[key] = distribution(optuna, key, o)
        else:
            fixed[key] = f"{key}={o.get_value_element_as_str()}"
    return Space(distributions, list(fixed.values()))


def distribution(optuna: Any, key: str, override: Any) -> Any:
    """One swept override as an Optuna distribution."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    d = optuna.distributions
    sweep = override.value()
    text = override.input_line
    if not isinstance(sweep, (ChoiceSweep, IntervalSweep, RangeSweep)):  # glob(...)
        raise DlrunError(f"cannot search {text}: a search takes interval(...), range(...) or choice(...)")
    unknown = sorted(set(sweep.tags) - set(TAGS))
    if unknown:
        raise DlrunError(
            f"{text}: unknown tag {unknown[0]!r}: use "
            + ", ".join(f"tag({t}, ...) for {what}" for t, what in TAGS.items())
        )
    log = "log" in sweep.tags
    try:
        if isinstance(sweep, IntervalSweep):
            if "int" in sweep.tags:
                return d.IntDistribution(math.ceil(sweep.start), math.floor(sweep.end), log=log)
            return d.FloatDistribution(sweep.start, sweep.end, log=log)
        if isinstance(sweep, RangeSweep):
            values = list(sweep.range())
            if not values:
                raise ValueError("the range is empty")
            low, high, step = min(values), max(values), abs(sweep.step)
            if all(isinstance(v, int) for v in values):
                return d.IntDistribution(low, high, step=step, log=log)
            return d.FloatDistribution(low, high, step=None if log else step, log=log)
        if log or "int" in sweep.tags:
            raise ValueError("tag(log, ...) and tag(int, ...) apply to interval(...) and range(...)")
        bad = [c for c in sweep.list if not (c is None or isinstance(c, (bool, int, float, str)))]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a single value")
        return d.CategoricalDistribution(sweep.list)
    except ValueError as e:
        raise DlrunError(f"cannot search {text}: {first_line(e)}") from None


def overrides_of(params: Mapping[str, Any]) -> list[str]:
    """A trial's parameters as the overrides of its job."""
    from dlrun.overrides import hydra_quote

    def value(v: Any) -> str:
        if v is None:
            return "null"
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float):
            # Six significant digits: the job's overrides, the sweep table and the tests read
            # alike, at a relative difference (< 1e-6) no search can tell apart.
            return f"{v:.6g}"
        return hydra_quote(v) if isinstance(v, str) else repr(v)

    return [f"{k}={value(v)}" for k, v in params.items()]


def representative(space: Space) -> list[str]:
    """One job of the space (each parameter at its first choice or lowest value), for checking
    the keys and values before anything runs."""
    first = {k: (d.choices[0] if hasattr(d, "choices") else d.low) for k, d in space.distributions.items()}
    return space.fixed + overrides_of(first)


def sampler(name: str, seed: int | None) -> Any:
    """The Optuna sampler `hydra.sweeper.sampler` names."""
    optuna = require_optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise DlrunError(f"hydra.sweeper.sampler={name} is not a sampler: use one of {', '.join(SAMPLERS)}")


def check(settings: Any, arguments: list[str]) -> list[str]:
    """Check the sweeper's settings and search space as a user error before anything runs.
    Returns one job's overrides (see `representative`) for the CLI's key and value checks."""
    require_optuna()
    sampler(str(settings.sampler), None)
    if settings.direction is not None and settings.direction not in DIRECTIONS:
        raise DlrunError(
            f"hydra.sweeper.direction={settings.direction} is not a direction: use "
            f"{' or '.join(DIRECTIONS)}, or null to take it from the monitored metric"
        )
    for key in ("n_trials", "n_jobs"):
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DlrunError(f"hydra.sweeper.{key}={value} must be a whole number >= 1")
    space = parse_space(settings.params, arguments)
    if not space.distributions:
        raise DlrunError(
            "the Optuna search has nothing to search: give parameters as key=interval(a,b), "
            "key=choice(a,b) or key=a,b, or a named space (+sweep=dropout_wd)"
        )
    return representative(space)


def storage_url(settings: Any, root: Path) -> str:
    """Where the study lives: `hydra.sweeper.storage`, or SQLite in the sweep directory."""
    return settings.storage or f"sqlite:///{(root / STUDY_FILE).resolve()}"


def direction_of(mode: str) -> str:
    return "maximize" if mode == "max" else "minimize"


@dataclass
class JobEnd:
    """How a trial's job ended, from its summary.json."""

    status: str
    value: float | None = None
    monitor: str = "valid_loss"
    mode: str = "min"
    message: str = ""


def job_end(job: Path) -> JobEnd:
    """The status and monitored value of the job in `job` ("unknown" when it left no summary)."""
    path = job / rundir.SUMMARY
    s = runs.read_summary(path) if path.is_file() else None
    if s is None:
        return JobEnd("unknown" if not path.is_file() else "unreadable")
    monitor, mode = runs.monitor_of(s)
    value = (s.get("best") or {}).get(monitor)
    return JobEnd(s["status"], value, monitor, mode, s.get("message") or "")


def outcome(study: Any, end: JobEnd) -> tuple[float | None, Any, dict[str, str]]:
    """What a job tells the study: (value, state, user attributes). A completed job gives its
    monitored value; anything else is a failed trial whose attributes say why (diverged and
    failed trials count towards n_trials)."""
    optuna = require_optuna()
    wanted = "max" if study.direction == optuna.study.StudyDirection.MAXIMIZE else "min"
    if end.status == "completed" and end.mode != wanted:
        end = JobEnd("failed", None, end.monitor, end.mode, f"it monitors {end.monitor} ({end.mode})")
    if end.status == "completed" and end.value is not None and math.isfinite(end.value):
        return end.value, optuna.trial.TrialState.COMPLETE, {}
    attrs = {"status": end.status if end.status != "completed" else "failed"}
    return None, optuna.trial.TrialState.FAIL, attrs | ({"message": end.message} if end.message else {})


def tell(study: Any, trial: Any, end: JobEnd) -> None:
    """Tell the study how `trial` (a Trial, or a trial number; see the sweeper's settle) ended."""
    value, state, attrs = outcome(study, end)
    if not isinstance(trial, int):  # a trial told by number has no attributes to set
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna warns about each failed trial; dlrun lists them
        study.tell(trial, value, state=state)


def add(study: Any, trial: Any, end: JobEnd) -> None:
    """Record in `study` a finished trial that was asked from another (in-memory) study."""
    optuna = require_optuna()
    value, state, attrs = outcome(study, end)
    study.add_trial(
        optuna.trial.create_trial(
            params=trial.params,
            distributions=trial.distributions,
            value=value,
            state=state,
            user_attrs=trial.user_attrs | attrs,
        )
    )


def finished(study: Any) -> int:
    """Trials that count towards n_trials: completed ones and those whose job ended badly, not
    those cut short by a kill (they are tried again)."""
    from optuna.trial import TrialState

    return sum(
        t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "status" in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )


def write_plots(study: Any, root: Path) -> None:
    """Optuna's optimization history and parameter importances as png in the sweep directory.
    Importances need two completed trials and a parameter that varied among them."""
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as plots

    report.pyplot()  # the file backend, before Optuna's plots import pyplot
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    wanted = [("optuna_history.png", plots.plot_optimization_history)]
    if len(done) >= 2:
        wanted.append(("optuna_importance.png", plots.plot_param_importances))
    target = study.user_attrs.get("monitor", "value")
    for name, plot in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the matplotlib plots are "experimental"
                ax = plot(study, target_name=target)
            ax = ax.flat[0] if hasattr(ax, "flat") else ax
            ax.legend(loc="best")  # Optuna puts it outside the axes, where the file cuts it off
            report.save_figure(ax.figure, root / name)
        except Exception as e:  # noqa: BLE001 - a plot must never cost the sweep its summary
            report.err_console.print(f"warning: no {name} ({first_line(e)})", markup=False)
