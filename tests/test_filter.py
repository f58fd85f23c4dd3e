"""The filter math: the reference against SPEC section 3, the folded form against the reference."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from waveguard_optim.filter import _median, fold_filter, median_network
from waveguard_optim.reference import gate_scale, haar, inverse_haar, reference_filter


def spec_filter_scalar(b, decay, kappa, snr_gate):
    """SPEC section 3 for one element, in plain Python floats, step by step."""
    n = len(b)
    w = [decay ** (n - 1 - j) for j in range(n)]
    w = [x / sum(w) for x in w]
    details, approx = [], list(b)
    while len(approx) > 1:
        pairs = list(zip(approx[0::2], approx[1::2]))
        details = [(x - y) / math.sqrt(2) for x, y in pairs] + details
        approx = [(x + y) / math.sqrt(2) for x, y in pairs]
    c = approx + details
    finest = sorted(abs(x) for x in c[n // 2 :])
    k = len(finest)
    med = finest[k // 2] if k % 2 else (finest[k // 2 - 1] + finest[k // 2]) / 2
    t = med / 0.6745 * math.sqrt(2 * math.log(n))
    e_c, e_f = sum(x * x for x in c[: n // 2]), sum(x * x for x in c[n // 2 :])
    gamma = (e_f / (e_c + e_f) if e_c + e_f > 0 else 0.0) if snr_gate else 1.0
    tau = kappa * gamma * t
    d = [c[0]] + [math.copysign(max(abs(x) - tau, 0.0), x) for x in c[1:]]
    # inverse Haar
    x, width = d[:1], 1
    while width < n:
        det = d[width : 2 * width]
        x = [v for a, e in zip(x, det) for v in ((a + e) / math.sqrt(2), (a - e) / math.sqrt(2))]
        width *= 2
    return sum(wj * xj for wj, xj in zip(w, x))


def test_haar_worked_example():
    c = haar(torch.tensor([4.0, 6.0, 10.0, 2.0], dtype=torch.float64))
    expected = torch.tensor([11.0, -1.0, -math.sqrt(2), 4 * math.sqrt(2)], dtype=torch.float64)
    torch.testing.assert_close(c, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32, 64])
def test_inverse_haar_inverts(n):
    x = torch.randn(n, 5, dtype=torch.float64)
    torch.testing.assert_close(inverse_haar(haar(x)), x, rtol=0, atol=1e-13)


def test_reference_worked_example_by_hand():
    b = [4.0, 6.0, 10.0, 2.0]
    out = reference_filter(torch.tensor(b, dtype=torch.float64), decay=0.85, threshold_scale=1.0, snr_gate=True)
    # tau = gamma * T with gamma = 34/156 and sigma = median(sqrt2, 4 sqrt2)/0.6745
    tau = 34 / 156 * (2.5 * math.sqrt(2) / 0.6745) * math.sqrt(2 * math.log(4))
    x = [5.5, 5.5, (11 / math.sqrt(2) + 4 * math.sqrt(2) - tau) / math.sqrt(2), (11 / math.sqrt(2) - 4 * math.sqrt(2) + tau) / math.sqrt(2)]
    w = [0.85**3, 0.85**2, 0.85, 1.0]
    assert out.item() == pytest.approx(sum(a * b for a, b in zip(w, x)) / sum(w), rel=1e-14)


def test_reference_spec_example_with_decay_zero_by_hand():
    """SPEC section 3, folded form with decay 0: u = Haar(e_3) = (1/2, -1/2, 0, -1/sqrt2), so
    g_hat = b_3 + clamp(c_1)/2 + clamp(c_3)/sqrt2 with c = (11, -1, -sqrt2, 4 sqrt2); |c_1| < tau < c_3."""
    b = [4.0, 6.0, 10.0, 2.0]
    tau = 34 / 156 * (2.5 * math.sqrt(2) / 0.6745) * math.sqrt(2 * math.log(4))
    assert 1 < tau < 4 * math.sqrt(2)
    out = reference_filter(torch.tensor(b, dtype=torch.float64), decay=0.0, threshold_scale=1.0, snr_gate=True)
    assert out.item() == pytest.approx(2.0 - 1 / 2 + tau / math.sqrt(2), rel=1e-14)
    assert out.item() == pytest.approx(spec_filter_scalar(b, 0.0, 1.0, True), rel=1e-14)


@settings(max_examples=200, deadline=None)
@given(
    log_n=st.integers(1, 5),
    data=st.data(),
    decay=st.sampled_from([0.0, 0.3, 0.85, 1.0]),
    kappa=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    snr_gate=st.booleans(),
)
def test_reference_matches_spec_scalar(log_n, data, decay, kappa, snr_gate):
    n = 2**log_n
    b = data.draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=n, max_size=n))
    expected = spec_filter_scalar(b, decay, kappa, snr_gate)
    got = reference_filter(torch.tensor(b, dtype=torch.float64), decay=decay, threshold_scale=kappa, snr_gate=snr_gate)
    assert got.item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


def _buffers(n, dtype):
    """Histories of 4096 elements: noise, trend + noise, zeros, constants, mixed scales."""
    g = torch.Generator().manual_seed(n)
    t = torch.arange(n, dtype=torch.float64)[:, None]
    noise = torch.randn(n, 1024, generator=g, dtype=torch.float64)
    trend = 0.3 * t - 1.0 + 0.1 * torch.randn(n, 1024, generator=g, dtype=torch.float64)
    zeros = torch.zeros(n, 512, dtype=torch.float64)
    const = torch.full((n, 512), -2.5, dtype=torch.float64)
    scaled = noise[:, :1024] * torch.logspace(-6, 6, 1024, dtype=torch.float64)
    return torch.cat([noise, trend, zeros, const, scaled], dim=1).to(dtype)


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "decay,kappa,snr_gate",
    [(0.85, 1.0, True), (0.85, 1.0, False), (0.5, 2.5, True), (1.0, 1.0, True), (0.0, 1.0, True), (0.0, 0.7, False), (0.85, 0.0, True), (0.0, 0.0, True)],
)
def test_fold_filter_matches_reference(n, dtype, decay, kappa, snr_gate):
    buffer = _buffers(n, dtype)
    expected = reference_filter(buffer, decay=decay, threshold_scale=kappa, snr_gate=snr_gate)
    # three tensors in one call, as the multi-tensor path passes them
    parts = buffer.split([1000, 3000, 96], dim=1)
    got = fold_filter([[p[j] for p in parts] for j in range(n)], decay=decay, threshold_scale=kappa, snr_gate=snr_gate)
    scale = buffer.abs().amax(0)
    tol = 1e-13 if dtype == torch.float64 else 2e-6
    assert got[0].dtype == dtype
    assert ((torch.cat(got) - expected).abs() <= tol * scale + 1e-30).all()


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_decay_one_is_plain_mean_whatever_the_threshold(n):
    buffer = _buffers(n, torch.float64)
    for kappa in [0.0, 1.0, 5.0]:
        (got,) = fold_filter([[b] for b in buffer], decay=1.0, threshold_scale=kappa, snr_gate=False)
        torch.testing.assert_close(got, buffer.mean(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
def test_median_network_on_all_binary_inputs(k):
    """0-1 principle: a comparator network that is right on every 0/1 input is right on all inputs."""
    patterns = torch.tensor(list(itertools.product([0.0, 1.0], repeat=k))).T  # (k, 2^k)
    (got,) = [_median([[row] for row in patterns])[0]]
    expected = patterns.sort(0).values
    mid = expected[k // 2] if k % 2 else (expected[k // 2 - 1] + expected[k // 2]) / 2
    torch.testing.assert_close(got, mid, rtol=0, atol=0)


def test_median_network_32_random_and_pruned():
    x = torch.randn(32, 20000, dtype=torch.float64)
    (got,) = _median([[row] for row in x])
    expected = x.sort(0).values
    torch.testing.assert_close(got, (expected[15] + expected[16]) / 2, rtol=0, atol=0)
    assert len(median_network(32)[0]) < 191  # Batcher's full network for 32 wires has 191 comparators


def test_fold_filter_does_not_write_its_inputs():
    buffer = _buffers(8, torch.float32)
    slots = [[b.clone()] for b in buffer]
    fold_filter(slots, decay=0.85, threshold_scale=1.0, snr_gate=True)
    torch.testing.assert_close(torch.stack([s[0] for s in slots]), buffer, rtol=0, atol=0)


NON_FINITE = [math.inf, -math.inf, math.nan]


@pytest.mark.parametrize("n", [2, 4, 8, 64])
def test_decay_zero_without_threshold_is_the_newest_gradient_bit_for_bit(n):
    """SPEC section 3: terms of weight 0 are not evaluated and kappa = 0 skips the threshold, so
    delta = 0, kappa = 0 returns b_{N-1} exactly, even with inf or NaN in an older slot."""
    buffer = _buffers(n, torch.float32)
    buffer[0, :3] = torch.tensor(NON_FINITE)  # the oldest slot
    buffer[n - 2, 3:6] = torch.tensor(NON_FINITE)  # the one before the newest
    for snr_gate in (True, False):
        options = dict(decay=0.0, threshold_scale=0.0, snr_gate=snr_gate)
        assert torch.equal(reference_filter(buffer, **options), buffer[-1])
        got = fold_filter([list(b.split([1000, 3096])) for b in buffer], **options)
        assert torch.equal(torch.cat(got), buffer[-1])


@pytest.mark.parametrize("kappa", [0.0, 1.0])
def test_decay_one_ignores_a_non_finite_slot_nowhere(kappa):
    """The converse: every weight of the plain mean is nonzero, so an inf in the window is in the output."""
    buffer = _buffers(4, torch.float64)
    buffer[0, 0] = math.inf
    (got,) = fold_filter([[b] for b in buffer], decay=1.0, threshold_scale=kappa, snr_gate=True)
    assert got[0] == math.inf and torch.isfinite(got[1:]).all()


def test_gate_scale_is_a_normal_power_of_two_that_brings_the_largest_magnitude_to_one():
    for dtype in (torch.float32, torch.float64):
        finfo = torch.finfo(dtype)
        m = torch.tensor([0.0, finfo.tiny * finfo.eps, finfo.tiny, 1e-30, 0.75, 1.0, 3.0, 1e30, finfo.max], dtype=dtype)
        s = gate_scale(m)
        mantissa, _ = torch.frexp(s)
        assert (mantissa == 0.5).all() and (s >= finfo.tiny).all()  # powers of two, normal
        scaled = m * s
        inside = (m >= finfo.tiny) & (m < finfo.max / 2)
        assert ((scaled[inside] >= 1) & (scaled[inside] < 2)).all()
        assert scaled[-1] < 4 and scaled[0] == 0  # the largest is clamped (2^k normal), zero stays zero


@pytest.mark.parametrize("n", [2, 8, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay,kappa,snr_gate", [(0.0, 1.0, True), (0.85, 1.5, True), (0.0, 1.0, False)])
def test_filter_scales_exactly_with_huge_and_tiny_gradients(n, dtype, decay, kappa, snr_gate):
    """SPEC section 3, step 5: gamma is finite for every finite input. The filter is positively
    homogeneous, and multiplying by a power of two is exact, so scaling a buffer by 2^k scales
    the output by 2^k bit for bit, also where the squares of the gate would overflow (values
    ~1e30: squares 1e60 > float32's 3e38) or underflow (values ~1e-18: squares below 2^-120)."""
    buffer = _buffers(n, dtype)[:, :3072]  # noise, trend, zeros, constants: values of order 1
    buffer = buffer / buffer.abs().amax(0).clamp_min(1)
    options = dict(decay=decay, threshold_scale=kappa, snr_gate=snr_gate)
    base = torch.cat(fold_filter([[b] for b in buffer], **options))
    exponents = (100, -60) if dtype == torch.float32 else (600, -600)
    for k in exponents:
        scaled = buffer * 2.0**k
        got = torch.cat(fold_filter([[b] for b in scaled], **options))
        assert torch.isfinite(got).all()
        assert torch.equal(got, base * 2.0**k)
        expected = reference_filter(scaled, **options)
        assert torch.equal(expected, reference_filter(buffer, **options) * 2.0**k)


@pytest.mark.parametrize("decay", [0.0, 0.85])
def test_one_huge_gradient_keeps_gamma_finite_and_matches_float64(decay):
    """Issue 11, item 5: one |g| >= 3e19 in float32 made E_f overflow and gamma = inf/inf = NaN.
    The output stays of the order of the other gradients (the huge details are clamped to tau),
    as float64 arithmetic, where nothing overflows, computes it."""
    b = [0.3, -1.2, 0.8, 2e30, -0.5, 0.1, 1.1, -0.7]
    options = dict(decay=decay, threshold_scale=1.0, snr_gate=True)
    expected = reference_filter(torch.tensor(b, dtype=torch.float64), **options).item()
    assert abs(expected) < 10 if decay == 0 else abs(expected) > 1e29  # decay 0.85 weighs the huge one in
    got = reference_filter(torch.tensor(b), **options)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    (folded,) = fold_filter([[torch.tensor([x])] for x in b], **options)
    assert folded.item() == pytest.approx(expected, rel=1e-5)
