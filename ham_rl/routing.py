"""What the cache kept: per-episode routing decisions, scored against the steps the env says carry information.

A :class:`RoutingTrace` collects, for each finished episode, which steps the router cached (``Memory.last_routing``),
their router scores, and which steps were informative (``info["informative"]`` of the recall envs; -1 where the env
does not say). From them: cache **recall** (informative steps that were cached), **precision** (cached steps that
were informative), **episode recall** (episodes with an informative step whose cache kept at least one: the measure
where the same information is in view over several steps, as in MiniGrid's memory rooms), the KV fraction, how often
step 0 was cached, and a raster picture of the episodes.
It knows nothing of the trainer: ``ham_rl.evaluate`` and ``agents.PPO`` feed it numpy arrays.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Episode", "RoutingTrace", "informative_flags"]

UNKNOWN = -1  # an informative flag the env did not report


def informative_flags(infos: list[dict]) -> np.ndarray:
    """``[B]`` int8 per env: 1 informative, 0 not, -1 where the info has no ``informative`` key."""
    return np.array([UNKNOWN if (f := info.get("informative")) is None else int(bool(f)) for info in infos], np.int8)


class Episode(NamedTuple):
    """One finished episode, a value per step."""

    cached: np.ndarray  # [L] bool, the router cached this step
    informative: np.ndarray  # [L] int8, 1 / 0 / -1 (unknown)
    scores: np.ndarray  # [L] float32, the router's score (NaN where not given)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


class RoutingTrace:
    """Routing decisions of finished episodes, and the metrics and picture made from them."""

    def __init__(self) -> None:
        self.episodes: list[Episode] = []
        # per env: the chunks of the episode in progress, or None until an episode start is seen (its steps so far
        # were not recorded, so it cannot be a whole episode)
        self._open: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None] = []

    def add_episode(self, cached: np.ndarray, informative: np.ndarray | None = None, scores: np.ndarray | None = None):
        """Add one whole episode (``informative`` None: unknown at every step)."""
        cached = np.asarray(cached, dtype=bool).reshape(-1)
        n = len(cached)
        inf = np.full(n, UNKNOWN, np.int8) if informative is None else np.asarray(informative, np.int8).reshape(-1)
        sc = np.full(n, np.nan, np.float32) if scores is None else np.asarray(scores, np.float32).reshape(-1)
        if len(inf) != n or len(sc) != n:
            raise ValueError(f"informative ({len(inf)}) and scores ({len(sc)}) must have one value per step ({n})")
        self.episodes.append(Episode(cached, inf, sc))

    def add_steps(
        self,
        cached: np.ndarray,
        starts: np.ndarray,
        dones: np.ndarray,
        informative: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        active: np.ndarray | None = None,
    ) -> None:
        """Add ``T`` consecutive steps of ``B`` envs (arrays ``[T, B]``); episodes are assembled per env.

        ``starts[t, b]``: step t begins an episode of env b; ``dones[t, b]``: it ends with step t. An episode is kept
        once it ends, and only if its start was seen by this trace. ``active`` ``[B]``: envs whose steps are
        recorded (others are skipped, and their episode in progress is dropped).
        """
        cached, starts, dones = np.asarray(cached, bool), np.asarray(starts, bool), np.asarray(dones, bool)
        T, B = cached.shape
        inf = np.full((T, B), UNKNOWN, np.int8) if informative is None else np.asarray(informative, np.int8)
        sc = np.full((T, B), np.nan, np.float32) if scores is None else np.asarray(scores, np.float32)
        self._open.extend([None] * (B - len(self._open)))
        for b in range(B):
            if active is not None and not active[b]:
                self._open[b] = None
                continue
            cuts = np.union1d(np.flatnonzero(dones[:, b]) + 1, np.flatnonzero(starts[:, b]))
            bounds = [0, *cuts[(cuts > 0) & (cuts < T)].tolist(), T]
            for a, z in zip(bounds[:-1], bounds[1:], strict=True):  # [a, z): one piece of one episode
                if starts[a, b]:
                    self._open[b] = []  # an unfinished episode before it (none in a gymnasium env) is dropped
                if self._open[b] is not None:  # copies: the callers reuse their buffers
                    self._open[b].append((cached[a:z, b].copy(), inf[a:z, b].copy(), sc[a:z, b].copy()))
                if dones[z - 1, b]:
                    if self._open[b] is not None:
                        self.add_episode(*(np.concatenate(parts) for parts in zip(*self._open[b], strict=True)))
                    self._open[b] = []  # the next step starts an episode

    def drop_finished(self) -> None:
        """Forget the finished episodes, keep the ones in progress (the trainer logs each rollout's episodes once)."""
        self.episodes = []

    # -- metrics ---------------------------------------------------------------------------------------------
    @property
    def num_episodes(self) -> int:
        """Finished episodes recorded."""
        return len(self.episodes)

    def _all(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.episodes:
            return np.zeros(0, bool), np.zeros(0, np.int8)
        return np.concatenate([e.cached for e in self.episodes]), np.concatenate([e.informative for e in self.episodes])

    @property
    def recall(self) -> float | None:
        """Informative steps that were cached / informative steps; None where the env reported none."""
        cached, inf = self._all()
        return _ratio(int((cached & (inf == 1)).sum()), int((inf == 1).sum()))

    @property
    def episode_recall(self) -> float | None:
        """Episodes with an informative step in which one was cached / episodes with an informative step."""
        told = [e for e in self.episodes if (e.informative == 1).any()]
        return _ratio(sum(bool((e.cached & (e.informative == 1)).any()) for e in told), len(told))

    @property
    def precision(self) -> float | None:
        """Cached informative steps / cached steps whose flag is known; None if no informative step or none cached."""
        cached, inf = self._all()
        if not (inf == 1).any():
            return None
        return _ratio(int((cached & (inf == 1)).sum()), int((cached & (inf != UNKNOWN)).sum()))

    @property
    def kv_fraction(self) -> float | None:
        """Cached steps / steps."""
        cached, _ = self._all()
        return _ratio(int(cached.sum()), len(cached))

    @property
    def step0_cached(self) -> float | None:
        """Fraction of episodes whose first step was cached (near 1 with little else cached: HAM keeps only step 0)."""
        return _ratio(sum(bool(e.cached[0]) for e in self.episodes if len(e.cached)), self.num_episodes)

    @property
    def cached_per_episode(self) -> float | None:
        """Mean number of cached steps per episode."""
        return float(np.mean([e.cached.sum() for e in self.episodes])) if self.episodes else None

    def summary(self) -> dict[str, float | None]:
        """``cache_recall``, ``cache_episode_recall``, ``cache_precision``, ``step0_cached``, ``cached_per_episode``
        (None where undefined)."""
        return {
            "cache_recall": self.recall,
            "cache_episode_recall": self.episode_recall,
            "cache_precision": self.precision,
            "step0_cached": self.step0_cached,
            "cached_per_episode": self.cached_per_episode,
        }

    # -- picture ---------------------------------------------------------------------------------------------
    def raster_figure(self, max_episodes: int = 64, max_steps: int = 256, title: str = "") -> Figure:
        """Episode step across, episodes down: cached steps filled, informative steps outlined in red."""
        from matplotlib.collections import PatchCollection
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend
        from matplotlib.patches import Patch, Rectangle

        if max_episodes < 1 or max_steps < 1:
            raise ValueError(f"max_episodes and max_steps must be >= 1, got {max_episodes} and {max_steps}")
        shown = self.episodes[:max_episodes]
        steps = min(max((len(e.cached) for e in shown), default=1), max_steps)
        grid = np.full((max(len(shown), 1), steps), np.nan)
        boxes = []
        for row, e in enumerate(shown):
            n = min(len(e.cached), steps)
            grid[row, :n] = e.cached[:n]
            boxes += [Rectangle((t - 0.5, row - 0.5), 1, 1) for t in np.flatnonzero(e.informative[:n] == 1)]
        fig = Figure(figsize=(float(np.clip(steps / 18, 6, 14)), float(np.clip(len(shown) / 8, 2.5, 7))), layout="constrained")
        ax = fig.add_subplot()
        cmap = ListedColormap(["#ececec", "#1f4e9c"]).with_extremes(bad="white")  # white: past the episode's end
        ax.imshow(grid, cmap=cmap, vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        if boxes:
            ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="#e3342f", linewidth=1.2))
        ax.set_xlabel("episode step" + (f" (first {steps})" if steps == max_steps else ""))
        ax.set_ylabel("episode" + (f" (first {len(shown)} of {self.num_episodes})" if len(shown) < self.num_episodes else ""))

        def fmt(v: float | None, spec: str = ".2f") -> str:
            return "-" if v is None else format(v, spec)

        ax.set_title(
            (f"{title}\n" if title else "")
            + f"cache recall {fmt(self.recall)}, precision {fmt(self.precision)}, kv {fmt(self.kv_fraction, '.3f')}, "
            f"step 0 cached {fmt(self.step0_cached)} ({self.num_episodes} episodes)",
            fontsize=9,
        )
        handles = [Patch(facecolor="#1f4e9c", label="cached"), Patch(facecolor="#ececec", label="not cached")]
        if boxes:
            handles.append(Patch(facecolor="none", edgecolor="#e3342f", label="informative (env)"))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
        return fig
