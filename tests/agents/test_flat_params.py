"""agents/flat_params.py: the agent's parameters as views of one flat tensor, and PPO stepping it: the same training as
Adam over the separate parameters (within round-off), the same checkpoint layout, exact resumption, and the per-tensor
path where a parameter cannot be flattened."""

import copy
import sys
from pathlib import Path

import pytest
import torch

import ham_rl.agents.ppo as ppo_module
from ham_rl.agents import PPO, PPOConfig, RecurrentActorCritic
from ham_rl.agents.flat_params import FlatParameters
from ham_rl.envs import VecEnv

sys.path.insert(0, str(Path(__file__).parent))
from tiny_env import TINY_ENV_ID, register_tiny_env  # noqa: E402


def _ppo(memory="ham", seed=0, freeze=False) -> PPO:
    register_tiny_env()
    torch.manual_seed(seed)
    venv = VecEnv(TINY_ENV_ID, 4, seed=seed)
    cfg = PPOConfig(num_envs=4, num_steps=12, num_minibatches=2, update_epochs=2, embed_size=16, head_size=16)
    opts = {"num_heads": 2} if memory == "ham" else {}
    agent = RecurrentActorCritic(venv.feature_dim, venv.action_space, memory, 16, opts, embed_size=16, head_size=16)
    if freeze:
        agent.encoder[0].bias.requires_grad_(False)
    return PPO(agent, venv, cfg, 10**5)


def _per_tensor(monkeypatch, **kw) -> PPO:
    """A PPO whose optimizer steps each parameter tensor (the path before flat parameters)."""

    def refuse(params):
        raise ValueError("flat parameters off for this test")

    with monkeypatch.context() as m:
        m.setattr(ppo_module, "FlatParameters", refuse)
        ppo = _ppo(**kw)
    assert ppo.flat is None
    return ppo


def test_parameters_become_views_of_one_tensor_with_their_values():
    lin = torch.nn.Linear(3, 2)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    flat = FlatParameters(list(lin.parameters()))
    assert torch.equal(lin.weight, w) and torch.equal(lin.bias, b)
    assert torch.equal(flat.param.detach(), torch.cat([w.reshape(-1), b]))
    with torch.no_grad():
        flat.param[-1] = 7.0  # the optimizer's write reaches the module
    assert lin.bias[-1].item() == 7.0
    lin(torch.ones(4, 3)).sum().backward()  # autograd's gradient lands in the flat gradient
    assert torch.equal(flat.grad[-2:], torch.full((2,), 4.0))
    flat.zero_grad()
    assert not flat.grad.any() and lin.bias.grad is not None and not lin.bias.grad.any()


def test_clipping_matches_torch():
    torch.manual_seed(0)
    mods = [torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)]
    params = [p for m in mods for p in m.parameters()]
    grads = [torch.randn_like(p) * 3 for p in params]
    ref = [g.clone() for g in grads]
    for p, g in zip(params, ref, strict=True):
        p.grad = g
    want_norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
    flat = FlatParameters(params)
    for p, g in zip(params, grads, strict=True):
        p.grad.copy_(g)
    norm = flat.clip_grad_norm_(0.5)
    torch.testing.assert_close(norm, want_norm)
    for p, want in zip(params, ref, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=1e-7)
    assert torch.linalg.vector_norm(flat.grad) == pytest.approx(0.5, rel=1e-5)
    flat.grad.mul_(1e-3)  # below the bound: unchanged
    before = flat.grad.clone()
    flat.clip_grad_norm_(0.5)
    assert torch.equal(flat.grad, before)


@pytest.mark.parametrize("memory", ["ham", "gru"])
def test_training_equals_adam_over_the_separate_tensors(monkeypatch, memory):
    runs = []
    for make in (lambda: _ppo(memory), lambda: _per_tensor(monkeypatch, memory=memory)):
        ppo = make()  # seeds torch: the same samples and minibatches for both runs
        for _ in range(2):
            ppo.iterate()
        runs.append(ppo)
    flat, per = runs
    assert flat.flat is not None and len(flat.optimizer.param_groups[0]["params"]) == 1
    initial = _ppo(memory).agent.state_dict()
    for (name, a), b in zip(flat.agent.named_parameters(), per.agent.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        assert not torch.equal(a, initial[name]), f"{name} was not trained"
    # the checkpoint holds the optimizer state in the per-tensor layout, with the per-tensor run's values
    a, b = flat.state_dict()["optimizer"], per.state_dict()["optimizer"]
    assert a["param_groups"] == b["param_groups"]
    assert sorted(a["state"]) == sorted(b["state"])
    for i in b["state"]:
        for k in b["state"][i]:
            torch.testing.assert_close(a["state"][i][k], b["state"][i][k], rtol=1e-4, atol=1e-6)


def test_a_checkpoint_resumes_exactly_and_loads_into_either_path(monkeypatch):
    ppo = _ppo()
    ppo.iterate()
    saved = copy.deepcopy(ppo.state_dict())
    ppo.iterate()
    resumed = _ppo(seed=1)
    resumed.load_state_dict(copy.deepcopy(saved))
    resumed.iterate()
    for a, b in zip(ppo.agent.parameters(), resumed.agent.parameters(), strict=True):
        assert torch.equal(a, b)
    resumed.flat.check_bound()  # loading copied into the views
    # the per-tensor path reads the same checkpoint, and writes one the flat path reads
    per = _per_tensor(monkeypatch, seed=2)
    per.load_state_dict(copy.deepcopy(saved))
    back = _ppo(seed=3)
    back.load_state_dict(per.state_dict())
    for a, b in zip(back.agent.parameters(), per.agent.parameters(), strict=True):
        assert torch.equal(a, b)


def test_an_optimizer_state_it_cannot_continue_is_refused():
    ppo = _ppo()
    ppo.iterate()
    state = ppo.state_dict()["optimizer"]
    uneven = copy.deepcopy(state)
    uneven["state"][1]["step"] += 1
    with pytest.raises(ValueError, match="'step' differs between parameters"):
        ppo.flat.flat_state(uneven)
    missing = copy.deepcopy(state)
    del missing["state"][2]
    with pytest.raises(ValueError, match="covers"):
        ppo.flat.flat_state(missing)
    other = copy.deepcopy(state)
    other["param_groups"][0]["params"] = other["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="expected one group"):
        ppo.flat.flat_state(other)


def test_replacing_a_parameter_after_building_ppo_is_caught():
    ppo = _ppo()
    weight = ppo.agent.actor[0].weight
    weight.data = weight.data.clone()  # what moving the agent to another device or dtype does to every parameter
    with pytest.raises(RuntimeError, match="no longer shares the flat parameter's storage"):
        ppo.iterate()


def test_a_frozen_parameter_keeps_the_per_tensor_path():
    ppo = _ppo(freeze=True)
    assert ppo.flat is None
    bias = ppo.agent.encoder[0].bias.detach().clone()
    ppo.iterate()
    assert torch.equal(ppo.agent.encoder[0].bias, bias)
    with pytest.raises(ValueError, match="parameter 1 does not require grad"):
        FlatParameters(list(ppo.agent.parameters()))
