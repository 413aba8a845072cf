"""Spec algorithms.md §6 invariants 24 (RL EMA) and 26 (BP hinge), plus the fp32-shadow EMA mechanics."""

from __future__ import annotations

import pytest
import torch

from rtdmd_ray.algorithms import bp, ema

torch.set_num_threads(1)


def test_inv24_rl_ema_decay_and_interval():
    got = [ema.rl_ema_decay(s, 0.9) for s in (0, 7, 15, 79, 80, 1000)]
    assert got == pytest.approx([0.1, 0.470588, 0.64, 0.898876, 0.9, 0.9], abs=1e-6)
    assert [s for s in range(40) if ema.should_update(s, 8)] == [7, 15, 23, 31, 39]
    with pytest.raises(ValueError, match="interval"):
        ema.should_update(3, 0)


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))


def test_ema_update_formula_and_fp32_shadows():
    m = _module()
    trainable = [(n, p) for n, p in m.named_parameters() if n.startswith("0.")]
    e = ema.EMA(trainable)
    start = {n: p.detach().clone() for n, p in trainable}
    with torch.no_grad():
        for _, p in trainable:
            p.add_(1.0)
    e.update(m.named_parameters(), decay=0.9)
    for n, p in trainable:
        expected = 0.9 * start[n] + 0.1 * p.detach()
        assert e.shadow[n].dtype == torch.float32 and torch.allclose(e.shadow[n], expected)
    assert e.names == ["0.weight", "0.bias"] and e.num_updates == 1


def test_ema_fp32_shadow_does_not_stall_on_bf16_parameters():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    e = ema.EMA([("w", p)])
    with torch.no_grad():
        p.add_(2**-7)  # the next bf16 value above 1.0
    for _ in range(10):
        e.update([("w", p)], decay=0.99)
    # a bf16 shadow would round 1 + 0.01 * 2**-7 back to 1.0 every time (the reference's quirk)
    assert torch.allclose(e.shadow["w"], torch.full((4,), 1 + (1 - 0.99**10) * 2**-7))
    assert (e.shadow["w"] > 1.0).all()


def test_ema_accepts_a_plain_parameter_list_matched_by_position():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.ones(3))]
    e = ema.EMA(params)
    with torch.no_grad():
        params[0].fill_(1.0)
    e.update(params, decay=0.75)
    assert e.names == ["0", "1"]
    assert torch.allclose(e.shadow["0"], torch.full((2,), 0.25)) and torch.equal(e.shadow["1"], torch.ones(3))


def test_ema_swap_in_out_and_context_manager_restore_live_weights():
    m = _module()
    e = ema.EMA(m.named_parameters())
    live = {n: p.detach().clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0)
    trained = {n: p.detach().clone() for n, p in m.named_parameters()}
    with e.applied_to(m):
        for n, p in m.named_parameters():
            assert torch.equal(p, live[n])  # the shadows (== the initial weights)
    for n, p in m.named_parameters():
        assert torch.equal(p, trained[n])
    e.swap_in(m.named_parameters())
    with pytest.raises(RuntimeError, match="already swapped"):
        e.swap_in(m.named_parameters())
    e.swap_out(m.named_parameters())
    with pytest.raises(RuntimeError, match="not swapped"):
        e.swap_out(m.named_parameters())


def test_ema_state_dict_round_trip_and_strict_load():
    m = _module()
    e = ema.EMA(m.named_parameters())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5)
    e.update(m.named_parameters(), 0.5)
    state = e.state_dict()
    fresh = ema.EMA(_module().named_parameters())
    fresh.load_state_dict(state)
    assert fresh.num_updates == 1
    for n in e.names:
        assert torch.equal(fresh.shadow[n], e.shadow[n])
    other = ema.EMA(torch.nn.Linear(3, 2).named_parameters())
    with pytest.raises(KeyError, match="names differ"):
        other.load_state_dict(state)
    with pytest.raises(KeyError, match="missing"):
        e.update(torch.nn.Linear(3, 2).named_parameters(), 0.9)


def test_inv26_bp_hinge_gradient():
    reward = torch.tensor([0.3, 1.2, 2.9, 1.0], requires_grad=True)
    loss = bp.hinge_reward_loss(reward, margin=3.0, scale=1e-4)
    assert loss.item() == pytest.approx(1e-4 * (2.7 + 1.8 + 0.1 + 2.0) / 4)
    loss.backward()
    assert torch.allclose(reward.grad, torch.full((4,), -1e-4 / 4))
    # samples above the margin get no gradient
    above = torch.tensor([3.5, 2.0], requires_grad=True)
    bp.hinge_reward_loss(above, margin=3.0, scale=2.0).backward()
    assert above.grad.tolist() == [0.0, -1.0]
    with pytest.raises(ValueError, match=r"\[B\]"):
        bp.hinge_reward_loss(torch.zeros(2, 2), 3.0, 1.0)
