"""`rtdmd-ray eval` on Ray eval workers (rtdmd_ray/eval/evaluate.py) with the tiny random SD3-family backbone,
the synthetic ``brightness`` reward on a text prompt file and ``shapes_geneval`` on GenEval-style ShapeWorld
records: seeds independent of worker count and batch size, resume, model rows and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rtdmd_ray.config import apply_overrides, load_config
from rtdmd_ray.eval.evaluate import _create_workers, run_eval
from rtdmd_ray.stages.inference import PNG_HASH_KEY, PNG_SEED_KEY, image_seed, read_png

pytestmark = pytest.mark.ray

PLAIN = ["a red circle", "a photo of a cat", "a city at night", "a bowl of fruit", "two green triangles"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from rtdmd_ray.shapes.prompts import test_prompts

    data = tmp_path_factory.mktemp("prompts")
    (data / "plain.txt").write_text("\n".join(PLAIN) + "\n")
    shapes = test_prompts(0)
    tags = ("colors", "counting", "position", "two_object")
    picked = [next(m for m in shapes if m["tag"] == t) for t in tags]
    (data / "shapes.jsonl").write_text("".join(json.dumps(m) + "\n" for m in picked))
    return load_config("configs/debug/tiny_sd3.yaml", [
        "stage=inference", "model.resolution_px=16", "data.kind=prompt_file", f"data.dataset_dir={data}",
        "eval.reward_weights={brightness: 1.0, shapes_geneval: 1.0}",
        "eval.dataset_map={brightness: plain.txt, shapes_geneval: shapes.jsonl}",
        "eval.prompt_file=plain.txt",
        "eval.batch_images=2", "resources.eval_worker={count: 2, cpus_per_actor: 0.5}",
    ])


@pytest.fixture(scope="module")
def workers(ray_local, cfg):
    """Two eval workers for the whole module (each imports torch/diffusers once and keeps its tiny model)."""
    group = _create_workers(cfg)
    yield list(group)
    group.shutdown()


def _images(root: Path, row: str = "model") -> dict[str, tuple[np.ndarray, dict[str, str]]]:
    return {p.name: read_png(p) for p in sorted((root / row / "images").glob("*.png"))}


def test_images_do_not_depend_on_worker_count_or_batch_size(cfg, workers, tmp_path):
    one = run_eval(cfg, out_dir=tmp_path / "one", progress=False, workers=workers[:1], report=False)
    two = run_eval(apply_overrides(cfg, ["eval.batch_images=3"]), out_dir=tmp_path / "two", progress=False,
                   workers=workers, report=False)
    a, b = _images(tmp_path / "one"), _images(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 9  # 5 plain + 4 ShapeWorld prompts
    assert sorted(a)[:2] == ["plain_000000.png", "plain_000001.png"]
    for name, (img, info) in a.items():
        img_b, info_b = b[name]
        index = int(name.split("_")[-1].split(".")[0])
        assert info[PNG_SEED_KEY] == info_b[PNG_SEED_KEY] == str(image_seed(cfg.eval.seed, index))
        assert info[PNG_HASH_KEY] == info_b[PNG_HASH_KEY]  # the batch size is not part of the config hash
        # identical up to float round-off of differently shaped BLAS calls: a rare pixel off by one level
        diff = np.abs(img.astype(int) - img_b.astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, name
    # the two prompt sets share seeds by index but not prompts: different images
    assert not np.array_equal(a["plain_000000.png"][0], a["shapes_000000.png"][0])
    ra, rb = one["rows"][0], two["rows"][0]
    assert [r["seed"] for r in ra["records"]] == [r["seed"] for r in rb["records"]]
    assert ra["scores"]["brightness"] == pytest.approx(rb["scores"]["brightness"], abs=1e-3)
    assert ra["scores"]["strict_accuracy"] == rb["scores"]["strict_accuracy"]


def test_resume_skips_what_is_on_disk(cfg, workers, tmp_path):
    out = tmp_path / "ev"
    first = run_eval(cfg, out_dir=out, progress=False, workers=workers)
    row = first["rows"][0]
    assert (row["generated_now"], row["scored_now"]) == (9, 9)
    assert set(row["scores"]) >= {"brightness", "shapes_geneval", "accuracy", "strict_accuracy", "mean",
                                  "colors_accuracy", "counting_strict_accuracy"}
    tags = {"colors", "counting", "position", "two_object", "overall"}
    assert set(row["per_tag"]["shapes_geneval"]) == tags
    assert row["per_dataset"]["plain.txt"]["brightness"] == row["scores"]["brightness"]
    assert len(row["records"]) == 9 and {"prompt", "seed", "file", "scores"} <= set(row["records"][0])
    stamps = {p: p.stat().st_mtime_ns for p in (out / "model" / "images").glob("*.png")}

    again = run_eval(cfg, out_dir=out, progress=False, workers=workers)
    assert (again["rows"][0]["generated_now"], again["rows"][0]["scored_now"]) == (0, 0)
    assert again["rows"][0]["scores"] == row["scores"]
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}

    # a deleted image is regenerated and rescored, alone
    (out / "model" / "images" / "shapes_000002.png").unlink()
    third = run_eval(cfg, out_dir=out, progress=False, workers=workers)
    assert (third["rows"][0]["generated_now"], third["rows"][0]["scored_now"]) == (1, 1)
    assert third["rows"][0]["scores"] == pytest.approx(row["scores"], abs=1e-4)

    # a new reward scores the existing images; nothing is generated
    more = apply_overrides(cfg, ["eval.reward_weights={brightness: 1.0, shapes_geneval: 1.0, latency: 0.5}",
                                 "eval.dataset_map={brightness: plain.txt, shapes_geneval: shapes.jsonl, "
                                 "latency: plain.txt}"])
    fourth = run_eval(more, out_dir=out, progress=False, workers=workers)
    assert (fourth["rows"][0]["generated_now"], fourth["rows"][0]["scored_now"]) == (0, 5)
    assert "latency" in fourth["rows"][0]["scores"]
    # another scorer setting rescores that reward only
    faster = apply_overrides(more, ["rewards.options={latency: {seconds_per_batch: 0.0}}"])
    rescored = run_eval(faster, out_dir=out, progress=False, workers=workers)
    assert (rescored["rows"][0]["generated_now"], rescored["rows"][0]["scored_now"]) == (0, 5)

    # another sampler setting is another config hash: everything is made again
    eta = apply_overrides(cfg, ["eval.noise_level=0.5"])
    fifth = run_eval(eta, out_dir=out, progress=False, workers=workers)
    assert (fifth["rows"][0]["generated_now"], fifth["rows"][0]["scored_now"]) == (9, 9)
    assert fifth["rows"][0]["config_hash"] != row["config_hash"]
    lines = (out / "model" / "records.jsonl").read_text().splitlines()
    # one line per (image, reward of its prompt set); the old images' lines (and latency's) are gone
    assert sorted(json.loads(x)["reward"] for x in lines) == ["brightness"] * 5 + ["shapes_geneval"] * 4
    assert {json.loads(x)["config_hash"] for x in lines} == {fifth["rows"][0]["config_hash"]}


def test_rows_compare_models_on_the_same_seeds(cfg, workers, tmp_path):
    import torch

    from rtdmd_ray.models import build_backbone
    from rtdmd_ray.models.lora import save_lora

    t = build_backbone("tiny_sd3", dtype="fp32", seed=cfg.train.seed).transformer
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, mod in t.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.endswith(("attn.to_q", "attn.to_v")):
            tensors[f"{name}.lora_A.default.weight"] = torch.randn(4, mod.in_features, generator=g) * 0.5
            tensors[f"{name}.lora_B.default.weight"] = torch.randn(mod.out_features, 4, generator=g) * 0.5
    lora = save_lora(tmp_path / "acdmd" / "generator_ema.safetensors", tensors, rank=4, alpha=4.0)
    rows_cfg = apply_overrides(cfg, [
        f"inference.lora_paths=[{lora}]",
        "eval.rows={teacher-2: [eval.mode=teacher, eval.num_steps=2, eval.guidance_scale=2.0, "
        "'inference.lora_paths=[]'], AC-DMD-4: [], RTDMD-4: ['inference.lora_paths=[/nonexistent/rl.pt]']}",
        "eval.log_images=4",
    ])
    out = tmp_path / "rows"
    md = run_eval(rows_cfg, out_dir=out, progress=False, workers=workers)
    teacher, acdmd, rtdmd = md["rows"]
    assert (teacher["name"], acdmd["name"], rtdmd["name"]) == ("teacher-2", "AC-DMD-4", "RTDMD-4")
    want = {"mode": "teacher", "num_steps": 2, "resolution_px": 16, "guidance_scale": 2.0}
    assert teacher["sampler"] == want
    assert acdmd["lora_paths"] == [str(lora)] and "not found" in rtdmd["skipped"] and "records" not in rtdmd
    assert not (out / "RTDMD-4").exists()
    ta, aa = _images(out, "teacher-2"), _images(out, "AC-DMD-4")
    assert sorted(ta) == sorted(aa) and len(ta) == 9
    for name in ta:
        assert ta[name][1][PNG_SEED_KEY] == aa[name][1][PNG_SEED_KEY]
        assert np.abs(ta[name][0].astype(int) - aa[name][0].astype(int)).mean() > 1.0  # other models
    # the report links every row's grid images and notes the skipped row
    html = (out / "report.html").read_text()
    assert len(md["grid"]) == 4 and "skipped: LoRA file(s) not found" in html
    for g in md["grid"]:
        for row in ("teacher-2", "AC-DMD-4"):
            assert f'src="{row}/images/{g["file"]}"' in html and (out / row / "images" / g["file"]).is_file()
    saved = json.loads((out / "metadata.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["teacher-2", "AC-DMD-4", "RTDMD-4"]
    assert saved["rows"][1]["scores"] == pytest.approx(acdmd["scores"])


def test_serve_scores_as_the_eval_workers_and_attaches_to_a_shared_app(cfg, workers, tmp_path):
    """`rtdmd-ray eval` scores on the reward deployments (``rewards.serving: serve``, the default) exactly as
    the eval workers' own scorers do (float32 round-off aside), and with ``rewards.serve_app`` it attaches to
    a running application and leaves it running."""
    from ray import serve

    from rtdmd_ray.roles.reward_serve import replica_counts, start_reward_app

    on_workers = run_eval(apply_overrides(cfg, ["rewards.serving=actors"]), out_dir=tmp_path / "w",
                          progress=False, workers=workers, report=False)
    on_serve = run_eval(apply_overrides(cfg, ["rewards.serving=serve"]), out_dir=tmp_path / "s",
                        progress=False, workers=workers, report=False)
    a, b = on_workers["rows"][0], on_serve["rows"][0]
    assert b["scored_now"] == 9 and [r["file"] for r in a["records"]] == [r["file"] for r in b["records"]]
    for ra, rb in zip(a["records"], b["records"], strict=True):
        assert set(ra["scores"]) == set(rb["scores"]), ra["file"]
        for k, v in ra["scores"].items():
            assert rb["scores"][k] == pytest.approx(v, rel=1e-6, abs=1e-7), (ra["file"], k)
    assert b["scores"] == pytest.approx(a["scores"], rel=1e-6)
    assert not any(app.startswith("rtdmd-rewards-") for app in serve.status().applications)  # its own: gone

    shared = apply_overrides(cfg, ["rewards.serve_app=shared-eval"])
    start_reward_app(shared.rewards, ["brightness", "shapes_geneval"], "shared-eval")
    try:
        attached = run_eval(shared, out_dir=tmp_path / "a", progress=False, workers=workers, report=False)
        assert attached["rows"][0]["scores"] == pytest.approx(b["scores"], rel=1e-6)
        assert replica_counts("shared-eval") == {"brightness": 1, "shapes_geneval": 1}  # still serving
        # an app without one of the eval's rewards is named, with the fix
        more = apply_overrides(shared, ["eval.reward_weights={brightness: 1.0, latency: 1.0}",
                                        "eval.dataset_map={brightness: plain.txt, latency: plain.txt}"])
        with pytest.raises(RuntimeError, match=r"no running deployment for reward\(s\) \['latency'\]"):
            run_eval(more, out_dir=tmp_path / "m", progress=False, workers=workers, report=False)
    finally:
        serve.delete("shared-eval")
