"""Loss curves of AdamW vs Muon vs MuonClip on the tiny config and the built-in corpus, plotted to a PNG.

    python bench/optimizer_curves.py --steps 300 --out docs/optimizer_curves.png

Each run is the real trainer (`Trainer.train_step`) with the same seed, data order and LR schedule; only
the optimizer differs. The tiny model's attention logits stay far below K2's tau = 100, so MuonClip runs
with a low `--tau` to make the clip act; the table reports how many heads it clipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.config import load_config  # noqa: E402
from train.trainer import Trainer  # noqa: E402

RUNS = {
    "AdamW": ["optim.name=adamw", "optim.qk_clip_tau=null"],
    "Muon": ["optim.name=muon", "optim.qk_clip_tau=null"],
    "MuonClip": ["optim.name=muon"],  # tau set from --tau
}


def run(name: str, overrides: list[str], steps: int, out: str) -> list[dict]:
    cfg = load_config("configs/tiny.yaml", [f"train.out_dir={out}", f"train.steps={steps}", "train.eval_interval=0",
                                            "checkpoint.save_final=false", "logging.progress=false", *overrides])
    trainer = Trainer(cfg)
    recs = []
    for _ in range(steps):
        recs.append(trainer.train_step())
    print(f"{name}: loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f}, val {trainer.evaluate()['val_loss']:.3f}",
          flush=True)
    return recs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--tau", type=float, default=2.0)
    ap.add_argument("--out", default="docs/optimizer_curves.png")
    args = ap.parse_args()
    RUNS["MuonClip"] = ["optim.name=muon", f"optim.qk_clip_tau={args.tau}"]
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in RUNS.items():
            curves[name] = run(name, overrides + [f"optim.lr={3e-3}"], args.steps, f"{tmp}/{name}")
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {k: [{"step": r["step"], "loss": r["loss"], "max_logit": r["max_logit"],
              "clipped": r["qk_clip/heads_clipped"]} for r in v] for k, v in curves.items()}))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, recs in curves.items():
        steps = [r["step"] for r in recs]
        loss = [r["loss"] for r in recs]
        smooth = [sum(loss[max(0, i - 9):i + 1]) / len(loss[max(0, i - 9):i + 1]) for i in range(len(loss))]
        ax1.plot(steps, smooth, label=name)
        ax2.plot(steps, [r["max_logit"] for r in recs], label=name)
    ax1.set(xlabel="step", ylabel="train loss (10-step mean)", title="tiny config, built-in corpus")
    ax1.set_ylim(top=min(4.0, ax1.get_ylim()[1]))
    ax2.axhline(args.tau, color="grey", ls="--", lw=1, label=f"MuonClip tau = {args.tau}")
    ax2.set(xlabel="step", ylabel="max attention logit (all heads)", title="max pre-softmax logit")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)

    print()
    print("| optimizer | loss step 1 | mean loss last 20 steps | max logit (max over run) | heads clipped (total) |")
    print("|---|---|---|---|---|")
    for name, recs in curves.items():
        last = sum(r["loss"] for r in recs[-20:]) / 20
        print(f"| {name} | {recs[0]['loss']:.3f} | {last:.3f} | {max(r['max_logit'] for r in recs):.2f} | "
              f"{sum(r['qk_clip/heads_clipped'] for r in recs)} |")
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
