"""Launching: the command lines panda hands to torchrun and to DeepSpeed's launcher, the
SLURM variables an srun task adopts, and real 2-process runs of ``panda train`` started by
``--nproc`` (torchrun), ``--launcher deepspeed`` and two srun-like tasks, which must train
to the same losses (the ranks found each other and split the data the same way)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from panda import launch
from panda.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]


# -- command lines ----------------------------------------------------------------------------

def test_single_node_uses_torchrun_standalone_and_drops_launch_options():
    plan = launch.LaunchPlan(nproc=4, max_restarts=2)
    command = launch.launch_command(plan, ["train", "r.toml", "--nproc", "4", "--launcher=torchrun",
                                           "--max-restarts", "2", "--set", "optim.lr=1"])
    assert command[1:] == ["-m", "torch.distributed.run", "--nproc-per-node", "4", "--standalone",
                           "--max-restarts", "2", "-m", "panda", "train", "r.toml", "--set",
                           "optim.lr=1"]


def test_several_nodes_pass_through_to_torchrun():
    plan = launch.LaunchPlan(nproc=8, nnodes=2, node_rank=1, master_addr="node0",
                             master_port=29400)
    command = launch.launch_command(plan, ["train", "r.toml", "--nnodes", "2", "--node-rank", "1",
                                           "--master-addr", "node0", "--master-port=29400"])
    assert command[3:13] == ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1",
                             "--master-addr", "node0", "--master-port", "29400"]
    assert command[-4:] == ["-m", "panda", "train", "r.toml"]


def test_deepspeed_launcher_command(monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    plan = launch.LaunchPlan(nproc=2, launcher="deepspeed", master_port=29600)
    command = launch.launch_command(plan, ["train", "r.toml", "--nproc=2",
                                           "--launcher", "deepspeed"])
    assert command[1:] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                           "--no_local_rank", "--master_port", "29600", "--module", "panda",
                           "train", "r.toml"]


def test_a_launcher_local_rank_argument_is_dropped_into_the_environment():
    environ: dict[str, str] = {}
    argv = ["panda", "train", "r.toml", "--local_rank=3"]
    assert launch.strip_local_rank_argument(argv, environ) == ["panda", "train", "r.toml"]
    assert environ == {"LOCAL_RANK": "3"}
    assert launch.strip_local_rank_argument(["p", "--local-rank", "1", "x"], {}) == ["p", "x"]


# -- SLURM ----------------------------------------------------------------------------------

def srun_task(procid: int, ntasks: int = 4, **extra: str) -> dict[str, str]:
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_STEP_ID": "0",
            "SLURM_LOCALID": str(procid % 2), "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu[07-08],cpu1", "SLURM_NTASKS_PER_NODE": "2(x2)", **extra}


def test_an_srun_task_adopts_rank_world_and_master_from_slurm(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no scontrol here: parse the list
    environ = srun_task(3)
    launch.adopt_slurm_environment(environ)
    assert {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                    "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 4242)}


def test_slurm_never_overrides_what_a_launcher_or_the_user_set():
    environ = srun_task(1, MASTER_ADDR="10.0.0.1", MASTER_PORT="1234")
    launch.adopt_slurm_environment(environ)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("10.0.0.1", "1234")
    torchrun_child = srun_task(1, RANK="5", WORLD_SIZE="8")
    launch.adopt_slurm_environment(torchrun_child)
    assert (torchrun_child["RANK"], torchrun_child["WORLD_SIZE"]) == ("5", "8")
    batch_script = {k: v for k, v in srun_task(0).items() if k != "SLURM_STEP_ID"}
    launch.adopt_slurm_environment(batch_script)
    assert "RANK" not in batch_script  # sbatch's own shell is no rank


def test_first_host_of_slurm_node_lists(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert launch.first_slurm_host("node3") == "node3"
    assert launch.first_slurm_host("a100-[002-004,9]") == "a100-002"
    assert launch.first_slurm_host("cpu1,gpu[1-2]") == "cpu1"


def test_srun_one_task_per_node_becomes_each_node_torchrun_agent(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    environ = {**srun_task(1, ntasks=2), "SLURM_NNODES": "2", "SLURM_NODEID": "1"}
    plan = launch.plan_for_srun_node(8, "torchrun", 0, environ)
    assert (plan.nnodes, plan.node_rank, plan.master_addr, plan.nproc) == (2, 1, "gpu07", 8)
    with pytest.raises(UsageError, match="DeepSpeed's launcher starts the ranks"):
        launch.plan_for_srun_node(8, "deepspeed", 0, environ)
    with pytest.raises(UsageError, match="one task per node"):
        launch.plan_for_srun_node(8, "torchrun", 0, {**srun_task(1), "SLURM_NNODES": "2"})


def test_relaunch_decisions(monkeypatch):
    launched = []
    monkeypatch.setattr(os, "execv", lambda path, command: launched.append(command))
    for name in [k for k in os.environ if k.startswith("SLURM_")] + ["RANK", "WORLD_SIZE"]:
        monkeypatch.delenv(name, raising=False)
    launch.relaunch_if_needed(None, ["train", "r.toml"])
    launch.relaunch_if_needed(1, ["train", "r.toml"])
    assert launched == []  # one process is the whole run
    launch.relaunch_if_needed(2, ["train", "r.toml", "--nproc", "2"])
    assert launched[-1][1:6] == ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                                 "--standalone"]
    with pytest.raises(UsageError, match="needs --node-rank and --master-addr"):
        launch.relaunch_if_needed(2, ["train", "r.toml"], nnodes=2)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    launch.relaunch_if_needed(2, ["train", "r.toml", "--nproc", "2"])
    assert len(launched) == 1  # torchrun or deepspeed started us: never again


# -- real runs ------------------------------------------------------------------------------

RECIPE = """
[run]
name = "launch"
seed = 1
output_dir = "{out}"
[model]
preset = "tiny-llama"
dtype = "float32"
[data]
max_seq_length = 64
num_workers = 0
[[data.sources]]
name = "instruction"
path = "{data}"
[method]
name = "sft"
[optim]
lr = 3e-3
max_grad_norm = 1.0
[schedule]
name = "constant"
warmup_steps = 0
[train]
per_device_batch_size = 4
gradient_accumulation_steps = 2
max_steps = 3
precision = "fp32"
log_every = 1
[backend]
name = "deepspeed"
zero_stage = 2
[log]
tensorboard = false
"""


def write_recipe(folder: Path) -> Path:
    path = folder / "recipe.toml"
    path.write_text(RECIPE.format(out=folder / "out", data=ROOT / "recipes/data/demo_train.jsonl"))
    return path


def losses(folder: Path) -> list[float]:
    lines = (folder / "out" / "metrics.jsonl").read_text().splitlines()
    return [record["loss"] for record in map(json.loads, lines) if "loss" in record]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def panda_train(folder: Path, *args: str, env: dict[str, str] | None = None
                ) -> subprocess.Popen:
    recipe = folder / "recipe.toml"
    if not recipe.is_file():
        write_recipe(folder)
    return subprocess.Popen([sys.executable, "-m", "panda", "train", str(recipe), *args],
                            cwd=folder, env=env or clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def launched_runs(tmp_path_factory, deepspeed_cpu_ops):
    """The same 3 steps of the deepspeed backend, 2 processes, started three ways."""
    from standins import free_port

    tmp = tmp_path_factory.mktemp("launch")
    for name in ("torchrun", "deepspeed", "srun"):
        (tmp / name).mkdir()
    finish(panda_train(tmp / "torchrun", "--nproc", "2"))
    finish(panda_train(tmp / "deepspeed", "--nproc", "2", "--launcher", "deepspeed",
                       "--master-port", str(free_port())))
    # two tasks as srun starts them (one per rank): nothing but SLURM's variables to go on
    port = str(free_port())
    write_recipe(tmp / "srun")
    tasks = [panda_train(tmp / "srun", env=clean_env(**{**srun_task(rank, ntasks=2),
                                                        "SLURM_JOB_NODELIST": "localhost",
                                                        "MASTER_PORT": port}))
             for rank in range(2)]
    for task in tasks:
        finish(task)
    return tmp


@pytest.mark.slow
def test_deepspeed_launcher_and_srun_tasks_train_like_torchrun(launched_runs):
    reference = losses(launched_runs / "torchrun")
    assert len(reference) == 3
    assert losses(launched_runs / "deepspeed") == pytest.approx(reference, rel=1e-6)
    assert losses(launched_runs / "srun") == pytest.approx(reference, rel=1e-6)
    assert (launched_runs / "srun" / "out" / "final" / "model.safetensors").is_file()
