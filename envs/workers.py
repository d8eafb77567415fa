"""The vector env with its envs stepped in worker processes (``env.workers=N``), for envs whose step is costly.

The ``num_envs`` envs are split into N contiguous groups; each worker process steps one group as an in-process
:class:`~ham_rl.envs.vector.VecEnv` of its slice (env i keeps seed ``seed + i`` and its restart seed), so features,
autoreset, the truncation bootstrap (``truncated``/``final_features``), ``infos``, restarts and the checkpoint format
are those of the in-process VecEnv and a fixed seed gives the same trajectories with any number of workers. Each step
sends every worker its actions before waiting for any, so the groups step at the same time.

Messages are pickled by value (``send_bytes``), never through shared memory; the workers are spawned, so an env that a
user's module registers must be importable there (``env.id=my_pkg.tasks:MyEnv-v0`` is). Only ``final_features`` rows
where ``truncated`` is True are defined (as in VecEnv); other rows may differ from the in-process ones.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import traceback
import warnings
from typing import Any

import numpy as np
import torch

from ham_rl.envs.registry import resolve_env_id
from ham_rl.envs.vector import VecEnv

__all__ = ["EnvWorkerError", "WorkerVecEnv", "make_vec_env"]


class EnvWorkerError(RuntimeError):
    """A worker process died, or raised an error that could not be sent back as itself."""


class _EnvGroup(VecEnv):
    """Envs ``first .. first + num_envs - 1`` of a run's ``total`` envs: their seeds and messages are the whole run's."""

    def __init__(self, env_id: str, first: int, num_envs: int, total: int, seed: int, **features: bool):
        super().__init__(env_id, num_envs, seed=seed + first, **features)
        self.first, self.total, self.run_seed = first, total, seed

    def _restart_seed(self, i: int) -> int:
        return self.run_seed + self.total + self.first + i

    def _index_in_run(self, i: int) -> int:
        return self.first + i


def _send(conn, message: Any) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn) -> Any:
    return pickle.loads(conn.recv_bytes())


def _serve(conn, env_id: str, first: int, num_envs: int, total: int, seed: int, features: dict) -> None:
    """A worker process: build the group, then answer commands until ``close``."""
    torch.set_num_threads(1)
    try:
        group = _EnvGroup(env_id, first, num_envs, total, seed, **features)
        _send(conn, ("ok", (group.observation_space, group.action_space, group.feature_dim)))
    except Exception as e:  # sent to the main process, which raises it
        _send(conn, _error(e))
        return
    while True:
        command, arg = _receive(conn)
        try:
            if command == "close":
                group.close()
                _send(conn, ("ok", None))
                return
            _send(conn, ("ok", _answer(group, command, arg)))
        except Exception as e:
            _send(conn, _error(e))


def _answer(group: _EnvGroup, command: str, arg: Any) -> Any:
    if command == "reset":
        return (*group.reset(), group.infos)
    if command == "step":
        return (*group.step(arg), group.truncated, group.final_features, group.infos, group.final_infos)
    if command == "state_dict":
        return group.state_dict()
    if command == "load_state_dict":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restarted = group.load_state_dict(arg)
        return restarted, [str(w.message) for w in caught], (*group.current_features(), group.infos)
    if command == "current_features":
        return group.current_features()
    raise ValueError(f"unknown env worker command {command!r}")


def _error(e: Exception) -> tuple[str, Any]:
    try:
        pickle.loads(pickle.dumps(e))
        return "error", e
    except Exception:  # one that does not pickle travels as its text
        return "error", EnvWorkerError("".join(traceback.format_exception_only(e)).strip())


class WorkerVecEnv:
    """``num_envs`` copies of one env stepped in ``workers`` subprocesses; the interface of :class:`VecEnv`.

    :param env_id: alias or gymnasium id (see :func:`ham_rl.envs.resolve_env_id`)
    :param num_envs: number of envs (>= 1)
    :param workers: worker processes, 1 to ``num_envs``; worker k steps the k-th of ``workers`` contiguous groups
    :param seed: env i is reset with ``seed + i`` the first time, as in VecEnv
    :param prev_action: append the one-hot previous action to the features
    :param prev_reward: append the previous reward to the features
    """

    COUNTERS = VecEnv.COUNTERS

    def __init__(
        self,
        env_id: str,
        num_envs: int,
        workers: int,
        seed: int = 0,
        prev_action: bool = True,
        prev_reward: bool = True,
    ):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= int(num_envs):
            raise ValueError(f"env.workers must be an int from 1 to num_envs ({num_envs}) here, got {workers!r}")
        self.env_id = resolve_env_id(env_id)
        self.num_envs, self.seed, self.workers = int(num_envs), int(seed), workers
        sizes = [len(a) for a in np.array_split(np.arange(self.num_envs), workers)]
        self.bounds = [(sum(sizes[:k]), sum(sizes[: k + 1])) for k in range(workers)]
        features = {"prev_action": bool(prev_action), "prev_reward": bool(prev_reward)}
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        for first, end in self.bounds:
            parent, child = ctx.Pipe()
            args = (child, self.env_id, first, end - first, self.num_envs, self.seed, features)
            proc = ctx.Process(target=_serve, args=args, daemon=True, name=f"ham_rl-env-worker-{first}")
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)
        try:
            spaces = self._gather()
        except BaseException:
            self.close()
            raise
        self.observation_space, self.action_space, self.feature_dim = spaces[0]
        b = self.num_envs
        self.truncated = np.zeros(b, dtype=bool)
        self.final_features = np.zeros((b, self.feature_dim), dtype=np.float32)
        self.infos: list[dict] = [{} for _ in range(b)]
        self.final_infos: dict[int, dict] = {}

    # ------------------------------------------------------------------------------------------------------------
    def _gather(self, commands: list | None = None) -> list:
        """Send each worker its command (if given), then collect every answer; raise the first worker's error."""
        dead = set()
        for k, command in enumerate(commands or []):
            try:
                _send(self._conns[k], command)
            except OSError:
                dead.add(k)
        answers, error = [], None
        for k, conn in enumerate(self._conns):
            try:
                if k in dead:
                    raise EOFError
                status, value = _receive(conn)
            except (EOFError, OSError):
                first, end = self.bounds[k]
                status, value = "error", EnvWorkerError(f"env worker {k} (envs {first} to {end - 1}) died")
            if status == "error" and error is None:
                error = value
            answers.append(value)
        if error is not None:
            raise error
        return answers

    def _all(self, command: str, arg: Any = None) -> list:
        return self._gather([(command, arg)] * self.workers)

    def reset(self) -> tuple[np.ndarray, np.ndarray]:
        """Reset every env (env i with ``seed + i``); features ``[B, feature_dim]`` and starts ``[B]`` (all True)."""
        answers = self._all("reset")
        self.infos, self.final_infos = [info for a in answers for info in a[2]], {}
        return np.concatenate([a[0] for a in answers]), np.concatenate([a[1] for a in answers])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, float, int]]]:
        """Step every env and autoreset finished ones, as :meth:`VecEnv.step` (same returns, same order)."""
        actions = np.asarray(actions)
        answers = self._gather([("step", actions[a:b]) for a, b in self.bounds])
        finished = [(first + i, ret, n) for (first, _), a in zip(self.bounds, answers, strict=True) for i, ret, n in a[3]]
        self.truncated = np.concatenate([a[4] for a in answers])
        for (first, end), a in zip(self.bounds, answers, strict=True):
            if a[4].any():
                self.final_features[first:end] = a[5]
        self.infos = [info for a in answers for info in a[6]]
        self.final_infos = {
            first + i: info for (first, _), a in zip(self.bounds, answers, strict=True) for i, info in a[7].items()
        }
        cat = [np.concatenate([a[j] for a in answers]) for j in range(3)]
        return cat[0], cat[1], cat[2], finished

    def state_dict(self) -> dict:
        """What :meth:`VecEnv.state_dict` saves, in the same format (a checkpoint resumes with any ``workers``)."""
        parts = self._all("state_dict")
        merged: dict[str, Any] = {"env_id": self.env_id, "num_envs": self.num_envs, "seed": self.seed}
        for key, value in parts[0].items():
            if key not in merged:
                values = [p[key] for p in parts]
                merged[key] = torch.cat(values) if isinstance(value, torch.Tensor) else [x for v in values for x in v]
        return merged

    def load_state_dict(self, data: dict) -> list[int]:
        """Restore what :meth:`state_dict` (or an in-process VecEnv's) saved; returns the restarted envs (warned)."""
        if data["env_id"] != self.env_id or data["num_envs"] != self.num_envs:
            raise ValueError(
                f"env state is for {data['env_id']} x{data['num_envs']}, this VecEnv is {self.env_id} x{self.num_envs}"
            )
        commands = []
        for first, end in self.bounds:
            part = {"env_id": self.env_id, "num_envs": end - first, "seed": self.seed + first}
            for key, value in data.items():
                if key not in part:
                    part[key] = value[first:end].clone() if isinstance(value, torch.Tensor) else list(value[first:end])
            commands.append(("load_state_dict", part))
        answers = self._gather(commands)
        restarted = [first + i for (first, _), a in zip(self.bounds, answers, strict=True) for i in a[0]]
        for a in answers:
            for message in a[1]:
                warnings.warn(message, stacklevel=2)
        self.infos = [info for a in answers for info in a[2][2]]
        return restarted

    def current_features(self) -> tuple[np.ndarray, np.ndarray]:
        """The features and starts that the last ``reset``/``step`` returned (or a restore set)."""
        answers = self._all("current_features")
        return np.concatenate([a[0] for a in answers]), np.concatenate([a[1] for a in answers])

    def close(self) -> None:
        """Close the envs and end the worker processes (those that do not answer within 10 s are terminated)."""
        for conn, proc in zip(self._conns, self._procs, strict=True):
            try:
                if proc.is_alive():
                    _send(conn, ("close", None))
                    if conn.poll(10):
                        _receive(conn)
            except (EOFError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join()
            conn.close()
        self._conns, self._procs = [], []


def make_vec_env(
    env_id: str, num_envs: int, workers: int = 0, seed: int = 0, prev_action: bool = True, prev_reward: bool = True
) -> VecEnv | WorkerVecEnv:
    """The in-process :class:`VecEnv` (``workers=0``) or a :class:`WorkerVecEnv` with that many worker processes."""
    if workers == 0:
        return VecEnv(env_id, num_envs, seed=seed, prev_action=prev_action, prev_reward=prev_reward)
    return WorkerVecEnv(env_id, num_envs, workers, seed=seed, prev_action=prev_action, prev_reward=prev_reward)
