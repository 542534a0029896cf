"""Loss-spike detection: is this step's loss far above where the loss has been lately?

The baseline is the median of the last `window` finite losses. The spread is the step-to-step noise:
the median absolute deviation of the successive differences, scaled (1.4826 / sqrt 2) to estimate one
step's standard deviation. Differences ignore a slow trend, so a falling loss curve does not hide a jump
the way the spread of the raw values would. Both statistics are medians: one spike barely moves them, so
a run of spikes keeps being flagged and a spike does not mask the next one. A step is a spike when
``loss > baseline + threshold * max(spread, min_rel_spread * baseline)``. The floor stops a plateau whose
losses barely vary from calling every wiggle a spike. Nothing is flagged before `warmup` losses have been
seen. A non-finite loss is always a spike and never enters the window.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass
class SpikeCheck:
    spike: bool
    baseline: float  # the robust running mean the loss was compared with (nan before the warm-up ends)
    score: float  # (loss - baseline) / spread: how many robust standard deviations above the baseline


class SpikeDetector:
    def __init__(self, window: int = 100, threshold: float = 6.0, min_rel_spread: float = 0.01,
                 warmup: int = 20) -> None:
        if window < 3 or threshold <= 0 or min_rel_spread < 0 or warmup < 3:
            raise ValueError("need window >= 3, threshold > 0, min_rel_spread >= 0, warmup >= 3")
        self.window, self.threshold, self.min_rel_spread = window, threshold, min_rel_spread
        self.warmup = min(warmup, window)
        self.losses: deque[float] = deque(maxlen=window)
        self.count = 0

    def update(self, loss: float) -> SpikeCheck:
        """Judge `loss` against the losses before it, then add it to the window."""
        if not math.isfinite(loss):
            self.count += 1
            return SpikeCheck(True, self._baseline(), math.inf)
        check = SpikeCheck(False, math.nan, 0.0)
        if len(self.losses) >= self.warmup:
            baseline = self._baseline()
            recent = list(self.losses)
            diffs = [b - a for a, b in zip(recent, recent[1:], strict=False)]
            center = _median(diffs)
            noise = _median([abs(d - center) for d in diffs]) * 1.4826 / math.sqrt(2)
            spread = max(noise, self.min_rel_spread * abs(baseline), 1e-12)
            score = (loss - baseline) / spread
            check = SpikeCheck(score > self.threshold, baseline, score)
        self.losses.append(loss)
        self.count += check.spike
        return check

    def _baseline(self) -> float:
        return _median(list(self.losses)) if self.losses else math.nan

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.count = int(state["count"])


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])
