"""Saved run configs load with the settings of their time."""

import pytest
from omegaconf import OmegaConf
from train_helpers import cfg_of

from ham_rl.agents import PPOConfig
from ham_rl.config import CONFIG_DIR, load_run_config, memory_kwargs
from ham_rl.envs import resolve_env_id
from ham_rl.memory import make_memory, memory_options


def _saved(tmp_path, memory: dict):
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml({"seed": 0, "memory": memory}))
    return load_run_config(tmp_path)


def test_a_run_from_before_conv_path_keeps_its_convolution_on_qkv(tmp_path):
    assert _saved(tmp_path, {"name": "ham", "hidden_size": 64, "conv_size": 4}).memory.conv_path == "qkv"


def test_a_run_with_conv_path_or_without_convolution_is_left_alone(tmp_path):
    assert _saved(tmp_path, {"name": "gdn", "conv_size": 4, "conv_path": "local"}).memory.conv_path == "local"
    assert "conv_path" not in _saved(tmp_path, {"name": "ham", "conv_size": 0}).memory
    assert "conv_path" not in _saved(tmp_path, {"name": "gru", "hidden_size": 64}).memory


def test_a_ham_run_from_before_score_keeps_the_cosine_score(tmp_path):
    assert _saved(tmp_path, {"name": "ham", "conv_size": 4, "conv_path": "local"}).memory.score == "cosine"
    assert _saved(tmp_path, {"name": "ham", "score": "error"}).memory.score == "error"
    assert "score" not in _saved(tmp_path, {"name": "gdn", "conv_size": 0}).memory


def test_a_null_option_turns_hams_feedback_rule_off():
    from ham_rl.config import memory_kwargs
    from ham_rl.memory import make_memory

    name, hidden, options = memory_kwargs(OmegaConf.create({"name": "ham", "hidden_size": 8, "target_fraction": None}))
    assert options == {"target_fraction": None}
    assert make_memory(name, 4, hidden, **options).target_fraction is None
    assert make_memory(name, 4, hidden).target_fraction == 0.05


def test_env_presets_carry_their_budget_and_ppo_settings_and_the_command_line_wins():
    from hydra import compose, initialize_config_module

    with initialize_config_module("ham_rl.configs", version_base=None):
        ar = compose("config", overrides=["env=ar-4"])
        assert (ar.env.id, ar.total_timesteps, ar.agent.gae_lambda) == ("ham_rl/AssociativeRecall4-v0", 2_000_000, 0.0)
        mine = compose("config", overrides=["env=ar-4", "total_timesteps=5000", "agent.gae_lambda=0.9"])
        assert (mine.total_timesteps, mine.agent.gae_lambda) == (5000, 0.9)
        plain = compose("config", overrides=["env=popgym-repeat"])  # a preset without settings keeps the root's
        assert (plain.total_timesteps, plain.agent.gae_lambda) == (300_000, 0.95)
        d200 = compose("config", overrides=["env=cue-random-d200"])
        assert (d200.total_timesteps, d200.agent.num_steps) == (3_000_000, 202)  # a rollout row per episode


def test_count_recall_preset_gives_every_memory_the_readout_clock_and_the_command_line_wins():
    from hydra import compose, initialize_config_module

    with initialize_config_module("ham_rl.configs", version_base=None):
        for memory in ("ham", "gru", "attention"):
            cfg = compose("config", overrides=["env=popgym-count-recall", f"memory={memory}"])
            assert (cfg.memory.name, cfg.memory.time_feature) == (memory, "readout")
        off = compose("config", overrides=["env=popgym-count-recall", "memory.time_feature=false"])
        assert off.memory.time_feature is False
        assert compose("config", overrides=["env=popgym-repeat"]).memory.time_feature is False


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "env").glob("*.yaml")))
def test_every_env_preset_composes_to_a_registered_env_and_valid_options(preset):
    cfg = cfg_of(f"env={preset}", "memory=ham")
    assert resolve_env_id(cfg.env.id)  # raises for an unknown env, listing the known ones
    name, hidden, options = memory_kwargs(cfg.memory)
    assert set(options) <= set(memory_options(name)), f"{preset} sets memory options ham does not have"
    PPOConfig.from_dict(OmegaConf.to_container(cfg.agent, resolve=True))  # raises naming a bad agent setting


def test_a_task_can_set_one_memorys_options_and_the_command_line_still_wins():
    from hydra import compose, initialize_config_module

    with initialize_config_module("ham_rl.configs", version_base=None):
        ham = compose("config", overrides=["env=ar-8", "memory=ham"])  # configs/env_memory/ar-8_ham.yaml
        assert (ham.memory.gate_bias, ham.memory.target_fraction) == (2, 0.15)
        assert "gate_bias" not in compose("config", overrides=["env=ar-8", "memory=gdn"]).memory
        mine = compose("config", overrides=["env=ar-8", "memory=ham", "memory.gate_bias=0"])
        assert (mine.memory.gate_bias, mine.memory.target_fraction) == (0, 0.15)
        plain = compose("config", overrides=["env=popgym-repeat", "memory=ham"])  # no file for the pair: ham's own
        assert (plain.memory.gate_bias, plain.memory.target_fraction) == (0, 0.05)


@pytest.mark.parametrize("pair", sorted(p.stem for p in (CONFIG_DIR / "env_memory").glob("*.yaml")))
def test_every_env_memory_file_names_a_preset_and_a_memory_and_sets_valid_options(pair):
    env, memory = pair.rsplit("_", 1)
    assert (CONFIG_DIR / "env" / f"{env}.yaml").exists() and (CONFIG_DIR / "memory" / f"{memory}.yaml").exists()
    name, _, options = memory_kwargs(cfg_of(f"env={env}", f"memory={memory}").memory)
    assert set(options) <= set(memory_options(name)), f"{pair} sets options {memory} does not have"
    make_memory(name, 4, 8, **options)  # raises naming a bad value
