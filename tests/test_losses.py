"""Policy losses: a hand-computed 1x3 PPO-clip example, k3 KL, entropy, aggregation modes, masked-position
invariance, the combined policy_loss and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tspo_core.agent.losses import (aggregate, entropy_loss, get_policy_loss, kl_k3, kl_k3_loss, policy_loss,
                                    policy_loss_names, ppo_clip_loss)

LN15, LN05 = math.log(1.5), math.log(0.5)


def example():
    """1x3: ratios (1, 1.5, 0.5), advantages (2, 1, 1), clip 0.2."""
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    logp = (old + torch.tensor([[0.0, LN15, LN05]])).requires_grad_(True)
    adv = torch.tensor([[2.0, 1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.long)
    return logp, old, adv, mask


def test_ppo_clip_hand_computed():
    logp, old, adv, mask = example()
    loss, m = ppo_clip_loss(logp, old, adv, mask, clip_ratio=0.2)
    # token 0: ratio 1.0, A 2: max(-2 * 1, -2 * 1)       = -2
    # token 1: ratio 1.5, A 1: max(-1.5, -1 * clip 1.2)  = -1.2   (clipped term active)
    # token 2: ratio 0.5, A 1: max(-0.5, -1 * clip 0.8)  = -0.5   (outside the range, but unclipped is larger)
    # token-mean: (-2 - 1.2 - 0.5) / 3 = -3.7 / 3
    assert loss.item() == pytest.approx(-3.7 / 3, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(1 / 3)
    # approx KL (k1) = mean(old - logp) = -(0 + ln 1.5 + ln 0.5) / 3 = 0.287682 / 3
    assert m["approx_kl"] == pytest.approx(-(LN15 + LN05) / 3, abs=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["ratio_max"] == pytest.approx(1.5, abs=1e-6)
    loss.backward()
    # d/dlogp of -A * ratio / 3 = -A * ratio / 3: token 0 -2/3; token 1 clipped -> 0; token 2 -0.5/3
    torch.testing.assert_close(logp.grad, torch.tensor([[-2 / 3, 0.0, -0.5 / 3]]))


def test_ppo_clip_negative_advantage_clips_below():
    # ratio .5, A -1: max(0.5, 1 * clip .8 = .8) = .8 (clipped, the pessimistic bound)
    logp = torch.tensor([[LN05]])
    loss, m = ppo_clip_loss(logp, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(0.8) and m["clip_frac"] == 1.0


def test_on_policy_loss_is_minus_mean_advantage():
    # ratio 1 everywhere: loss = -mean(A) = -(1 - 2 + 4) / 3 = -1; nothing clipped, approx KL 0
    logp = torch.tensor([[-0.3, -1.2, -2.0]])
    loss, m = ppo_clip_loss(logp, logp.clone(), torch.tensor([[1.0, -2.0, 4.0]]), torch.ones(1, 3))
    assert loss.item() == pytest.approx(-1.0) and m["clip_frac"] == 0.0 and m["approx_kl"] == 0.0


def test_k3_kl_hand_computed():
    logp, old, _, mask = example()
    # d = ref - logp = (0, -ln 1.5, -ln 0.5); k3 = e^d - d - 1
    #   token 1: 2/3 + ln 1.5 - 1 = 0.072132; token 2: 2 + ln 0.5 - 1 = 0.306853
    kl, m = kl_k3_loss(logp, old, mask)
    expected = (0.0 + (2 / 3 + LN15 - 1) + (2 + LN05 - 1)) / 3  # 0.126328
    assert kl.item() == pytest.approx(expected, abs=1e-6) and m["kl"] == pytest.approx(expected, abs=1e-6)


def test_k3_kl_zero_when_equal():
    logp = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kl_k3(logp, logp), torch.zeros(3, 5))
    assert kl_k3_loss(logp, logp.clone(), torch.ones(3, 5))[0].item() == 0.0


def test_k3_kl_far_off_token_is_clamped_with_a_finite_gradient():
    # token 0: logp -31, ref -1 -> d = 30: e^30 - 30 - 1 = 1.07e13 unclamped; clamped to 10
    # token 1: logp -1.5, ref -1 -> d = .5: e^.5 - .5 - 1 = .148721 (inside the clamp, unchanged)
    logp = torch.tensor([[-31.0, -1.5]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    per_token = kl_k3(logp, ref)
    assert per_token[0, 0].item() == 10.0
    assert per_token[0, 1].item() == pytest.approx(math.exp(0.5) - 1.5, abs=1e-6)
    kl, m = kl_k3_loss(logp, ref, torch.ones(1, 2))
    assert m["kl"] == pytest.approx((10.0 + math.exp(0.5) - 1.5) / 2, abs=1e-6)  # 5.074361, not 5.3e12
    kl.backward()
    # the clamped token has a zero gradient (not NaN: d is clamped to +-20 before the exp); the other token's is
    # d/dlogp (e^d - d - 1) / 2 = (1 - e^d) / 2 = (1 - 1.648721) / 2 = -.324361
    assert logp.grad[0, 0].item() == 0.0
    assert logp.grad[0, 1].item() == pytest.approx((1 - math.exp(0.5)) / 2, abs=1e-6)
    # a much larger gap and the setting: still bounded, finite
    huge = kl_k3(torch.tensor([-1000.0]), torch.tensor([0.0]), clamp=3.0)
    assert huge.item() == 3.0
    total, _ = policy_loss(logp.detach(), logp.detach(), torch.zeros(1, 2), torch.ones(1, 2), ref_logp=ref,
                           kl_coef=1.0, kl_clamp=1.0)
    assert total.item() == pytest.approx((1.0 + math.exp(0.5) - 1.5) / 2, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(a=st.floats(-20, 0), b=st.floats(-20, 0))
def test_k3_kl_positive_when_different(a, b):
    # e^d - d - 1 ~ d^2 / 2 for small d: positive in exact arithmetic, representable once |d| >~ 1e-7 in float64
    assume(abs(a - b) > 1e-6)
    k = kl_k3(torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)).item()
    assert k > 0.0


def test_entropy_loss_is_minus_entropy():
    loss, m = entropy_loss(torch.tensor([[1.0, 2.0, 3.0]]), torch.ones(1, 3))
    assert loss.item() == pytest.approx(-2.0) and m["entropy"] == pytest.approx(2.0)


def test_policy_loss_combines_terms_with_given_coefficients():
    logp, old, adv, mask = example()
    ent = torch.tensor([[1.0, 2.0, 3.0]])
    total, m = policy_loss(logp, old, adv, mask, ref_logp=old, entropy=ent, clip_ratio=0.2, kl_coef=0.1,
                           entropy_coef=0.01)
    # -3.7/3 + 0.1 * 0.126328 + 0.01 * (-2) = -1.233333 + 0.0126328 - 0.02 = -1.2407005
    kl = (2 / 3 + LN15 - 1 + 2 + LN05 - 1) / 3
    expected = -3.7 / 3 + 0.1 * kl - 0.01 * 2.0
    assert total.item() == pytest.approx(expected, abs=1e-6)
    assert m["loss"] == pytest.approx(expected, abs=1e-6)
    assert set(m) >= {"pg_loss", "clip_frac", "approx_kl", "kl", "entropy", "loss"}


def test_policy_loss_zero_coefficients_report_but_do_not_add():
    logp, old, adv, mask = example()
    total, m = policy_loss(logp, old, adv, mask, ref_logp=old - 1.0, entropy=torch.ones(1, 3), kl_coef=0.0,
                           entropy_coef=0.0)
    assert total.item() == pytest.approx(-3.7 / 3, abs=1e-6)
    assert m["kl"] > 0 and m["entropy"] == 1.0


def test_policy_loss_requires_the_inputs_its_coefficients_need():
    logp, old, adv, mask = example()
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, kl_coef=0.001)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(logp, old, adv, mask, ref_logp=old, entropy_coef=0.01)
    total, m = policy_loss(logp, old, adv, mask, kl_coef=0.0)
    assert "kl" not in m and "entropy" not in m


# ---------------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------------
def test_aggregation_modes_differ_as_expected():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [5.0, 5.0, 5.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    # token-mean: (1 + 2 + 3 + 4) / 4 tokens = 2.5 (the long sequence weighs 3x the short one)
    assert aggregate(v, m, "token-mean").item() == pytest.approx(2.5)
    # seq-mean-token-mean: mean(2, 4) over the 2 sequences with tokens = 3 (each sequence weighs the same)
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx(3.0)
    # equal lengths -> the two modes agree
    full = torch.ones(2, 3)
    assert aggregate(v[:2], full, "token-mean").item() == pytest.approx(aggregate(v[:2], full,
                                                                                 "seq-mean-token-mean").item())


def test_aggregation_denominator_and_empty_mask():
    v = torch.tensor([[1.0, 2.0, 3.0]])
    assert aggregate(v, torch.ones(1, 3), "token-mean", denominator=6).item() == pytest.approx(1.0)  # 6 / 6
    for mode in ("token-mean", "seq-mean-token-mean"):
        assert aggregate(v, torch.zeros(1, 3), mode).item() == 0.0


def test_unknown_modes_and_names_list_known_ones():
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(torch.ones(1, 1), torch.ones(1, 1), "sum")
    with pytest.raises(KeyError, match="ppo_clip"):
        get_policy_loss("reinforce++")
    assert "ppo_clip" in policy_loss_names()


def test_shape_mismatch_fails():
    with pytest.raises(ValueError):
        ppo_clip_loss(torch.zeros(1, 3), torch.zeros(1, 2), torch.zeros(1, 3), torch.ones(1, 3))


# ---------------------------------------------------------------------------------------------------------------
# invariance: values at masked positions (even NaN / inf) change neither the loss nor the gradient
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_masked_positions_change_nothing(agg):
    gen = torch.Generator().manual_seed(1)
    B, T = 3, 6
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]])
    base = {k: -torch.rand(B, T, generator=gen) for k in ("logp", "old", "ref")}
    base["adv"] = torch.randn(B, T, generator=gen)
    base["ent"] = torch.rand(B, T, generator=gen)

    def run(values):
        logp = values["logp"].clone().requires_grad_(True)
        loss, metrics = policy_loss(logp, values["old"], values["adv"], mask, ref_logp=values["ref"],
                                    entropy=values["ent"], kl_coef=0.1, entropy_coef=0.01, agg=agg)
        loss.backward()
        return loss.detach(), metrics, logp.grad

    changed = {k: v.clone() for k, v in base.items()}
    off = ~mask.bool()
    changed["logp"][off] = -torch.inf
    changed["old"][off] = torch.nan
    changed["ref"][off] = 123.0
    changed["adv"][off] = 1e9
    changed["ent"][off] = torch.nan
    loss_a, metrics_a, grad_a = run(base)
    loss_b, metrics_b, grad_b = run(changed)
    assert torch.equal(loss_a, loss_b) and metrics_a == metrics_b
    assert torch.equal(grad_a, grad_b) and torch.all(grad_a[off] == 0) and torch.isfinite(grad_a).all()
