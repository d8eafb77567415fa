"""The package's layers import one way: kernels <- memory <- agents <- applications; envs imports none of them.

Each layer's modules are imported in a fresh interpreter in which every module of the layers above it (and, for
envs, every other layer) raises ImportError, so an arrow the wrong way fails here whether it is at module level or
behind the import of a sibling.
"""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
import textwrap

import pytest

APPLICATIONS = ("ham_rl.train", "ham_rl.evaluate", "ham_rl.report", "ham_rl.sb3", "ham_rl.checkpoint", "ham_rl.config",
                "ham_rl.runlog", "ham_rl.distributed", "ham_rl.early_stop")  # fmt: skip
LAYERS = {  # layer: (its packages, what it must not import)
    "kernels": (("ham_rl.kernels",), ("ham_rl.memory", "ham_rl.agents", "ham_rl.envs", *APPLICATIONS)),
    # routing: what a memory's cache kept, read by the PPO rollout and the applications (numpy and matplotlib only)
    "memory": (("ham_rl.memory", "ham_rl.routing"), ("ham_rl.agents", "ham_rl.envs", *APPLICATIONS)),
    "envs": (("ham_rl.envs",), ("ham_rl.kernels", "ham_rl.memory", "ham_rl.agents", *APPLICATIONS)),
    "agents": (("ham_rl.agents",), APPLICATIONS),
    "applications": (APPLICATIONS, ()),
}
# Modules that import triton at module level (loaded lazily by the dispatchers, on the first Triton call).
TRITON_MODULES = {"ham_rl.kernels.aot", "ham_rl.kernels.cache_attention.parallel", "ham_rl.kernels.gated_delta_rule.chunk",
                  "ham_rl.kernels.ham_step.fused"}  # fmt: skip


def _all_modules() -> list[str]:
    """Every module of the package, the subpackages that live in other folders of the checkout included."""
    names = set()
    for package in ("ham_rl", "ham_rl.envs", "ham_rl.agents", "ham_rl.kernels"):
        module = importlib.import_module(package)
        names |= {m.name for m in pkgutil.walk_packages(module.__path__, package + ".")}
        names.add(package)
    return sorted(names - {"ham_rl", "ham_rl.configs"})


def _under(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_every_module_belongs_to_one_layer():
    for name in _all_modules():
        owners = [layer for layer, (packages, _) in LAYERS.items() if _under(name, packages)]
        assert len(owners) == 1, f"{name} is in layers {owners}; add it to exactly one in LAYERS"


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_imports_nothing_above_it(layer):
    packages, blocked = LAYERS[layer]
    modules = [m for m in _all_modules() if _under(m, packages) and m not in TRITON_MODULES]
    assert modules
    script = textwrap.dedent(f"""
        import importlib, importlib.abc, sys
        BLOCKED = {blocked!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                    raise ImportError(f"layer violation: {{name}} imported")
        sys.meta_path.insert(0, Block())
        for module in {modules!r}:
            importlib.import_module(module)
        print("imported", len({modules!r}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr.strip().splitlines()[-1]
    assert out.stdout.strip() == f"imported {len(modules)}"


def test_old_top_level_names_are_not_importable_from_outside_the_checkout(tmp_path):
    code = "import importlib.util as u; print([n for n in ('envs', 'agents', 'kernels', 'configs') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
