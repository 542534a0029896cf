"""The sbatch script for a Slurm job: render (a pure function), write (atomically), submit (`sbatch`).

One srun task per node runs torchrun; torchrun starts the node's ranks. The first node of the allocation
hosts the c10d rendezvous; the rendezvous id is the Slurm job id, which a requeued job keeps.

Signals. `--signal=B:USR1@<grace>` makes Slurm send SIGUSR1 to the batch shell `grace` seconds before the
time limit. The script traps it, sends SIGUSR1 to srun (srun forwards it to its tasks; torchrun forwards
it to every rank), waits for the trainer to checkpoint and exit, and requeues the job, which resumes from
that checkpoint. It does not send SIGTERM to srun: srun answers its own SIGTERM with SIGKILL to the tasks.
On scancel, preemption or the time limit itself Slurm sends SIGTERM to every process of the job: the
ranks and torchrun get it directly, the batch shell traps it and keeps waiting, but srun gets it too, so
a checkpoint there is best effort (docs/launch.md).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from launch.commands import Job, c10d_rendezvous, env_prefix, pythonpath_prefix, torchrun_command, trainer_args

PORT_BASE = 15000  # the rendezvous port is PORT_BASE + job id % 10000 (below Linux's ephemeral range)


@dataclass(frozen=True)
class SlurmOptions:
    job_name: str
    log_dir: Path  # absolute; gets %x-%j.out / %x-%j.err (job name, job id)
    time: str | None = None  # sbatch --time; None = the partition's default
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None  # CPU cores per node (one task per node)
    port: int | None = None  # fixed rendezvous port; None = derived from the job id
    extra: tuple[str, ...] = ()  # more sbatch options, each written as its own #SBATCH line


class Expand(str):
    """An argument the batch shell must expand (it holds "$VAR"); written as is, not shell-quoted."""


def _shell_args(argv: list[str]) -> str:
    return " ".join(a if isinstance(a, Expand) else shlex.quote(a) for a in argv)


def _srun_prefix(opts: SlurmOptions) -> list[str]:
    srun = ["srun", Expand('--nodes="$SLURM_JOB_NUM_NODES"'), "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if opts.cpus_per_task:  # srun does not inherit sbatch's --cpus-per-task on every Slurm version
        srun.append(f"--cpus-per-task={opts.cpus_per_task}")
    return srun


def _node_torchrun(job: Job) -> list[str]:
    """torchrun for every node: c10d rendezvous on the head node; the script sets HEAD_NODE and PORT."""
    rendezvous = c10d_rendezvous(Expand('"$HEAD_NODE:$PORT"'), Expand('"$SLURM_JOB_ID"'))
    return torchrun_command(job, rendezvous, nnodes=Expand('"$SLURM_JOB_NUM_NODES"'))


def _check_sbatch_value(name: str, value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{name}: '{value}' cannot be written on an #SBATCH line (empty or holds whitespace)")
    return value


def sbatch_script(job: Job, opts: SlurmOptions, workdir: Path, command_line: str = "") -> str:
    """The batch script's text. `workdir` (absolute) is where the job runs, so that relative paths in the
    overrides (train.out_dir=runs/x) mean what they meant where the launcher ran."""
    log = opts.log_dir
    directives = [
        f"--job-name={opts.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={job.nproc_per_node}",
        *([f"--cpus-per-task={opts.cpus_per_task}"] if opts.cpus_per_task else []),
        *([f"--time={opts.time}"] if opts.time else []),
        *([f"--partition={opts.partition}"] if opts.partition else []),
        *([f"--account={opts.account}"] if opts.account else []),
        f"--output={log}/%x-%j.out",
        f"--error={log}/%x-%j.err",
        "--open-mode=append",  # a requeued job keeps its id, hence its log files: append, do not truncate
        "--requeue",  # requeue after node failure or preemption, and let the script requeue itself
        f"--signal=B:USR1@{job.grace_s}",
        *opts.extra,
    ]
    for d in directives:
        _check_sbatch_value("sbatch option", d)
    threads = max(1, (opts.cpus_per_task or 0) // job.nproc_per_node)
    port = str(opts.port) if opts.port else f"$(({PORT_BASE} + SLURM_JOB_ID % 10000))"
    cmd = _node_torchrun(job)  # one argument group per line: srun, torchrun, rendezvous, restarts, trainer
    r, m, t = cmd.index("--rdzv-backend"), cmd.index("--max-restarts"), len(cmd) - len(trainer_args(job))
    groups = [_srun_prefix(opts), cmd[:r], cmd[r:m], cmd[m:t], cmd[t:]]
    srun_text = " \\\n    ".join(_shell_args(g) for g in groups)
    generated = command_line.replace("\n", " ")
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {d}" for d in directives),
        "",
        f"# Written by `python -m launch`{':' if generated else '.'}",
        *([f"#   {generated}"] if generated else []),
        f"# {job.nodes} node(s) x {job.nproc_per_node} rank(s); SIGUSR1 {job.grace_s} s before the time limit",
        "# makes the trainer checkpoint and exit, then the job requeues itself and resumes.",
        "set -eu",
        f"cd {shlex.quote(str(workdir))}",
        f"export {pythonpath_prefix()}",
        f"export OMP_NUM_THREADS={threads}",
        f"export {env_prefix()}",
        "",
        "# c10d rendezvous on the allocation's first node",
        'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"PORT={port}",
        '[ -n "$HEAD_NODE" ] || { echo "cannot read the node list (SLURM_JOB_NODELIST)" >&2; exit 1; }',
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NUM_NODES node(s),'
        ' rendezvous $HEAD_NODE:$PORT"',
        "",
        "requeue=0",
        "srun_pid=",
        "on_usr1() {  # the time limit is near: checkpoint, exit, requeue",
        '    echo "SIGUSR1: asking the trainer to checkpoint and exit; the job will requeue itself"',
        "    requeue=1",
        '    if [ -n "$srun_pid" ]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi',
        "}",
        "on_term() {  # scancel, preemption or the time limit: Slurm signals the tasks itself",
        '    echo "SIGTERM: the job is ending; waiting for the trainer to checkpoint and exit"',
        "}",
        "trap on_usr1 USR1",
        "trap on_term TERM",
        "",
        f"{srun_text} &",
        "srun_pid=$!",
        "while :; do",
        '    rc=0; wait "$srun_pid" || rc=$?',
        '    kill -0 "$srun_pid" 2>/dev/null || break  # else a trapped signal interrupted `wait`',
        "done",
        'if [ "$requeue" = 1 ]; then',
        '    echo "requeueing job $SLURM_JOB_ID (the trainer resumes from its newest checkpoint)"',
        '    scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'exit "$rc"',
        "",
    ])


def script_path(opts: SlurmOptions) -> Path:
    return opts.log_dir / f"{opts.job_name}.sbatch"


def write_script(text: str, path: Path) -> Path:
    """Write atomically (a temp file in the same directory, then rename); creates the directory, which
    must exist before the job starts because Slurm opens its log files there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class SbatchNotFound(RuntimeError):
    pass


def submit(path: Path) -> subprocess.CompletedProcess[str]:
    """`sbatch <path>`; raises SbatchNotFound when there is no sbatch on PATH (not a Slurm login node)."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SbatchNotFound("`sbatch` is not on PATH: submit from a Slurm login node, or print the script "
                             "with --dry-run")
    return subprocess.run([sbatch, str(path)], capture_output=True, text=True)
