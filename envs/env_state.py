"""An env's state as plain data, restored into a freshly built env without unpickling anything.

A checkpoint must load without running code from the file (``torch.load(weights_only=True)``), so envs are not
pickled: they are rebuilt from the config, and the values of their attributes are written into the new objects.
:func:`encode` turns an env (its whole wrapper chain) into nested dicts, lists, numbers, strings and tensors;
:func:`restore` walks the rebuilt env alongside and assigns them. It never creates an object of a class named in the
data: custom objects (a deck of cards, a board) must already exist at the same place in the rebuilt env, with the
same class, and only their fields are set. The few value types it does create are plain containers, numpy arrays and
numpy's own random generators. Shared references (a generator used by the env and by its deck) stay shared.

An object whose state is not its attributes (a simulator that rebuilds its world at every reset) says it itself:
``plain_state()`` returns plain data and ``load_plain_state(data)`` puts the rebuilt object into that state, e.g.
by replaying the episode from its reset (``envs/minigrid_memory.py``).

Functions and classes that the constructor stored are references, not state: the rebuilt env must hold the same one
there. An attribute of any other kind (a bound method, a module, a file, a lock) makes the env unencodable
(:class:`EnvStateError`); the vector env then restarts that env from a seed, with a warning, instead of failing the
checkpoint.
"""

from __future__ import annotations

import enum
import types
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

__all__ = ["EnvStateError", "encode", "encode_envs", "restore"]

#: attributes rebuilt from the config, not restored (spaces, the registration spec, render settings)
REBUILT = frozenset(
    {"spec", "_cached_spec", "metadata", "render_mode", "observation_space", "action_space", "_observation_space",
     "_action_space", "_metadata", "reward_range", "_reward_range", "_np_random_seed"}
)  # fmt: skip
#: numpy bit generators that may be created on restore
BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM, "MT19937": np.random.MT19937,
                  "Philox": np.random.Philox, "SFC64": np.random.SFC64}  # fmt: skip
_SCALARS = (type(None), bool, int, float, str)
_ARRAY_KINDS = "biufUS"
_ARRAY_KINDS_TEXT = "bool, int, uint, float and text"


class EnvStateError(ValueError):
    """An env's state cannot be written as plain data, or the data does not fit the rebuilt env."""


def _class_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def encode(obj: Any) -> Any:
    """Plain data for ``obj`` (an env, a wrapper, or any attribute value); raises :class:`EnvStateError` where it cannot."""
    return _Encoder().value(obj, "env")


def encode_envs(envs: list, observations: list) -> dict[str, list]:
    """Each env's state and current observation as plain data; ``None`` and the reason where there is no plain form."""
    out: dict[str, list] = {"envs": [], "obs": [], "unsaved_reasons": []}
    for env, obs in zip(envs, observations, strict=True):
        try:
            encoded = encode(env), encode(obs), None
        except EnvStateError as e:
            encoded = None, None, str(e)
        for key, value in zip(out, encoded, strict=True):
            out[key].append(value)
    return out


def restore(target: Any, data: Any) -> Any:
    """Write ``data`` (from :func:`encode`) into ``target``, the same object rebuilt; returns the restored value."""
    return _Decoder().value(data, target, "env")


class _Encoder:
    def __init__(self):
        self.refs: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps encoded objects alive, so their ids stay unique

    def value(self, obj: Any, path: str) -> Any:
        if type(obj) in _SCALARS:  # exact types: an IntEnum member or a str subclass would pickle its class
            return obj
        if isinstance(obj, enum.Enum):
            return {"kind": "enum", "class": _class_name(obj), "name": obj.name}
        if isinstance(obj, types.FunctionType | types.BuiltinFunctionType | type):
            # set by the constructor (a generator function, a class): the rebuilt env holds the same one
            return {"kind": "rebuilt_ref", "name": f"{obj.__module__}.{obj.__qualname__}"}
        if isinstance(obj, types.ModuleType | types.MethodType):
            raise EnvStateError(f"{path} is a {type(obj).__name__}, which has no plain-data form")
        if isinstance(obj, np.generic):
            return {"kind": "np_scalar", "dtype": obj.dtype.str, "value": obj.item()}
        if isinstance(obj, np.dtype):
            if obj.kind not in _ARRAY_KINDS:
                raise EnvStateError(f"{path} is the dtype {obj}; only {_ARRAY_KINDS_TEXT} dtypes have a plain-data form")
            return {"kind": "dtype", "dtype": obj.str}
        if isinstance(obj, spaces.Space):
            return {"kind": "rebuilt"}  # a space is made by the env's constructor, like the top-level spaces
        if id(obj) in self.refs:
            return {"kind": "ref", "id": self.refs[id(obj)]}
        self.refs[id(obj)] = len(self.refs)
        self.keep.append(obj)
        ref = self.refs[id(obj)]
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in _ARRAY_KINDS:
                raise EnvStateError(f"{path} is an array of dtype {obj.dtype}; only {_ARRAY_KINDS_TEXT} arrays")
            if obj.dtype.kind in "US":  # text: a list, since tensors hold numbers only
                return {"kind": "ndarray", "ref": ref, "dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.tolist()}
            return {"kind": "ndarray", "ref": ref, "dtype": obj.dtype.str, "data": torch.from_numpy(np.array(obj))}
        if isinstance(obj, torch.Tensor):
            return {"kind": "tensor", "ref": ref, "data": obj.detach().clone()}
        if isinstance(obj, np.random.Generator):
            return {"kind": "generator", "ref": ref, "state": self.value(obj.bit_generator.state, f"{path}.state")}
        if isinstance(obj, np.random.RandomState):
            return {"kind": "random_state", "ref": ref, "state": self.value(obj.get_state(legacy=False), f"{path}.state")}
        if isinstance(obj, list | tuple):
            items = [self.value(v, f"{path}[{i}]") for i, v in enumerate(obj)]
            if type(obj) in (list, tuple):
                return {"kind": type(obj).__name__, "ref": ref, "items": items}
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple: rebuilt as the env's own class
                return {"kind": "namedtuple", "ref": ref, "class": _class_name(obj), "items": items}
            raise EnvStateError(f"{path} is a {type(obj).__name__}, which has no plain-data form")
        if isinstance(obj, dict):
            items = [[self.value(k, f"{path} key"), self.value(v, f"{path}[{k!r}]")] for k, v in obj.items()]
            return {"kind": "dict", "ref": ref, "items": items}
        if callable(getattr(type(obj), "plain_state", None)):  # an object that says its own state (module docstring)
            return {"kind": "own", "ref": ref, "class": _class_name(obj), "state": self.value(obj.plain_state(), path)}
        if hasattr(obj, "__dict__") and not callable(obj):
            fields = {k: self.value(v, f"{path}.{k}") for k, v in vars(obj).items() if k not in REBUILT}
            return {"kind": "object", "ref": ref, "class": _class_name(obj), "fields": fields}
        raise EnvStateError(f"{path} is a {type(obj).__name__}, which has no plain-data form")


class _Decoder:
    def __init__(self):
        self.refs: dict[int, Any] = {}

    def value(self, data: Any, target: Any, path: str) -> Any:
        if type(data) in _SCALARS:
            return data
        if not isinstance(data, dict) or "kind" not in data:
            raise EnvStateError(f"{path}: not env-state data ({type(data).__name__})")
        kind = data["kind"]
        if kind == "ref":
            if data["id"] not in self.refs:
                raise EnvStateError(f"{path}: reference to an object not seen before")
            return self.refs[data["id"]]
        if kind == "np_scalar":
            return _dtype(data["dtype"], path).type(data["value"])
        if kind == "dtype":
            return _dtype(data["dtype"], path)
        if kind == "enum":  # a member of the enum class the rebuilt env already holds there
            same = isinstance(target, enum.Enum) and _class_name(target) == data["class"]
            if not same or data["name"] not in type(target).__members__:
                saved = f"{data['class']}.{data['name']}"
                raise EnvStateError(f"{path}: the saved state holds {saved}, the rebuilt env has {target!r}")
            return type(target)[data["name"]]
        if kind == "rebuilt":
            if target is None:
                raise EnvStateError(f"{path}: the rebuilt env has no space here")
            return target
        if kind == "rebuilt_ref":  # a function or class the constructor set: kept only if the rebuilt env has the same
            name = getattr(target, "__module__", None), getattr(target, "__qualname__", None)
            if f"{name[0]}.{name[1]}" != data["name"]:
                raise EnvStateError(f"{path}: the saved state refers to {data['name']}, the rebuilt env has {target!r}")
            return target
        out = self._build(kind, data, target, path)
        return out

    def _build(self, kind: str, data: dict, target: Any, path: str) -> Any:
        ref = data["ref"]
        if kind == "ndarray":
            dtype, values = _dtype(data["dtype"], path), data["data"]
            if dtype.kind in "US" and isinstance(values, list):
                out = np.array(values, dtype=dtype).reshape(data["shape"])
            elif dtype.kind not in "US" and isinstance(values, torch.Tensor):
                out = values.numpy().astype(dtype, copy=True)
            else:
                raise EnvStateError(f"{path}: bad array data for dtype {dtype}")
            self.refs[ref] = out
            return out
        if kind == "tensor":
            if not isinstance(data["data"], torch.Tensor):
                raise EnvStateError(f"{path}: bad tensor data")
            self.refs[ref] = out = data["data"].clone()
            return out
        if kind in ("generator", "random_state"):
            state = self._plain(data["state"], f"{path}.state")
            name = state.get("bit_generator") if isinstance(state, dict) else None
            if name not in BIT_GENERATORS:
                raise EnvStateError(f"{path}: bit generator {name!r} is not one of {', '.join(BIT_GENERATORS)}")
            if kind == "generator":
                same = isinstance(target, np.random.Generator) and type(target.bit_generator).__name__ == name
                out = target if same else np.random.Generator(BIT_GENERATORS[name]())
                out.bit_generator.state = state
            else:
                out = target if isinstance(target, np.random.RandomState) else np.random.RandomState()
                out.set_state(state)
            self.refs[ref] = out
            return out
        if kind in ("list", "tuple", "namedtuple"):
            items = data["items"]
            if kind == "namedtuple" and (not isinstance(target, tuple) or _class_name(target) != data["class"]):
                raise EnvStateError(f"{path}: the saved state holds a {data['class']}, the rebuilt env has {target!r}")
            old = target if isinstance(target, list | tuple) and len(target) == len(items) else [None] * len(items)
            out = []
            self.refs[ref] = out  # registered first: an item may refer back to its list
            out.extend(self.value(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(items, old, strict=True)))
            if kind == "tuple":
                self.refs[ref] = out = tuple(out)
            elif kind == "namedtuple":
                self.refs[ref] = out = type(target)._make(out)
            return out
        if kind == "dict":
            old = target if isinstance(target, dict) else {}
            self.refs[ref] = out = {}
            for k, v in data["items"]:
                key = self.value(k, None, f"{path} key")
                out[key] = self.value(v, old.get(key) if _hashable(key) else None, f"{path}[{key!r}]")
            return out
        if kind == "own":
            if target is None or _class_name(target) != data["class"]:
                got = "nothing" if target is None else _class_name(target)
                raise EnvStateError(f"{path}: the saved state holds a {data['class']}, the rebuilt env has {got} there")
            self.refs[ref] = target
            target.load_plain_state(self._plain(data["state"], f"{path}.state"))
            return target
        if kind == "object":
            if target is None or _class_name(target) != data["class"]:
                got = "nothing" if target is None else _class_name(target)
                raise EnvStateError(f"{path}: the saved state holds a {data['class']}, the rebuilt env has {got} there")
            self.refs[ref] = target
            for name, v in data["fields"].items():
                setattr(target, name, self.value(v, getattr(target, name, None), f"{path}.{name}"))
            return target
        raise EnvStateError(f"{path}: unknown kind {kind!r}")

    def _plain(self, data: Any, path: str) -> Any:
        """A generator's state: plain containers and arrays only."""
        return self.value(data, None, path)


def _dtype(text: Any, path: str) -> np.dtype:
    """A numpy dtype from its ``.str`` form (simple kinds only: no structured dtypes, no objects)."""
    try:
        dtype = np.dtype(str(text))
    except TypeError as e:
        raise EnvStateError(f"{path}: bad dtype {text!r}") from e
    if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
        raise EnvStateError(f"{path}: dtype {text!r} is not one of {_ARRAY_KINDS_TEXT}")
    return dtype


def _hashable(key: Any) -> bool:
    try:
        hash(key)
    except TypeError:
        return False
    return True
