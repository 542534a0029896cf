"""`python -m launch`: the rendered commands (exact argv, read back by torchrun's own argument parser), the
sbatch script (its #SBATCH lines, `bash -n`, and the script itself run by bash against stand-in `srun`,
`scontrol` and `sbatch` executables: the real shell and subprocess paths, only the cluster is absent), and
real 2-process torchrun launches of the trainer on CPU."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.run import get_args_parser

from launch.__main__ import main
from launch.commands import FORWARDED_SIGNALS, Job, local_command, node_command
from launch.slurm import SlurmOptions, sbatch_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SIGNALS = ",".join(FORWARDED_SIGNALS)
# an override the shell must pass through untouched: spaces, a quote, a $ that must not expand
TRICKY = "logging.wandb.name=my run's $HOME \"x\""


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`python -m launch ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def torchrun_args(argv: list[str]):
    """Parse a command with torchrun's own parser: every flag we write must exist there."""
    assert argv[:3] == TORCHRUN
    return get_args_parser().parse_args(argv[3:])


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """Executables standing in for the cluster's commands; each logs to $FAKE_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + body)
        path.chmod(0o755)
    return bin_dir


FAKE_SRUN = """printf '%s\\n' "$@" > "$FAKE_LOG/srun.args"
trap 'echo USR1 >> "$FAKE_LOG/srun.signals"; exit 143' USR1
: > "$FAKE_LOG/srun.started"
while [ ! -e "$FAKE_LOG/finish" ]; do sleep 0.05; done
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCONTROL = """echo "$*" >> "$FAKE_LOG/scontrol.calls"
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; fi
"""
FAKE_SBATCH = """printf '%s\\n' "$@" > "$FAKE_LOG/sbatch.args"
echo "Submitted batch job 4242"
"""


# --- rendered commands -------------------------------------------------------------------------------


def test_local_command_is_standalone_torchrun_of_the_trainer() -> None:
    job = Job(config=TINY, overrides=("train.steps=5", TRICKY), nproc_per_node=2)
    cmd = local_command(job)
    assert cmd == [*TORCHRUN, "--nnodes", "1", "--nproc-per-node", "2", "--standalone", "--max-restarts", "0",
                   "--signals-to-handle", SIGNALS, "--shutdown-timeout", "300",
                   "-m", "train", "--config", str(TINY), "train.steps=5", TRICKY]
    a = torchrun_args(cmd)
    assert (a.standalone, a.nnodes, a.nproc_per_node, a.module, a.training_script) == (True, "1", "2", True, "train")
    assert a.training_script_args == ["--config", str(TINY), "train.steps=5", TRICKY]
    assert "SIGUSR1" in a.signals_to_handle.split(",") and a.shutdown_timeout == 300


def test_dry_run_prints_the_command_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    out_dir = tmp_path / "run"
    code, out, _ = cli(capsys, "--config", "configs/tiny.yaml", "--gpus-per-node", "2", "--max-restarts", "1",
                       "--dry-run", f"train.out_dir={out_dir}", TRICKY)
    assert code == 0
    expected = Job(config=TINY, overrides=(f"train.out_dir={out_dir}", TRICKY), nproc_per_node=2, max_restarts=1)
    assert shlex.split(out) == local_command(expected)  # config made absolute, override survives quoting
    assert not out_dir.exists()


def test_multinode_every_node_gets_the_same_c10d_command(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(ROOT)
    args = ["--config", TINY, "--nodes", "2", "--gpus-per-node", "4", "--rdzv-endpoint", "node-a:29400",
            "--dry-run", "train.out_dir=runs/exp1", "train.micro_batch_size=2"]
    outputs = []
    for node in ("node-a", "node-b"):  # each node runs the launcher itself, on its own host
        monkeypatch.setattr(socket, "gethostname", lambda node=node: node)
        monkeypatch.setattr(socket, "getfqdn", lambda *_, node=node: f"{node}.cluster")
        monkeypatch.setenv("HOSTNAME", node)
        outputs.append(cli(capsys, *args))
    assert outputs[0] == outputs[1] and outputs[0][0] == 0
    comment, line = outputs[0][1].splitlines()
    assert comment.startswith("# run on each of the 2 node(s)")
    cd, workdir, amp, env, store, *cmd = shlex.split(line)
    assert (cd, workdir, amp) == ("cd", str(ROOT), "&&") and env.startswith(f"PYTHONPATH={ROOT}")
    assert store == "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # elastic restarts must not reuse stale addresses
    assert cmd == node_command(Job(config=TINY, overrides=("train.out_dir=runs/exp1", "train.micro_batch_size=2"),
                                   nodes=2, nproc_per_node=4, max_restarts=3), "node-a:29400", "exp1")
    a = torchrun_args(cmd)
    assert (a.nnodes, a.rdzv_backend, a.rdzv_endpoint, a.rdzv_id, a.max_restarts) == (
        "2", "c10d", "node-a:29400", "exp1", 3)
    assert not a.standalone and a.node_rank == 0  # no per-node rank: the rendezvous assigns them

    code, _, err = cli(capsys, *[a for a in args if a not in ("--rdzv-endpoint", "node-a:29400")])
    assert code == 2 and "--rdzv-endpoint" in err
    code, _, err = cli(capsys, *args[:7], "node-a:http", *args[8:])
    assert code == 2 and "HOST:PORT" in err


def test_config_errors_exit_2_before_anything_is_launched(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "--config", TINY, "--gpus-per-node", "2", f"train.out_dir={tmp_path}/r",
                         "optim.lrr=1e-3")
    assert code == 2 and out == ""
    assert "unknown key 'lrr'" in err and "did you mean 'lr'" in err
    # a layout the trainer would reject at start-up, caught here: 16 sequences do not split over 3 ranks
    code, _, err = cli(capsys, "--config", TINY, "--gpus-per-node", "3", f"train.out_dir={tmp_path}/r")
    assert code == 2 and "train.global_batch_size: 16 does not split into 3 data-parallel rank(s)" in err
    code, _, err = cli(capsys, "--config", TINY, "--gpus-per-node", "2", "parallel.ep=4", "--dry-run")
    assert code == 2 and "parallel.ep: 4 must divide" in err
    code, _, err = cli(capsys, "--config", TINY, "--slurm", "--dry-run")
    assert code == 2 and "--slurm needs --gpus-per-node" in err
    code, _, err = cli(capsys, "--config", TINY, "--partition", "gpu", "--dry-run")
    assert code == 2 and "--partition is only for --slurm" in err
    assert not (tmp_path / "r").exists()


# --- Slurm -----------------------------------------------------------------------------------------


def sbatch_directives(script: str) -> dict[str, str]:
    lines = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]
    return dict(line.partition("=")[::2] for line in lines)


def test_sbatch_script_directives_and_syntax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    base = ["--config", TINY, "--slurm", "--nodes", "4", "--gpus-per-node", "8", "--dry-run",
            "train.out_dir=runs/k2", "train.micro_batch_size=1", "train.global_batch_size=32",
            "checkpoint.interval=100"]
    code, script, err = cli(capsys, *base)
    assert code == 0 and err == ""
    assert script.startswith("#!/bin/bash\n")
    log = tmp_path / "runs" / "k2" / "slurm"
    assert sbatch_directives(script) == {
        "--job-name": "k2", "--nodes": "4", "--ntasks-per-node": "1", "--gpus-per-node": "8",
        "--output": f"{log}/%x-%j.out", "--error": f"{log}/%x-%j.err", "--open-mode": "append",
        "--requeue": "", "--signal": "B:USR1@300"}  # no partition / account / time unless asked for
    assert f"cd {tmp_path}\n" in script
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "--rdzv-endpoint \"$HEAD_NODE:$PORT\" --rdzv-id \"$SLURM_JOB_ID\"" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "runs").exists()  # --dry-run writes nothing

    code, script, _ = cli(capsys, *base, "--time", "2-00:00:00", "--partition", "gpu", "--account", "proj",
                          "--cpus-per-task", "64", "--grace-seconds", "600", "--job-name", "k2-a",
                          "--sbatch-arg=--qos=high", "--sbatch-arg=--exclusive")
    d = sbatch_directives(script)
    assert (d["--time"], d["--partition"], d["--account"], d["--cpus-per-task"]) == ("2-00:00:00", "gpu", "proj",
                                                                                       "64")
    assert (d["--job-name"], d["--signal"], d["--qos"], d["--exclusive"]) == ("k2-a", "B:USR1@600", "high", "")
    assert "--shutdown-timeout 600" in script and "export OMP_NUM_THREADS=8\n" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def run_script(tmp_path: Path, job: Job, **env: str) -> tuple[subprocess.Popen, Path]:
    """Start the rendered sbatch script with bash, as Slurm would on the first node (stand-in srun)."""
    log = tmp_path / "log"
    log.mkdir()
    opts = SlurmOptions(job_name="t", log_dir=tmp_path / "slurm")
    script = tmp_path / "job.sbatch"
    script.write_text(sbatch_script(job, opts, tmp_path))
    bin_dir = fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    proc = subprocess.Popen(["bash", str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(log),
                                 "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]",
                                 "SLURM_JOB_NUM_NODES": "2", **env})
    deadline = time.monotonic() + 20
    while not (log / "srun.started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.02)
    return proc, log


def test_pipeline_layout_passes_through_torchrun_and_slurm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """parallel.pp reaches every rank's trainer verbatim, after the launcher checked it against the world."""
    layout = ["parallel.pp=4", "parallel.ep=2", "parallel.pp_schedule=interleaved_1f1b", "train.micro_batch_size=1",
              "train.global_batch_size=32", "model.num_hidden_layers=8", "checkpoint.interval=100",
              f"train.out_dir={tmp_path}/r"]
    for mode in (["--nodes", "1"], ["--slurm", "--nodes", "2"]):
        code, out, err = cli(capsys, "--config", TINY, *mode, "--gpus-per-node", "8", "--dry-run", *layout)
        assert code == 0 and err == "", err
        assert all(o in out for o in layout[:3])
    # 4 stages x 2 virtual need 8 layers; tiny has 4: refused before anything starts
    code, _, err = cli(capsys, "--config", TINY, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "--dry-run",
                       *layout[:5], f"train.out_dir={tmp_path}/r")
    assert code == 2 and "parallel.pp: 4 x 2 virtual stages need at least 8 layers" in err


def test_sbatch_script_runs_torchrun_on_every_node_and_requeues_on_sigusr1(tmp_path: Path) -> None:
    job = Job(config=TINY, overrides=("train.steps=5", TRICKY), nodes=2, nproc_per_node=8, max_restarts=3)
    proc, log = run_script(tmp_path, job)
    srun_args = (log / "srun.args").read_text().splitlines()
    assert srun_args == [
        "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
        *TORCHRUN, "--nnodes", "2", "--nproc-per-node", "8",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node-a:19242", "--rdzv-id", "4242",  # head node, 15000+id
        "--max-restarts", "3", "--signals-to-handle", SIGNALS, "--shutdown-timeout", "300",
        "-m", "train", "--config", str(TINY), "train.steps=5", TRICKY]  # the override arrives verbatim

    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does before the time limit
    out = proc.communicate(timeout=20)[0]
    assert (log / "srun.signals").read_text() == "USR1\n", out  # forwarded to srun (and on to the ranks)
    assert "requeue 4242" in (log / "scontrol.calls").read_text().splitlines(), out
    assert proc.returncode == 143  # srun's exit code


def test_sbatch_script_survives_sigterm_and_returns_the_step_exit_code(tmp_path: Path) -> None:
    proc, log = run_script(tmp_path, Job(config=TINY, nodes=2, nproc_per_node=8), FAKE_SRUN_RC="3")
    proc.send_signal(signal.SIGTERM)  # scancel / preemption: the shell keeps waiting for the step
    time.sleep(0.5)
    assert proc.poll() is None
    (log / "finish").touch()
    out = proc.communicate(timeout=20)[0]
    assert proc.returncode == 3 and "SIGTERM" in out
    assert not (log / "srun.signals").exists()
    assert (log / "scontrol.calls").read_text() == "show hostnames node-[a-b]\n"  # no requeue


def test_slurm_writes_the_script_and_submits_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--config", TINY, "--slurm", "--nodes", "2", "--gpus-per-node", "8", "train.out_dir=runs/exp",
            "train.micro_batch_size=1", "checkpoint.interval=50"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no sbatch: not a Slurm login node
    code, out, err = cli(capsys, *args)
    script = tmp_path / "runs" / "exp" / "slurm" / "exp.sbatch"
    assert code == 1 and "`sbatch` is not on PATH" in err and "--dry-run" in err and str(script) in err

    log = tmp_path / "log"
    log.mkdir()
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, sbatch=FAKE_SBATCH)}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_LOG", str(log))
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    assert "Submitted batch job 4242" in out and f"wrote {script}" in out
    assert (log / "sbatch.args").read_text().splitlines() == [str(script)]
    assert os.access(script, os.X_OK) and script.parent.is_dir()  # Slurm opens its logs there
    assert sbatch_directives(script.read_text())["--output"] == f"{script.parent}/%x-%j.out"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


# --- real launches ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_two_process_launch_stops_on_sigusr1_and_resumes(tmp_path: Path) -> None:
    """SIGUSR1 to the launcher reaches both ranks through torchrun; the trainer checkpoints at the step
    boundary and exits; the same command again resumes and finishes with exit code 0."""
    out_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch", "--config", "configs/tiny.yaml", "--gpus-per-node", "2",
           f"train.out_dir={out_dir}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=8",
           "train.global_batch_size=8", "train.micro_batch_size=4", "data.seq_len=64", "train.eval_interval=0",
           "logging.progress=false", "optim.warmup_steps=2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    metrics = out_dir / "metrics.jsonl"

    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGUSR1)
    log = first.communicate(timeout=300)[0]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    stopped = steps[-1]
    assert steps == list(range(1, stopped + 1)) and stopped < 8, log[-3000:]
    assert (out_dir / "checkpoints" / f"step-{stopped}" / "COMPLETE").exists(), log[-3000:]
    assert first.returncode != 0 and "after SIGUSR1 was forwarded to it" in log  # torchrun: a signal is a failure

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"at step {stopped}" in second.stdout and "step 8/8 |" in second.stdout
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 9))


def test_hostfile_dry_run_renders_deepspeeds_launcher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--hostfile`: DeepSpeed's runner (this interpreter's module) with the hostfile's nodes and slots, a static
    master on its first host, `--no_local_rank` and the trainer as a module; the layout is checked against
    hosts x slots before anything starts. Nothing runs (DeepSpeed is not needed for a dry run)."""
    hosts = tmp_path / "hostfile"
    hosts.write_text("# the cluster\nnode001 slots=2\n\nnode002 slots=2  # second\n")
    assert main(["--config", str(TINY), "--hostfile", str(hosts), "parallel.ep=2", "train.micro_batch_size=2",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("# DeepSpeed's launcher") and "rerun this command" in out[0]
    argv = shlex.split(out[1].split(" && ", 1)[1])
    runner = argv.index("deepspeed.launcher.runner")
    assert argv[runner - 2:runner] == [sys.executable, "-m"]
    flags = argv[runner + 1:argv.index("--module")]
    assert flags == ["--hostfile", str(hosts.resolve()), "--num_nodes", "2", "--num_gpus", "2", "--master_addr",
                     "node001", "--master_port", "29500", "--no_local_rank"]
    assert argv[argv.index("--module") + 1:] == ["train", "--config", str(TINY.resolve()), "parallel.ep=2",
                                                 "train.micro_batch_size=2"]


@pytest.mark.parametrize("text, extra, message", [
    ("node001 slots=2\nnode002 slots=4\n", [], "every host needs the same slots"),
    ("node001 slots=2\nnode001 slots=2\n", [], ":2: host 'node001' is listed twice"),
    ("node001 2\n", [], ":1: expected 'HOST slots=N'"),
    ("# nothing\n", [], "no hosts"),
    ("node001 slots=2\n", ["--slurm"], "cannot be combined with --slurm"),
    ("node001 slots=2\n", ["--gpus-per-node", "4"], "disagrees with the hostfile's slots=2"),
    ("node001 slots=2\n", ["--nodes", "3"], "with --hostfile the nodes are its 1 host(s)"),
])
def test_hostfile_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                          extra: list[str], message: str) -> None:
    hosts = tmp_path / "hostfile"
    hosts.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(TINY), "--hostfile", str(hosts), "--dry-run", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_hostfile_layout_is_checked_against_hosts_times_slots(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    hosts = tmp_path / "hostfile"
    hosts.write_text("node001 slots=2\nnode002 slots=2\n")
    assert main(["--config", str(TINY), "--hostfile", str(hosts), "parallel.ep=3", "--dry-run"]) == 2
    assert "parallel.ep: 3 must divide the data-parallel size 4" in capsys.readouterr().err
