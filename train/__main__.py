"""`python -m train --config configs/tiny.yaml [key=value ...]`

A bad input (a config value, the layout for this many ranks, the data, a checkpoint that fails its
checks) prints one line, `error: <key or file>: <what is wrong and what is allowed>`, and exits 2, before
anything is written. Exit codes: 0 done (or stopped by SIGTERM/SIGUSR1 after saving), 1 a checkpoint could
not be saved (e.g. a full disk), 2 bad input, 3 training diverged, 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import sys

from train.signals import stop_signals

if __name__ == "__main__":  # before the imports below (seconds of torch): a signal from now on is honoured
    stop_signals.install()

from models.config import ConfigError
from parallel.dims import ignored_in_one_process
from train.config import load_config, validate_layout

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


def _bad_input(e: Exception, every_rank: bool = False) -> int:
    """One `error:` line, exit code 2. Errors every rank meets alike are printed by rank 0 only."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(f"error: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a DeepSeek-V3 / Kimi-K2 style MoE model from a YAML config.",
        epilog="Overrides use dotted keys, e.g. train.steps=100 optim.lr=1e-3 logging.wandb.mode=offline. "
               "Every key is documented in docs/configuration.md.",
    )
    parser.add_argument("--config", required=True, help="YAML experiment config, e.g. configs/tiny.yaml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; what the trainer's process group will have
    try:
        cfg = load_config(args.config, args.overrides)
        validate_layout(cfg, world)
    except ConfigError as e:
        return _bad_input(e)
    if args.print_config:
        from train.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0

    import torch

    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        return _bad_input(ConfigError("train.device: cuda, but no CUDA device is visible; use cpu or auto"))
    notice = ignored_in_one_process(cfg.parallel) if world == 1 else None
    if notice:
        print(notice, file=sys.stderr)

    # Only now the trainer and its checkpointing (DCP, DTensor: seconds): `--print-config` and a bad config need
    # neither.
    from data.shards import DataError, ShardError
    from models.hf import HFCheckpointError
    from train.checkpoint import CheckpointError
    from train.trainer import Trainer, TrainingDiverged

    bad_input = (ConfigError, DataError, ShardError, CheckpointError, HFCheckpointError)
    try:
        trainer = Trainer(cfg)
    except bad_input as e:
        return _bad_input(e)
    except KeyboardInterrupt:
        print("interrupted during start-up", file=sys.stderr)
        return INTERRUPTED
    try:
        result = trainer.run()
    except TrainingDiverged as e:
        if trainer.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:  # a save failed (disk full, ...): every rank raises it; the last good one stays
        if trainer.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except bad_input as e:  # e.g. a bad token id in a batch: only the rank that read it knows
        return _bad_input(e, every_rank=True)
    except KeyboardInterrupt:  # the second Ctrl-C: leave now, without the save
        if trainer.rank == 0:
            print(f"interrupted at step {trainer.step} without saving; rerunning the same command resumes from "
                  "the last checkpoint", file=sys.stderr)
        return INTERRUPTED
    finally:
        trainer.close()
    stopped_by = result.get("stopped_by")
    if trainer.rank == 0 and stopped_by:
        saved = "the checkpoint is saved and " if result.get("step") else ""
        print(f"stopped by {stopped_by} at step {trainer.step}; {saved}rerunning the same command resumes",
              file=sys.stderr)
    elif trainer.rank == 0 and result.get("first_loss") is not None:
        print(f"done: loss {result['first_loss']:.4f} -> {result['loss']:.4f} over steps "
              f"{result['first_step']}..{result['step']}")
    return INTERRUPTED if stopped_by == "SIGINT" else 0


if __name__ == "__main__":
    sys.exit(main())
