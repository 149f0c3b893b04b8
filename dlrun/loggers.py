"""Experiment tracking: the `logger` config group, several at once (`logger=[csv,tensorboard,mlflow]`).

`csv` is the run directory's own files (metrics.csv, summary.json, loss.png), written whatever
is chosen: resume, early stopping and `dlrun runs` read them. `tensorboard` and `mlflow` hand
the same numbers to those tools, which teams already browse:

- per step (every `trainer.log_every` batches, the loss the loop reads back then anyway):
  `train/loss`, `train/lr`;
- per epoch: `epoch/<column>` for each metrics.csv column (valid_loss, accuracy, seconds...);
- the lr-finder curve; at the end the best metrics with the hyper-parameters (TensorBoard's
  HParams tab; MLflow params), and in MLflow the run directory's files as artifacts.

The x axis ("step") is the number of training batches seen, as in fastai's and Lightning's
loggers. Loggers run on one background thread, fed by a queue: the training loop only hands
over Python numbers, and a slow server or disk never holds up a step. A logger that raises is
reported once and switched off for the rest of the run; training and the run's files go on.

A resumed run stays one run: TensorBoard purges the points past the checkpoint's step
(`purge_step`), MLflow reopens the run whose id is stored in `mlflow.json` in the run directory
and skips the steps it already holds. A sweep with `mlflow` is one parent run (opened by the
`SweepTracking` Hydra callback, id in the sweep directory's `mlflow.json`) with a nested run per job.

Light at import (no torch, no tensorboard, no mlflow): the sweep callback is imported by the CLI.
The chosen loggers' packages are imported when a run opens them (`require`).
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from dlrun import rundir
from dlrun.errors import DlrunError, first_line

log = logging.getLogger("dlrun")

# logger -> (the module it runs on, the package that installs it: also dlrun's pip extra).
PACKAGES = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "mlflow": ("mlflow.tracking", "mlflow"),
}
TENSORBOARD_DIR = "tensorboard"  # inside the run directory
# MLflow: per-step points wait at most this long (or to the epoch's end) to be sent, in one call.
FLUSH_S = 10.0
MLFLOW_IDS = "mlflow.json"  # in a run directory: its MLflow run; in a sweep directory: the parent's
# The run directory's files an MLflow run keeps as artifacts (those that exist).
ARTIFACTS = (
    rundir.METRICS,
    rundir.SUMMARY,
    rundir.LOSS_PLOT,
    "lr_find.png",
    "lr_find.csv",
    "lr_find_unfrozen.png",
    "lr_find_unfrozen.csv",
    str(rundir.CONFIG),
)
# summary.json's status -> MLflow's run status.
MLFLOW_STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "diverged": "FAILED", "failed": "FAILED"}


def chosen(cfg: Any) -> list[str]:
    """The loggers a config selects (`logger=[csv,mlflow]` -> ['csv', 'mlflow'])."""
    return list(cfg.get("logger") or {})


def require(names: list[str]) -> None:
    """Import the modules the chosen loggers run on, or refuse with the pip command that installs
    them. Imported here, on the main thread, before training: an import on the loggers' thread
    would compete with the first epochs for the interpreter."""
    for name in names:
        if name not in PACKAGES:
            continue
        module, package = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise DlrunError(
                f"logger={name} needs the {package} package, which is not installed ({first_line(e)}): "
                f"pip install 'dlrun[{name}]' (or drop {name} from logger=[...])"
            ) from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {dotted.key: leaf} (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, path + ".")
        else:
            flat[path] = value
    return flat


def config_params(cfg: Any) -> dict[str, Any]:
    """The composed config, flattened: every hyper-parameter of the run by its key."""
    from omegaconf import OmegaConf

    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's app can resolve: keep it as text
        tree = OmegaConf.to_container(cfg, resolve=False)
    return flatten(tree)


def sweep_dir() -> Path | None:
    """The sweep directory when this process runs one job of a Hydra sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    return Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else None


def job_overrides() -> list[str]:
    """This Hydra job's overrides, without Hydra's own ([] outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [o for o in HydraConfig.get().overrides.task if not o.startswith(("hydra", "resume="))]


class Run:
    """What a logger is told when the run starts."""

    def __init__(self, cfg: Any, run_dir: Path, first_step: int, resumed: bool, device: str):
        self.cfg, self.run_dir, self.device = cfg, run_dir, device
        self.first_step = first_step  # batches already trained (a resumed run goes on from here)
        self.resumed = resumed
        self.sweep = sweep_dir()
        self.overrides = job_overrides()


class Loggers:
    """The chosen loggers behind one queue and one thread. Used as a context manager around
    the training loop; every method returns at once."""

    def __init__(self, loggers: list[Any]):
        self.active = loggers
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.finished = False
        self.thread = threading.Thread(target=self._work, name="dlrun-loggers", daemon=True)

    def _send(self, method: str, *args: Any) -> None:
        if self.active:
            self.queue.put((method, args))

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            method, args = item
            for logger in list(self.active):
                try:
                    getattr(logger, method)(*args)
                except Exception as e:  # noqa: BLE001 - a logger never stops training
                    self._switch_off(logger, method, e)

    def _switch_off(self, logger: Any, method: str, error: Exception) -> None:
        """Report a logger's failure once, and send it nothing more for this run."""
        self.active.remove(logger)
        what = f"{type(error).__name__}: {first_line(error)}"
        # To the terminal (the console handler shows warnings) and to the run's log.
        log.warning("warning: logger %s switched off for this run (%s failed: %s)", logger.name, method, what)
        try:
            logger.close()
        except Exception:  # noqa: BLE001 - it has been reported already
            pass

    def __enter__(self) -> Loggers:
        if self.active:
            self.thread.start()
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if not self.finished:  # the loop stopped on a bug: no summary was written
            self._send("finish", {"status": "failed", "best": {}})
        self._send("close")
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def start(self, run: Run) -> None:
        self._send("start", run)

    def step(self, step: int, loss: float, lr: float) -> None:
        """The training loss and learning rate after `step` batches."""
        self._send("metrics", step, {"train/loss": loss, "train/lr": lr})

    def epoch(self, step: int, row: dict[str, float]) -> None:
        """One metrics.csv row, at the step that ends its epoch."""
        self._send("epoch", step, {f"epoch/{k}": float(v) for k, v in row.items() if k != "epoch"})

    def lr_find(self, result: dict[str, Any], run_dir: Path, stem: str) -> None:
        """The lr finder's curve (written as <stem>.png / .csv in run_dir)."""
        self._send("lr_find", result, run_dir, stem)

    def finish(self, summary: dict[str, Any]) -> None:
        """The run ended (summary.json is written): final metrics, files, status."""
        self.finished = True
        self._send("finish", summary)


def open_loggers(cfg: Any) -> Loggers:
    """The loggers `cfg.logger` chooses (csv needs no object: the run directory is its store)."""
    names = chosen(cfg)
    require(names)
    kinds = {"tensorboard": TensorBoardLogger, "mlflow": MlflowLogger}
    return Loggers([kinds[name]() for name in names if name in kinds])


class TensorBoardLogger:
    """Event files in <run dir>/tensorboard, through torch's SummaryWriter."""

    name = "tensorboard"

    def __init__(self) -> None:
        self.writer: Any = None
        self.params: dict[str, Any] = {}

    def start(self, run: Run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # Resumed: points past the checkpoint (a killed run logged them, the resumed one logs
        # them again) are purged, so each step has one point.
        purge = run.first_step + 1 if run.resumed else None
        self.writer = SummaryWriter(str(run.run_dir / TENSORBOARD_DIR), purge_step=purge)
        params = config_params(run.cfg)
        # The HParams tab takes numbers, strings and booleans.
        self.params = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in params.items()
            if not k.startswith("logger.")
        }

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    epoch = metrics

    def lr_find(self, result: dict[str, Any], run_dir: Path, stem: str) -> None:
        # Scalars take a step, not an lr, as x: the curve by iteration, then the plot itself.
        for i, (lr, loss) in enumerate(zip(result["lrs"], result["smoothed"])):
            self.writer.add_scalar(f"{stem}/lr", lr, i)
            self.writer.add_scalar(f"{stem}/smoothed_loss", loss, i)
        png = run_dir / f"{stem}.png"
        if png.is_file():
            import matplotlib.image

            self.writer.add_image(stem, matplotlib.image.imread(png)[..., :3], 0, dataformats="HWC")

    def finish(self, summary: dict[str, Any]) -> None:
        best = {f"best/{k}": float(v) for k, v in (summary.get("best") or {}).items()}
        if summary["status"] != "interrupted" and best:
            # run_name ".": the HParams session goes beside the run's scalars, one run per directory.
            self.writer.add_hparams(self.params, best, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MlflowLogger:
    """One MLflow run per dlrun run, through MlflowClient (no global active-run state)."""

    name = "mlflow"

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id = ""
        self.run_dir = Path()
        self.logged: dict[str, int] = {}  # metric -> last step the run holds (a resumed run)
        self.pending: list[Any] = []  # per-step metrics not yet sent
        self.sent = time.monotonic()

    def start(self, run: Run) -> None:
        from mlflow.tracking import MlflowClient

        settings = run.cfg.logger.mlflow
        self.run_dir = run.run_dir
        self.client = client = MlflowClient(tracking_uri=store_uri(settings.tracking_uri))
        ids = run.run_dir / MLFLOW_IDS
        tags = {
            "dlrun.device": run.device,
            "dlrun.run_dir": str(run.run_dir.resolve()),
            **version_tags(),
        }
        if run.resumed and ids.is_file():
            self.run_id = rundir.read_json(ids)["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            held = client.get_run(self.run_id).data.metrics
            self.logged = {k: max(m.step for m in client.get_metric_history(self.run_id, k)) for k in held}
            self._tags(tags | {"dlrun.status": "running", "dlrun.resumed": "true"})
            return
        experiment = experiment_id(client, settings)
        parent = read_ids(run.sweep)
        shown = run.overrides
        if parent:
            tags["mlflow.parentRunId"] = parent["run_id"]
            # A job by its number and the values swept (the sweep's other overrides are the parent's).
            shown = [o for o in shown if o.split("=")[0].lstrip("+~") in parent.get("swept", [])]
        name = run.run_dir.name + (f" {' '.join(shown)}" if shown else "")
        self.run_id = client.create_run(experiment, run_name=name, tags=tags).info.run_id
        rundir.write_json(ids, {"run_id": self.run_id, "experiment_id": experiment})
        self._params(config_params(run.cfg))
        self._tags({"dlrun.status": "running"})

    def _params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Per-step points, sent with the epoch's metrics or once FLUSH_S seconds have passed:
        each call to the store is a transaction (tens of ms of Python on a busy CPU), which
        the training thread would feel through the interpreter lock."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, step) for k, v in values.items() if step > self.logged.get(k, -1)]
        if time.monotonic() - self.sent > FLUSH_S:
            self.flush()

    def epoch(self, step: int, values: dict[str, float]) -> None:
        self.metrics(step, values)
        self.flush()

    def flush(self) -> None:
        for i in range(0, len(self.pending), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        self.pending, self.sent = [], time.monotonic()

    def lr_find(self, result: dict[str, Any], run_dir: Path, stem: str) -> None:
        # The curve by iteration (as in TensorBoard) and the suggested rate; the plot and the
        # csv are artifacts at the end.
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(f"{stem}/lr", float(lr), now, i) for i, lr in enumerate(result["lrs"])]
        losses = enumerate(result["smoothed"])
        points += [Metric(f"{stem}/smoothed_loss", float(v), now, i) for i, v in losses]
        points.append(Metric(f"{stem}/suggested_lr", float(result["lr"]), now, 0))
        for i in range(0, len(points), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=points[i : i + 1000])

    def finish(self, summary: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        best = summary.get("best") or {}
        self.pending += [Metric(f"best/{k}", float(v), now, 0) for k, v in best.items()]
        self.flush()
        self._tags({"dlrun.status": summary["status"]})
        for name in ARTIFACTS:
            path = self.run_dir / name
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(summary["status"], "FAILED"))

    def close(self) -> None:
        return None


def store_uri(uri: str) -> str:
    """The tracking URI; a SQLite file's folder is created first (MLflow creates only the file)."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # The store's schema set-up, told line by line on the first run.
        for name in ("alembic", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)
    return uri


def experiment_id(client: Any, settings: Any) -> str:
    """The id of `logger.mlflow.experiment`, created if new. With a SQLite store, its artifacts
    go beside the database (rundir.MLFLOW_ARTIFACTS), not into an mlruns/ folder wherever dlrun was run."""
    found = client.get_experiment_by_name(settings.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if settings.tracking_uri.startswith("sqlite:///"):
        db = Path(settings.tracking_uri.removeprefix("sqlite:///")).resolve()
        location = (db.parent / rundir.MLFLOW_ARTIFACTS).as_uri()
    try:
        return client.create_experiment(settings.experiment, artifact_location=location)
    except Exception:  # noqa: BLE001 - another job of the sweep created it first
        found = client.get_experiment_by_name(settings.experiment)
        if found is None:
            raise
        return found.experiment_id


def version_tags() -> dict[str, str]:
    """The versions a run was made with, as MLflow tags."""
    import platform
    from importlib.metadata import version

    import dlrun

    return {
        "dlrun.version": dlrun.__version__,
        "torch.version": version("torch"),
        "mlflow.version": version("mlflow"),
        "python.version": platform.python_version(),
    }


def read_ids(sweep: Path | None) -> dict[str, Any] | None:
    """The sweep's parent MLflow run ({"run_id", "swept": keys}), if this is a job of a sweep
    that has one."""
    path = sweep / MLFLOW_IDS if sweep else None
    return rundir.read_json(path) if path and path.is_file() else None


class SweepTracking(Callback):
    """`dlrun train -m ... logger=[...,mlflow]`: the sweep is one MLflow run, its jobs nested
    under it. Opened before the first job, closed with the sweep's summary files as artifacts.
    A failure here is a warning: the jobs then log unnested runs."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        if "mlflow" not in chosen(config):
            return
        require(["mlflow"])
        root = Path(config.hydra.sweep.dir)
        try:
            from mlflow.tracking import MlflowClient

            settings = config.logger.mlflow
            client = MlflowClient(tracking_uri=store_uri(settings.tracking_uri))
            tags = {"dlrun.sweep_dir": str(root.resolve()), "dlrun.status": "running", **version_tags()}
            run = client.create_run(experiment_id(client, settings), run_name=f"sweep {root.name}", tags=tags)
            from hydra.core.override_parser.overrides_parser import OverridesParser

            sweep_args = [o for o in config.hydra.overrides.task if not o.startswith("hydra")]
            client.set_tag(run.info.run_id, "dlrun.overrides", " ".join(sweep_args))
            parsed = OverridesParser.create().parse_overrides(sweep_args)
            swept = [o.key_or_group.lstrip("+~") for o in parsed if o.is_sweep_override()]
            root.mkdir(parents=True, exist_ok=True)
            rundir.write_json(root / MLFLOW_IDS, {"run_id": run.info.run_id, "swept": swept})
        except Exception as e:  # noqa: BLE001 - tracking never stops the sweep
            warn_sweep(e)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        root = Path(config.hydra.sweep.dir)
        ids = read_ids(root)
        if ids is None:
            return
        parent = ids["run_id"]
        try:
            from mlflow.tracking import MlflowClient

            from dlrun import sweep

            client = MlflowClient(tracking_uri=store_uri(config.logger.mlflow.tracking_uri))
            for name in ("summary.csv", "sweep.png"):
                if (root / name).is_file():
                    client.log_artifact(parent, str(root / name))
            ends = [sweep.job_end(job)[0] for job in sweep.job_dirs(root)]
            done = all(end == "completed" for end in ends)
            status = "completed" if done else f"{ends.count('completed')} of {len(ends)} jobs completed"
            client.set_tag(parent, "dlrun.status", status)
            client.set_terminated(parent, status="FINISHED" if done else "FAILED")
        except Exception as e:  # noqa: BLE001
            warn_sweep(e)


def warn_sweep(error: Exception) -> None:
    """The sweep's parent MLflow run could not be written: say so once, go on."""
    from dlrun import report

    report.err_console.print(
        f"warning: logger mlflow: the sweep's parent run failed ({type(error).__name__}: "
        f"{first_line(error)}); the jobs' runs are logged without it",
        style="yellow",
        markup=False,
        soft_wrap=True,
    )
