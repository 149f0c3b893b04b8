"""Searches and cluster sweeps: named search spaces (configs/sweep/), the Optuna sweeper
(hydra/sweeper=optuna: its grammar, its direction, its study that resumes), submitit launchers."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DLRUN, QUICK, REPO, assert_user_error, dlrun

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = [*QUICK, "trainer.epochs=1", "trainer.limit_batches=3"]


def hydra_config(*overrides: str):
    """The composed config with its hydra node, as a sweep's sweeper sees it."""
    from hydra import compose, initialize_config_dir

    from dlrun.config import configs_dir

    with initialize_config_dir(str(configs_dir()), version_base="1.3", job_name="test"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


# --- named search spaces -------------------------------------------------------------


@pytest.mark.parametrize(
    "space, family, jobs",
    [("dropout_wd", [], 12), ("lr_wd", [], 16), ("bptt_dropout", ["model=rnn"], 9)],
)
def test_a_named_space_sets_the_sweepers_params_and_the_basic_sweeper_makes_its_grid(space, family, jobs):
    from conftest import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dlrun.cli import flat_keys

    params = hydra_config(*family, f"+sweep={space}").hydra.sweeper.params
    assert len(params) == 2
    keys = flat_keys(compose(*family, f"+sweep={space}"))
    assert all(k in keys for k in params), (list(params), space)  # every key is one dlrun reads
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (grid,) = BasicSweeper.split_arguments(overrides, None)
    assert len(grid) == jobs


def test_a_named_space_works_with_the_optuna_sweeper_too():
    from optuna.distributions import CategoricalDistribution

    from dlrun import search

    cfg = hydra_config("+sweep=dropout_wd", "hydra/sweeper=optuna")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    space = search.parse_space(cfg.hydra.sweeper.params)
    assert space.distributions == {
        "regularization.dropout": CategoricalDistribution([0, 0.25, 0.5]),
        "regularization.wd": CategoricalDistribution([0, 1e-4, 1e-3, 1e-2]),
    }


def test_cfg_hydra_shows_a_named_spaces_params():
    proc = dlrun("train", "+sweep=dropout_wd", "--cfg", "hydra")
    assert proc.returncode == 0, proc.stderr
    assert "regularization.dropout: 0,0.25,0.5" in proc.stdout
    assert "regularization.wd: 0,1e-4,1e-3,1e-2" in proc.stdout


def test_an_unknown_named_space_is_a_user_error(tmp_path):
    proc = dlrun("train", "-m", f"hydra.sweep.dir={tmp_path}", "+sweep=dropout_wdd")
    assert_user_error(proc, "sweep=dropout_wdd is not a sweep config", "did you mean sweep=dropout_wd")


# --- the search-space grammar, read by Hydra's parser ----------------------------------


def test_hydras_sweep_expressions_become_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from dlrun import search

    space = search.parse_space(
        {
            "optimizer.lr": "tag(log, interval(1e-4, 1e-1))",
            "regularization.dropout": "interval(0, 0.5)",
            "data.bs": "tag(int, interval(16, 128))",
            "model.layers": "range(1, 5)",
            "regularization.wd": "range(0.0, 0.3, 0.1)",
            "optimizer": "choice(adam, sgd)",
            "schedule": "onecycle,cosine,constant",
            "seed": "3",
        }
    )
    d = space.distributions
    assert d["optimizer.lr"] == FloatDistribution(1e-4, 1e-1, log=True)
    assert d["regularization.dropout"] == FloatDistribution(0.0, 0.5)
    assert d["data.bs"] == IntDistribution(16, 128)
    assert d["model.layers"] == IntDistribution(1, 4)  # range's end is excluded, as in Python
    assert d["regularization.wd"].low == 0.0 and d["regularization.wd"].step == pytest.approx(0.1)
    assert d["optimizer"] == CategoricalDistribution(["adam", "sgd"])
    assert d["schedule"] == CategoricalDistribution(["onecycle", "cosine", "constant"])
    assert space.fixed == ["seed=3"]


def test_the_command_line_overrides_a_params_entry():
    from optuna.distributions import FloatDistribution

    from dlrun import search

    space = search.parse_space(
        {"regularization.wd": "0,1e-4", "regularization.dropout": "0,0.5"},
        ["regularization.wd=tag(log, interval(1e-6, 1e-1))", "regularization.dropout=0.1", "+x=1"],
    )
    assert space.distributions == {"regularization.wd": FloatDistribution(1e-6, 1e-1, log=True)}
    assert space.fixed == ["regularization.dropout=0.1", "+x=1"]


def test_a_trials_parameters_read_back_as_the_same_overrides():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dlrun import search

    params = {"optimizer.lr": 3.2e-05, "data.bs": 64, "optimizer": "adam", "x": "a b, c", "y": None}
    params["z"] = True
    lines = search.overrides_of(params)
    parsed = OverridesParser.create().parse_overrides(lines)
    assert {o.key_or_group: o.value() for o in parsed} == params


@pytest.mark.parametrize(
    "expression, fragment",
    [
        ("interval(1e-1, 1e-4)", "cannot search regularization.wd=interval(1e-1, 1e-4)"),
        ("tag(log, interval(0, 1e-1))", "cannot search"),
        ("tag(lg, interval(1e-4, 1e-1))", "unknown tag 'lg'"),
        ("interval(1e-4", "cannot read the search space"),
        ("range(5, 1)", "the range is empty"),
        ("glob(*)", "takes interval(...), range(...) or choice(...)"),
    ],
)
def test_a_bad_expression_is_a_user_error(expression, fragment):
    from dlrun import search
    from dlrun.errors import DlrunError

    with pytest.raises(DlrunError, match=None) as e:
        search.parse_space({"regularization.wd": expression})
    assert fragment in str(e.value)


# --- the direction: from the metric the jobs monitor -----------------------------------


def test_the_direction_follows_the_monitored_metric(tmp_path):
    from dlrun import search

    def job(name: str, summary: dict) -> Path:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
        return tmp_path / name

    accuracy = search.job_end(
        job("a", {"status": "completed", "monitor": "accuracy", "mode": "max", "best": {"accuracy": 0.9}})
    )
    assert (accuracy.value, search.direction_of(accuracy.mode)) == (0.9, "maximize")
    perplexity = search.job_end(
        job("p", {"status": "completed", "monitor": "perplexity", "mode": "min", "best": {"perplexity": 9.0}})
    )
    assert (perplexity.value, search.direction_of(perplexity.mode)) == (9.0, "minimize")
    unknown = search.job_end(job("u", {"status": "completed", "best": {"valid_loss": 0.5}}))
    assert (unknown.monitor, unknown.value) == ("valid_loss", 0.5)
    assert search.direction_of(unknown.mode) == "minimize"
    diverged = search.job_end(job("d", {"status": "diverged", "message": "nan", "best": {}}))
    assert (diverged.status, diverged.value) == ("diverged", None)
    assert search.job_end(tmp_path / "never-ran").status == "unknown"


def test_a_job_that_does_not_complete_is_a_failed_trial_that_counts():
    import optuna

    from dlrun import search

    study = optuna.create_study(direction="maximize")
    good, bad, other = (study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(3))
    search.tell(study, good, search.JobEnd("completed", 0.8, "accuracy", "max"))
    search.tell(study, bad, search.JobEnd("diverged", None, "accuracy", "max", "the loss became nan"))
    search.tell(study, other, search.JobEnd("completed", 2.0, "valid_loss", "min"))  # the wrong way round
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "FAIL"]
    assert study.trials[1].user_attrs == {"status": "diverged", "message": "the loss became nan"}
    assert search.finished(study) == 3


# --- user errors, before any job runs -------------------------------------------------


def search_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "hydra/sweeper=optuna", *FAST, *extra]


def test_an_unknown_sampler_is_a_user_error(tmp_path):
    proc = dlrun(*search_args(tmp_path, "hydra.sweeper.sampler=cmaes", "regularization.dropout=0,0.5"))
    assert_user_error(proc, "hydra.sweeper.sampler=cmaes is not a sampler", "tpe, random")


def test_a_bad_expression_on_the_command_line_is_a_user_error(tmp_path):
    proc = dlrun(*search_args(tmp_path, "regularization.wd=tag(log, interval(0, 0.1))"))
    assert_user_error(proc, "cannot search regularization.wd=tag(log, interval(0, 0.1))")


def test_a_misspelt_key_in_the_search_is_a_user_error(tmp_path):
    proc = dlrun(*search_args(tmp_path, "regularization.dropuot=interval(0,0.5)"))
    assert_user_error(proc, "regularization.dropuot is not a config key", "regularization.dropout")


def test_a_search_without_parameters_is_a_user_error(tmp_path):
    proc = dlrun(*search_args(tmp_path))
    assert_user_error(proc, "nothing to search", "+sweep=dropout_wd")


def hide(tmp_path: Path, module: str) -> dict:
    """An environment in which `import module` fails, as if the extra were not installed."""
    shadow = tmp_path / "shadow" / module.replace(".", "/")
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"raise ImportError('No module named {module}')\n")
    return {"PYTHONPATH": str(tmp_path / "shadow")}


def test_the_optuna_sweeper_without_optuna_names_the_pip_command(tmp_path):
    proc = dlrun(*search_args(tmp_path, "+sweep=dropout_wd"), env=hide(tmp_path, "optuna"))
    assert_user_error(proc, "hydra/sweeper=optuna needs the optuna extra", "pip install 'dlrun[optuna]'")


def test_a_submitit_launcher_without_submitit_names_the_pip_command(tmp_path):
    proc = dlrun(
        "train", "-m", "hydra/launcher=submitit_slurm", "seed=0,1", f"hydra.sweep.dir={tmp_path}/s",
        env=hide(tmp_path, "submitit"),
    )  # fmt: skip
    assert_user_error(proc, "submitit_slurm needs the slurm extra", "pip install 'dlrun[slurm]'")


def test_the_slurm_launchers_settings_compose():
    cfg = hydra_config(
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.timeout_min=120",
    )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 4)


@pytest.mark.parametrize("tasks", [1, 2])
def test_a_submitit_job_of_several_tasks_is_one_ddp_run_with_a_rank_per_task(tasks, monkeypatch):
    from dlrun.cli import join_submitit_ranks

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        # set, then deleted: monkeypatch records the name, so what the export below sets is
        # removed after the test (a WORLD_SIZE left behind makes every later dlrun a DDP rank)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # What submitit's local executor sets in the second task of a job (SLURM's job is alike).
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    for key, value in {"JOB_ID": "4242", "NTASKS": tasks, "JOB_NUM_NODES": 1, "NODEID": 0}.items():
        monkeypatch.setenv(f"SUBMITIT_LOCAL_{key}", str(value))
    monkeypatch.setenv("SUBMITIT_LOCAL_GLOBALID", str(tasks - 1))
    monkeypatch.setenv("SUBMITIT_LOCAL_LOCALID", str(tasks - 1))
    join_submitit_ranks()
    if tasks == 1:
        assert "RANK" not in os.environ  # one task: a run of one process, as before
    else:
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
        assert os.environ["MASTER_ADDR"] and int(os.environ["MASTER_PORT"]) > 0


def test_the_optuna_sweeper_is_for_training_runs(tmp_path):
    proc = dlrun("lr-find", "-m", f"hydra.sweep.dir={tmp_path}", "hydra/sweeper=optuna", "+sweep=dropout_wd")
    assert_user_error(proc, "use it with dlrun train")


# --- a search that runs -----------------------------------------------------------------


def test_an_optuna_search_records_diverged_trials_and_exits_1(tmp_path):
    proc = dlrun(
        *search_args(tmp_path, "optimizer=sgd", "schedule=constant", "optimizer.lr=1e12"),
        "hydra.sweeper.n_trials=1",
        "regularization.dropout=interval(0,0.5)",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the trial diverged: the search ends all the same
    import optuna

    study = optuna.load_study(study_name="dlrun", storage=f"sqlite:///{tmp_path / 'sweep' / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["FAIL"]  # counted: the search stopped at n_trials
    assert study.trials[0].user_attrs["status"] == "diverged"
    assert "sweep of 1 jobs" in out and "1 of 1 jobs did not complete" in out and "diverged" in out
    with open(tmp_path / "sweep" / "summary.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["diverged"]


# --- slow: cluster launchers and a search that is killed and resumed -----------------


@pytest.mark.slow
def test_a_submitit_local_sweep_ends_with_the_table_and_exit_status(tmp_path):
    proc = dlrun(
        "train", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={tmp_path}", *FAST,
        "optimizer=sgd", "schedule=constant", "optimizer.lr=0.05,1e12",
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the second job diverged
    assert "sweep of 2 jobs" in out and "1 of 2 jobs did not complete" in out and "diverged" in out
    with open(tmp_path / "summary.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed", "diverged"]
    assert (tmp_path / ".submitit").is_dir()  # the jobs ran through submitit


@pytest.mark.slow
def test_an_optuna_search_killed_after_3_trials_resumes_to_6(tmp_path):
    sweep = tmp_path / "sweep"
    args = [
        *search_args(tmp_path, "trainer.limit_batches=5"),
        "hydra.sweeper.n_trials=6",
        "hydra.sweeper.sampler=random",
        "hydra.sweeper.seed=0",
        "regularization.dropout=interval(0,0.5)",
        "optimizer.lr=tag(log, interval(1e-3, 3e-2))",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [DLRUN, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip

    def running() -> bool:
        """3 trials have ended and the next one's job has started (its config is written)."""
        started = {p.parent.parent.name for p in sweep.glob("*/.hydra/config.yaml")}
        ended = {p.parent.name for p in sweep.glob("*/summary.json")}
        return len(ended) >= 3 and bool(started - ended)

    deadline = time.time() + 300
    while not running() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/summary.json")}
    assert 3 <= len(done) < 6, done
    cut = [j.name for j in sweep.iterdir() if j.name.isdigit() and j.name not in done]
    assert cut, "the search was killed between two trials"

    proc = dlrun(*args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "continuing study 'dlrun'" in out and "sweep of 6 jobs" in out
    # The trials that had ended were not run again.
    assert all((sweep / job / "summary.json").stat().st_mtime_ns == t for job, t in done.items())
    import optuna

    study = optuna.load_study(study_name="dlrun", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert study.direction.name == "MAXIMIZE"  # digits monitors accuracy
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6 and not [t for t in study.trials if t.state.name == "RUNNING"]
    killed = [t for t in study.trials if t.state.name == "FAIL"]
    assert all("status" not in t.user_attrs for t in killed)  # cut short: not counted, tried again
    # The job that was running when the search was killed ran again, in its directory.
    assert "cut-short trial(s) again" in out and killed, out
    assert {str(t.user_attrs["job"]) for t in killed} >= set(cut)
    again_params = {str(t.user_attrs["job"]): t.params for t in complete}
    assert all(again_params[str(t.user_attrs["job"])] == t.params for t in killed)
    assert sorted(t.user_attrs["job"] for t in complete) == list(range(6))
    # A seeded sampler that continues a study does not ask for the first trials' values again.
    assert len({tuple(t.params.values()) for t in complete}) == 6
    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"completed"}
    accuracies = [float(r["accuracy"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)  # best first
    assert (sweep / "optuna_history.png").is_file() and (sweep / "optuna_importance.png").is_file()
    again = dlrun("runs", str(sweep))
    assert again.returncode == 0 and "6 runs" in again.stdout


def test_a_damaged_study_file_is_a_user_error_that_keeps_the_file(tmp_path):
    """A sweep directory whose optuna.db is not a database (a truncated copy, another file):
    one line with the way out, exit 2, and the file left as it was."""
    root = tmp_path / "swé ep"
    root.mkdir()
    (root / "optuna.db").write_text("not a database")
    proc = dlrun(
        "train", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
        "optimizer.lr=tag(log, interval(1e-3, 1e-2))", *FAST, f"hydra.sweep.dir={root}",
    )  # fmt: skip
    assert_user_error(proc, "cannot open the Optuna storage", "move a damaged study file away")
    assert (root / "optuna.db").read_text() == "not a database"
