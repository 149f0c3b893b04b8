"""configs/ is found from the editable install and from a built wheel in a fresh venv."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO, dlrun

from dlrun.config import configs_dir


def test_editable_install_reads_the_repository_configs():
    assert configs_dir() == REPO / "configs"


def test_a_wheel_in_a_fresh_venv_carries_its_configs(tmp_path):
    wheels = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
    )
    wheel = next(wheels.glob("dlrun-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies (torch and the rest, several GB) come from this venv rather than
    # being installed again; dlrun itself comes only from the wheel.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import dlrun.config as c; print(c.configs_dir())"],
        cwd=elsewhere,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert where == str(Path(site) / "dlrun" / "configs")
    proc = subprocess.run(
        [str(venv / "bin" / "dlrun"), "train", "--cfg", "job", "model=tabular"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "name: penguins" in proc.stdout
    # Hydra finds dlrun's sweeper plugin (hydra_plugins/, a namespace package) in the wheel.
    proc = subprocess.run(
        [str(venv / "bin" / "dlrun"), "train", "--cfg", "hydra", "hydra/sweeper=optuna", "+sweep=dropout_wd"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "_target_: hydra_plugins.dlrun_optuna_sweeper" in proc.stdout and "0,0.25,0.5" in proc.stdout
    run = elsewhere / "run"
    proc = subprocess.run(
        [
            str(venv / "bin" / "dlrun"),
            "train",
            "trainer.epochs=1",
            "trainer.limit_batches=2",
            "trainer.progress=false",
            f"hydra.run.dir={run}",
        ],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (run / "summary.json").is_file()


def test_python_dash_m_dlrun_is_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "dlrun", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == dlrun("--help").stdout
