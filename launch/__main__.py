"""`python -m launch --config X.yaml [--nodes N] [--gpus-per-node G] [--slurm ...] [--dry-run] [key=value ...]`

One node: torchrun with the standalone rendezvous, run here. Several nodes: run the same command on every
node (`--rdzv-endpoint HOST[:PORT]`, c10d rendezvous). `--slurm`: write an sbatch script and submit it.
`--dry-run` prints the command or script instead. The overrides are checked against the config schema
before anything starts, so a typo fails here and not after a day in the queue. See docs/launch.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from launch import hostfile, slurm
from launch.commands import (
    FORWARDED_SIGNALS,
    ROOT,
    TORCHRUN_ENV,
    Job,
    check_endpoint,
    local_command,
    node_command,
    shell_line,
)
from models.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch",
        description="Launch `python -m train` under torchrun: on this machine, on several nodes, or as a Slurm "
                    "job. Trailing key=value arguments are config overrides passed to the trainer verbatim.",
        epilog="examples:\n"
               "  python -m launch --config configs/tiny.yaml --gpus-per-node 2 train.steps=20\n"
               "  python -m launch --config configs/small.yaml --nodes 2 --rdzv-endpoint node001:29400\n"
               "  python -m launch --config configs/k2-1t.yaml --slurm --nodes 128 --gpus-per-node 8 "
               "--time 2-00:00:00 --partition gpu --dry-run\n"
               "See docs/launch.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML experiment config, e.g. configs/tiny.yaml")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    p.add_argument("--gpus-per-node", "--nproc-per-node", dest="gpus_per_node", type=int, default=None,
                   help="ranks per node: the GPUs to use on each node (default: the CUDA devices here); "
                        "on CPU the number of processes, which talk over gloo (default 1)")
    p.add_argument("--max-restarts", type=int, default=None,
                   help="torchrun restarts of all ranks after a failure; each restart resumes from the newest "
                        "checkpoint (default 0 on one node, 3 on several or with --slurm)")
    p.add_argument("--grace-seconds", type=int, default=300,
                   help="seconds a signalled trainer gets to finish its step and checkpoint: torchrun waits "
                        "this long before SIGKILL, and Slurm sends SIGUSR1 this long before the time limit "
                        "(default 300)")
    p.add_argument("--job-name", default=None,
                   help="the job's name (Slurm job name, script name, default rendezvous id); "
                        "default: the name of train.out_dir")
    p.add_argument("--dry-run", action="store_true", help="print the command (or the sbatch script); run nothing")
    multi = p.add_argument_group("several nodes without Slurm (run the same command on every node)")
    multi.add_argument("--rdzv-endpoint", help="HOST[:PORT] of one of the nodes, reachable from all "
                                               "(torchrun's c10d default port is 29400)")
    multi.add_argument("--rdzv-id", help="rendezvous id, the same on every node (default: the job name)")
    h = p.add_argument_group("several nodes with DeepSpeed's launcher (pdsh / ssh; no Slurm, no elastic restarts)")
    h.add_argument("--hostfile", type=Path, help="DeepSpeed hostfile: one 'HOST slots=GPUS' per line; nodes and "
                                                 "GPUs per node come from it")
    h.add_argument("--master-port", type=int, default=29500, help="port on the first host (default 29500)")
    s = p.add_argument_group("Slurm")
    s.add_argument("--slurm", action="store_true",
                   help="write <train.out_dir>/slurm/<job-name>.sbatch and submit it with sbatch")
    s.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00 (default: the partition's)")
    s.add_argument("--partition", help="partition (default: the cluster's default)")
    s.add_argument("--account", help="account to charge (default: your default account)")
    s.add_argument("--cpus-per-task", type=int, help="CPU cores per node (one task per node)")
    s.add_argument("--port", type=int, help="rendezvous port on the head node (default: 15000 + job id %% 10000)")
    s.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                   help="one more sbatch option, e.g. --sbatch-arg=--qos=high --sbatch-arg=--exclusive")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=100")
    return p


def _job_name(out_dir: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(out_dir).name).strip("-.") or "chogori"


def _default_ranks_per_node() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def run(argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> int:
    """Run `argv` (torchrun) to completion and return its exit code (128 + N for signal N).

    torchrun gets its own session, so a terminal's Ctrl-C reaches it once, through here; every signal it
    forwards to the ranks (FORWARDED_SIGNALS) is passed on to it when this process receives it."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, start_new_session=True)
    forwarded: list[str] = []

    def forward(sig: int, _frame: object) -> None:
        proc.send_signal(sig)
        forwarded.append(signal.Signals(sig).name)

    previous = {s: signal.signal(s, forward) for s in (getattr(signal, name) for name in FORWARDED_SIGNALS)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    code = code if code >= 0 else 128 - code
    if forwarded and code:
        print(f"launch: torchrun exited with code {code} after {', '.join(forwarded)} was forwarded to it "
              "(torchrun reports a signal as a failure; see the trainer's last lines above)", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command_line = shlex.join(["python", "-m", "launch", *(a for a in given if a != "--dry-run")])
    for flag, value, low, high in (("--nodes", args.nodes, 1, None), ("--max-restarts", args.max_restarts, 0, None),
                                   ("--master-port", args.master_port, 1, 65535),
                                   ("--grace-seconds", args.grace_seconds, 1, 65535),
                                   ("--cpus-per-task", args.cpus_per_task, 1, None), ("--port", args.port, 1, 65535)):
        if value is not None and (value < low or (high is not None and value > high)):
            parser.error(f"{flag} must be in [{low}, {high or 'inf'}], got {value}")
    slurm_only = [f for f, v in (("--time", args.time), ("--partition", args.partition), ("--account", args.account),
                                 ("--cpus-per-task", args.cpus_per_task), ("--port", args.port),
                                 ("--sbatch-arg", args.sbatch_arg)) if v]
    if slurm_only and not args.slurm:
        parser.error(f"{', '.join(slurm_only)} {'is' if len(slurm_only) == 1 else 'are'} only for --slurm")
    if args.job_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.job_name):
        parser.error(f"--job-name must be letters, digits, '.', '_' or '-', got '{args.job_name}'")
    if args.hostfile is not None:
        clash = [f for f, v in (("--slurm", args.slurm), ("--rdzv-endpoint", args.rdzv_endpoint),
                                ("--max-restarts", args.max_restarts)) if v]
        if clash:
            parser.error(f"--hostfile cannot be combined with {', '.join(clash)} (DeepSpeed's launcher has a static "
                         "rendezvous: no elastic restarts; rerun the command to resume)")
        try:
            hosts = hostfile.read_hostfile(args.hostfile)
        except hostfile.HostfileError as e:
            parser.error(str(e))
        slots = hosts[0][1]
        if args.gpus_per_node is not None and args.gpus_per_node != slots:
            parser.error(f"--gpus-per-node {args.gpus_per_node} disagrees with the hostfile's slots={slots}")
        if given_nodes := [a for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--nodes")]:
            parser.error(f"{given_nodes[0]}: with --hostfile the nodes are its {len(hosts)} host(s)")
        args.nodes, args.gpus_per_node, args.max_restarts = len(hosts), slots, 0
    if args.rdzv_id and not args.rdzv_endpoint:
        parser.error("--rdzv-id needs --rdzv-endpoint")
    if args.slurm and args.gpus_per_node is None:
        parser.error("--slurm needs --gpus-per-node (this machine's GPU count says nothing about the compute "
                     "nodes)")
    if args.slurm and args.rdzv_endpoint:
        parser.error("--rdzv-endpoint is for launches without Slurm; a Slurm job uses its first node")
    if args.nodes > 1 and not args.slurm and not args.rdzv_endpoint and args.hostfile is None:
        parser.error(f"--nodes {args.nodes} without --slurm needs --rdzv-endpoint HOST[:PORT]: one of the nodes, "
                     "reachable from all of them, where the c10d rendezvous runs")
    if args.rdzv_endpoint:
        try:
            check_endpoint(args.rdzv_endpoint)
        except ValueError as e:
            parser.error(str(e))
    ranks = args.gpus_per_node if args.gpus_per_node is not None else _default_ranks_per_node()
    if ranks < 1:
        parser.error(f"--gpus-per-node must be >= 1, got {ranks}")
    several = args.nodes > 1 or args.slurm
    restarts = args.max_restarts if args.max_restarts is not None else (3 if several else 0)

    from train.config import load_config, validate_layout  # after argument errors: importing torch takes a moment

    try:
        cfg = load_config(args.config, args.overrides)
        validate_layout(cfg, args.nodes * ranks)  # what every rank would check at start-up, checked here
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (restarts or args.slurm) and cfg.checkpoint.interval == 0:
        print("warning: checkpoint.interval=0 writes no checkpoint before the end (except one when the trainer "
              "is signalled), so a restart after a failure starts again from step 0; set checkpoint.interval",
              file=sys.stderr)

    workdir = Path.cwd()
    job = Job(config=Path(os.path.abspath(args.config)), overrides=tuple(args.overrides), nodes=args.nodes,
              nproc_per_node=ranks, max_restarts=restarts, grace_s=args.grace_seconds)
    name = args.job_name or _job_name(cfg.train.out_dir)

    if args.slurm:
        opts = slurm.SlurmOptions(
            job_name=name, log_dir=workdir / cfg.train.out_dir / "slurm", time=args.time,
            partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task, port=args.port,
            extra=tuple(args.sbatch_arg))
        try:
            text = slurm.sbatch_script(job, opts, workdir, command_line)
        except ValueError as e:
            parser.error(str(e))
        if args.dry_run:
            print(text, end="")
            return 0
        path = slurm.write_script(text, slurm.script_path(opts))
        print(f"wrote {path}")
        try:
            done = slurm.submit(path)
        except slurm.SbatchNotFound as e:
            print(f"error: {e}; the script is at {path}", file=sys.stderr)
            return 1
        print(done.stdout, end="")
        print(done.stderr, end="", file=sys.stderr)
        if done.returncode == 0:
            print(f"logs: {opts.log_dir}/{name}-<job id>.out and .err")
        return done.returncode

    if args.hostfile is not None:
        cmd = hostfile.deepspeed_command(job, args.hostfile.resolve(), hosts, args.master_port)
        if args.dry_run:
            print(f"# DeepSpeed's launcher starts the trainer on the {job.nodes} host(s) of {args.hostfile} over "
                  "pdsh/ssh; static rendezvous: after a failure rerun this command, it resumes")
            print(shell_line(cmd, workdir))
            return 0
        if importlib.util.find_spec("deepspeed") is None:
            print("error: --hostfile runs DeepSpeed's launcher, which is not installed: "
                  "pip install -e '.[deepspeed]'", file=sys.stderr)
            return 1
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        return run(cmd, cwd=workdir, env={**os.environ, "PYTHONPATH": pythonpath})

    if args.rdzv_endpoint:  # several nodes (or one) joining a c10d rendezvous
        cmd = node_command(job, args.rdzv_endpoint, args.rdzv_id or name)
        if args.dry_run:
            print(f"# run on each of the {job.nodes} node(s), the same command: the c10d rendezvous at "
                  f"{args.rdzv_endpoint} hands out the node ranks")
            print(shell_line(cmd, workdir))
            return 0
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        return run(cmd, cwd=workdir, env={**os.environ, "PYTHONPATH": pythonpath, **TORCHRUN_ENV})

    cmd = local_command(job)
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return run(cmd, env={**os.environ, **TORCHRUN_ENV})


if __name__ == "__main__":
    sys.exit(main())
