"""`hydra/sweeper=optuna`: ask Optuna (>= 4) for a batch of trials, launch them through the
configured launcher (basic, joblib, submitit...), read each job's summary.json, tell the study,
until n_trials have ended. The study lives in SQLite in the sweep directory by default, so the
same command with the same hydra.sweep.dir continues an interrupted search.

The search space, the study's settings and what a job tells it are in dlrun.search; this module
is only the Hydra side. Nothing heavy is imported at the top: Hydra imports every plugin at start."""

# No `from __future__ import annotations`: Hydra runs this module without registering it in
# sys.modules, and dataclasses then cannot resolve string annotations.
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.dlrun_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    sampler: str = "tpe"  # tpe | random
    seed: int | None = None  # the sampler's seed (null: a fresh one each time)
    n_trials: int = 20  # trials that end (completed, diverged or failed) over the whole study
    n_jobs: int = 1  # trials asked and launched together (the launcher may run them in parallel)
    direction: str | None = None  # minimize | maximize; null: from the monitored metric
    storage: str | None = None  # an Optuna storage URL; null: sqlite in the sweep directory
    study_name: str = "dlrun"
    params: dict[str, str] | None = None  # key: expression, as on the command line


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="dlrun")


class OptunaSweeper(Sweeper):
    """Hydra's Sweeper interface over an Optuna study (ask, launch a batch, tell)."""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self.settings = OmegaConf.create(settings)
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        """Hydra reports what a sweeper raises as a traceback with exit code 1: a user error
        found here (a damaged study, a study of the other direction) leaves as exit code 2 and
        one line instead, past Hydra, and the CLI still ends the sweep with its summary."""
        from dlrun.cli import user_errors

        with user_errors():
            return self.search(arguments)

    def search(self, arguments: list[str]) -> Any:
        """Ask, launch a batch, tell, until the study has its n_trials."""
        from dlrun import report, search, sweep

        assert self.config is not None
        optuna = search.require_optuna()
        s = self.settings
        space = search.parse_space(s.params, arguments)
        root = Path(self.config.hydra.sweep.dir)
        root.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, root / "multirun.yaml")
        storage = search.storage_url(s, root)
        study = self.existing_study(optuna, storage)
        if study:
            study.sampler = self.sampler(len(study.trials))
        retry = self.settle(study, root) if study else []
        if study:
            report.console.print(
                f"continuing study {s.study_name!r} ({search.finished(study)} of {s.n_trials} trials ended)"
                + (f"; trying {len(retry)} cut-short trial(s) again" if retry else ""),
                highlight=False,
            )
        numbers = [int(j.name) for j in sweep.job_dirs(root) if j.name.isdigit()]
        next_job = max(numbers, default=-1) + 1
        returns = []
        while (done := search.finished(study) if study else 0) < s.n_trials:
            # Trials cut short go again first, in their own job directories (consecutive numbers
            # make one batch); then new trials, numbered after every job so far.
            if retry:
                batch = [retry.pop(0)]
                while retry and len(batch) < s.n_jobs and retry[0][0] == batch[-1][0] + 1:
                    batch.append(retry.pop(0))
                first = batch[0][0]
                for job, _ in batch:
                    shutil.rmtree(root / str(job), ignore_errors=True)
            else:
                size = min(s.n_jobs, s.n_trials - done)
                batch = [(next_job + i, None) for i in range(size)]
                first, next_job = next_job, next_job + size
            # A new study's direction comes from hydra.sweeper.direction or else from the metric
            # its jobs monitor, known once the first batch has run: that batch is then asked from
            # a study in memory (TPE samples its first trials at random either way) and copied
            # into the stored study after.
            if study is None and s.direction:
                study = self.new_study(optuna, storage, self.sampler(0), s.direction)
            asking = study or optuna.create_study(sampler=self.sampler(0))
            trials = []
            for job, params in batch:
                if params is not None:
                    asking.enqueue_trial(params)
                trial = asking.ask(space.distributions)
                trial.set_user_attr("job", job)
                trial.set_user_attr("sweep_dir", str(root.resolve()))
                trials.append(trial)
            jobs = [space.fixed + search.overrides_of(t.params) for t in trials]
            self.validate_batch_is_legal(jobs)
            results = self.launcher.launch(jobs, initial_job_idx=first)
            returns.append(results)
            ends = [search.job_end(self.job_dir(root, r, job)) for r, (job, _) in zip(results, batch)]
            if study is None:
                completed = [e for e in ends if e.status == "completed"]
                mode = completed[0].mode if completed else "min"  # valid_loss when none completed
                study = self.new_study(optuna, storage, self.sampler(len(batch)), search.direction_of(mode))
                for trial, end in zip(trials, ends):
                    search.add(study, trial, end)
            else:
                for trial, end in zip(trials, ends):
                    search.tell(study, trial, end)
            monitors = [e.monitor for e in ends if e.status == "completed"]
            if monitors and "monitor" not in study.user_attrs:
                study.set_user_attr("monitor", monitors[0])  # the plots' label
        if study is not None:
            self.report(study, storage)
            search.write_plots(study, root)
        return returns

    def sampler(self, trials_so_far: int) -> Any:
        """A sampler for one study object (TPE's cannot serve two). A seeded one that continues a
        study starts from a seed moved on by the trials so far, or it would ask for the first
        trials' values again."""
        from dlrun import search

        s = self.settings
        return search.sampler(s.sampler, None if s.seed is None else s.seed + trials_so_far)

    def existing_study(self, optuna: Any, storage: str) -> Any:
        """The study to continue, or None when this is its first run."""
        from dlrun.errors import DlrunError, first_line

        s = self.settings
        try:
            names = optuna.get_all_study_names(storage=storage)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors: a damaged file, a bad URL
            raise DlrunError(
                f"cannot open the Optuna storage {storage} ({first_line(e)}): move a damaged study "
                "file away to start the search afresh (the jobs' directories stay), or give another "
                "hydra.sweeper.storage or hydra.sweep.dir"
            ) from None
        if s.study_name not in names:
            return None
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        wanted = s.direction or study.direction.name.lower()
        if study.direction.name.lower() != wanted:
            raise DlrunError(
                f"study {s.study_name!r} in {storage} was created to {study.direction.name.lower()}, "
                f"not to {s.direction}: give another hydra.sweeper.study_name or hydra.sweep.dir"
            )
        return study

    def new_study(self, optuna: Any, storage: str, sampler: Any, direction: str) -> Any:
        """The stored study (one that another process has just created is shared)."""
        return optuna.create_study(
            study_name=self.settings.study_name,
            storage=storage,
            sampler=sampler,
            direction=direction,
            load_if_exists=True,
        )

    def settle(self, study: Any, root: Path) -> list[tuple[int, dict[str, Any]]]:
        """Trials of this sweep directory that a killed process left running: those whose job
        ended are told now; the others are failed and returned (job, params) to run again."""
        from optuna.trial import TrialState

        from dlrun import search

        again = []
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("sweep_dir") != str(root.resolve()) or "job" not in t.user_attrs:
                continue  # another process's trial (a shared storage)
            job = int(t.user_attrs["job"])
            end = search.job_end(root / str(job))
            if end.status in search.ENDED:
                search.tell(study, t.number, end)
            else:
                study.tell(t.number, state=TrialState.FAIL)
                again.append((job, t.params))
        return sorted(again, key=lambda x: x[0])

    @staticmethod
    def job_dir(root: Path, result: Any, job: int) -> Path:
        """Where a launched job wrote (the launcher's record of it, else the sweep's subdir)."""
        hydra_cfg = getattr(result, "hydra_cfg", None)
        out = OmegaConf.select(hydra_cfg, "hydra.runtime.output_dir") if hydra_cfg is not None else None
        return Path(out) if out else root / str(job)

    def report(self, study: Any, storage: str) -> None:
        from optuna.trial import TrialState

        from dlrun import report

        s = self.settings
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        line = f"study {s.study_name!r} ({study.direction.name.lower()}) in {storage}: {len(done)} completed"
        if done:
            best = study.best_trial
            params = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
            )
            line += f"; best {best.value:.4g} (job {best.user_attrs.get('job')}: {params})"
        report.console.print(line, highlight=False, soft_wrap=True)
