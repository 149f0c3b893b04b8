"""`dlrun COMMAND ...`: the first word picks the command; for `train` and `lr-find` it also
picks the primary config, and every other word goes to Hydra unchanged (`-m`, `--cfg job`,
`--help`, `--config-dir`, `+key=value`, `hydra/launcher=...`, shell completion).

This module and what it imports at the top stay free of torch: `dlrun --help` and
`dlrun train --cfg job` must answer in well under a second.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dlrun import distributed  # light: torch is imported where a process group starts
from dlrun.errors import DlrunError, first_line
from dlrun.overrides import hydra_quote, override_value

# command -> (primary config, one-line help); these run through Hydra.
HYDRA_COMMANDS = {
    "train": ("train", "train the experiment the config describes (key=value overrides, -m to sweep)"),
    "lr-find": ("lr_find", "learning-rate range test: loss-vs-lr plot and suggested rates"),
}
# command -> (module with main(argv), one-line help)
PLAIN_COMMANDS = {
    "eval": ("dlrun.evaluate", "validation metrics of a saved run: dlrun eval RUN_DIR"),
    "runs": ("dlrun.runs", "table of past runs or of one sweep, best first: dlrun runs [DIR]"),
    "embeddings": ("dlrun.embeddings", "export a tabular run's embeddings, compare tree models with them"),
    "generate": ("dlrun.generate", "sample text from a trained language model: dlrun generate RUN_DIR"),
    "predict": ("dlrun.predict", "apply a trained model to new data: dlrun predict RUN_DIR INPUT"),
    "export": ("dlrun.export", "write a run's model as ONNX or TorchScript: dlrun export RUN_DIR"),
    "interpret": ("dlrun.interpret", "confusion matrix, most confused classes, top losses of a run"),
}
COMMANDS = {**HYDRA_COMMANDS, **PLAIN_COMMANDS}
# Hydra flags after which composing the config ourselves first would be wrong or pointless.
NO_PREFLIGHT = {
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--shell-completion",
    "-sc",
    "--config-dir",
    "-cd",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--experimental-rerun",
}
VERBOSE = {"-v", "--verbose"}

USAGE = """usage: dlrun COMMAND [ARGS...]

Config-driven deep-learning experiments: Hydra configs in, a trained PyTorch model,
metrics, checkpoints and plots out.

commands:
{commands}

`dlrun COMMAND --help` shows a command's options (for train and lr-find: the config
groups and every key). -v (or HYDRA_FULL_ERROR=1) shows tracebacks."""


def usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(
        commands="\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    )


def verbose() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


@contextmanager
def user_errors() -> Iterator[None]:
    """The one place a DlrunError becomes a short message and exit code 2 (no traceback
    unless -v)."""
    try:
        yield
    except DlrunError as e:
        if verbose():
            raise
        from rich.console import Console
        from rich.markup import escape

        # Messages quote the user's own values and paths: `[x]` in them is text, not markup.
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(str(e))}")
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """The console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in VERBOSE for a in argv):
        argv = [a for a in argv if a not in VERBOSE]
        os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        with user_errors():
            code = dispatch(argv)
            sys.stdout.flush()  # a reader that went away shows up here, not at interpreter exit
    except BrokenPipeError:
        # `dlrun train --help | head`: as the Python docs recommend for SIGPIPE, send the rest
        # of the output nowhere and exit with an error code, without a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(code)


def dispatch(argv: list[str]) -> int:
    if "COMP_LINE" in os.environ and ("-sc" in argv or "--shell-completion" in argv):
        return complete(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from dlrun import __version__

        print(f"dlrun {__version__}")
        return 0
    if argv[0].startswith("-"):
        # `dlrun --shell-completion install=bash` and other bare Hydra flags mean `train`.
        return run_hydra("train", hydra_args(argv))
    command, rest = argv[0], argv[1:]
    if command in HYDRA_COMMANDS:
        return run_hydra(command, hydra_args(rest))
    if command in PLAIN_COMMANDS:
        module = importlib.import_module(PLAIN_COMMANDS[command][0])
        module.main(rest)
        return 0
    from dlrun.errors import closest

    hint = closest(command, COMMANDS)
    raise DlrunError(
        f"unknown command {command!r}"
        + (f" (did you mean {hint!r}?)" if hint else "")
        + f": use one of {', '.join(COMMANDS)}"
    )


def complete(argv: list[str]) -> int:
    """Shell completion: complete the command word here, hand the rest to Hydra with the
    command removed from COMP_LINE (Hydra completes the words after the program name)."""
    line = os.environ["COMP_LINE"]
    point = int(os.environ.get("COMP_POINT", len(line)))
    words = line[:point].split()
    partial = len(words) < 2 or (len(words) == 2 and not line[:point].endswith(" "))
    if partial:
        prefix = words[1] if len(words) == 2 else ""
        print(" ".join(c for c in COMMANDS if c.startswith(prefix)))
        return 0
    command = words[1]
    if command not in HYDRA_COMMANDS:
        return 0
    start = line.index(command, len(words[0]))
    end = start + len(command) + 1
    os.environ["COMP_LINE"] = line[:start] + line[end:]
    os.environ["COMP_POINT"] = str(max(0, point - (end - start)))
    return run_hydra(command, argv)


def run_hydra(command: str, args: list[str]) -> int:
    """Run `command`'s task through Hydra, after checking the overrides ourselves and claiming
    the run's (or the sweep's) own directory. A sweep ends with its summary whatever its jobs
    did, and exits non-zero when any job did not complete (130 after Ctrl-C)."""
    import hydra

    from dlrun.config_tree import configs_dir

    config_name = HYDRA_COMMANDS[command][0]
    if command == "train":
        args = expand_resume(args)
    output = None
    check_extras(args)
    if not any(a.split("=")[0] in NO_PREFLIGHT for a in args):
        # Printing the config (--cfg job) must not import torch, which the family checks do.
        printing = any(a.split("=")[0] in ("--cfg", "-c") for a in args)
        preflight(config_name, args, deep=not printing)
        if not printing:
            output = claim_output(config_name, args)
            try:
                check_sweeper(config_name, args, output)
            except BaseException:
                output.release()
                raise
            args = args + output.overrides
            ends_here = True  # trainer.devices launched the ranks, or is a user error
            try:
                devices = distributed.devices_to_launch(output.config, output.sweep)
                if devices:  # trainer.devices=N: N processes of this same command, one directory
                    return distributed.launch(devices, [command, *args])
                ends_here = False
            finally:
                if ends_here:
                    output.release()  # the directory is removed again if nothing was written into it
            args = args + distributed.hydra_overrides()
    sys.argv = ["dlrun"] + args
    task = hydra.main(config_path=str(configs_dir()), config_name=config_name, version_base="1.3")(
        make_task(command, output.swept if output else None)
    )
    if output is None:  # --help, --hydra-help, --cfg, --info: Hydra composes without a run
        from hydra.errors import HydraException

        try:
            task()
        except HydraException as e:
            # `--help` with a sweep's `a=1,2`: Hydra's help composes one config, which a list
            # of values cannot give.
            raise DlrunError(
                f"{first_line(e)}: --help, --cfg and --info show one config; leave the swept "
                "values out (seed=1, not seed=1,2)"
            ) from e
        return 0
    try:
        task()
    except BaseException as e:
        if not output.sweep:
            raise
        end_sweep(output, stopped=True, interrupted=is_interrupt(e))
        if is_interrupt(e):
            return 130
        raise
    finally:
        output.release()
        distributed.finish()
    return end_sweep(output, stopped=False) if output.sweep else 0


class Output:
    """Where a run or a sweep writes: the directory (claimed for this process alone unless the
    user named it), the override that hands it to Hydra, and what a sweep's end needs."""

    def __init__(self, path: Path, sweep: bool, claimed: bool, config: Any, swept: list[str], pin: bool):
        self.path, self.sweep, self.claimed, self.config, self.swept = path, sweep, claimed, config, swept
        key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
        self.overrides = [f"{key}={hydra_quote(str(path))}"] if pin else []

    def release(self) -> None:
        """A claimed directory that nothing was written into (Hydra stopped before the job
        began) is removed again."""
        if self.claimed:
            try:
                self.path.rmdir()  # only if empty
            except OSError:
                pass


def claim_output(config_name: str, args: list[str]) -> Output:
    """Resolve the configured directory pattern (`hydra.run.dir` or, with -m,
    `hydra.sweep.dir`, in configs/base.yaml) and create it exclusively: two runs started in
    the same second, from any number of processes, never share a directory. The literal path
    goes to Hydra as an override, so every job and every launcher process sees the same one.
    A directory the user named is used as given."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode
    from omegaconf import OmegaConf, read_write

    from dlrun import rundir
    from dlrun.config_tree import configs_dir

    parsed_args, _ = get_args_parser().parse_known_args(args)
    overrides = OverridesParser.create().parse_overrides(parsed_args.overrides)
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    swept = [o.key_or_group.lstrip("+~") for o in overrides if o.is_sweep_override()]
    with initialize_config_dir(str(configs_dir()), version_base="1.3", job_name="dlrun"):
        try:
            cfg = compose(config_name, overrides=fixed, return_hydra_config=True)
        except Exception as e:  # noqa: BLE001 - preflight has checked the overrides; Hydra says why
            raise DlrunError(first_line(e)) from e
    sweep = bool(parsed_args.multirun) or cfg.hydra.mode == RunMode.MULTIRUN
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    # Under torchrun every rank runs this: the process group starts first, then rank 0 claims.
    distributed.check_config(cfg, sweep, config_name.replace("_", "-"))
    distributed.start(cfg)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the pattern
    path = Path(str(OmegaConf.select(cfg, key)))
    given = [o for o in overrides if o.key_or_group == key]
    try:
        if given:
            # As given; one with ${now:...} in it is resolved here, once, like the claimed one.
            path.mkdir(parents=True, exist_ok=True)
            return Output(path, sweep, False, cfg, swept, pin="${" in str(given[-1].value()))
    except OSError as e:
        raise cannot_create(path, sweep, key, e) from e

    def claim() -> Path:
        try:
            return rundir.claim(path)
        except OSError as e:
            raise cannot_create(path, sweep, key, e) from e

    path = distributed.agree(claim)  # one directory for all the ranks of a run
    with read_write(cfg.hydra):
        OmegaConf.update(cfg, key, str(path))
    # Only the process that claimed the directory removes it again when nothing was written.
    return Output(path, sweep, distributed.world().main, cfg, swept, pin=True)


def cannot_create(path: Path, sweep: bool, key: str, error: OSError) -> DlrunError:
    """The user error for a run or sweep directory that cannot be made."""
    return DlrunError(
        f"cannot create the {'sweep' if sweep else 'run'} directory {path}: {error.strerror or error}: "
        f"run dlrun from a folder you can write to, or choose one with {key}=DIR"
    )


# Hydra plugins that come with one of dlrun's extras: the option -> (modules it needs, extra).
PLUGIN_EXTRAS = {
    "hydra/sweeper=optuna": (("optuna",), "optuna"),
    "hydra/launcher=submitit_slurm": (("hydra_plugins.hydra_submitit_launcher", "submitit"), "slurm"),
    "hydra/launcher=submitit_local": (("hydra_plugins.hydra_submitit_launcher", "submitit"), "slurm"),
}


def check_extras(args: list[str]) -> None:
    """A sweeper or launcher from an extra that is not installed is a user error naming the
    pip command (Hydra would only say that it has no such config)."""
    for arg in args:
        modules, extra = PLUGIN_EXTRAS.get(arg.lstrip("+").replace(" ", ""), ((), ""))
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise DlrunError(
                    f"{arg} needs the {extra} extra ({first_line(e)}): pip install 'dlrun[{extra}]'"
                ) from None


def check_sweeper(config_name: str, args: list[str], output: Output) -> None:
    """What the sweeper will vary besides the command line: `hydra.sweeper.params` (a named
    space, +sweep=NAME) and an Optuna search's settings, checked like the command line's
    overrides before any job runs. Their keys are the sweep's swept keys too."""
    from hydra._internal.utils import get_args_parser
    from omegaconf import OmegaConf

    if not output.sweep:
        return
    sweeper = OmegaConf.select(output.config, "hydra.sweeper")
    params = sweeper.get("params") or {}
    output.swept += [override_key(k) for k in params if override_key(k) not in output.swept]
    if str(sweeper.get("_target_", "")).endswith(".OptunaSweeper"):
        from dlrun import search

        if config_name != "train":
            raise DlrunError(
                "hydra/sweeper=optuna searches training runs (their summary.json holds the value): "
                "use it with dlrun train"
            )

        overrides = get_args_parser().parse_known_args(args)[0].overrides
        overrides = [o for o in overrides if not override_key(o).startswith("hydra")]
        for message in check_job(config_name, search.check(sweeper, overrides)):
            warn(message)
    elif params:
        preflight(config_name, args + [f"{k}={v}" for k, v in params.items()])


def end_sweep(output: Output, stopped: bool, interrupted: bool = False) -> int:
    """The sweep's last lines: the jobs that did not complete, and the exit code. When the sweep
    stopped early (Ctrl-C, a launcher failure), Hydra never reached the end of the sweep, so its
    end-of-sweep callbacks (the summary table, summary.csv, the plots) run here."""
    from omegaconf import OmegaConf

    from dlrun import rundir, sweep

    if stopped:
        from hydra.utils import instantiate

        if interrupted:
            # A launcher's worker processes can be killed while they stop (joblib does):
            # their jobs were interrupted all the same.
            for job in sweep.job_dirs(output.path):
                if sweep.job_end(job)[0] == "unknown":
                    record_end(job, (job / rundir.CONFIG).stat().st_mtime, KeyboardInterrupt())

        # In reverse, as Hydra ends them: a callback ends after those it was listed before.
        callbacks = (OmegaConf.select(output.config, "hydra.callbacks") or {}).items()
        for name, params in reversed(list(callbacks)):
            try:
                instantiate(params).on_multirun_end(config=output.config)
            except Exception as e:  # noqa: BLE001 - one broken callback must not hide the rest
                print(f"warning: the sweep's {name} callback failed: {describe(e)}", file=sys.stderr)
    return 1 if sweep.report_unfinished(output.path) else 0


def make_task(command: str, swept: list[str] | None = None) -> Any:
    """The function Hydra calls once per job, with the composed config. Every job that starts
    leaves a summary.json saying how it ended. In a sweep, a job that fails, for any reason, is
    reported in one line and the other jobs run; Ctrl-C stops the sweep."""

    def task(cfg: Any) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from dlrun.config import validate

        join_submitit_ranks()
        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        in_sweep = hc.mode == RunMode.MULTIRUN
        started = time.time()
        with user_errors():
            try:
                validate(cfg)
                # A submitit job of several tasks (joined above) is one DDP run that starts here;
                # under torchrun the ranks started before the run directory was claimed.
                distributed.check_config(cfg, sweep=False, command=command)
                distributed.start(cfg)
                distributed.set_threads(cfg)  # before any work: trainer.threads
                module = importlib.import_module("dlrun.train" if command == "train" else "dlrun.lr_find")
                return module.main(cfg, run_dir)
            except BaseException as e:
                if not distributed.world().main:
                    raise  # rank 0 records how the run ended
                status = record_end(run_dir, started, e)
                if not (in_sweep and isinstance(e, Exception)):
                    raise  # one run: a user error is one line, anything else a bug's traceback
                job = describe_job(hc.job.num, list(hc.overrides.task), swept)
                print_error(f"{job} {status}: {describe(e)}")
                if verbose():
                    traceback.print_exception(e)
        return None

    return task


def join_submitit_ranks() -> None:
    """A submitit job of several tasks (hydra.launcher.tasks_per_node, nodes) is one
    DistributedDataParallel run, each task one rank: submitit knows the ranks (from SLURM, or
    its local executor) and exports them the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). Each task keeps every GPU in view and takes its LOCAL_RANK one."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or "RANK" in os.environ:
        return
    import submitit
    from submitit.helpers import TorchDistributedEnvironment

    if submitit.JobEnvironment().num_tasks > 1:
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def record_end(run_dir: Path, started: float, error: BaseException) -> str:
    """Write summary.json for a job that ended with `error`, unless the job wrote its own (a
    diverged or interrupted run, a user error the loop recorded). Returns the status it holds."""
    from dlrun import rundir, runs

    path = run_dir / rundir.SUMMARY
    if path.is_file():
        written = runs.read_summary(path)
        return written["status"] if written else "failed"
    status = "interrupted" if is_interrupt(error) else "failed"
    try:
        from dlrun.train import Summary

        Summary(run_dir, None, started, None).write(status, rundir.read_metrics(run_dir), describe(error))
    except Exception as e:  # noqa: BLE001 - never hide the job's own error behind this one
        print(f"warning: could not write {path}: {describe(e)}", file=sys.stderr)
    return status


def is_interrupt(error: BaseException) -> bool:
    """Ctrl-C: caught in the loop (which saves a checkpoint and exits with 130) or not."""
    return isinstance(error, KeyboardInterrupt) or (isinstance(error, SystemExit) and error.code == 130)


def describe(error: BaseException) -> str:
    """An exception in one line: a user error's message, anything else with its type."""
    if isinstance(error, DlrunError):
        return first_line(error)
    if is_interrupt(error):
        return "stopped by Ctrl-C"
    if isinstance(error, SystemExit):
        return f"exited with code {error.code}"
    return f"{type(error).__name__}: {first_line(error)}"


def print_error(text: str) -> None:
    """One `error: ...` line on stderr (the text is shown as it is, never read as markup)."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {escape(text)}")


def describe_job(num: int, overrides: list[str], swept: list[str] | None) -> str:
    """`job 3 (seed=1 data.bptt=70)`: a sweep job by its number and its swept values (all its
    overrides when which were swept is not known)."""
    shown = [
        o
        for o in overrides
        if not o.startswith("hydra") and (swept is None or o.split("=")[0].lstrip("+~") in swept)
    ]
    return f"job {num}" + (f" ({' '.join(shown)})" if shown else "")


def expand_resume(args: list[str]) -> list[str]:
    """`resume=RUN_DIR`: re-compose the run's own overrides (then any new ones) and
    write into RUN_DIR itself, so the resumed run has the config it started with. The run
    directory is data: only its non-hydra overrides are replayed, they are checked like any
    other, and new overrides may not change the model or the optimizer the checkpoint holds."""
    resume = [a for a in args if a.startswith("resume=")]
    if not resume:
        return args
    value = override_value(resume[-1])
    if value is None:  # resume=null
        return args
    if any(a in ("-m", "--multirun") for a in args):
        raise DlrunError("resume= continues one run and cannot be swept: drop -m")
    from dlrun import rundir

    run_dir = rundir.existing_run(str(value), need=rundir.CHECKPOINT).resolve()
    original = saved_overrides(run_dir)
    check_unchanged(run_dir, original, args)
    return original + args + [f"hydra.run.dir={hydra_quote(str(run_dir))}"]


def saved_overrides(run_dir: Path) -> list[str]:
    """The overrides a run was started with (`.hydra/overrides.yaml`), without `resume=` and
    without any `hydra...` override: Hydra never saves those there, so one found there was put
    there by hand, and it could make Hydra call any function (`hydra.callbacks.x._target_`)."""
    from omegaconf import ListConfig, OmegaConf

    from dlrun import rundir

    path = run_dir / rundir.OVERRIDES
    try:
        saved = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - missing file, YAML errors alike
        raise DlrunError(f"cannot read {path} ({first_line(e)}): the run directory is damaged") from None
    if not isinstance(saved, ListConfig) or not all(isinstance(o, str) for o in saved):
        raise DlrunError(f"{path} is not a list of overrides: the run directory is damaged")
    kept, dropped = [], []
    for line in saved:
        key = override_key(line)
        if key == "resume":
            continue
        (dropped if key == "hydra" or key.startswith(("hydra.", "hydra/")) else kept).append(line)
    if dropped:
        warn(f"ignoring {', '.join(dropped)} in {path}: a run directory cannot change how Hydra runs")
    return kept


def check_unchanged(run_dir: Path, original: list[str], args: list[str]) -> None:
    """Refuse new overrides that change the model or the optimizer of a resumed run: the
    checkpoint holds their weights and state, which would not fit (or silently not apply)."""
    from hydra._internal.utils import get_args_parser

    new = [
        a
        for a in get_args_parser().parse_known_args(args)[0].overrides
        if override_key(a) not in ("resume", "hydra") and not override_key(a).startswith(("hydra.", "hydra/"))
    ]
    if not new:
        return
    try:
        before, after = (resume_state(original + extra) for extra in ([], new))
    except Exception:  # noqa: BLE001 - a bad override: preflight says what is wrong with it
        return
    keys = sorted(before.keys() | after.keys(), key=lambda k: (not k.endswith(".name"), k))
    changed = [f"{k} ({before.get(k)} -> {after.get(k)})" for k in keys if before.get(k) != after.get(k)]
    if changed:
        raise DlrunError(
            f"resume={run_dir} continues the run with the model and optimizer in its checkpoint, but "
            f"the new overrides change {', '.join(changed[:4])}: start a new run to train another one"
        )


def resume_state(overrides: list[str]) -> dict[str, Any]:
    """The keys whose values a checkpoint depends on: the model, the optimizer, the weight-decay
    mode (it decides the optimizer's parameter groups) and the fine-tuning phases."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dlrun.config_tree import configs_dir

    with initialize_config_dir(str(configs_dir()), version_base="1.3", job_name="dlrun"):
        cfg = compose("train", overrides=overrides)
    state = {"regularization.wd_mode": cfg.regularization.get("wd_mode")}
    for group in ("model", "optimizer", "finetune"):
        tree = OmegaConf.to_container(cfg[group], resolve=False)
        state |= {f"{group}.{k}": v for k, v in tree.items()}
    return state


def override_key(line: str) -> str:
    """The key (or group) of an override, without `+`, `++` or `~`."""
    return line.lstrip("~+").split("=", 1)[0].split("@", 1)[0]


def warn(message: str) -> None:
    """One line on stderr; the run goes on."""
    print(f"warning: {message}", file=sys.stderr)


# --- any path a shell can pass --------------------------------------------------------

# Keys whose value is a file or folder: `resume`, `data.path`, `data.root`, `model.weights_path`,
# `model.init_from`, `hydra.run.dir`, `hydra.sweep.dir`... Their values are taken as the shell passed them.
PATH_LEAVES = ("path", "root", "dir", "weights_path", "init_from")
# Hydra flags whose next word is their value, not an override.
VALUE_FLAGS = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--package", "-p"}
# Hydra runs one of these per command (its own check ends in a traceback).
MODES = {"-m": "-m", "--multirun": "-m", "--cfg": "--cfg", "-c": "--cfg", "--info": "--info", "-i": "--info"}
# Values Hydra reads as they are; anything else in a path value is quoted for it.
SWEEP_FUNCTION = re.compile(r"(choice|range|interval|glob|tag|sort|shuffle)\(")


def hydra_args(args: list[str]) -> list[str]:
    """The words after the command, made safe for Hydra: one mode flag at most, and path
    values (spaces, accents, commas, apostrophes, `~`) quoted in Hydra's override grammar."""
    modes = sorted({MODES[a.split("=")[0]] for a in args if a.split("=")[0] in MODES})
    if len(modes) > 1:
        if modes == ["--cfg", "-m"]:
            raise DlrunError("--cfg shows one job's config and cannot be combined with -m: drop -m")
        raise DlrunError(f"{' and '.join(modes)} cannot be combined: use one of them per command")
    multirun = "-m" in modes
    out: list[str] = []
    for i, arg in enumerate(args):
        m = re.fullmatch(r"(~|\+\+|\+)?([\w.\-]+)=(.*)", arg, re.S)
        after_flag = i > 0 and args[i - 1] in VALUE_FLAGS
        if m and not after_flag and (m[2] == "resume" or m[2].rsplit(".", 1)[-1] in PATH_LEAVES):
            arg = f"{m[1] or ''}{m[2]}={path_value(m[3], multirun)}"
        out.append(arg)
    return out


def path_value(value: str, multirun: bool) -> str:
    """A path as a Hydra override value. Already quoted for Hydra, `null` or empty: as it is. In
    a sweep (-m), commas separate values as for any key; quote a path with a comma Hydra's way."""
    if value in ("", "null") or (len(value) > 1 and value[0] in "'\"" and value[-1] == value[0]):
        return value
    if multirun and SWEEP_FUNCTION.match(value):
        return value
    parts = split_sweep(value) if multirun else [value]
    return ",".join(hydra_quote(os.path.expanduser(p)) for p in parts)


def split_sweep(value: str) -> list[str]:
    """`a.csv,b.csv` -> the two paths; a comma inside `${...}` does not separate."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(value):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    return parts + [value[start:]]


# --- checking overrides before Hydra runs anything ---------------------------------


def preflight(config_name: str, args: list[str], deep: bool = True) -> None:
    """Compose the config the way Hydra will, and turn a misspelt key, an unknown group
    option or a bad value into one clear DlrunError. Sweeps are checked value by value."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed_args, unknown = get_args_parser().parse_known_args(args)
    flags = [a.split("=")[0] for a in unknown if a.startswith("--")]
    if flags:
        # `--resume DIR` would otherwise reach the override parser as the override "DIR".
        key = flags[0][2:].replace("-", "_")
        raise DlrunError(
            f"{flags[0]} is not an option: settings are key=value overrides "
            f"({key}=VALUE, for example resume=RUN_DIR); `dlrun --help` lists the options"
        )
    try:
        overrides = OverridesParser.create().parse_overrides(parsed_args.overrides)
    except Exception as e:  # noqa: BLE001 - Hydra's parse errors carry the explanation
        raise DlrunError(f"cannot read the overrides: {first_line(e)}") from e
    overrides = [o for o in overrides if not o.key_or_group.startswith("hydra")]
    sweeps = [o for o in overrides if o.is_sweep_override()]
    if sweeps and not parsed_args.multirun:
        raise DlrunError(
            f"{sweeps[0].input_line} is a sweep: add -m to run one job per value "
            f"(dlrun {config_name.replace('_', '-')} -m ...)"
        )
    warnings: dict[str, None] = {}  # each once, however many jobs share the override
    for job in job_variants(overrides):
        warnings |= dict.fromkeys(check_job(config_name, job, deep))
    for message in warnings:
        warn(message)


def job_variants(overrides: list[Any]) -> list[list[Any]]:
    """Jobs in which every swept value appears at least once: the first value of every
    sweep, then each other value of each sweep in turn."""

    def values(o: Any) -> list[str]:
        if not o.is_sweep_override():
            return [o.input_line]
        try:
            return [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        except Exception:  # noqa: BLE001 - glob sweeps and the like: Hydra checks them
            return []

    per_override = [values(o) for o in overrides]
    first = [v[0] for v in per_override if v]
    jobs = [first]
    for i, vals in enumerate(per_override):
        for v in vals[1:]:
            job = list(first)
            job[sum(1 for p in per_override[:i] if p)] = v
            jobs.append(job)
    return jobs


def check_job(config_name: str, job: list[str], deep: bool = True) -> list[str]:
    """Check one job's overrides: group options exist, keys exist, values are allowed, nothing
    dlrun needs is deleted. Returns warnings: keys added with `+` that nothing reads."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dlrun.config import GROUPS, OPTIONAL_GROUPS, rules_for, validate
    from dlrun.config_tree import configs_dir, group_options
    from dlrun.errors import closest

    command = config_name.replace("_", "-")
    parsed = OverridesParser.create().parse_overrides(job)
    is_group = [o.key_or_group in GROUPS or "/" in o.key_or_group for o in parsed]
    for o, group in zip(parsed, is_group):
        value = o.value()
        if o.is_delete() and o.key_or_group in GROUPS and o.key_or_group not in OPTIONAL_GROUPS:
            options = group_options(o.key_or_group)
            raise DlrunError(
                f"~{o.key_or_group} would remove the {o.key_or_group} group, which dlrun needs: "
                f"pick one instead ({o.key_or_group}={', '.join(options)})"
            )
        # A list-valued group (logger=[csv,mlflow]) selects several options at once.
        names = value if isinstance(value, list) else [value]
        if group and o.key_or_group in GROUPS and all(isinstance(v, str) for v in names):
            options = group_options(o.key_or_group)
            for name in names:
                if name not in options:
                    hint = closest(name, options)
                    raise DlrunError(
                        f"{o.key_or_group}={name} is not a {o.key_or_group} config"
                        + (f" (did you mean {o.key_or_group}={hint}?)" if hint else "")
                        + f": use one of {', '.join(options)}"
                    )
    with initialize_config_dir(str(configs_dir()), version_base="1.3", job_name="dlrun"):
        groups_only = [s for s, g in zip(job, is_group) if g]
        try:
            base = compose(config_name, overrides=groups_only)
        except Exception as e:  # noqa: BLE001 - Hydra's message says what is wrong
            raise DlrunError(first_line(e)) from e
        keys = flat_keys(base)
        rules = rules_for(base, deep)
        # Mappings whose keys the user names (model.emb_szs.<column>): entries come and go.
        open_maps = {k for k, rule in rules.items() if rule.keyed}

        def in_open_map(key: str) -> bool:
            return any(key.startswith(m + ".") for m in open_maps)

        warnings = []
        for o, group in zip(parsed, is_group):
            key = o.key_or_group
            if group:
                continue
            if o.is_delete():
                if key in keys and not in_open_map(key):
                    raise DlrunError(
                        f"~{key} would delete {key}, which dlrun needs: set it instead "
                        f"({key}=VALUE; `dlrun {command} --cfg job` shows its value)"
                    )
            elif o.is_add() or o.is_force_add():
                # `+` adds keys on purpose (a key some code reads with a default), so an unknown
                # one is a warning, not an error; but a misspelling is named with its fix.
                if deep and key not in keys and key not in rules and not in_open_map(key):
                    hint = closest(key, keys | set(rules))
                    warnings.append(
                        f"+{key} adds a key that dlrun does not read"
                        + (f" (did you mean {hint}?)" if hint else "")
                        + "; the run goes on without it"
                    )
            elif key not in keys and not any(k.startswith(key + ".") for k in keys):
                part = key.split(".")
                if part[0] == "logger" and len(part) > 1 and part[1] in group_options("logger"):
                    raise DlrunError(
                        f"{key} sets the {part[1]} logger, which is not chosen: "
                        f"add it to the loggers, e.g. 'logger=[csv,{part[1]}]'"
                    )
                hint = closest(key, keys)
                raise DlrunError(
                    f"{key} is not a config key"
                    + (f" (did you mean {hint}?)" if hint else "")
                    + f"; `dlrun {command} --cfg job` lists every key"
                )
        try:
            cfg = compose(config_name, overrides=job)
        except Exception as e:  # noqa: BLE001
            raise DlrunError(first_line(e)) from e
    validate(cfg, deep)
    return warnings


def flat_keys(cfg: Any, prefix: str = "") -> set[str]:
    """Every dotted key path of a config (lists count as leaves)."""
    keys = set()
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        keys.add(path)
        if hasattr(v, "items"):
            keys |= flat_keys(v, path + ".")
    return keys
