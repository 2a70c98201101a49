"""Config: defaults, YAML + dotted overrides, and one-line UserErrors that name the field."""

from pathlib import Path

import pytest

from grouprl.config import EMBEDDED_MODEL, TrainConfig, load_config, parse_overrides, save_config
from grouprl.errors import UserError


def config_error(path=None, overrides=None) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message  # one line
    return message


def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------- defaults


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, TrainConfig)
    assert cfg == TrainConfig()
    assert cfg.algo == "grpo" and cfg.steps == 40
    assert cfg.model.name_or_path == EMBEDDED_MODEL and cfg.model.lora.enabled is False and cfg.model.lora.r == 16
    assert cfg.task.name == "arithmetic" and cfg.task.source is None and cfg.task.prefill == "<reasoning>\n"
    assert cfg.rollout.group_size == 8 and cfg.rollout.prompts_per_step == 4
    assert cfg.grpo.advantage == "zscore" and cfg.grpo.ratio == "token" and cfg.grpo.loss_agg == "seq_mean_token_mean"
    assert (cfg.grpo.eps_low, cfg.grpo.eps_high, cfg.grpo.beta, cfg.grpo.mu) == (0.2, 0.2, 0.04, 1)
    assert [(r.name, r.weight) for r in cfg.rewards] == [
        ("tag_count", 0.5), ("strict_format", 0.5), ("correctness", 2.0)
    ]
    assert load_config(None, []) == cfg


CONFIGS = Path(__file__).parent.parent / "configs"


def test_the_shipped_configs_are_found():
    assert {"default.yaml", "calculator-compare.yaml", "guess.yaml"} <= {p.name for p in CONFIGS.glob("*.yaml")}


@pytest.mark.parametrize("path", sorted(str(p) for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(path, None)
    assert cfg.steps >= 1 and cfg.task.name


def test_every_field_has_a_description():
    def walk(model, prefix):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, f"{prefix}{name}.")

    walk(TrainConfig, "")


# ---------------------------------------------------------------- YAML file + overrides


def test_yaml_file_and_overrides(tmp_path):
    p = write(tmp_path, """
steps: 7
rollout:
  group_size: 4
  prompts_per_step: 2
grpo:
  beta: 0.0
  advantage: rloo
task:
  name: countdown
rewards:
  - name: countdown
    weight: 1.5
""")
    cfg = load_config(p)
    assert cfg.steps == 7 and cfg.rollout.group_size == 4 and cfg.rollout.prompts_per_step == 2
    assert cfg.grpo.beta == 0.0 and cfg.grpo.advantage == "rloo" and cfg.task.name == "countdown"
    assert [(r.name, r.weight) for r in cfg.rewards] == [("countdown", 1.5)]
    assert cfg.rollout.max_new_tokens == 96  # untouched fields keep their defaults

    cfg = load_config(p, ["rollout.group_size=6", "model.lora.enabled=true", "grpo.eps_high=0.28",
                          "task.system_prompt=Be brief."])
    assert cfg.rollout.group_size == 6  # the override wins over the file
    assert cfg.rollout.prompts_per_step == 2  # siblings from the file survive the merge
    assert cfg.model.lora.enabled is True and cfg.model.lora.r == 16  # nested override, siblings default
    assert cfg.grpo.eps_high == 0.28 and cfg.grpo.beta == 0.0 and cfg.grpo.advantage == "rloo"
    assert cfg.task.system_prompt == "Be brief." and cfg.task.name == "countdown"


def test_overrides_without_file():
    cfg = load_config(None, ["rollout.group_size=4", "model.lora.enabled=true", "model.lora.r=8", "steps=3"])
    assert cfg.rollout.group_size == 4 and cfg.model.lora.enabled and cfg.model.lora.r == 8 and cfg.steps == 3


def test_override_list_value():
    cfg = load_config(None, ["rewards=[{name: correctness, weight: 1.0}]", "model.lora.target_modules=[q_proj, v_proj]"])
    assert [(r.name, r.weight) for r in cfg.rewards] == [("correctness", 1.0)]
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


def test_parse_overrides():
    assert parse_overrides(["a.b=1", "a.c=true", "a.d.e=x y", "f=", "g=0.5"]) == {
        "a": {"b": 1, "c": True, "d": {"e": "x y"}}, "f": "", "g": 0.5
    }
    assert parse_overrides([]) == {}
    for bad in ["no_equals_sign", "=3"]:
        with pytest.raises(UserError, match="key.path=value"):
            parse_overrides([bad])
    with pytest.raises(UserError, match="both as a value and as a section"):
        parse_overrides(["rollout=1", "rollout.group_size=2"])


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(None, ["rollout.group_size=4", "model.lora.enabled=true", "grpo.loss_agg=constant"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == TrainConfig()


def test_override_values_for_string_fields_are_taken_as_text():
    assert load_config(None, ["output_dir=2024"]).output_dir == "2024"
    assert load_config(None, ["output_dir=no"]).output_dir == "no"
    assert load_config(None, ["task.system_prompt=42"]).task.system_prompt == "42"
    assert load_config(None, ["task.seed=0123"]).task.seed == 123
    # an optional text field is unset by null (as in YAML); quoted, or where null is not allowed, it is text
    assert load_config(None, ["env.name=calculator", "env.name=null"]).env.name is None
    assert load_config(None, ["task.system_prompt=~"]).task.system_prompt is None
    assert load_config(None, ["task.system_prompt='null'"]).task.system_prompt == "null"
    assert load_config(None, ["output_dir=null"]).output_dir == "null"


# ---------------------------------------------------------------- errors


def test_unknown_top_level_field():
    msg = config_error(overrides=["stepz=3"])
    assert "stepz" in msg and "Extra inputs are not permitted" in msg


def test_unknown_nested_field():
    msg = config_error(overrides=["model.lora.rank=8"])
    assert "model.lora.rank" in msg
    msg = config_error(overrides=["rollout.groupsize=4"])
    assert "rollout.groupsize" in msg


def test_unknown_field_in_yaml(tmp_path):
    msg = config_error(write(tmp_path, "grpo:\n  betta: 0.1\n"))
    assert "grpo.betta" in msg


def test_unknown_section():
    assert "optimizer" in config_error(overrides=["optimizer.lr=1e-5"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("rollout.group_size=0", "rollout.group_size"),
        ("rollout.group_size=1", "rollout.group_size"),  # a group of one has no baseline
        ("rollout.group_size=four", "rollout.group_size"),
        ("grpo.advantage=foo", "grpo.advantage"),
        ("grpo.ratio=word", "grpo.ratio"),
        ("grpo.loss_agg=sum", "grpo.loss_agg"),
        ("grpo.beta=-0.1", "grpo.beta"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("task.name=mnist", "task.name"),
        ("task.max_steps=4", "task.max_steps"),
        ("model.lora.dropout=1", "model.lora.dropout"),
        ("model.dtype=int8", "model.dtype"),
        ("optim.lr=0", "optim.lr"),
        ("rewards=[]", "rewards"),
    ],
)
def test_invalid_value_names_the_field(override, field):
    msg = config_error(overrides=[override])
    assert msg.startswith("invalid config: ")
    assert f"{field}:" in msg
    value = override.split("=", 1)[1]
    if value not in ("[]",):
        assert value in msg  # the rejected value is shown


def test_invalid_value_message_lists_choices():
    msg = config_error(overrides=["grpo.advantage=foo"])
    for choice in ("zscore", "mean", "rloo", "rank", "batch_std"):
        assert choice in msg


def test_two_problems_reported_together():
    msg = config_error(overrides=["rollout.group_size=0", "model.lora.foo=1"])
    assert "rollout.group_size" in msg and "model.lora.foo" in msg


def test_reward_without_name(tmp_path):
    msg = config_error(write(tmp_path, "rewards:\n  - weight: 1.0\n"))
    assert "rewards.0.name" in msg


def test_missing_file(tmp_path):
    msg = config_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_invalid_yaml(tmp_path):
    p = write(tmp_path, "rollout:\n  group_size: [1, 2\n", name="broken.yaml")
    msg = config_error(p)
    assert "broken.yaml" in msg and "not valid YAML" in msg


def test_yaml_not_a_mapping(tmp_path):
    msg = config_error(write(tmp_path, "- a\n- b\n", name="list.yaml"))
    assert "list.yaml" in msg and "mapping" in msg


@pytest.mark.parametrize("name", ["gsm8k", "dataset"])
def test_data_task_needs_source(name):
    msg = config_error(overrides=[f"task.name={name}"])
    assert "task.source" in msg and name in msg
    cfg = load_config(None, [f"task.name={name}", "task.source=data.jsonl"])
    assert cfg.task.source == "data.jsonl"


def test_minibatches_must_divide_the_batch():
    # minibatches are made of whole groups, so they must divide prompts_per_step (default 4)
    msg = config_error(overrides=["grpo.minibatches=3"])  # 4 groups cannot be split in 3
    assert "grpo.minibatches" in msg and "prompts_per_step" in msg
    assert load_config(None, ["grpo.minibatches=4"]).grpo.minibatches == 4
    assert load_config(None, ["grpo.minibatches=2"]).grpo.minibatches == 2
    # 2 prompts * G 4 = 8 sequences: 4 minibatches of 2 sequences would cut groups in half
    assert "grpo.minibatches" in config_error(
        overrides=["rollout.prompts_per_step=2", "rollout.group_size=4", "grpo.minibatches=4"]
    )
    assert load_config(None, ["rollout.prompts_per_step=6", "rollout.group_size=3", "grpo.minibatches=3"])


def test_reference_refresh_needs_full_fine_tuning():
    msg = config_error(overrides=["grpo.ref_refresh_steps=5", "model.lora.enabled=true"])
    assert "grpo.ref_refresh_steps" in msg
    assert load_config(None, ["grpo.ref_refresh_steps=5"]).grpo.ref_refresh_steps == 5


def test_assignment_is_validated():
    cfg = load_config()
    with pytest.raises(Exception):
        cfg.rollout.group_size = 0


# ---------------------------------------------------------------- strict types, files that cannot be read


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=.inf", "optim.lr"),
        ("rollout.temperature=.nan", "rollout.temperature"),
        ("rollout.temperature=.inf", "rollout.temperature"),
        ("grpo.beta=-.inf", "grpo.beta"),
        ("optim.betas=[0.9, .nan]", "optim.betas.1"),
        ("rewards=[{name: correctness, weight: .inf}]", "rewards.0.weight"),
    ],
)
def test_non_finite_floats_are_refused(override, field):
    msg = config_error(overrides=[override])
    assert f"{field}:" in msg and "finite" in msg


def test_non_finite_float_in_a_file_is_refused(tmp_path):
    msg = config_error(write(tmp_path, "optim:\n  lr: .inf\nrollout:\n  temperature: .nan\n"))
    assert "optim.lr:" in msg and "rollout.temperature:" in msg


@pytest.mark.parametrize(
    "override, field",
    [
        ("steps=true", "steps"),  # lax pydantic would read True as 1
        ("rollout.group_size=false", "rollout.group_size"),
        ("task.max_prompt_tokens=true", "task.max_prompt_tokens"),
        ("optim.lr=true", "optim.lr"),
        ("grpo.beta=false", "grpo.beta"),
        ("steps=2.5", "steps"),
        ("steps=10.0", "steps"),  # an int field takes an int, not a float that happens to be whole
        ("model.lora.enabled=1", "model.lora.enabled"),
        ("model.lora.enabled=yes please", "model.lora.enabled"),
    ],
)
def test_wrong_type_overrides_are_refused(override, field):
    msg = config_error(overrides=[override])
    assert msg.startswith("invalid config: ") and f"{field}:" in msg


def test_booleans_and_strings_for_numbers_in_a_file_are_refused(tmp_path):
    msg = config_error(write(tmp_path, 'steps: true\nseed: "10"\noptim:\n  lr: "0.001"\n  weight_decay: false\n'))
    assert "steps: Input should be a valid integer (got True)" in msg
    assert "seed: Input should be a valid integer (got '10')" in msg
    assert "optim.lr:" in msg and "optim.weight_decay:" in msg


def test_ints_and_exponents_are_accepted_for_floats(tmp_path):
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1\n  betas: [0, 1]\ngrpo:\n  beta: 0\n"))
    assert cfg.optim.lr == 1.0 and cfg.optim.betas == (0.0, 1.0) and cfg.grpo.beta == 0.0
    # YAML 1.1 (PyYAML) reads 1e-5 as the string '1e-5'; the config reads it as the number people mean
    cfg = load_config(write(tmp_path, "optim:\n  lr: 1e-5\n  weight_decay: 2E2\n"), ["grpo.beta=4e-2"])
    assert cfg.optim.lr == 1e-5 and cfg.optim.weight_decay == 200.0 and cfg.grpo.beta == 0.04
    assert load_config(None, ["optim.lr=3.0e-6", "steps=12"]).optim.lr == 3e-6
    assert load_config(None, ["output_dir=1e5"]).output_dir == "1e5"  # a text field keeps the text


def test_duplicate_key_in_a_file(tmp_path):
    p = write(tmp_path, "steps: 3\nrollout:\n  group_size: 4\n  temperature: 0.7\n  group_size: 2\n", name="dup.yaml")
    msg = config_error(p)
    assert msg == "config file '" + str(p) + "': key 'group_size' appears twice (lines 3 and 5): keep one"
    msg = config_error(write(tmp_path, "steps: 3\nseed: 1\nsteps: 4\n", name="top.yaml"))
    assert "top.yaml" in msg and "'steps'" in msg and "lines 1 and 3" in msg
    assert "'name'" in config_error(write(tmp_path, "rewards: [{name: correctness, name: countdown}]\n"))


def test_merge_keys_are_not_duplicates(tmp_path):
    # a YAML merge followed by an explicit key overrides it; that is not a repeated key
    text = "rollout:\n  <<: {group_size: 4, prompts_per_step: 2}\n  group_size: 6\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.rollout.group_size == 6 and cfg.rollout.prompts_per_step == 2


def test_duplicate_key_in_an_override():
    with pytest.raises(UserError, match=r"override .*'name' appears twice"):
        parse_overrides(["rewards=[{name: correctness, name: countdown}]"])


def test_config_file_not_utf8(tmp_path):
    p = tmp_path / "latin1.yaml"
    p.write_bytes("steps: 3\ntask:\n  system_prompt: caf\u00e9\n".encode("latin-1"))
    msg = config_error(p)
    assert "latin1.yaml" in msg and "not UTF-8" in msg and "line 3" in msg
    p.write_bytes("steps: 3\n".encode("utf-16"))
    assert "not UTF-8" in config_error(p)


def test_config_path_is_a_directory(tmp_path):
    msg = config_error(tmp_path)
    assert str(tmp_path) in msg and "is a directory" in msg


def test_config_file_unreadable(tmp_path, monkeypatch):
    p = write(tmp_path, "steps: 3\n", name="locked.yaml")

    def refuse(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(p), "read_bytes", refuse)  # chmod 0 does not stop root
    msg = config_error(p)
    assert msg == f"config file '{p}' cannot be read: Permission denied"


def test_invalid_yaml_names_the_line(tmp_path):
    p = write(tmp_path, "steps: 3\nrollout:\n  group_size: [1, 2\n", name="broken.yaml")
    assert "line" in config_error(p)


def test_engine_and_layout_options_that_cannot_run_are_refused():
    assert "static_cache" in config_error(None, ["rollout.compile=true"])
    assert "rollout.engine=hf" in config_error(None, ["rollout.static_cache=true"])
    assert "packed or auto" in config_error(None, ["model.gradient_checkpointing=true", "model.update_layout=shared"])
    assert "vllm" in config_error(None, ["rollout.engine=vllm"])
    assert load_config(None, ["rollout.engine=cb", "model.update_layout=packed"]).rollout.engine == "cb"


def test_adapter_critic_needs_lora_and_one_process():
    from grouprl.config import world_problems

    with pytest.raises(UserError, match="ppo.critic.kind: adapter needs model.lora.enabled"):
        load_config(None, ["algo=ppo", "ppo.critic.kind=adapter"])
    load_config(None, ["algo=grpo", "ppo.critic.kind=adapter"])  # the PPO section does not apply to GRPO
    cfg = load_config(None, ["algo=ppo", "ppo.critic.kind=adapter", "model.lora.enabled=true"])
    assert world_problems(cfg, 1, "ddp") == []
    assert any("runs in one process only" in p for p in world_problems(cfg, 2, "ddp"))
    with pytest.raises(UserError, match="cannot run with model.gradient_checkpointing"):
        load_config(None, ["algo=ppo", "ppo.critic.kind=adapter", "model.lora.enabled=true",
                           "model.gradient_checkpointing=true"])
    with pytest.raises(UserError, match=r"ppo.critic.epochs=1 must be at least ppo.epochs=2"):
        load_config(None, ["algo=ppo", "ppo.epochs=2", "ppo.critic.epochs=1"])


def test_config_changes_skip_the_section_of_the_unused_algorithm():
    """Resuming a GRPO run after ppo.* changed (a compare config's critic retuned, say) cannot change its
    training; the same change to a PPO run, or a change of algorithm, is reported."""
    from grouprl.config import config_changes

    def cfg(**kv):
        return TrainConfig.model_validate(kv)

    grpo = cfg(algo="grpo", ppo={"critic": {"lr": 1e-3}, "eps_value": 0.2})
    assert config_changes(grpo, cfg(algo="grpo", ppo={"critic": {"lr": 2e-3}, "eps_value": None})) == []
    assert config_changes(grpo, cfg(algo="grpo", grpo={"beta": 0.1})) == ["grpo.beta"]
    ppo = cfg(algo="ppo", grpo={"beta": 0.0})
    assert config_changes(ppo, cfg(algo="ppo", grpo={"beta": 0.1})) == []
    assert config_changes(ppo, cfg(algo="ppo", ppo={"vf_coef": 0.5})) == ["ppo.vf_coef"]
    assert config_changes(grpo, cfg(algo="ppo", ppo={"critic": {"lr": 2e-3}})) == ["algo", "ppo.critic.lr"]
