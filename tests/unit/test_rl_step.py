"""The per-rank RL update without Ray, on the tiny SD3 backbone (spec algorithms.md §3.1, §3.5-§3.7).

One learner state (the generator stacks a saved "cold-start" LoRA under a fresh one), one sampler and one
reward worker are built once; the tests sample real rollouts, score them and run epochs through ``RLUpdate``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from rtdmd_ray.config import load_config
from rtdmd_ray.models import build_backbone
from rtdmd_ray.models.lora import (
    add_lora,
    load_lora_state,
    lora_state,
    merge_adapter,
    save_lora,
    use_adapters,
)
from rtdmd_ray.roles.reward_pool import RewardWorker
from rtdmd_ray.roles.sampler import RolloutWorker, epoch_prompt_jobs, epoch_train_steps
from rtdmd_ray.stages.rl_state import RLLearnerState
from rtdmd_ray.stages.rl_step import RLUpdate, bp_scorer_fn, learner_sigmas
from rtdmd_ray.types import RolloutBatch, ScoredBatch

SEED = 42
TINY_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "debug" / "tiny_sd3.yaml"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("rl")
    # a "cold-start" generator LoRA with non-zero B (so stacking it matters), saved like Stage 1 saves it
    ref = build_backbone("tiny_sd3", dtype="fp32", seed=SEED)
    add_lora(ref.transformer, "cold", family="sd3", rank=4, alpha=8.0, seed=3)
    g = torch.Generator().manual_seed(5)
    cold = {
        k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lora_state(ref.transformer, "cold").items()
    }
    path = tmp / "generator_ema.safetensors"
    save_lora(path, cold, rank=4, alpha=8.0, family="sd3")  # alpha 8, unlike the RL LoRA's alpha 4
    cfg = load_config(
        TINY_CONFIG,
        [
            "resources.learner.count=1",
            f"train.output_dir={tmp}",
            f"model.generator_lora.load_path={path}",
            "model.generator_lora.merge_before_training=true",
            "model.generator_lora.reinit_a_std=1.0",
        ],
    )
    state = RLLearnerState(model=cfg.model, solver=cfg.solver, train=cfg.train, parallelism="ddp")
    rl = RLUpdate(
        state=state,
        grpo=cfg.grpo,
        last_step_loss=cfg.last_step_loss,
        sampling=cfg.sampling,
        dmd=cfg.dmd,
        ac_dmd=cfg.ac_dmd,
        train=cfg.train,
        rewards=cfg.rewards,
        micro_batches_per_epoch=cfg.micro_batches_per_rank_per_epoch,
        micro_batches_per_step=cfg.micro_batches_per_optimizer_step,
        sigmas=learner_sigmas(state, cfg.model, cfg.sampling),
        bp_scorer=bp_scorer_fn(cfg.last_step_loss, cfg.rewards, "cpu"),
    )
    sampler = RolloutWorker(
        model=cfg.model, sampling=cfg.sampling, grpo=cfg.grpo, train=cfg.train, sampler_id=0
    )
    scorer = RewardWorker(rewards=cfg.rewards, worker_id=0)
    # the reference's start (spec §3.1): the cold-start LoRA folded into the base, a fresh RL LoRA on top
    load_lora_state(ref.transformer, "cold", cold)
    merge_adapter(ref.transformer, "cold")
    lora = cfg.model.generator_lora
    add_lora(ref.transformer, "rl", family="sd3", rank=lora.rank, alpha=lora.alpha, seed=4)
    return {
        "cfg": cfg,
        "state": state,
        "rl": rl,
        "sampler": sampler,
        "scorer": scorer,
        "ref": ref,
        "cold": cold,
    }


def sync(env) -> None:
    """What weight sync does: the learner's generator LoRA into the sampler's adapter, with the version."""
    load_lora_state(env["sampler"].backbone.transformer, "generator", env["state"].full_lora("generator"))
    env["sampler"].version = env["state"].iteration


def rollout(env, epoch: int) -> tuple[RolloutBatch, ScoredBatch]:
    from rtdmd_ray.data.prompts import training_prompt_records

    cfg = env["cfg"]
    steps = epoch_train_steps(cfg.grpo, cfg.train.seed, epoch)
    jobs = epoch_prompt_jobs(
        training_prompt_records(cfg.data),
        grpo=cfg.grpo,
        seed=cfg.train.seed,
        epoch=epoch,
        num_samplers=1,
        policy_version=env["sampler"].version,
    )
    outs = [env["sampler"].sample(j.prompts, steps) for j in jobs]
    return RolloutBatch.cat([o[0] for o in outs]), ScoredBatch.cat([env["scorer"].score(o[1]) for o in outs])


def frozen_checksum(state) -> float:
    with torch.no_grad():
        return float(
            sum(p.double().abs().sum() for p in state.transformer.parameters() if not p.requires_grad)
        )


def test_adapter_stack_equals_the_merged_cold_start_model(env):
    s, ref = env["state"], env["ref"]
    assert s.stacks["generator"] == ("generator_init", "generator") and s.stacks["fake_score"] == (
        "fake_score",
    )
    trainable = {n for n, p in s.transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".generator." in n or ".fake_score." in n for n in trainable)
    assert (
        torch.count_nonzero(
            torch.cat([v.flatten() for k, v in s.full_lora("generator").items() if "lora_B" in k])
        )
        == 0
    )  # fresh adapter: B = 0
    x = torch.randn(2, *s.backbone.latent_shape(32), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.5])
    cond = s.backbone.encode_prompts(["a red circle", "a cat"])
    with torch.no_grad():
        v_stack = s.velocity("generator", x, sigma, cond)
        with use_adapters(ref.transformer, None):
            v_merged = ref.velocity(x, sigma, ref.encode_prompts(["a red circle", "a cat"]))
        v_teacher = s.velocity(None, x, sigma, cond)
        with use_adapters(ref.transformer, None):
            assert not torch.allclose(
                v_teacher, v_merged, atol=1e-4
            )  # the init adapter does change the model
    torch.testing.assert_close(v_stack, v_merged, atol=2e-5, rtol=1e-4)


def test_sampler_refuses_another_policy_version(env):
    sync(env)
    cfg = env["cfg"]
    job = epoch_prompt_jobs(
        [{"prompt": "a cat"}, {"prompt": "a dog"}],
        grpo=cfg.grpo,
        seed=0,
        epoch=0,
        num_samplers=1,
        policy_version=env["sampler"].version + 1,
    )[0]
    with pytest.raises(RuntimeError, match="policy version"):
        env["sampler"].sample(job.prompts, (0, 1))


def test_on_policy_epochs(env):
    s, rl = env["state"], env["rl"]
    frozen = frozen_checksum(s)
    before = s.full_lora("generator")
    fake_before = s.full_lora("fake_score")
    for epoch in range(2):
        sync(env)
        batch, scores = rollout(env, epoch)
        assert batch.policy_version == epoch and len(batch) == env["cfg"].grpo.samples_per_epoch
        m = rl.run_epoch(batch, scores, epoch, max_policy_lag=0)
        # on-policy: the learner recomputes the sampler's log-probs (ratio 1 within 1e-6)
        assert m["learner/ppo/ratio_max_dev"] < 1e-6
        assert math.isclose(m["learner/ppo/ratio_mean"], 1.0, abs_tol=1e-6)
        assert m["learner/generator/optimizer_steps"] == 1.0 and m["learner/generator/ema_updates"] == 1.0
        # the instruments: each term's own gradient, the update size, groups without signal
        assert all(m[f"learner/grad_norm/{k}"] > 0 for k in ("subgrpo", "aux_dmd", "bp"))
        assert m["learner/generator/update_rel"] > 0 and m["learner/generator/update_norm"] > 0
        assert 0.0 <= m["learner/advantage/zero_variance_groups"] <= 1.0
        assert ("learner/grad_cos_prev/subgrpo" in m) == (epoch > 0)
        prompts, adv = rl.last_advantages
        for p in set(prompts):  # zero mean per prompt group
            group = adv[[i for i, q in enumerate(prompts) if q == p]]
            assert abs(float(group.mean())) < 1e-5
    assert s.iteration == 2 and s.optimizers["generator"].steps == 2 and s.optimizers["fake_score"].steps == 2
    after = s.full_lora("generator")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(fake_before[k], v) for k, v in s.full_lora("fake_score").items())
    assert frozen_checksum(s) == frozen  # base, teacher, VAE, text encoders and the cold-start adapter
    # the stack after training is still "merged cold-start model + trained RL LoRA"
    ref = copy.deepcopy(env["ref"])
    load_lora_state(ref.transformer, "rl", after)
    x = torch.randn(2, *s.backbone.latent_shape(32), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([1.0, 0.75])
    with torch.no_grad():
        v = s.velocity("generator", x, sigma, s.backbone.encode_prompts(["a", "b"]))
        with use_adapters(ref.transformer, "rl"):
            v_ref = ref.velocity(x, sigma, ref.encode_prompts(["a", "b"]))
    torch.testing.assert_close(v, v_ref, atol=2e-5, rtol=1e-4)


def test_stale_rollouts_and_wrong_epoch_are_rejected(env):
    rl, s = env["rl"], env["state"]
    sync(env)
    batch, scores = rollout(env, s.iteration)
    stale = batch.index(slice(None))
    stale.policy_version = s.iteration - 1
    with pytest.raises(RuntimeError, match="max_policy_lag=0"):
        rl.run_epoch(stale, scores, s.iteration, max_policy_lag=0)
    with pytest.raises(RuntimeError, match="asked to train"):
        rl.run_epoch(batch, scores, s.iteration + 3, max_policy_lag=0)


def test_nan_reward_is_quarantined(env):
    rl, s = env["rl"], env["state"]
    sync(env)
    batch, _ = rollout(env, s.iteration)
    scorer = env["scorer"].scorer.scorers["brightness"]
    original = scorer.__call__

    def with_nan(images, prompts, metadata=None):
        out = original(images, prompts, metadata)
        out["brightness"][0] = float("nan")
        return out

    env["scorer"].scorer.scorers["brightness"] = type(
        "NaNScorer", (), {"__call__": staticmethod(with_nan), "differentiable": False}
    )()
    try:
        from rtdmd_ray.roles.sampler import ScoreRequest

        scores = env["scorer"].score(ScoreRequest(batch.images, batch.prompts, batch.metadata))
    finally:
        env["scorer"].scorer.scorers["brightness"] = scorer
    assert scores.num_quarantined == 1 and not bool(scores.valid[0]) and math.isnan(float(scores.total[0]))
    adv = rl.advantages(batch, scores)
    assert float(adv[0]) == 0.0 and bool(torch.isfinite(adv).all())
    group = [i for i, p in enumerate(batch.prompts) if p == batch.prompts[0] and i != 0]
    others = [i for i, p in enumerate(batch.prompts) if p != batch.prompts[0]]
    assert abs(float(adv[group].mean())) < 1e-5 and abs(float(adv[others].sum())) < 1e-4


def test_one_epoch_stale_rollouts_give_a_real_ratio(env):
    """What ``grpo.max_policy_lag: 1`` does: rollouts of version v trained by a learner already at v + 1."""
    rl, s = env["rl"], env["state"]
    sync(env)
    batch, scores = rollout(env, s.iteration)
    rl.run_epoch(batch, scores, s.iteration, max_policy_lag=0)  # the learner moves on to v + 1
    stale, stale_scores = rollout(env, s.iteration)  # the sampler still holds v
    assert stale.policy_version == s.iteration - 1
    m = rl.run_epoch(stale, stale_scores, s.iteration, max_policy_lag=1)
    assert m["rollout/policy_lag"] == 1.0
    assert m["learner/ppo/ratio_max_dev"] > 1e-6  # the ratio is real now
    assert m["learner/ppo/clip_frac"] > 0.0  # and the 1e-5 clip range binds


def test_subgrpo_only_runs_without_the_fake_score(env):
    """``loss_type: none`` with BP off is SubGRPO alone: the aux step contributes no loss (it used to crash
    in backward) and the fake score, which only the AC-DMD term uses, is not updated."""
    import dataclasses

    cfg, s = env["cfg"], env["state"]
    lsl = dataclasses.replace(cfg.last_step_loss, loss_type="none", train_steps=(-1,),
                              bp=dataclasses.replace(cfg.last_step_loss.bp, enabled=False))
    rl = RLUpdate(
        state=s, grpo=cfg.grpo, last_step_loss=lsl, sampling=cfg.sampling, dmd=cfg.dmd, ac_dmd=cfg.ac_dmd,
        train=cfg.train, rewards=cfg.rewards, micro_batches_per_epoch=cfg.micro_batches_per_rank_per_epoch,
        micro_batches_per_step=cfg.micro_batches_per_optimizer_step,
        sigmas=learner_sigmas(s, cfg.model, cfg.sampling), bp_scorer=None,
    )
    sync(env)
    batch, scores = rollout(env, s.iteration)
    fake_before, gen_before = s.full_lora("fake_score"), s.full_lora("generator")
    m = rl.run_epoch(batch, scores, s.iteration, max_policy_lag=0)
    assert m["learner/grad_norm/subgrpo"] > 0 and "learner/grad_norm/aux_dmd" not in m
    assert "learner/fake/loss_ac" not in m
    assert all(torch.equal(fake_before[k], v) for k, v in s.full_lora("fake_score").items())
    assert any(not torch.equal(gen_before[k], v) for k, v in s.full_lora("generator").items())


def test_aux_sample_fraction_puts_the_aux_terms_on_every_kth_micro_batch(env, monkeypatch):
    import dataclasses

    from rtdmd_ray.config import ConfigError

    cfg, s = env["cfg"], env["state"]
    lsl = dataclasses.replace(cfg.last_step_loss, aux_sample_fraction=0.5)
    nb = cfg.micro_batches_per_rank_per_epoch
    rl = RLUpdate(
        state=s, grpo=cfg.grpo, last_step_loss=lsl, sampling=cfg.sampling, dmd=cfg.dmd, ac_dmd=cfg.ac_dmd,
        train=cfg.train, rewards=cfg.rewards, micro_batches_per_epoch=nb,
        micro_batches_per_step=cfg.micro_batches_per_optimizer_step,
        sigmas=learner_sigmas(s, cfg.model, cfg.sampling), bp_scorer=bp_scorer_fn(lsl, cfg.rewards, "cpu"),
    )
    assert nb == 4 and (rl.aux_stride, rl.aux_micro_batches, rl.aux_scale) == (2, 2, 2.0)
    from rtdmd_ray.algorithms import acdmd

    calls, fake_sizes = [], []
    aux_loss, fake_loss = rl._aux_loss, acdmd.fake_score_loss

    def counting_aux(x, *a, **k):
        calls.append(x.shape[0])
        return aux_loss(x, *a, **k)

    def sized_fake_loss(v, *a, **k):
        fake_sizes.append(v.shape[0])
        return fake_loss(v, *a, **k)

    monkeypatch.setattr(rl, "_aux_loss", counting_aux)
    monkeypatch.setattr(acdmd, "fake_score_loss", sized_fake_loss)
    sync(env)
    batch, scores = rollout(env, s.iteration)
    m = rl.run_epoch(batch, scores, s.iteration, max_policy_lag=0)
    assert len(calls) == 2 and sum(calls) == len(batch) // 2  # half of the micro-batches carry the aux terms
    assert sum(fake_sizes) == len(batch) // 2  # and the fake score trains on half of the samples
    assert m["learner/grad_norm/aux_dmd"] > 0 and m["learner/grad_norm/bp"] > 0
    sub = dataclasses.replace(lsl, aux_sample_fraction=0.0)
    with pytest.raises(ConfigError, match="aux_sample_fraction"):
        dataclasses.replace(cfg, last_step_loss=sub).validate()
