"""Load a saved HAMRecurrentPPO without unpickling: what SB3 stores pickled is rebuilt from plain data saved beside it.

SB3's ``.zip`` holds the parameters as ``.pth`` files (read with ``torch.load(weights_only=True)``) and the model's
other attributes as JSON, where whatever JSON cannot hold (the policy class, the spaces, the schedules, the last
observation) is a base64 cloudpickle, which ``BaseAlgorithm.load`` unpickles: a crafted file runs its payload there.
``HAMRecurrentPPO`` also saves ``ham_plain_data`` (plain JSON: the policy's name, the spaces, the clip ranges and the
learning rate), and ``safe_custom_objects`` turns it into SB3's ``custom_objects``, so that no pickled entry is read.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from typing import Any

from stable_baselines3.common.utils import FloatSchedule

from ham_rl.envs.space_json import space_from_json, space_to_json

__all__ = ["plain_model_data", "safe_custom_objects"]

#: pickled entries that learn() rebuilds when they are None (its first rollout resets the env)
REBUILT_ON_LEARN = ("_last_obs", "_last_episode_starts", "_last_original_obs", "ep_info_buffer", "ep_success_buffer")


def _schedule_start(value: Any) -> tuple[float | None, bool]:
    """``(value at the start of training, whether it was a schedule)`` of a float or a schedule (None stays None)."""
    if value is None or isinstance(value, int | float):
        return (None if value is None else float(value)), False
    return float(value(1.0)), True


def plain_model_data(model: Any) -> dict[str, Any]:
    """What ``safe_custom_objects`` needs, as JSON-ready data; call before the schedules are wrapped."""
    data: dict[str, Any] = {"policy_class": model.policy_class.__name__}
    for name in ("observation_space", "action_space"):
        try:
            data[name] = space_to_json(getattr(model, name))
        except ValueError:
            data[name] = None  # loading then needs custom_objects for it (or trust_pickle)
    for name in ("learning_rate", "clip_range", "clip_range_vf"):
        data[name], data[f"{name}_was_schedule"] = _schedule_start(getattr(model, name))
    return data


def safe_custom_objects(path: Any, policy_classes: dict[str, type]) -> dict[str, Any]:
    """SB3 ``custom_objects`` for every pickled entry of the saved model at ``path``, from its plain data.

    :raises ValueError: (one line) for a pickled entry with no plain-data replacement; the message names it
    """
    with zipfile.ZipFile(path) as archive:
        saved = json.loads(archive.read("data").decode())
    plain = saved.get("ham_plain_data")
    if not isinstance(plain, dict):
        raise ValueError(
            f"{path} has no ham_plain_data (saved by an older ham_rl or another library), so loading it would unpickle "
            "its entries; pass trust_pickle=True if you trust the file"
        )
    out: dict[str, Any] = {}
    for key, value in saved.items():
        if not (isinstance(value, dict) and ":serialized:" in value):
            continue
        if key == "policy_class":
            name = plain.get("policy_class")
            if name not in policy_classes:
                raise ValueError(f"{path}: policy class {name!r} is not one of {', '.join(policy_classes)}")
            out[key] = policy_classes[plain["policy_class"]]
        elif key in ("observation_space", "action_space") and plain.get(key) is not None:
            out[key] = space_from_json(plain[key])
        elif key in ("learning_rate", "clip_range", "clip_range_vf"):
            if plain.get(f"{key}_was_schedule"):
                warnings.warn(f"{key} was a schedule; it is loaded as its starting value {plain[key]}", stacklevel=3)
            out[key] = plain.get(key)
        elif key == "lr_schedule":  # rebuilt from learning_rate by _setup_model
            out[key] = FloatSchedule(plain["learning_rate"])
        elif key in REBUILT_ON_LEARN:
            out[key] = None
        else:
            raise ValueError(
                f"{path}: `{key}` is stored pickled and has no plain-data form; pass custom_objects={{{key!r}: ...}}, "
                "or trust_pickle=True if you trust the file"
            )
    return out
