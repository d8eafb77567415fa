"""Ending a run early once it has learned: ``early_stop.at_return`` and ``early_stop.after_steps`` in the config.

Long presets give the slowest memory a fair budget, so a memory that learns early spends most of the run at the top.
The evidence needs the env steps to a return and some steps after it (does it hold?), not the rest of the budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["EarlyStop"]


class EarlyStop:
    """Says when to end a run: ``after_steps`` env steps after its training return first reached ``at_return``.

    :param at_return: the training return (``ep_rew_mean``, the sampling policy's) to reach; None never stops
    :param after_steps: env steps to go on for after it was first reached (0 stops at once)
    :param rows: metrics rows already logged (a resumed run), so that a level reached before the resume counts
    """

    def __init__(self, at_return: float | None, after_steps: int, rows: Iterable[dict] = ()):
        self.at_return, self.after_steps = at_return, after_steps
        self.reached_at: int | None = None
        for row in rows:
            self.observe(row["global_step"], row["ep_rew_mean"])

    def observe(self, step: int, ret: float | None) -> bool:
        """Record one update's training return at env step ``step``; True when the run should end now."""
        if self.at_return is None:
            return False
        if self.reached_at is None and ret is not None and math.isfinite(ret) and ret >= self.at_return:
            self.reached_at = int(step)
        return self.reached_at is not None and step >= self.reached_at + self.after_steps

    def summary(self) -> dict | None:
        """What summary.json records of it: ``{at_return, after_steps, reached_at}``, or None when it is off."""
        if self.at_return is None:
            return None
        return {"at_return": self.at_return, "after_steps": self.after_steps, "reached_at": self.reached_at}
