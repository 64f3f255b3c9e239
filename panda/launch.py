"""Start training processes through existing launchers, never a launcher of our own.

``panda train RECIPE --nproc 4`` re-executes itself as::

    python -m torch.distributed.run --nproc-per-node 4 --standalone -m panda train RECIPE ...

so torchrun's elastic agent owns rendezvous, environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT), restarts (``--max-restarts``), signal forwarding
and exit codes. Several nodes: run the same command on each node with
``--nnodes N --node-rank R --master-addr A --master-port P`` (torchrun's static
rendezvous). ``--launcher deepspeed`` hands the same job to DeepSpeed's launcher
(``python -m deepspeed.launcher.runner``) instead.

A process that a launcher already started is never re-launched:

* torchrun and the DeepSpeed launcher set RANK and WORLD_SIZE (the DeepSpeed
  launcher also appends ``--local_rank=N`` to the command line unless told
  not to; ``strip_local_rank_argument`` drops it);
* ``srun`` with one task per rank: the task takes RANK, WORLD_SIZE, LOCAL_RANK
  from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and MASTER_ADDR from the first
  host of the job's node list (``adopt_slurm_environment``);
* ``srun`` with one task per node and ``--nproc N``: each task becomes that
  node's torchrun agent, nodes and node rank taken from SLURM.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

Environ = "os._Environ[str] | dict[str, str]"
LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                  "--launcher", "--max-restarts")
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class LaunchPlan:
    """How many processes to start where, and with which launcher."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: Optional[int] = None
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    launcher: str = "torchrun"  # or "deepspeed"
    max_restarts: int = 0

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def needs_launch(self) -> bool:
        return self.nproc > 1 or self.nnodes > 1


def inside_distributed_run() -> bool:
    return ("WORLD_SIZE" in os.environ and "RANK" in os.environ) or started_by_srun()


# -- SLURM ----------------------------------------------------------------------------------

def started_by_srun(environ: Environ = os.environ) -> bool:
    """True in a task that ``srun`` started as one of several (not in the batch script,
    which has SLURM_PROCID too but no SLURM_STEP_ID)."""
    return ("SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ
            and int(environ.get("SLURM_NTASKS", "1")) > 1)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``scontrol show hostnames``, else parsed here."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    # "gpu[01-04,07],cpu3" -> "gpu01": the first name, its first range's first number
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    return prefix + rest.split("]")[0].split(",")[0].split("-")[0]


def slurm_master(environ: Environ = os.environ) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) for this job: the environment's, else the first host and a
    port derived from the job id (two jobs sharing a node do not collide)."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    addr = environ.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist
                                          else "127.0.0.1")
    port = int(environ.get("MASTER_PORT") or
               20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)
    return addr, port


def adopt_slurm_environment(environ: Environ = os.environ) -> None:
    """Under ``srun`` (one task per rank), set torch.distributed's variables from SLURM's,
    never overriding any already set: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT."""
    if not started_by_srun(environ) or "RANK" in environ:
        return
    environ["RANK"] = environ["SLURM_PROCID"]
    environ["WORLD_SIZE"] = environ["SLURM_NTASKS"]
    environ.setdefault("LOCAL_RANK", environ.get("SLURM_LOCALID", "0"))
    tasks_per_node = environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0].split(",")[0]
    environ.setdefault("LOCAL_WORLD_SIZE", tasks_per_node)
    addr, port = slurm_master(environ)
    environ.setdefault("MASTER_ADDR", addr)
    environ.setdefault("MASTER_PORT", str(port))


def plan_for_srun_node(nproc: int, launcher: str, max_restarts: int,
                       environ: Environ = os.environ) -> LaunchPlan:
    """The plan of an ``srun`` task that is one node's agent for ``nproc`` local ranks."""
    from panda.errors import UsageError

    if launcher == "deepspeed":
        raise UsageError("--launcher deepspeed under srun: DeepSpeed's launcher starts the "
                         "ranks of every node itself (over ssh, from its hostfile)",
                         hint="under srun use the default launcher (torchrun), or one srun task "
                         "per GPU without --nproc")
    nodes = int(environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES") or 1)
    if int(environ.get("SLURM_NTASKS", "1")) != nodes:
        raise UsageError(f"--nproc {nproc} under srun needs one task per node (got "
                         f"{environ.get('SLURM_NTASKS')} tasks on {nodes} nodes)",
                         hint="srun --ntasks-per-node=1 panda train ... --nproc N, or srun one "
                         "task per GPU without --nproc")
    addr, port = slurm_master(environ)
    return LaunchPlan(nproc=nproc, nnodes=nodes, node_rank=int(environ.get("SLURM_NODEID", "0")),
                      master_addr=addr, master_port=port, launcher=launcher,
                      max_restarts=max_restarts)


# -- command lines --------------------------------------------------------------------------

def torchrun_argv(nproc: int, panda_args: list[str], plan: LaunchPlan | None = None
                  ) -> list[str]:
    """The command that runs ``panda <panda_args>`` in ``nproc`` processes on this node."""
    plan = plan or LaunchPlan(nproc=nproc)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if plan.multi_node:
        command += ["--nnodes", str(plan.nnodes), "--node-rank", str(plan.node_rank or 0),
                    "--master-addr", plan.master_addr or "127.0.0.1",
                    "--master-port", str(plan.master_port or DEFAULT_MASTER_PORT)]
    else:
        command += ["--standalone"]
    if plan.max_restarts:
        command += ["--max-restarts", str(plan.max_restarts)]
    return [*command, "-m", "panda", *panda_args]


def deepspeed_argv(plan: LaunchPlan, panda_args: list[str]) -> list[str]:
    """The same job under DeepSpeed's launcher.

    For several nodes DeepSpeed reads the hosts from its hostfile (``/job/hostfile``):
    from the first node it starts every node over ssh; with ``--node-rank`` each node
    starts its own ranks (``--no_ssh``).
    """
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(plan.nproc),
               "--no_local_rank"]
    if plan.multi_node:
        command += ["--num_nodes", str(plan.nnodes)]
        if plan.node_rank is not None:  # every node starts its own launcher: no ssh
            command += ["--no_ssh", "--node_rank", str(plan.node_rank)]
    if plan.master_addr:
        command += ["--master_addr", plan.master_addr]
    if plan.master_port:
        command += ["--master_port", str(plan.master_port)]
    return [*command, "--module", "panda", *panda_args]


def without_option(args: list[str], name: str) -> list[str]:
    """``args`` minus ``name VALUE`` / ``name=VALUE`` (so the relaunched command does not loop)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out


def strip_local_rank_argument(argv: list[str], environ: Environ = os.environ) -> list[str]:
    """Drop the ``--local_rank=N`` a launcher appends (keeping N in LOCAL_RANK)."""
    out, skip = [], False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        for name in ("--local_rank", "--local-rank"):
            if arg.startswith(name + "="):
                environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
                break
            if arg == name and index + 1 < len(argv):
                environ.setdefault("LOCAL_RANK", argv[index + 1])
                skip = True
                break
        else:
            out.append(arg)
    return out


# -- relaunching ------------------------------------------------------------------------------

def launch_command(plan: LaunchPlan, argv: list[str]) -> list[str]:
    args = list(argv)
    for name in LAUNCH_OPTIONS:
        args = without_option(args, name)
    if plan.launcher == "deepspeed":
        from panda.errors import require

        require("deepspeed", what="--launcher deepspeed", package="DeepSpeed", extra="deepspeed")
        import torch

        if not torch.cuda.is_available():
            # DeepSpeed's CPU accelerator counts its "devices" from LOCAL_SIZE (else NUMA nodes).
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            os.environ.setdefault("LOCAL_SIZE", str(plan.nproc))
        return deepspeed_argv(plan, args)
    return torchrun_argv(plan.nproc, args, plan)


def relaunch_if_needed(nproc: int | None, argv: list[str] | None = None, *,
                       nnodes: int | None = None, node_rank: int | None = None,
                       master_addr: str | None = None, master_port: int | None = None,
                       launcher: str = "torchrun", max_restarts: int = 0) -> None:
    """Replace this process with the launcher when the run needs more processes than this one.

    Returns (doing nothing) when a launcher already started us, or when one process
    is the whole run; an ``srun`` rank adopts SLURM's variables first. ``argv`` is
    the command line after the program name; default ``sys.argv[1:]``.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    if started_by_srun():
        if not nproc or nproc <= 1:
            adopt_slurm_environment()
            return
        plan = plan_for_srun_node(nproc, launcher, max_restarts)
    else:
        plan = LaunchPlan(nproc=nproc or 1, nnodes=nnodes or 1, node_rank=node_rank,
                          master_addr=master_addr, master_port=master_port, launcher=launcher,
                          max_restarts=max_restarts)
        if not plan.needs_launch:
            return
        if plan.multi_node and launcher == "torchrun" and (node_rank is None or not master_addr):
            from panda.errors import UsageError

            raise UsageError(f"--nnodes {plan.nnodes} needs --node-rank and --master-addr",
                             hint="run the same command on every node, each with its own "
                             "--node-rank (0 on the node at --master-addr)")
    command = launch_command(plan, list(sys.argv[1:] if argv is None else argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
