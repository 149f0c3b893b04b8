"""Experiment tracking: `logger=[csv,tensorboard,mlflow]` writes what TensorBoard and MLflow read
back, a sweep is one parent MLflow run, a resumed run stays one run, a dead tracking server
does not stop training; `dlrun runs --plot/--csv`. Each store lives under the test's tmp_path."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from conftest import QUICK, assert_user_error, compose, dlrun, metrics_rows, summary, train

pytestmark = pytest.mark.usefixtures("one_thread")

# 5 batches an epoch, the loss read back every 2: steps 2, 4, 5 of each epoch.
TINY = ("trainer.epochs=2", "trainer.limit_batches=5", "trainer.log_every=2", "seed=3")
STEPS = [2, 4, 5, 7, 9, 10]  # batches seen at each train-loss point
EPOCH_ENDS = [5, 10]


@pytest.fixture(scope="module")
def mlstore(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One MLflow SQLite store for the module (never the repository's outputs/), created here once:
    setting up a new store's tables takes seconds. Each test logs to an experiment of its own."""
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder


def store(folder: Path, experiment: str) -> tuple[str, str]:
    """The overrides that log to `experiment` in the store in `folder`."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return f"logger.mlflow.tracking_uri={uri}", f"logger.mlflow.experiment={experiment}"


def runs_of(folder: Path, experiment: str) -> tuple[object, list]:
    """(client, the runs of `experiment`) in the store in `folder`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id]) if found else []


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory, mlstore: Path) -> Path:
    """One 2-epoch run with every logger, after a short lr finder."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    folder = tmp_path_factory.mktemp("tracked")
    lr_find = ("optimizer.lr=find", "lr_find.num_it=8")
    train(folder / "run", *TINY, *lr_find, "logger=[csv,tensorboard,mlflow]", *store(mlstore, "tracked"))
    return folder


def test_tensorboard_reads_back_the_train_loss_and_valid_metrics(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == STEPS
    assert [e.step for e in events.Scalars("train/lr")] == STEPS
    rows = metrics_rows(tracked / "run", drop=())
    for column in ("valid_loss", "accuracy", "train_loss"):
        points = events.Scalars(f"epoch/{column}")
        assert [e.step for e in points] == EPOCH_ENDS
        assert [e.value for e in points] == pytest.approx([float(r[column]) for r in rows], rel=1e-6)
    # The HParams tab: the hyper-parameters with the best metrics, beside the scalars.
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")
    best = summary(tracked / "run")["best"]
    assert events.Scalars("best/accuracy")[-1].value == pytest.approx(best["accuracy"])
    # The lr finder's curve, point by point, and its plot.
    found = (tracked / "run" / "lr_find.csv").read_text().splitlines()[1:]
    assert len(events.Scalars("lr_find/smoothed_loss")) == len(found) > 0
    assert "lr_find" in events.Tags()["images"]


def test_mlflow_holds_one_run_with_params_metrics_by_step_and_artifacts(tracked, mlstore):
    client, (run,) = runs_of(mlstore, "tracked")
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["trainer.epochs"] == "2" and params["optimizer.name"] == "adamw"
    assert params["model.name"] == "cnn" and params["seed"] == "3"
    assert tags["dlrun.status"] == "completed" and tags["dlrun.device"] == "cpu"
    assert "torch.version" in tags and "mlflow.parentRunId" not in tags
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == STEPS
    valid = sorted(client.get_metric_history(run.info.run_id, "epoch/valid_loss"), key=lambda m: m.step)
    rows = metrics_rows(tracked / "run", drop=())
    assert [m.step for m in valid] == EPOCH_ENDS
    assert [m.value for m in valid] == pytest.approx([float(r["valid_loss"]) for r in rows])
    files = {"metrics.csv", "summary.json", "loss.png", "config.yaml", "lr_find.png", "lr_find.csv"}
    assert files <= {a.path for a in client.list_artifacts(run.info.run_id)}
    suggested = client.get_metric_history(run.info.run_id, "lr_find/suggested_lr")
    assert suggested[0].value == pytest.approx(summary(tracked / "run")["lr"])
    # The run directory names its MLflow run, for resuming it.
    assert (tracked / "run" / "mlflow.json").read_text().count(run.info.run_id) == 1


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, mlstore: Path) -> Path:
    """A 2-job sweep logged to MLflow."""
    folder = tmp_path_factory.mktemp("swept")
    proc = dlrun(
        "train", "-m", *QUICK, *TINY, "trainer.epochs=1", "seed=0,1", "logger=[csv,mlflow]",
        *store(mlstore, "swept"),
        f"hydra.sweep.dir={folder / 'sweep'}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


def test_a_sweep_is_one_parent_mlflow_run_with_the_jobs_nested(swept, mlstore):
    client, runs = runs_of(mlstore, "swept")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 3 and len(parents) == 1
    parent = parents[0]
    jobs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.params["seed"] for r in jobs) == ["0", "1"]
    assert sorted(r.info.run_name for r in jobs) == ["0 seed=0", "1 seed=1"]
    assert parent.info.status == "FINISHED" and all(r.info.status == "FINISHED" for r in jobs)
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"summary.csv"}


def test_runs_plots_every_runs_curve_and_writes_the_table_as_csv(swept, mlstore, tmp_path):
    sweep = swept / "sweep"
    proc = dlrun("runs", str(sweep), "--plot", str(tmp_path / "c.png"), "--csv", str(tmp_path / "t.csv"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].split(",")[:3] == ["run", "seed", "accuracy"] and len(lines) == 3
    proc = dlrun("runs", str(sweep), "--plot", "--metric", "valid_loss")
    assert proc.returncode == 0 and (sweep / "curves.png").is_file(), proc.stdout + proc.stderr
    # The store's artifact copies (summary.json among them) are not runs.
    assert list((mlstore / "mlartifacts").rglob("summary.json"))
    assert_user_error(dlrun("runs", str(mlstore)), "no runs under")


def test_runs_plot_of_a_metric_no_run_has_is_a_user_error(swept):
    proc = dlrun("runs", str(swept / "sweep"), "--plot", "--metric", "acuracy")
    assert_user_error(proc, "no run under", "'acuracy'", "--metric with one of accuracy")


def test_an_interrupted_and_resumed_run_is_one_mlflow_run_without_duplicated_steps(
    tmp_path, monkeypatch, mlstore
):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_failures import StopAfter

    from dlrun import train as loop

    args = (*TINY, "trainer.log_every=1", "trainer.progress=false", "logger=[csv,tensorboard,mlflow]")
    args += store(mlstore, "resumed")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Like a kill: the run logs steps 6 and 7, but its last checkpoint is the end of epoch 1
    # (step 5), so the resumed run trains (and logs) steps 6 and 7 again.
    save = loop.save_checkpoint
    monkeypatch.setattr(
        loop, "save_checkpoint", lambda path, learner, state: state.batch or save(path, learner, state)
    )
    monkeypatch.setattr(loop, "StopRequest", lambda: StopAfter(7))
    with pytest.raises(loop.Interrupted):
        loop.fit(compose(*args), run_dir)
    monkeypatch.undo()
    loop.fit(compose(*args, f"resume={run_dir}"), run_dir)

    client, (run,) = runs_of(mlstore, "resumed")
    assert run.info.status == "FINISHED" and run.data.tags["dlrun.status"] == "completed"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps == list(range(1, 11))
    assert (
        sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch/valid_loss")) == EPOCH_ENDS
    )
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 11))
    assert [e.step for e in events.Scalars("epoch/accuracy")] == EPOCH_ENDS


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_does_not_stop_training(tmp_path):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
    started = time.time()
    proc = dlrun(
        "train", *QUICK, *TINY, f"hydra.run.dir={tmp_path / 'run'}", "logger=[csv,mlflow]",
        f"logger.mlflow.tracking_uri=http://127.0.0.1:{closed_port()}", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("warning: logger mlflow switched off for this run (start failed") == 1, out
    assert summary(tmp_path / "run")["status"] == "completed" and len(metrics_rows(tmp_path / "run")) == 2
    assert time.time() - started < 90  # MLflow's default retries would take minutes


def test_a_logger_whose_package_is_missing_is_a_user_error(tmp_path):
    # sitecustomize runs at interpreter start: mlflow then cannot be imported, as if not installed.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['mlflow'] = None\n")
    proc = dlrun(
        "train", *QUICK, *TINY, f"hydra.run.dir={tmp_path / 'run'}", "logger=[csv,mlflow]",
        env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert_user_error(proc, "logger=mlflow needs the mlflow package", "pip install 'dlrun[mlflow]'")


def test_logger_overrides_are_checked_before_any_work():
    proc = dlrun("train", "--cfg", "job", "logger=[csv,tensorboard,mlflow]")
    assert proc.returncode == 0 and "tracking_uri: sqlite:///outputs/mlflow.db" in proc.stdout
    assert_user_error(dlrun("train", "logger=[csv,tensorbord]"), "logger=tensorbord is not a logger config")
    assert_user_error(
        dlrun("train", "logger.mlflow.tracking_uri=http://x"),
        "sets the mlflow logger, which is not chosen",
        "'logger=[csv,mlflow]'",
    )
