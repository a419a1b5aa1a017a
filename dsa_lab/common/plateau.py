"""When is a warm-up finished? When its held-out KL has stopped improving, not when a step count runs out.

One rule for every experiment (DESIGN.md lesson: 40 warm-up steps end at KL 1.9, the plateau is 0.16):
the held-out KL is evaluated every `eval_every` steps; the warm-up stops at the first evaluation where the
best KL of the last `window` evaluations improved on the best KL before them by less than `min_rel_improvement`
(relative), or at `max_steps` (the cap). `PlateauTracker` applies the rule and records the curve and the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

STOP_PLATEAU = "plateau"  # the rule ended the warm-up
STOP_CAP = "step_cap"  # the cap ended it while the KL was still improving
STOP_FIXED = "fixed_steps"  # the rule was off: a fixed number of steps


@dataclass(frozen=True)
class PlateauRule:
    """Stop when the best held-out KL of the last `window` evaluations (every `eval_every` steps) is less than
    `min_rel_improvement` below the best before them; never after `max_steps`. `enabled=False`: fixed count."""
    max_steps: int
    eval_every: int = 20
    window: int = 3
    min_rel_improvement: float = 0.02
    enabled: bool = True

    def __post_init__(self):
        if self.max_steps < 0:
            raise ValueError(f"warm-up max_steps={self.max_steps} must be >= 0")
        if self.eval_every < 1 or self.window < 1:
            raise ValueError(f"warm-up eval_every={self.eval_every} and window={self.window} must be >= 1")
        if not 0 <= self.min_rel_improvement < 1:
            raise ValueError(f"warm-up min_rel_improvement={self.min_rel_improvement} must be in [0, 1)")

    def describe(self) -> str:
        if not self.enabled:
            return f"fixed {self.max_steps} steps"
        return (f"held-out KL every {self.eval_every} steps; stop when the best of the last {self.window} "
                f"evaluations improves on the best before them by < {self.min_rel_improvement * 100:g}%; "
                f"cap {self.max_steps} steps")


@dataclass
class PlateauTracker:
    """Feed it (step, held-out KL) at each evaluation; `should_stop` says whether the warm-up is done."""
    rule: PlateauRule
    steps: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    stop_reason: str | None = None

    def is_eval_step(self, step: int) -> bool:
        return step % self.rule.eval_every == 0 or step == self.rule.max_steps

    def update(self, step: int, held_out_kl: float) -> bool:
        """Record one evaluation; True when the warm-up should stop here (reason in `stop_reason`)."""
        if not math.isfinite(held_out_kl):
            raise ValueError(f"held-out KL is {held_out_kl} at warm-up step {step}; lower the warm-up lr")
        self.steps.append(step)
        self.kl.append(held_out_kl)
        if step >= self.rule.max_steps:
            self.stop_reason = STOP_CAP if self.rule.enabled else STOP_FIXED
        elif self.rule.enabled and self._plateaued():
            self.stop_reason = STOP_PLATEAU
        return self.stop_reason is not None

    def _plateaued(self) -> bool:
        w = self.rule.window
        if len(self.kl) <= w:
            return False
        before, recent = min(self.kl[:-w]), min(self.kl[-w:])
        return recent > before * (1 - self.rule.min_rel_improvement)

    def record(self) -> dict:
        """What the reports show: the curve, the steps used and why the warm-up stopped."""
        return {"steps": list(self.steps), "held_out_kl": list(self.kl),
                "steps_used": self.steps[-1] if self.steps else 0, "stop_reason": self.stop_reason,
                "rule": self.rule.describe()}
