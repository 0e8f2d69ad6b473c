"""Each loss against a slow, literal implementation of the paper's formula (explicit loops)."""

from __future__ import annotations

import math

import pytest
import torch

from cc_model.attention import CapturedMaps
from cc_model.losses import CSCLLoss, LDMLoss, LocalisationLoss, MACLLoss, TotalLoss

TOL = dict(rel=1e-5, abs=1e-5)


def cos(u, v) -> float:
    u, v = u.double(), v.double()
    return float(u @ v / (u.norm() * v.norm()))


def to_float(x):
    return float(x.double())


# ---------------------------------------------------------------- CSCL (Eq. 4)


def cscl_paper_reference(v, t, reduction="sum"):
    n = v.shape[0]
    a = [[cos(v[i], t[j]) for j in range(n)] for i in range(n)]  # a[i][j] = cos(v_i^cls, t_j^cls)
    per = []
    for i in range(n):
        col = sum(math.exp(a[j][i]) for j in range(n) if j != i)
        row = sum(math.exp(a[i][j]) for j in range(n) if j != i)
        per.append(-math.log(math.exp(a[i][i]) / col) - math.log(math.exp(a[i][i]) / row))
    return sum(per) if reduction == "sum" else sum(per) / n


def cscl_infonce_reference(v, t, temperature):
    n = v.shape[0]
    a = [[cos(v[i], t[j]) / temperature for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        total -= math.log(math.exp(a[i][i]) / sum(math.exp(a[j][i]) for j in range(n)))
        total -= math.log(math.exp(a[i][i]) / sum(math.exp(a[i][j]) for j in range(n)))
    return total


@pytest.mark.parametrize("n", [2, 3, 6])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_cscl_paper_form_matches_eq4(n, reduction):
    v, t = torch.randn(n, 8), torch.randn(n, 8)
    got = CSCLLoss(form="paper", reduction=reduction)(v, t)["cscl"]
    assert to_float(got) == pytest.approx(cscl_paper_reference(v, t, reduction), **TOL)


def test_cscl_paper_denominator_excludes_the_positive():
    # With a_ii = 1 and all a_ij = -1 the paper's form reaches its minimum 2 (log(N-1) - 2) per sample;
    # InfoNCE (positive in the denominator) would stay positive.
    n = 4
    v = torch.eye(n)[:, :n] - 1.0 / n  # centred one-hots: cos(v_i, v_j) = -1/(n-1)
    got = to_float(CSCLLoss(form="paper", reduction="mean")(v, v)["cscl"])
    expected = 2 * (-1.0 + math.log(sum(math.exp(-1 / (n - 1)) for _ in range(n - 1))))
    assert got == pytest.approx(expected, **TOL)
    assert got < 0


def test_cscl_infonce_option():
    v, t = torch.randn(5, 8), torch.randn(5, 8)
    got = CSCLLoss(form="infonce", temperature=0.1)(v, t)["cscl"]
    assert to_float(got) == pytest.approx(cscl_infonce_reference(v, t, 0.1), **TOL)


def test_cscl_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        CSCLLoss()(torch.randn(1, 4), torch.randn(1, 4))


# ---------------------------------------------------------------- MACL (Eq. 7)


def macl_reference(tokens, positive, r, tau, r_min, reduction="sum"):
    n, layers, _ = tokens.shape
    total = 0.0
    for i in range(n):
        j = int(positive[i])
        for a in range(layers):
            alpha_ij = 1.0 / min(max(float(r[i, j]), r_min), 1.0)
            numerator = math.exp(alpha_ij * cos(tokens[i, a], tokens[j, a]) / tau)
            denominator = 0.0
            for k in range(n):
                if k == i:
                    continue
                alpha_ik = 1.0 / min(max(float(r[i, k]), r_min), 1.0)
                denominator += math.exp(alpha_ik * cos(tokens[i, a], tokens[k, a]) / tau)
            total -= math.log(numerator / denominator)
    return total if reduction == "sum" else total / n


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_macl_matches_eq7_with_alpha_and_clamp(reduction):
    b, layers = 3, 4
    n = 2 * b
    tokens = torch.randn(n, layers, 16)
    positive = torch.cat([torch.arange(b) + b, torch.arange(b)])
    r = torch.empty(n, n).uniform_(-0.5, 1.2)  # values below r_min and above 1 exercise the clamp
    r = (r + r.T) / 2
    got = MACLLoss(temperature=0.5, r_min=0.2, reduction=reduction)(tokens, positive, r)["macl"]
    expected = macl_reference(tokens, positive, r, tau=0.5, r_min=0.2, reduction=reduction)
    assert to_float(got) == pytest.approx(expected, **TOL)


def test_macl_alpha_scales_each_pair():
    # Doubling r_ik halves alpha_ik: the loss must change exactly as the literal formula says.
    n = 4
    tokens = torch.randn(n, 2, 8)
    positive = torch.tensor([2, 3, 0, 1])
    r = torch.full((n, n), 0.5)
    r2 = r.clone()
    r2[0, 1] = 1.0
    loss = MACLLoss(temperature=1.0, r_min=0.1)
    for sim in (r, r2):
        assert to_float(loss(tokens, positive, sim)["macl"]) == pytest.approx(
            macl_reference(tokens, positive, sim, 1.0, 0.1), **TOL
        )
    assert to_float(loss(tokens, positive, r)["macl"]) != pytest.approx(to_float(loss(tokens, positive, r2)["macl"]))


@pytest.mark.parametrize("form", ["cscl-paper", "cscl-infonce", "macl"])
def test_contrastive_losses_stay_float32_under_bf16_autocast(form):
    # The training step runs under bf16 autocast on a GPU (CPU autocast has the same matmul
    # rule); the cosines must still be float32 products, value and gradient.
    n = 8
    generator = torch.Generator().manual_seed(0)
    if form == "macl":
        inputs = [torch.randn(n, 4, 64, generator=generator, requires_grad=True)]
        args = (torch.tensor([1, 0, 3, 2, 5, 4, 7, 6]), torch.rand(n, n, generator=generator) * 0.8 + 0.2)
        loss = MACLLoss(temperature=0.07)
    else:
        inputs = [torch.randn(n, 64, generator=generator, requires_grad=True) for _ in range(2)]
        args = ()
        loss = CSCLLoss(form=form.split("-")[1], temperature=0.07)

    value = next(iter(loss(*inputs, *args).values()))
    grads = torch.autograd.grad(value, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward only, as the training step does
        value_ac = next(iter(loss(*inputs, *args).values()))
    grads_ac = torch.autograd.grad(value_ac, inputs)
    assert value_ac.dtype == torch.float32
    torch.testing.assert_close(value_ac, value, rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads_ac, grads):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- localisation (Sec. 3.4)


def loc_reference(maps, mask, weight):
    """Literal: per layer and pixel, max-normalise, average visual tokens, then maps per resolution."""
    b = mask.shape[0]
    grids = sorted({(m.height, m.width) for m in maps})
    losses = []
    for h, w in grids:
        num, den = 0.0, 0.0
        for s in range(b):
            layer_maps = []  # list of h x w nested lists
            for m in maps:
                if (m.height, m.width) != (h, w):
                    continue
                if m.visual is not None:
                    tokens = m.visual.shape[1]
                    acc = [[0.0] * w for _ in range(h)]
                    for v in range(tokens):
                        peak = max(float(m.visual[s, v, y, x]) for y in range(h) for x in range(w))
                        for y in range(h):
                            for x in range(w):
                                acc[y][x] += float(m.visual[s, v, y, x]) / peak / tokens
                    layer_maps.append(acc)
                if m.text is not None:
                    peak = max(float(m.text[s, y, x]) for y in range(h) for x in range(w))
                    layer_maps.append([[float(m.text[s, y, x]) / peak for x in range(w)] for y in range(h)])
            fy, fx = mask.shape[2] // h, mask.shape[3] // w
            background, subject = 0.0, 0.0
            for y in range(h):
                for x in range(w):
                    a_g = sum(lm[y][x] for lm in layer_maps) / len(layer_maps)
                    m_g = float(mask[s, 0, y * fy : (y + 1) * fy, x * fx : (x + 1) * fx].double().mean())
                    background += a_g * (1 - m_g) / (h * w)
                    subject += a_g * m_g / (h * w)
            num += float(weight[s]) * (background - subject)
            den += float(weight[s])
        losses.append(num / max(den, 1.0))
    return sum(losses) / len(losses)


def random_maps(b=2, m=3):
    def probs(*shape):
        return torch.rand(*shape) + 0.01

    return [
        CapturedMaps(layer_index=0, height=4, width=4, text=probs(b, 4, 4), visual=probs(b, m, 4, 4)),
        CapturedMaps(layer_index=1, height=2, width=2, text=probs(b, 2, 2), visual=probs(b, m, 2, 2)),
        CapturedMaps(layer_index=2, height=4, width=4, text=probs(b, 4, 4), visual=None),
    ]


def test_localisation_matches_literal_average_and_resized_mask():
    maps = random_maps()
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    weight = torch.tensor([1.0, 0.0])  # the second sample is a dropped one
    got = LocalisationLoss()(maps, mask, weight)["loc"]
    assert to_float(got) == pytest.approx(loc_reference(maps, mask, weight), **TOL)


def test_localisation_sign_rewards_subject_attention():
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :] = 1
    on_subject = torch.full((1, 4, 4), 0.01)
    on_subject[:, :2, :] = 1.0
    good = [CapturedMaps(layer_index=0, height=4, width=4, text=on_subject, visual=None)]
    bad = [CapturedMaps(layer_index=0, height=4, width=4, text=on_subject.flip(1), visual=None)]
    assert LocalisationLoss()(good, mask)["loc"] < LocalisationLoss()(bad, mask)["loc"]


def test_localisation_without_maps_is_an_error():
    with pytest.raises(ValueError, match="no attention maps"):
        LocalisationLoss()([], torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------- LDM and total


def test_ldm_is_noise_mse():
    pred, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    expected = sum(float(pred.flatten()[i] - target.flatten()[i]) ** 2 for i in range(pred.numel())) / pred.numel()
    assert to_float(LDMLoss()(pred, target)["ldm"]) == pytest.approx(expected, **TOL)


def test_total_weights_terms_and_skips_absent_ones():
    terms = {"ldm": torch.tensor(1.0), "cscl": torch.tensor(2.0), "macl": torch.tensor(3.0), "loc": torch.tensor(-4.0)}
    total = TotalLoss(lambda1=0.01, lambda2=0.001)
    assert float(total(terms)) == pytest.approx(1.0 + 0.01 * 5.0 - 0.004)
    assert float(total({"ldm": torch.tensor(1.0), "loc": torch.tensor(2.0)})) == pytest.approx(1.002)
