"""The eval's pure parts (rtdmd_ray/eval/evaluate.py) and the sample/eval CLI verbs: prompt-set reading and
routing, rows, score aggregation with the -10 sentinel and per-tag tables, and `eval --prompt` as an error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rtdmd_ray.config import ConfigError, apply_overrides, load_config
from rtdmd_ray.data.prompt_sets import (
    PromptSet,
    dataset_token,
    eval_prompt_sets,
    grid_selection,
    read_prompt_file,
)
from rtdmd_ray.eval.evaluate import Row, RowState, build_rows, summarize_row
from rtdmd_ray.stages.inference import image_seed

REPO = Path(__file__).resolve().parents[2]
TINY = "configs/debug/tiny_sd3.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(TINY, ["stage=inference", "model.resolution_px=16"])


def test_read_prompt_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("  first \n\nsecond\n")
    assert read_prompt_file(tmp_path / "a.txt") == [{"prompt": "first"}, {"prompt": "second"}]
    (tmp_path / "b.jsonl").write_text('{"prompt": "p1", "tag": "colors"}\n\n"p2"\n{"text": "p3"}\n')
    assert read_prompt_file(tmp_path / "b.jsonl") == [
        {"prompt": "p1", "tag": "colors"}, {"prompt": "p2"}, {"text": "p3", "prompt": "p3"}]
    (tmp_path / "c.json").write_text('["x", {"text": "y", "k": 1}]')
    assert read_prompt_file(tmp_path / "c.json") == [{"prompt": "x"}, {"text": "y", "k": 1, "prompt": "y"}]
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported prompt file type"):
        read_prompt_file(tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text('{"caption": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_prompt_file(tmp_path / "e.jsonl")
    with pytest.raises(FileNotFoundError, match="eval.prompt_file"):
        read_prompt_file(tmp_path / "missing.txt")


def test_prompt_directory_resolution_order(tmp_path):
    d = tmp_path / "set"
    d.mkdir()
    (d / "metadata.jsonl").write_text('"from metadata"\n')
    assert read_prompt_file(d) == [{"prompt": "from metadata"}]
    (d / "test_metadata.jsonl").write_text('{"prompt": "from test_metadata", "tag": "t"}\n')
    assert read_prompt_file(d)[0]["prompt"] == "from test_metadata"
    (d / "test.txt").write_text("from test.txt\n")
    assert read_prompt_file(d) == [{"prompt": "from test.txt"}]
    with pytest.raises(FileNotFoundError, match="none of"):
        read_prompt_file(tmp_path)


def test_vendored_prompt_sets_read_in_full():
    geneval = read_prompt_file(REPO / "data/prompts/geneval")
    assert len(geneval) == 2212 and {"tag", "include", "prompt"} <= set(geneval[0])
    assert len(read_prompt_file(REPO / "data/prompts/drawbench/test.txt")) == 1000
    assert all("vqa_list" in r for r in read_prompt_file(REPO / "data/prompts/geneval2"))


def test_dataset_token():
    assert dataset_token("drawbench/test.txt") == "drawbench_test"
    assert dataset_token("geneval/test_metadata.jsonl") == "geneval_test_metadata"
    assert dataset_token("my set/ä.txt") == "my_set__"
    assert dataset_token("") == "default"


def test_eval_prompt_sets_route_rewards_and_cap(cfg):
    c = apply_overrides(cfg, [
        "data.dataset_dir=data/prompts", "eval.num_prompts=7", "eval.prompt_file=drawbench/test.txt",
        "eval.reward_weights={brightness: 1.0, latency: 0.5, shapes_geneval: 2.0}",
        "eval.dataset_map={shapes_geneval: geneval}",
    ])
    sets = eval_prompt_sets(c)
    assert [(s.name, s.rewards, len(s.records)) for s in sets] == [
        ("drawbench/test.txt", ("brightness", "latency"), 7), ("geneval", ("shapes_geneval",), 7)]
    assert sets[1].records[0]["tag"] and sets[1].file_name(3) == "geneval_000003.png"


def test_shapes_prompt_sets_are_balanced():
    c = load_config("configs/inference/shapes.yaml", ["eval.num_prompts=60"])
    (s,) = eval_prompt_sets(c)
    tags = [r["tag"] for r in s.records]
    assert len(tags) == 60 and all(tags.count(t) == 10 for t in set(tags)) and len(set(tags)) == 6


def test_grid_selection_spreads_over_all_sets():
    sets = [PromptSet("a", "a", tuple({"prompt": str(i)} for i in range(6)), ("brightness",)),
            PromptSet("b", "b", tuple({"prompt": str(i)} for i in range(2)), ("brightness",))]
    assert grid_selection(sets, 4) == [(0, 0), (0, 2), (0, 4), (1, 0)]
    assert len(grid_selection(sets, 100)) == 8 and grid_selection(sets, 0) == []


def test_build_rows(cfg, tmp_path):
    assert [r.name for r in build_rows(cfg)] == ["model"]
    lora = tmp_path / "l.pt"
    lora.write_bytes(b"0")
    rows = build_rows(apply_overrides(cfg, [
        f'eval.rows={{teacher-8: [eval.mode=teacher, eval.num_steps=8], '
        f'"RTDMD 4": ["inference.lora_paths=[{lora}]"], '
        f'ghost: ["inference.lora_paths=[{tmp_path / "none.pt"}]"]}}']))
    assert [(r.name, r.dirname, r.skipped is None) for r in rows] == [
        ("teacher-8", "teacher-8", True), ("RTDMD 4", "RTDMD_4", True), ("ghost", "ghost", False)]
    assert rows[0].cfg.eval.num_steps == 8 and rows[0].cfg.eval.mode == "teacher"
    assert len({r.config_hash for r in rows}) == 3
    with pytest.raises(ConfigError, match="eval.rows.bad: override 'eval.seed=3'"):
        build_rows(apply_overrides(cfg, ["eval.rows={bad: [eval.seed=3]}"]))
    with pytest.raises(ConfigError, match="eval.rows.typo"):
        build_rows(apply_overrides(cfg, ["eval.rows={typo: [model.resolution_pix=3]}"]))
    with pytest.raises(FileNotFoundError, match="inference.lora_paths"):
        build_rows(apply_overrides(cfg, [f"inference.lora_paths=[{tmp_path / 'none.pt'}]"]))


def test_summarize_row_means_sentinels_and_tags(cfg):
    recs = ({"prompt": "p0", "tag": "colors"}, {"prompt": "p1", "tag": "colors"},
            {"prompt": "p2", "tag": "counting"})
    geneval_set = PromptSet("g", "g", recs, ("shapes_geneval",))
    plain_set = PromptSet("p", "p", ({"prompt": "q0"}, {"prompt": "q1"}), ("brightness",))
    row = Row(name="m", overrides=(), cfg=cfg, config_hash="h")
    st = RowState(row=row, dir=Path("/nonexistent"))
    S = -10.0

    def gv(acc: float, strict: float, tag: str) -> dict[str, float]:
        other = "counting" if tag == "colors" else "colors"
        return {"shapes_geneval": strict, "accuracy": acc, "strict_accuracy": strict, f"{tag}_accuracy": acc,
                f"{tag}_strict_accuracy": strict, f"{other}_accuracy": S, f"{other}_strict_accuracy": S}

    st.scores = {"g_000000.png": {"shapes_geneval": gv(1.0, 1.0, "colors")},
                 "g_000001.png": {"shapes_geneval": gv(1.0, 0.0, "colors")},
                 "g_000002.png": {"shapes_geneval": gv(0.0, 0.0, "counting")},
                 "p_000000.png": {"brightness": {"brightness": 0.2}},
                 "p_000001.png": {"brightness": {"brightness": 0.6}}}
    weights = {"shapes_geneval": 2.0, "brightness": 0.5}
    out = summarize_row(st, [geneval_set, plain_set], weights)
    s = out["scores"]
    assert s["shapes_geneval"] == pytest.approx(1 / 3) and s["accuracy"] == pytest.approx(2 / 3)
    assert s["colors_accuracy"] == 1.0 and s["colors_strict_accuracy"] == 0.5
    assert s["counting_accuracy"] == 0.0
    assert s["brightness"] == pytest.approx(0.4)
    assert s["mean"] == pytest.approx(2.0 / 3 + 0.5 * 0.4)
    assert out["per_dataset"]["p"] == {"brightness": pytest.approx(0.4), "mean": pytest.approx(0.2)}
    tags = out["per_tag"]["shapes_geneval"]
    assert tags["colors"] == {"accuracy": 1.0, "strict_accuracy": 0.5, "count": 2.0}
    assert tags["counting"] == {"accuracy": 0.0, "strict_accuracy": 0.0, "count": 1.0}
    assert tags["overall"]["accuracy"] == pytest.approx(0.5) and tags["overall"]["strict_accuracy"] == 0.25
    r2 = out["records"][2]
    assert r2["prompt"] == "p2" and r2["seed"] == image_seed(cfg.eval.seed, 2)
    assert r2["file"] == "m/images/g_000002.png"
    # per image, the other tags' -10 sentinels are dropped
    assert "colors_accuracy" not in r2["scores"] and r2["scores"]["counting_accuracy"] == 0.0
    assert out["records"][4]["scores"] == {"brightness": 0.6}


def test_eval_cli_rejects_prompt(capsys):
    from rtdmd_ray.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", TINY, "stage=inference", "--prompt", "a cat"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--prompt is not used" in err and "rtdmd-ray sample" in err


def test_cli_rejects_stray_arguments(capsys):
    from rtdmd_ray.cli import main

    with pytest.raises(SystemExit):
        main(["eval", TINY, "--frobnicate"])
    assert "unrecognized arguments: --frobnicate" in capsys.readouterr().err


def test_sample_cli_writes_pngs(tmp_path, capsys):
    import torch

    from rtdmd_ray.cli import main
    from rtdmd_ray.stages.inference import PNG_SEED_KEY, read_png

    torch.set_num_threads(1)
    out = tmp_path / "samples"
    # overrides may come after the flags; `--lora none` = the base model
    rc = main(["sample", TINY, "stage=inference", "--prompt", "a cat", "--prompt", "a dog", "--seed", "5",
               "--out", str(out), "--lora", "none", "model.resolution_px=16"])
    assert rc == 0 and "wrote 2 image(s)" in capsys.readouterr().out
    arr, info = read_png(out / "001_00.png")
    assert arr.shape == (16, 16, 3) and info[PNG_SEED_KEY] == str(image_seed(5, 1))
    meta = json.loads((out / "sample.json").read_text())
    assert meta["prompts"] == ["a cat", "a dog"] and meta["loras"] == [] and meta["base_seed"] == 5


def test_scorer_key_tracks_scorer_settings(cfg, tmp_path):
    from rtdmd_ray.eval.evaluate import scorer_key

    base = scorer_key("clipscore", cfg.rewards)
    model = tmp_path / "clip"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights v1")
    with_model = apply_overrides(cfg, [f"rewards.options={{clipscore: {{model: {model}}}}}"])
    k1 = scorer_key("clipscore", with_model.rewards)
    (model / "model.safetensors").write_bytes(b"weights v2")  # retrained in place: another key
    k2 = scorer_key("clipscore", with_model.rewards)
    assert len({base, k1, k2}) == 3
    assert scorer_key("clipscore", with_model.rewards) == k2 and scorer_key("pickscore", cfg.rewards) != base
