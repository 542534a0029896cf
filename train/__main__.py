"""`python -m train --config configs/tiny.yaml [key=value ...]`"""

from __future__ import annotations

import argparse
import sys

from models.config import ConfigError
from train.config import load_config


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
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from train.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0

    from train.trainer import Trainer, TrainingDiverged

    trainer = Trainer(cfg)
    try:
        result = trainer.run()
    except TrainingDiverged as e:
        if trainer.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if trainer.rank == 0 and result.get("stopped_by"):
        print(f"stopped by {result['stopped_by']} after step {result['step']}; the checkpoint is saved and "
              f"rerunning the same command resumes from it", file=sys.stderr)
    elif trainer.rank == 0 and result.get("first_loss") is not None:
        print(f"done: loss {result['first_loss']:.4f} -> {result['loss']:.4f} over steps 1..{result['step']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
