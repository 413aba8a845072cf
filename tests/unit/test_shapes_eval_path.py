"""One ShapeWorld evaluation: the in-run validation of a learner rank, ``rtdmd-ray shapes eval --split
validation`` and ``rtdmd-ray eval``'s ShapeWorld prompt set draw the same captions, generate through the same
sampler and score the same 8-bit images, so their figures for one adapter agree to the last digit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rtdmd_ray.config import load_config
from rtdmd_ray.models.shapes import SHIPPED_TEACHER
from rtdmd_ray.shapes import ASSETS_DIR
from rtdmd_ray.shapes.prompts import eval_captions

REPO = Path(__file__).resolve().parents[2]
ACDMD = ASSETS_DIR / "acdmd" / "generator_ema.safetensors"
RTDMD = ASSETS_DIR / "rtdmd" / "generator_ema.safetensors"

needs_assets = pytest.mark.skipif(
    not ((SHIPPED_TEACHER / "transformer").is_dir() and ACDMD.is_file() and RTDMD.is_file()),
    reason="needs the shipped ShapeWorld teacher and adapters",
)


def test_one_caption_draw_per_split_and_seed():
    from rtdmd_ray.data.prompt_sets import eval_prompt_sets

    val, test = eval_captions("validation", 60, 3), eval_captions("test", 60, 3)
    assert val == eval_captions("validation", 60, 3) and len(val) == len(test) == 60
    assert not {m["prompt"] for m in val} & {m["prompt"] for m in test}
    assert eval_captions("validation", 60, 4) != val
    cfg = load_config(REPO / "configs/rtdmd/shapes.yaml", ["eval.num_prompts=60", "eval.seed=3"])
    (shapes_set,) = eval_prompt_sets(cfg)  # what `rtdmd-ray eval` generates on ShapeWorld
    assert list(shapes_set.records) == test
    with pytest.raises(ValueError, match="split='dev'"):
        eval_captions("dev", 6, 0)


@needs_assets
def test_in_run_validation_equals_shapes_eval_for_the_same_adapter(tmp_path):
    """The RL learner's EvalHook on the shipped RTDMD stack (AC-DMD frozen under the RL adapter, unmerged)
    and `shapes eval --split validation` with both files merged into the teacher: the same strict figure."""
    from rtdmd_ray.eval.shapes import run_eval
    from rtdmd_ray.models.lora import load_lora_file, load_lora_state
    from rtdmd_ray.stages.rl_state import RLLearnerState
    from rtdmd_ray.stages.validation import EvalHook

    n, seed = 36, 7
    cfg = load_config(
        REPO / "configs/rtdmd/shapes.yaml",
        [f"eval.num_prompts={n}", f"eval.seed={seed}", "eval.batch_images=12", "eval.use_ema=false",
         f"train.output_dir={tmp_path / 'run'}", "resources.learner.count=1"],
    )
    torch.set_num_threads(2)
    state = RLLearnerState(model=cfg.model, solver=cfg.solver, train=cfg.train, parallelism="ddp")
    load_lora_state(state.backbone.transformer, "generator", load_lora_file(RTDMD).tensors)
    hook = EvalHook(state=state, eval_cfg=cfg.eval, sampling=cfg.sampling, data=cfg.data, rewards=cfg.rewards,
                    resolution_px=cfg.model.resolution_px)
    in_run = hook.run()["eval/shapes_geneval/strict_accuracy"]

    table = run_eval(teacher_dir=None, clip_dir=str(tmp_path / "no_clip"), out_dir=str(tmp_path / "eval"),
                     n_captions=n, seed=seed, split="validation", teacher_rows=False, n_diversity_prompts=2,
                     lora_rows={"RTDMD": [str(ACDMD), str(RTDMD)]}, threads=2)
    offline = table["rows"]["RTDMD, 4 NFE CPS η=0.9"]["strict"]
    assert offline == in_run, f"in-run validation {in_run!r} != shapes eval {offline!r}"
    # and the figure is a real one: the shipped stack gets some captions right and some wrong
    assert 0.0 < offline < 1.0
