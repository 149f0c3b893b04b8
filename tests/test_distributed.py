"""Training one run in several processes (DDP) and the threads each process takes: each data
source's share of every batch (no processes needed: a rank and a world size are given), the
`trainer.threads` rule, the user mistakes of a distributed run; the real 2-process runs on
gloo are slow-marked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DLRUN, QUICK, assert_user_error, compose, dlrun, metrics_rows, prose, summary, train
from test_images import image_folder

from dlrun import distributed
from dlrun.errors import DlrunError
from dlrun.family import build_data

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


def joined(parts: list) -> object:
    """The ranks' parts of one batch put back together, in rank order."""
    if isinstance(parts[0], (tuple, list)):
        return tuple(torch.cat(p) for p in zip(*parts))
    return torch.cat(parts)


def same(a: object, b: object) -> bool:
    if isinstance(a, (tuple, list)):
        return all(same(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and torch.equal(a, b)


def rows(x: object) -> int:
    return (x[0] if isinstance(x, (tuple, list)) else x).shape[0]


def check_shards(overrides: tuple[str, ...], world: int, split: str, equal: bool) -> None:
    """Every batch of `split`, epoch 1, is its ranks' parts in rank order; with `equal` every
    rank gets the same number of items per batch (training: the steps DDP takes together)."""
    cfg = compose(*overrides)
    whole = list(getattr(build_data(cfg, CPU), split).epoch(1))
    parts = []
    for rank in range(world):
        batches = getattr(build_data(cfg, CPU), split)
        batches.shard(rank, world)
        parts.append(list(batches.epoch(1)))
        if split == "train":  # resuming mid-epoch: the same batches from `start` on
            later = list(batches.epoch(1, start=2))
            assert all(same(a[1], b[1]) for a, b in zip(later, parts[-1][2:], strict=True))
    if equal:
        assert all(len(p) == len(whole) for p in parts)
    for i, (x, y) in enumerate(whole):
        mine = [p[i] for p in parts if i < len(p)]
        assert same(joined([m[1] for m in mine]), y), f"{split} batch {i}"
        if split == "valid" or "crop_pad" not in " ".join(overrides):  # augmentation is random
            assert same(joined([m[0] for m in mine]), x), f"{split} batch {i}"
        if equal:
            assert {rows(m[0]) for m in mine} == {rows(x) // world}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prose(tmp_path_factory.mktemp("corpus"), 8, 6_000)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_folder(tmp_path_factory.mktemp("pics"), n=11)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_gets_its_part_of_every_batch_of_every_family(world, corpus, pictures):
    bs = f"data.bs={6 * world}"
    families = {
        "tensors": ("model=cnn", bs),
        "tensors, augmented": ("model=cnn", bs, "data.augment.crop_pad=1", "data.augment.flip=true"),
        "table": ("model=tabular", bs),
        "text": (
            "model=rnn",
            "data=text",
            f"data.path={corpus}",
            bs,
            "data.bptt=10",
            "data.variable_bptt=true",
        ),
        "files": (
            "model=cnn",
            "data=imagefolder",
            f"data.path={pictures}",
            bs,
            "data.size=8",
            "data.num_workers=0",
        ),
    }
    for name, overrides in families.items():
        check_shards(overrides, world, "train", equal=True)
        # Validation keeps every item once; a last, smaller batch is split as evenly as it goes.
        check_shards(overrides, world, "valid", equal=name == "text")


def test_one_process_has_no_shard_no_wrapper(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    model = torch.nn.Linear(2, 2)
    assert distributed.world() == distributed.World()
    assert distributed.wrap(model, CPU) is model
    loss = torch.tensor(0.5)
    assert distributed.mean(loss, True) == (0.5, True)
    assert distributed.mean_sum(loss) is loss


def test_the_world_comes_from_torchruns_environment(monkeypatch):
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.world() == distributed.World(rank=3, size=4, local_rank=1, local_size=2)
    assert not distributed.world().main
    assert distributed.hydra_overrides() == [
        "hydra.output_subdir=null",
        f"hydra.job_logging.handlers.file.filename={os.devnull}",
    ]


# --- trainer.threads ----------------------------------------------------------------


@pytest.mark.parametrize(
    "value, n_jobs, local_size, cores, expected",
    [
        ("auto", None, 1, 16, 16),  # alone on the machine: every core it may use
        ("auto", 2, 1, 16, 8),  # joblib launcher, 2 jobs at a time
        ("auto", -1, 1, 16, 1),  # n_jobs=-1: a job per core
        ("auto", -2, 1, 16, 1),  # all cores but one: 15 jobs
        ("auto", 3, 1, 16, 5),
        ("auto", None, 4, 16, 4),  # torchrun --nproc_per_node=4
        ("auto", 2, 4, 16, 2),
        ("auto", 4, 8, 16, 1),  # more jobs than cores: one each
        (3, 2, 4, 16, 3),  # an explicit number wins
    ],
)
def test_threads_resolution(value, n_jobs, local_size, cores, expected):
    assert distributed.threads(value, n_jobs, local_size, cores) == expected


def test_threads_are_set_before_training_and_recorded(tmp_path):
    train(tmp_path, "trainer.epochs=1", "trainer.limit_batches=2", "trainer.threads=3")
    assert summary(tmp_path)["threads"] == 3


def test_auto_threads_count_the_joblib_launchers_jobs(monkeypatch):
    """The launcher's n_jobs as the job reads it: from the Hydra config of the sweep."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from dlrun.config import configs_dir

    monkeypatch.setattr(distributed, "cores", lambda: 12)
    for launcher, expected in ((["hydra/launcher=joblib", "hydra.launcher.n_jobs=3"], 4), ([], 12)):
        with initialize_config_dir(str(configs_dir()), version_base="1.3", job_name="test"):
            cfg = hydra_compose("train", overrides=launcher, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        try:
            assert distributed.set_threads(cfg) == expected
            assert torch.get_num_threads() == expected
        finally:
            torch.set_num_threads(1)
            HydraConfig.instance().cfg = None


@pytest.mark.slow
def test_auto_threads_share_the_cores_among_joblib_jobs(tmp_path):
    proc = dlrun(
        "train", "-m", *QUICK, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={tmp_path}", "trainer.epochs=1", "trainer.limit_batches=2", "seed=1,2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for job in ("0", "1"):
        assert summary(tmp_path / job)["threads"] == max(1, distributed.cores() // 2)


@pytest.mark.parametrize("value", ["0", "many", "1.5"])
def test_a_bad_threads_value_is_a_user_error(value):
    proc = dlrun("train", f"trainer.threads={value}", "--cfg", "job")
    assert_user_error(proc, "trainer.threads=", "'auto'")


# --- user mistakes ------------------------------------------------------------------

# One rank of a 2-process run, without the other: every check below stops it before it
# would wait for a second process.
RANK0 = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}


@pytest.fixture
def rank0(monkeypatch):
    for k, v in RANK0.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("data.bs=63",), ("data.bs=63 is the global batch", "multiple of 2", "data.bs=62")),
        (("optimizer.lr=find",), ("optimizer.lr=find", "dlrun lr-find")),
        (("trainer.devices=4",), ("trainer.devices=4", "2 processes", "--nproc_per_node")),
        (("trainer.device=mps",), ("trainer.device=mps",)),
        (("finetune.freeze_epochs=1",), ("finetune.freeze_epochs",)),
    ],
)
def test_distributed_mistakes(args, fragments, rank0):
    with pytest.raises(DlrunError) as e:
        distributed.check_config(compose(*args), sweep=False, command="train")
    assert all(f in str(e.value) for f in fragments), e.value


def test_a_sweep_or_lr_find_runs_in_one_process(rank0):
    with pytest.raises(DlrunError, match="cannot run a sweep: drop -m"):
        distributed.check_config(compose(), sweep=True, command="train")
    with pytest.raises(DlrunError, match="dlrun lr-find runs in one process"):
        distributed.check_config(compose(config_name="lr_find"), sweep=False, command="lr-find")


def test_trainer_devices_trains_one_run_not_a_sweep():
    with pytest.raises(DlrunError, match="trainer.devices=2 trains one run .* cannot run a sweep"):
        distributed.devices_to_launch(compose("trainer.devices=2", "trainer.device=cpu"), sweep=True)


def test_an_incomplete_torchrun_environment_is_a_user_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(DlrunError, match="WORLD_SIZE=2 is set but .* torchrun"):
        distributed.world()


def test_every_rank_stops_before_waiting_for_the_others(tmp_path):
    """The checks run before the process group starts: rank 0 alone exits with the message."""
    proc = dlrun("train", *QUICK, "data.bs=63", cwd=tmp_path, env=RANK0, timeout=60)
    assert_user_error(proc, "data.bs=63 is the global batch")
    assert not (tmp_path / "outputs").exists()


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the GPUs")
def test_more_devices_than_gpus_is_a_user_error(tmp_path):
    proc = dlrun("train", "trainer.devices=2", "trainer.device=cuda", cwd=tmp_path)
    assert_user_error(proc, "trainer.devices=2", "GPUs", f"{torch.cuda.device_count()}")
    assert not list((tmp_path / "outputs" / "train").iterdir())  # the claimed directory is removed again


# --- real processes (slow) ------------------------------------------------------------

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
DIGITS = ("trainer.epochs=4", "trainer.device=cpu", "trainer.threads=1", *QUICK)


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [TORCHRUN, "--nproc_per_node=2", "-m", "dlrun", "train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


@pytest.mark.slow
def test_two_gloo_processes_train_one_run_as_well_as_one_and_resume(tmp_path):
    one = tmp_path / "one"
    train(one, *DIGITS)
    torchrun(*DIGITS, cwd=tmp_path)
    runs = list((tmp_path / "outputs" / "train").iterdir())
    assert len(runs) == 1  # rank 0 claimed it, rank 1 wrote into it
    ddp = runs[0]
    assert files(ddp) == files(one)  # the same files, one of each: only rank 0 writes
    s1, s2 = summary(one), summary(ddp)
    assert (s1["processes"], s2["processes"]) == (1, 2)
    assert s2["status"] == "completed"
    # The global batch is data.bs in both: the same steps, the same accuracy band.
    assert s1["best"]["accuracy"] > 0.9 and abs(s2["best"]["accuracy"] - s1["best"]["accuracy"]) < 0.03
    # Validation added up over the ranks, with rank 0's BatchNorm statistics, is what one
    # process finds from the checkpoint.
    proc = dlrun("eval", str(ddp), "--weights", "last")
    assert proc.returncode == 0 and f"{s2['final']['valid_loss']:.4f}" in proc.stdout, proc.stdout
    # Resume with more epochs: the run continues in the same directory.
    torchrun(f"resume={ddp}", "trainer.epochs=6", cwd=tmp_path)
    rows = metrics_rows(ddp)
    assert [r["epoch"] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    assert summary(ddp)["epochs"] == 6 and len(list((tmp_path / "outputs" / "train").iterdir())) == 1


@pytest.mark.slow
def test_trainer_devices_launches_the_same_run_as_torchrun(tmp_path):
    torchrun(*DIGITS, "trainer.epochs=2", "hydra.run.dir=by_torchrun", cwd=tmp_path)
    proc = dlrun(
        "train", *DIGITS, "trainer.epochs=2", "trainer.devices=2", "hydra.run.dir=by_devices", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert metrics_rows(tmp_path / "by_devices", drop=("seconds",)) == metrics_rows(tmp_path / "by_torchrun")
    assert summary(tmp_path / "by_devices")["processes"] == 2


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_with_a_checkpoint_and_the_run_resumes(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [DLRUN, "train", *DIGITS, "trainer.epochs=200", "trainer.devices=2", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 300
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted; checkpoint saved" in out and "Traceback" not in out, out
    assert summary(run_dir)["status"] == "interrupted"
    stopped = len(metrics_rows(run_dir))
    proc = dlrun("train", f"resume={run_dir}", "trainer.epochs=" + str(stopped + 1), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["processes"] == 2


@pytest.mark.slow
def test_a_submitit_job_of_two_tasks_is_one_ddp_run(tmp_path):
    pytest.importorskip("submitit")
    proc = dlrun(
        "train", "-m", *DIGITS, "trainer.epochs=2", "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2", f"hydra.sweep.dir={tmp_path}", "seed=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = summary(tmp_path / "0")
    assert job["status"] == "completed" and job["processes"] == 2 and job["best"]["accuracy"] > 0.9
    log = (tmp_path / "0" / "train.log").read_text()
    assert log.count("training on") == 1  # rank 0 alone writes the log
