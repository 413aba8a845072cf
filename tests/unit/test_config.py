"""The strict config: unknown keys and wrong types fail with the key path, overrides parse YAML flow values,
cross-field arithmetic is checked with its numbers, the config is frozen and round-trips through YAML."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest

from rtdmd_ray.config import (
    REPO_ROOT,
    Config,
    ConfigError,
    FrozenDict,
    RewardsConfig,
    apply_overrides,
    config_from_dict,
    dump_yaml,
    load_config,
    to_dict,
)

TINY = REPO_ROOT / "configs" / "debug" / "tiny_sd3.yaml"
SD35_RL = REPO_ROOT / "configs" / "rtdmd" / "sd35m.yaml"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, f"config errors must be one line: {msg!r}"
    return msg


# ------------------------------------------------------------------ unknown keys and wrong types
def test_misspelt_key_names_full_path_and_closest_key(tmp_path):
    path = write(tmp_path, "inherit: " + str(TINY) + "\ngrpo:\n  images_per_promt: 4\n")
    msg = error_of(load_config, path)
    assert "'grpo.images_per_promt'" in msg
    assert "did you mean 'grpo.images_per_prompt'" in msg


def test_misspelt_nested_key_and_section(tmp_path):
    msg = error_of(config_from_dict, {"model": {"generator_lora": {"rnak": 8}}})
    assert "'model.generator_lora.rnak'" in msg and "'model.generator_lora.rank'" in msg
    msg = error_of(config_from_dict, {"modle": {}})
    assert "'modle'" in msg and "did you mean 'model'" in msg


def test_key_in_the_wrong_section_suggests_its_real_place():
    msg = error_of(config_from_dict, {"train": {"images_per_prompt": 4}})
    assert "'train.images_per_prompt'" in msg and "did you mean 'grpo.images_per_prompt'" in msg


def test_hopeless_key_lists_the_valid_keys():
    msg = error_of(config_from_dict, {"sync": {"zzzz": 1}})
    assert "'sync.zzzz'" in msg and "transport" in msg and "bucket_mib" in msg


@pytest.mark.parametrize(
    ("raw", "path", "expected"),
    [
        ({"grpo": {"images_per_prompt": "many"}}, "grpo.images_per_prompt", "expected int"),
        ({"grpo": {"images_per_prompt": 2.5}}, "grpo.images_per_prompt", "expected int"),
        ({"grpo": {"images_per_prompt": True}}, "grpo.images_per_prompt", "expected int"),
        ({"model": {"gradient_checkpointing": "true"}}, "model.gradient_checkpointing", "expected bool"),
        ({"train": {"output_dir": 5}}, "train.output_dir", "expected str"),
        ({"solver": {"generator": {"lr": "fast"}}}, "solver.generator.lr", "expected float"),
        ({"sampling": {"denoising_step_list": 1000}}, "sampling.denoising_step_list", "expected list of int"),
        ({"rewards": {"weights": ["clipscore"]}}, "rewards.weights", "expected map of {str: float}"),
        ({"rewards": {"weights": {"clipscore": "high"}}}, "rewards.weights.clipscore", "expected float"),
        ({"model": {"generator_lora": 8}}, "model.generator_lora", "expected a mapping"),
    ],
)
def test_wrong_type_names_path_and_expected_type(raw, path, expected):
    msg = error_of(config_from_dict, raw, validate=False)
    assert f"'{path}'" in msg and expected in msg


def test_literal_choice_suggests_closest():
    msg = error_of(config_from_dict, {"model": {"backbone": "sd4"}}, validate=False)
    assert "'model.backbone'" in msg and "did you mean 'sd3'" in msg and "flux2" in msg


def test_type_directed_coercion(tmp_path):
    # PyYAML reads 3e-6 (no dot) as a string; float fields convert it, int fields take integral floats
    text = f"inherit: {TINY}\nsolver:\n  generator:\n    lr: 3e-6\ntrain:\n  iterations: 1.0e2\n"
    path = write(tmp_path, text)
    cfg = load_config(path)
    assert cfg.solver.generator.lr == 3e-6 and isinstance(cfg.solver.generator.lr, float)
    assert cfg.train.iterations == 100 and isinstance(cfg.train.iterations, int)
    cfg = config_from_dict({"model": {"generator_lora": {"alpha": 8, "reinit_a_std": 1}}}, validate=False)
    assert cfg.model.generator_lora.alpha == 8.0 and isinstance(cfg.model.generator_lora.alpha, float)
    assert cfg.model.generator_lora.reinit_a_std == 1.0
    assert isinstance(cfg.sampling.denoising_step_list, tuple)


# ------------------------------------------------------------------ overrides
def test_overrides_parse_yaml_flow_values():
    cfg = load_config(TINY, [
        "train.seed=3",
        "solver.generator.lr=2.5e-4",
        "grpo.step_selection.enabled=false",
        "sampling.denoising_step_list=[1000, 500]",
        "sampling.num_steps=2",
        "eval.num_steps=2",
        "grpo.step_selection.range_end=0",
        "grpo.step_selection.num_train_steps=1",
        "rewards.batch_images={brightness: 4}",
        "rewards.options={latency: {seconds_per_batch: 0.5, tag: x, flag: true}}",
    ])
    assert cfg.train.seed == 3 and isinstance(cfg.train.seed, int)
    assert cfg.solver.generator.lr == 2.5e-4
    assert cfg.grpo.step_selection.enabled is False
    assert cfg.sampling.denoising_step_list == (1000, 500)
    assert cfg.rewards.batch_images == {"brightness": 4}
    assert cfg.rewards.options == {"latency": {"seconds_per_batch": 0.5, "tag": "x", "flag": True}}


def test_string_fields_take_override_text_verbatim():
    cfg = load_config(TINY, ["train.output_dir=2024", "logging.run_name=true", "train.resume=runs/a: b"])
    assert cfg.train.output_dir == "2024" and cfg.logging.run_name == "true"
    assert cfg.train.resume == "runs/a: b"


def test_override_map_entry_adds_one_key_and_section_map_merges():
    base = load_config(SD35_RL)
    cfg = load_config(SD35_RL, ["rewards.weights.hpsv3=2.0", "model.generator_lora={rank: 8}"])
    assert cfg.rewards.weights == {**base.rewards.weights, "hpsv3": 2.0}
    assert cfg.model.generator_lora.rank == 8
    # the rest of the section keeps the file's values
    assert cfg.model.generator_lora.load_path == base.model.generator_lora.load_path
    # a whole map given for a {name: value} field replaces it
    cfg = load_config(SD35_RL, ["rewards.weights={clipscore: 1.0}"])
    assert cfg.rewards.weights == {"clipscore": 1.0}
    # an entry of a map the file leaves at its default starts from that default
    cfg = config_from_dict({}, ["last_step_loss.bp.reward_weights.brightness=1.0"], validate=False)
    assert cfg.last_step_loss.bp.reward_weights == {"clipscore": 1.0, "hpsv2": 1.0, "pickscore": 1.0,
                                                    "brightness": 1.0}


def test_optional_field_accepts_null_override():
    cfg = load_config(SD35_RL, ["model.generator_lora.reinit_a_std=null"])
    assert cfg.model.generator_lora.reinit_a_std is None


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("grpo.imgs_per_prompt=3", "did you mean 'grpo.images_per_prompt'"),
        ("trian.seed=3", "did you mean 'train'"),
        ("train.seed.value=3", "has no sub-key 'value'"),
        ("train.seed", "must look like key.sub=value"),
        ("train..seed=3", "empty part"),
        ("sampling.denoising_step_list=[1000, 750", "not valid YAML"),
    ],
)
def test_bad_override_is_an_error(override, needle):
    msg = error_of(load_config, TINY, [override])
    assert needle in msg


def test_override_of_wrong_type_names_the_override():
    msg = error_of(load_config, TINY, ["grpo.images_per_prompt=four"])
    assert "'grpo.images_per_prompt'" in msg and "expected int" in msg
    assert "override 'grpo.images_per_prompt=four'" in msg


def test_inv27_unknown_keys_are_errors_and_override_types():
    """Spec algorithms.md §6 invariant 27: the reference drops unknown keys silently and parses a.b=3 as int,
    3.0 as float, True as bool, x as str. Ours keeps the parsing and deliberately rejects unknown keys."""
    cfg = load_config(TINY, ["train.seed=3", "solver.generator.lr=3.0", "train.ema.warmup=True",
                             "train.output_dir=x"])
    assert type(cfg.train.seed) is int and cfg.train.seed == 3
    assert type(cfg.solver.generator.lr) is float and cfg.solver.generator.lr == 3.0
    assert cfg.train.ema.warmup is True
    assert cfg.train.output_dir == "x"
    # where the reference would silently drop these, we fail with the key path
    assert "'train.not_a_field'" in error_of(load_config, TINY, ["train.not_a_field=3"])
    assert "'not_a_section'" in error_of(config_from_dict, {"not_a_section": {"a": 1}})


# ------------------------------------------------------------------ cross-field validation with numbers
def test_batch_arithmetic_error_shows_the_numbers():
    msg = error_of(load_config, TINY, ["grpo.prompts_per_step=3", "grpo.images_per_prompt=3"])
    assert "grpo.images_per_step=9" in msg
    assert "prompts_per_step=3 x images_per_prompt=3" in msg
    assert "resources.learner.count=2" in msg


def test_sampler_divisibility_and_micro_batches():
    msg = error_of(load_config, TINY, ["resources.sampler.count=3"])
    assert "grpo.images_per_step=8" in msg and "resources.sampler.count=3" in msg
    msg = error_of(load_config, TINY, ["grpo.micro_batch_images_per_rank=3"])
    assert "16 samples / 2 ranks = 8" in msg and "micro_batch_images_per_rank=3" in msg
    msg = error_of(load_config, TINY, ["grpo.optimizer_steps_per_epoch=3"])
    assert "2 micro-batches" in msg and "optimizer_steps_per_epoch=3" in msg


def test_cold_start_batch_per_rank():
    msg = error_of(load_config, TINY, ["stage=cold_start", "dmd.prompts_per_step=5"])
    assert "dmd.prompts_per_step=5" in msg and "resources.learner.count=2" in msg and "5/2 = 2.5" in msg
    # the RL batch arithmetic does not apply to a cold start
    cfg = load_config(TINY, ["stage=cold_start", "grpo.prompts_per_step=3", "grpo.images_per_prompt=3"])
    assert cfg.cold_start_prompts_per_rank == 2


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["grpo.step_selection.range_end=3"], ["range [0, 3]", "[0, 2]", "sampling.num_steps=4"]),
        (["grpo.step_selection.num_train_steps=4"], ["num_train_steps=4", "[1, 3]"]),
        (["grpo.max_policy_lag=2"], ["grpo.max_policy_lag=2", "0 (on-policy) or 1"]),
        (["rewards.weights={brightnes: 1.0}"], ["unknown reward 'brightnes'", "did you mean 'brightness'"]),
        (["rewards.weights.brightness=.nan"], ["rewards.weights.brightness=nan must be finite"]),
        (["eval.reward_weights.brightness=inf"], ["eval.reward_weights.brightness=inf must be finite"]),
        (["last_step_loss.bp.reward_weights={latency: 1.0}"], ["latency is not differentiable"]),
        (["model.resolution_px=30"], ["model.resolution_px=30", "divisible by 4", "e.g. 28"]),
        (["model.backbone=sd35", "model.pretrained_path="], ["model.pretrained_path is empty"]),
        (["grpo.images_per_prompt=1", "grpo.prompts_per_step=8"], ["images_per_prompt=1"]),
        (["sampling.num_steps=5"], ["sampling.num_steps=5", "[1, 4]"]),
        (["sampling.denoising_step_list=[1000, 1000, 500, 250]"], ["strictly decreasing"]),
        (["sampling.eta=1.5"], ["sampling.eta=1.5", "[0, 1]"]),
        (["last_step_loss.train_steps=[4]"], ["train_steps has 4"]),
        (["resources.fsdp_shard_ranks=4"], ["learner.count=2", "fsdp_shard_ranks=4"]),
        (["resources.sampler.max_task_retries=2"], ["max_task_retries=2", "sampler.max_restarts"]),
        (["resources.learner.max_restarts=2"], ["learner.max_restarts=2", "cannot rejoin", "resume: auto"]),
        (["model.generator_lora.merge_before_training=true"], ["model.generator_lora.load_path is empty"]),
        (["data.prompts=[]"], ["data.prompts is empty"]),
        (["train.ema.decay=1.0"], ["train.ema.decay=1.0"]),
        (["rewards.device=gpu"], ["rewards.device='gpu'"]),
    ],
)
def test_cross_field_checks(overrides, needles):
    msg = error_of(load_config, TINY, overrides)
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_role_custom_resources_accepted_from_file_and_override(tmp_path):
    path = write(tmp_path, f"inherit: {TINY}\nresources:\n  reward_worker: {{custom: {{rtdmd_reward: 1}}}}\n")
    cfg = load_config(path, ["resources.sampler.custom.rtdmd_sampler=0.5", "resources.learner.custom={}"])
    assert cfg.resources.reward_worker.custom == {"rtdmd_reward": 1.0}
    assert isinstance(cfg.resources.reward_worker.custom["rtdmd_reward"], float)
    assert cfg.resources.sampler.custom == {"rtdmd_sampler": 0.5}
    assert cfg.resources.learner.custom == {} == load_config(TINY).resources.eval_worker.custom  # default
    with pytest.raises(TypeError, match="read-only"):
        cfg.resources.sampler.custom["x"] = 1  # frozen like every config map
    # a map override replaces the whole map (switching the reward pool to the CPU group)
    cpu = apply_overrides(cfg, ["resources.reward_worker.custom={rtdmd_reward_cpu: 2}"])
    assert cpu.resources.reward_worker.custom == {"rtdmd_reward_cpu": 2.0}


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("resources.reward_worker.custom.rtdmd_reward=-1",
         ["resources.reward_worker.custom.rtdmd_reward=-1.0", "must be >= 0"]),
        ("resources.sampler.custom.rtdmd_sampler=.inf", ["resources.sampler.custom.rtdmd_sampler=inf"]),
        ("resources.learner.custom.GPU=1", ["resources.learner.custom.GPU", "built-in",
                                            "use cpus_per_actor / gpus_per_actor"]),
        ("resources.eval_worker.custom.memory=1e9", ["resources.eval_worker.custom.memory", "built-in"]),
        ("resources.sampler.custom={'node:10.0.0.1': 1}", ["resources.sampler.custom.node:10.0.0.1",
                                                          "not a resource name"]),
    ],
)
def test_role_custom_resources_rejected_with_key_path(override, needles):
    msg = error_of(load_config, TINY, [override])
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_role_custom_resources_wrong_type_names_the_key():
    msg = error_of(load_config, TINY, ["resources.sampler.custom.rtdmd_sampler=lots"])
    assert "'resources.sampler.custom.rtdmd_sampler'" in msg and "expected float" in msg
    msg = error_of(load_config, TINY, ["resources.sampler.custom=[rtdmd_sampler]"])
    assert "'resources.sampler.custom'" in msg and "map of {str: float}" in msg


def test_all_problems_reported_in_one_line():
    msg = error_of(load_config, TINY, ["grpo.max_policy_lag=2", "sampling.eta=2.0"])
    assert "max_policy_lag=2" in msg and "sampling.eta=2.0" in msg and "; " in msg


def test_default_config_fails_only_on_the_missing_model_path():
    msg = error_of(Config().validate)
    assert msg == "model.pretrained_path is empty: backbone sd35 needs a hub id or a local directory"


# ------------------------------------------------------------------ derived values, frozen, round trip
def test_derived_totals_are_properties_not_fields():
    cfg = load_config(SD35_RL)
    g = cfg.grpo
    assert (g.prompts_per_step, g.images_per_prompt, g.images_per_step) == (3, 24, 72)
    assert (g.sample_batches_per_epoch, g.samples_per_epoch, g.prompts_per_epoch) == (16, 1152, 48)
    assert cfg.images_per_sampler_per_step == 9 and cfg.images_per_rank_per_epoch == 144
    assert cfg.micro_batches_per_optimizer_step == 16
    names = {f.name for f in dataclasses.fields(cfg.grpo)}
    assert "images_per_step" not in names and "samples_per_epoch" not in names
    assert "images_per_step" not in to_dict(cfg)["grpo"]
    assert cfg.derived()["samples_per_epoch"] == 1152
    summary = cfg.summary()
    assert "\n" not in summary and "72 images/step" in summary and "1152 samples/epoch" in summary


def test_config_is_frozen():
    cfg = load_config(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grpo = cfg.grpo  # type: ignore[misc]
    assert isinstance(cfg.rewards.weights, FrozenDict)
    with pytest.raises(TypeError):
        cfg.rewards.weights["brightness"] = 2.0  # type: ignore[index]
    with pytest.raises(TypeError):
        cfg.rewards.weights.update(latency=1.0)
    # a changed copy is a new object; the original stays as it was
    new = apply_overrides(cfg, ["train.seed=7"])
    assert new.train.seed == 7 and cfg.train.seed == 42


def test_config_pickles_for_ray():
    cfg = load_config(SD35_RL)
    back = pickle.loads(pickle.dumps(cfg))
    assert back == cfg and isinstance(back.rewards.weights, FrozenDict)
    assert hash(back) == hash(cfg)


@pytest.mark.parametrize("comments", [False, True])
def test_print_config_round_trip(tmp_path, comments):
    for cfg in (load_config(TINY), load_config(SD35_RL), load_config(TINY, ["rewards.options={latency: "
                                                                             "{seconds_per_batch: 0.1}}"])):
        text = dump_yaml(cfg, comments=comments)
        back = load_config(write(tmp_path, text))
        assert back == cfg
        assert dump_yaml(back, comments=comments) == text


# ------------------------------------------------------------------ inherit
def test_inherit_merges_sections_and_replaces_maps(tmp_path):
    write(tmp_path, "model: {backbone: tiny_sd3, resolution_px: 64}\nrewards: {weights: {brightness: 1.0, "
                    "latency: 1.0}}\n", "parent.yaml")
    child = write(tmp_path, "inherit: parent.yaml\nmodel: {resolution_px: 32}\nrewards: {weights: "
                            "{brightness: 2.0}}\n", "child.yaml")
    cfg = load_config(child, validate=False)
    assert cfg.model.backbone == "tiny_sd3" and cfg.model.resolution_px == 32
    assert cfg.rewards.weights == {"brightness": 2.0}


def test_inherit_errors(tmp_path):
    write(tmp_path, "inherit: b.yaml\n", "a.yaml")
    write(tmp_path, "inherit: a.yaml\n", "b.yaml")
    assert "inherit cycle" in error_of(load_config, tmp_path / "a.yaml")
    assert "config file not found" in error_of(load_config, write(tmp_path, "inherit: nope.yaml\n", "c.yaml"))
    assert "top level must be a mapping" in error_of(load_config, write(tmp_path, "- 1\n", "d.yaml"))
    assert "invalid YAML" in error_of(load_config, write(tmp_path, "a: [1\n", "e.yaml"))
    assert "only allowed in a YAML file" in error_of(config_from_dict, {"inherit": "x.yaml"})


def test_error_names_the_file_holding_the_bad_key(tmp_path):
    write(tmp_path, "grpo: {images_per_promt: 4}\n", "parent.yaml")
    child = write(tmp_path, "inherit: parent.yaml\ntrain: {seed: 1}\n", "child.yaml")
    msg = error_of(load_config, child)
    assert "parent.yaml" in msg and "child.yaml" not in msg and "'grpo.images_per_promt'" in msg


# ------------------------------------------------------------------ the package and pydantic
def test_sections_stay_dataclasses_validated_on_construction():
    """The sections are pydantic dataclasses: dataclasses.replace / fields keep working, and a copy or a
    section built in code is validated like a loaded one (maps become read-only FrozenDicts)."""
    cfg = load_config(TINY)
    lsl = dataclasses.replace(cfg.last_step_loss, aux_sample_fraction=0.5)
    assert lsl.aux_sample_fraction == 0.5 and cfg.last_step_loss.aux_sample_fraction == 1.0
    assert isinstance(RewardsConfig(weights={"latency": 1}).weights, FrozenDict)
    assert RewardsConfig(weights={"latency": 1}).weights["latency"] == 1.0
    with pytest.raises(ValueError):
        dataclasses.replace(cfg.grpo, images_per_prompt="four")
    with pytest.raises(ValueError):
        RewardsConfig(weight={"latency": 1.0})  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"solver": {"generator": {"lr": True}}}, "'solver.generator.lr': expected float, got bool True"),
        ({"train": {"iterations": "1e2"}}, None),
        ({"train": {"iterations": float("inf")}}, "'train.iterations': expected int, got float inf"),
        ({"logging": {"tags": {"a"}}}, "'logging.tags': expected list of str, got set"),
        ({"eval": {"rows": {"a": ["b", 2]}}}, "'eval.rows.a[1]': expected str (quote it in YAML), got int 2"),
        ({"rewards": {"options": {"x": {"a": [1]}}}}, "'rewards.options.x.a': expected str | int | float"),
        ({"rewards": {"weights": {1: 2.0}}}, "'rewards.weights': keys must be strings, got int 1"),
        ({"grpo": {1: 2}}, "unknown key 'grpo.1'"),
        ({"stage": "cold_strat"}, "did you mean 'cold_start'"),
    ],
)
def test_lenient_and_strict_conversions_match_the_hand_written_loader(raw, needle):
    if needle is None:
        assert config_from_dict(raw, validate=False).train.iterations == 100
    else:
        assert needle in error_of(config_from_dict, raw, validate=False)


def test_scalar_options_keep_their_yaml_type():
    cfg = config_from_dict({"rewards": {"options": {"latency": {"a": 1, "b": 1.0, "c": True, "d": "x"}}}},
                           validate=False)
    opts = cfg.rewards.options["latency"]
    assert [type(opts[k]) for k in "abcd"] == [int, float, bool, str]
    assert isinstance(opts, FrozenDict)


def test_first_problem_in_file_order_is_reported():
    msg = error_of(config_from_dict, {"zz": 1, "grpo": {"images_per_prompt": "x"}}, validate=False)
    assert msg.startswith("unknown key 'zz'")
    msg = error_of(config_from_dict, {"grpo": {"images_per_prompt": "x"}, "zz": 1}, validate=False)
    assert msg.startswith("'grpo.images_per_prompt'")


def test_config_package_is_a_foundation_layer():
    """rtdmd_ray/config/ imports nothing else from rtdmd_ray (so `rtdmd-ray validate` stays light)."""
    import ast

    pkg = REPO_ROOT / "rtdmd_ray" / "config"
    for path in sorted(pkg.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for mod in mods:
                assert not mod.startswith("rtdmd_ray") or mod.startswith("rtdmd_ray.config"), (path.name, mod)
