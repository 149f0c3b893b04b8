"""Run dlrun the way a user does: the installed console script, in a subprocess."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DLRUN = str(Path(sys.executable).parent / "dlrun")
# Quick settings for tests: no progress bar, a couple of short epochs.
QUICK = ["trainer.progress=false"]


def dlrun(
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    timeout: int = 300,
) -> subprocess.CompletedProcess:
    """Run `dlrun ARGS...` and return the finished process (text output)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [DLRUN, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def train(run_dir: Path, *overrides: str, command: str = "train") -> subprocess.CompletedProcess:
    """`dlrun train` into run_dir; fails the test with dlrun's output if it does not succeed."""
    proc = dlrun(command, *QUICK, f"hydra.run.dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def metrics_rows(run_dir: Path, drop: tuple[str, ...] = ("seconds",)) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit code 2, a short message containing every fragment, no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    for fragment in fragments:
        assert fragment in out, out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one CPU thread, in this process and in the `dlrun` subprocesses,
    and stay fast when the machine is busy (two threads of many tiny kernels slow down tenfold
    when other processes want the cores). Modules use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:  # module scope: before the module's training fixtures
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def prose(folder: Path, topics: int, chars: int) -> Path:
    """Real English prose from the bundled pydoc corpus (its first `topics` topics, at most
    `chars` characters), as a user's book.txt in `folder`."""
    from pydoc_data.topics import topics as all_topics

    path = folder / "book.txt"
    path.write_text("\n".join(all_topics[k] for k in list(all_topics)[:topics])[:chars], encoding="utf-8")
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def compose(*overrides: str, config_name: str = "train"):
    """The composed config a user would get from `dlrun train OVERRIDES`, checked as the CLI checks it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from dlrun.config import configs_dir, validate

    with initialize_config_dir(str(configs_dir()), version_base="1.3", job_name="test"):
        cfg = hydra_compose(config_name, overrides=list(overrides))
    validate(cfg)
    return cfg
