import math

import pytest
import torch
import torch.nn.functional as F

from vrc_dist.probe.divergence import divergence, top1_of_head

# A's top-2 ids are 0 and 1 with P = (3/4, 1/4); B on those ids gives Q = (1/2, 1/2), and its large
# logit on id 2 must not matter (outside A's top-k). M = (5/8, 3/8).
A = torch.tensor([[math.log(3.0), 0.0, -10.0]], dtype=torch.float64)
B = torch.tensor([[0.0, 0.0, 5.0]], dtype=torch.float64)


def test_reference_convention_by_hand():
    # M ln(M/P) = 5/8 ln(5/6) + 3/8 ln(3/2) = 0.0380984; M ln(M/Q) = 5/8 ln(5/4) + 3/8 ln(3/4) = 0.0315839
    # 0.5 * (0.0380984 / 2 + 0.0315839 / 2): the means are over the k = 2 entries
    m_over_p = 5 / 8 * math.log(5 / 6) + 3 / 8 * math.log(3 / 2)
    m_over_q = 5 / 8 * math.log(5 / 4) + 3 / 8 * math.log(3 / 4)
    expected = 0.5 * (m_over_p / 2 + m_over_q / 2)
    assert expected == pytest.approx(0.0174206, abs=1e-7)
    assert divergence(A, B, k=2, convention="reference").item() == pytest.approx(expected, rel=1e-12)


def test_jsd_convention_by_hand():
    # KL(P||M) = 3/4 ln(6/5) + 1/4 ln(2/3) = 0.0353749; KL(Q||M) = 1/2 ln(4/5) + 1/2 ln(4/3) = 0.0322693
    kl_p = 3 / 4 * math.log(6 / 5) + 1 / 4 * math.log(2 / 3)
    kl_q = 1 / 2 * math.log(4 / 5) + 1 / 2 * math.log(4 / 3)
    expected = 0.5 * (kl_p + kl_q)
    assert expected == pytest.approx(0.0338221, abs=1e-7)
    assert divergence(A, B, k=2, convention="jsd").item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.filterwarnings("ignore:reduction")  # the 'mean' reduction is the point here
def test_reference_convention_is_what_f_kl_div_computes():
    torch.manual_seed(0)
    a, b = torch.randn(7, 100, dtype=torch.float64), torch.randn(7, 100, dtype=torch.float64)
    ids = a.topk(10, dim=-1).indices
    log_p, log_q = a.gather(-1, ids).log_softmax(-1), b.gather(-1, ids).log_softmax(-1)
    m = (log_p.exp() + log_q.exp()) / 2
    # reduction="mean" over one row = the mean over its k entries; the reference code does it row by row
    expected = torch.stack(
        [0.5 * (F.kl_div(log_p[i], m[i], reduction="mean") + F.kl_div(log_q[i], m[i], reduction="mean")) for i in range(7)]
    )
    torch.testing.assert_close(divergence(a, b, k=10), expected, rtol=1e-12, atol=0)


def test_batched_rows_zero_for_identical_and_shape():
    torch.manual_seed(1)
    a = torch.randn(5, 50)
    out = divergence(a, a.clone(), k=10, convention="jsd")
    assert out.shape == (5,) and out.abs().max() < 1e-15
    assert divergence(a[0], a[1], k=10).shape == ()


def test_rejects_unknown_convention_and_mismatched_shapes():
    with pytest.raises(ValueError, match="convention"):
        divergence(A, B, convention="kl")
    with pytest.raises(ValueError, match="shapes"):
        divergence(A, B[:, :2])


def test_top1_of_head_softmaxes_only_the_head():
    logits = torch.full((1, 1000), -1e9, dtype=torch.float64)
    logits[0, :50] = 0.0
    logits[0, 7] = math.log(51.0)  # softmax over 50 entries: 51 / (51 + 49) = 0.51
    logits[0, 60] = -5.0  # outside the top 50 only because the rest are higher; ignored
    prob, token = top1_of_head(logits, k_head=50)
    assert prob.item() == pytest.approx(0.51, rel=1e-12) and token.item() == 7
