"""Stage 1 pieces without Ray: backward simulation, the AC-DMD iteration on one rank, state round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rtdmd_ray.config import load_config
from rtdmd_ray.data.prompts import PromptStream
from rtdmd_ray.stages.cold_start_step import ColdStartIteration, backward_simulation

REPO = Path(__file__).resolve().parents[2]
# the tiny SD3's last joint block is context_pre_only: its text-query output is discarded, so this adapter
# gets no gradient (genuinely unused, in the real SD3 too)
UNUSED_LORA = "transformer_blocks.1.attn.add_q_proj."


def _cfg(*extra: str):
    return load_config(
        REPO / "configs/debug/tiny_sd3.yaml",
        [
            "stage=cold_start",
            "resources.learner.count=1",
            "dmd.prompts_per_step=2",
            "dmd.fake_update_ratio=2",
            "train.ema.warmup=false",
            *extra,
        ],
    )


def _rank(cfg):
    from rtdmd_ray.stages.learner_state import LearnerState

    torch.set_num_threads(1)
    state = LearnerState(model=cfg.model, solver=cfg.solver, train=cfg.train, parallelism="ddp")
    prompts = PromptStream(
        [{"prompt": p} for p in cfg.data.prompts],
        prompts_per_step=cfg.dmd.prompts_per_step,
        seed=cfg.train.seed,
    )
    it = ColdStartIteration(
        state=state,
        sampling=cfg.sampling,
        dmd=cfg.dmd,
        ac_dmd=cfg.ac_dmd,
        train=cfg.train,
        prompts=prompts,
        resolution_px=cfg.model.resolution_px,
    )
    return state, it


def test_backward_simulation_gradient_only_through_last_step():
    # v = w * x: the sample after k steps depends on w through every step, but only the last is autograd
    w = torch.tensor(0.3, requires_grad=True)
    sigmas = [1.0, 0.9, 0.75, 0.5, 0.0]
    x0 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    last = backward_simulation(lambda x, s: w * x, x0, sigmas, 3, eta=0.0, grad_last=True, generator=None)
    assert last.k == 3 and last.sigma_t == 0.75 and last.sigma_next == 0.5
    last.x_next.sum().backward()
    # eta = 0: x_next = x_t + (0.5 - 0.75) * w * x_t, x_t treated as a constant
    assert torch.allclose(w.grad, (-0.25 * last.x_t).sum(), atol=1e-6)
    assert not last.x_t.requires_grad
    with torch.no_grad():
        none = backward_simulation(
            lambda x, s: w * x, x0, sigmas, 4, eta=0.9, grad_last=False, generator=None
        )
    assert none.sigma_next == 0.0 and not none.x_next.requires_grad
    assert torch.allclose(none.x_next, none.x0)  # the last step lands on x0_hat
    with pytest.raises(ValueError, match="stop k=5"):
        backward_simulation(lambda x, s: w * x, x0, sigmas, 5, eta=0.0, grad_last=False, generator=None)


def test_prompt_stream_is_a_pure_function_of_iteration_and_slices_partition():
    recs = [{"prompt": f"p{i}"} for i in range(5)]
    a = PromptStream(recs, prompts_per_step=4, seed=1)
    b = PromptStream(recs, prompts_per_step=4, seed=1)
    assert [a.global_batch(i) for i in range(6)] == [b.global_batch(i) for i in reversed(range(6))][::-1]
    # every epoch of 5 prompts shows each prompt once
    flat = [r["prompt"] for i in range(5) for r in a.global_batch(i)]
    for e in range(4):
        assert sorted(flat[5 * e : 5 * e + 5]) == [f"p{i}" for i in range(5)]
    assert a.rank_batch(3, 0, 2) + a.rank_batch(3, 1, 2) == a.global_batch(3)


def test_iteration_ttur_lora_moves_teacher_frozen_and_state_round_trip_is_bit_exact():
    cfg = _cfg()
    state, it = _rank(cfg)
    gen0 = state.full_lora("generator")
    frozen0 = {n: p.detach().clone() for n, p in state.transformer.named_parameters() if not p.requires_grad}
    metrics = [it.run(i) for i in range(2)]
    assert [m["learner/fake_updates"] for m in metrics] == [1, 2]
    assert [m["learner/generator_updates"] for m in metrics] == [0, 1]
    assert all(torch.isfinite(torch.tensor(list(m.values()))).all() for m in metrics)
    assert {"learner/fake/loss_ac", "learner/fake/loss_consistency"} <= metrics[0].keys()
    gen1 = state.full_lora("generator")
    # B starts at zero, so the first step moves B only (A's gradient is B^T dL/dh = 0)
    moved = [k for k in gen0 if ".lora_B." in k and UNUSED_LORA not in k]
    assert len(moved) >= 7 and all(not torch.equal(gen0[k], gen1[k]) for k in moved)
    ema = state.full_lora("generator", ema=True)
    # one EMA pull (decay 0.9) per generator step: ema = 0.9 * init + 0.1 * live
    for k in gen0:
        assert torch.allclose(ema[k], 0.9 * gen0[k] + 0.1 * gen1[k], atol=1e-7)
    for n, p in state.transformer.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen0[n]), n

    # save (state of the rank), continue 2 iterations; a fresh rank restored from the save must match
    tensors, aux = state.local_tensors(), state.aux_state()
    cont = [it.run(i) for i in (2, 3)]
    state2, it2 = _rank(cfg)
    state2.load_state(tensors, aux)
    again = [it2.run(i) for i in (2, 3)]
    for a, b in zip(cont, again, strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("timing/")} == {
            k: v for k, v in b.items() if not k.startswith("timing/")
        }
    for role in ("generator", "fake_score"):
        x, y = state.full_lora(role), state2.full_lora(role)
        assert all(torch.equal(x[k], y[k]) for k in x), role
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            state.full_lora("generator", ema=True).values(),
            state2.full_lora("generator", ema=True).values(),
            strict=True,
        )
    )
    with pytest.raises(RuntimeError, match="is at iteration 4"):
        it.run(7)


def test_fsdp2_matches_ddp_on_one_rank(tmp_path):
    """fully_shard (DTensor parameters, FSDP's own gradient reduction over several forwards per backward)
    gives the same iteration as the replicated path."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        # one iteration runs both updates (fsdp2 forwards are slow on CPU)
        cfg = _cfg("dmd.fake_update_ratio=1")
        runs = {}
        for parallelism in ("ddp", "fsdp2"):
            from rtdmd_ray.stages.learner_state import LearnerState

            state = LearnerState(model=cfg.model, solver=cfg.solver, train=cfg.train, parallelism=parallelism)
            prompts = PromptStream([{"prompt": p} for p in cfg.data.prompts], prompts_per_step=2, seed=0)
            it = ColdStartIteration(state=state, sampling=cfg.sampling, dmd=cfg.dmd, ac_dmd=cfg.ac_dmd,
                                    train=cfg.train, prompts=prompts, resolution_px=cfg.model.resolution_px)
            m = it.run(0)
            losses = [m["learner/fake/loss"], m["learner/generator/loss_dmd"]]
            runs[parallelism] = (losses, state.full_lora("generator"), state.full_lora("generator", ema=True),
                                 state.local_tensors())
        (la, ga, ea, ta), (lb, gb, eb, tb) = runs["ddp"], runs["fsdp2"]
        assert la == lb
        assert all(torch.equal(ga[k], gb[k]) and torch.equal(ea[k], eb[k]) for k in ga)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    finally:
        dist.destroy_process_group()


def _generator_step(mode: str, stop: int | None, *extra: str):
    state, it = _rank(_cfg("dmd.fake_update_ratio=1", f"dmd.normalization={mode}", *extra))
    if stop is not None:
        it._draw_stop = lambda: stop
    metrics = it.run(0)
    return metrics, state.full_lora("generator")


def test_clean_normalisation_is_the_reference_at_the_last_step_and_larger_above_it():
    """k = n ends at sigma_s = 0, where both normalisers are the same number (up to rounding: x - sigma v
    versus x + (0 - sigma) v): the same update. k = 1 ends at sigma_s = 0.9, where the reference divides by
    the CPS noise as well: the clean DMD gradient is larger."""
    ref, lora_ref = _generator_step("reference", 4)
    clean, lora_clean = _generator_step("clean", 4)
    assert ref["learner/generator/stop_k"] == 4.0
    assert ref["learner/generator/dmd_grad_norm"] == pytest.approx(
        clean["learner/generator/dmd_grad_norm"], rel=1e-5
    )
    assert all(torch.allclose(lora_ref[k], lora_clean[k], rtol=1e-4, atol=1e-7) for k in lora_ref)
    ref1, _ = _generator_step("reference", 1)
    clean1, _ = _generator_step("clean", 1)
    assert clean1["learner/generator/dmd_grad_norm"] > 2 * ref1["learner/generator/dmd_grad_norm"]


def test_stop_loss_weight_scales_only_its_stops_gradient():
    """The weight of the drawn stop multiplies the generator gradient (pre-clip norm x3 exactly); the
    other stops' weights do not enter; the logged DMD loss stays the unweighted one."""
    base, _ = _generator_step("clean", 2)
    weighted, _ = _generator_step("clean", 2, "dmd.stop_loss_weights=[7.0,3.0,5.0,11.0]")
    assert weighted["learner/generator/stop_loss_weight"] == 3.0
    gn, gn_base = weighted["learner/generator/grad_norm"], base["learner/generator/grad_norm"]
    assert gn == pytest.approx(3 * gn_base, rel=1e-5)
    loss, loss_base = weighted["learner/generator/loss_dmd"], base["learner/generator/loss_dmd"]
    assert loss == pytest.approx(loss_base, rel=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dmd.stop_loss_weights=[1.0,2.0]", "one weight per stop k = 1..4"),
        ("dmd.stop_loss_weights=[1.0,0.0,1.0,1.0]", r"stop_loss_weights\[1\]=0.0 \(stop k=2\) must be > 0"),
    ],
)
def test_stop_loss_weights_are_checked_before_any_actor(override, message):
    from rtdmd_ray.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs/cold_start/shapes.yaml", [override])


def test_stop_loss_weights_are_rejected_in_the_rl_stage():
    from rtdmd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="dmd.stop_loss_weights is set but stage is rtdmd"):
        load_config(REPO / "configs/rtdmd/shapes.yaml", ["dmd.stop_loss_weights=[1.0,1.0,1.0,1.0]"])


def _fake_step(target: str, stop: int):
    state, it = _rank(_cfg("dmd.fake_update_ratio=2", f"ac_dmd.fake_target={target}"))
    it._draw_stop = lambda: stop
    return it.run(0)


def test_x0_fake_target_is_the_path_target_at_the_last_step_and_lower_variance_above_it():
    path, x0 = _fake_step("path", 4), _fake_step("x0", 4)
    assert path["learner/fake/loss_ac"] == pytest.approx(x0["learner/fake/loss_ac"], rel=1e-5)
    path1, x01 = _fake_step("path", 1), _fake_step("x0", 1)
    assert x01["learner/fake/loss_ac"] < 0.2 * path1["learner/fake/loss_ac"]


def test_x0_fake_target_is_rejected_in_the_rl_stage():
    from rtdmd_ray.config import ConfigError

    with pytest.raises(ConfigError, match="ac_dmd.fake_target"):
        load_config(REPO / "configs/rtdmd/shapes.yaml", ["ac_dmd.fake_target=x0"])
