"""Shared fixtures: a few parameters of awkward shapes and a reproducible gradient stream."""

import torch

from waveguard_optim.denoise import claim_histories


def make_params(dtype=torch.float32, seed=0):
    """Parameters of several shapes (one non-contiguous) so paths that group tensors are exercised."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 10, generator=g, dtype=torch.float64).to(dtype)
    return [
        torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64).to(dtype)),
        torch.nn.Parameter(torch.randn(17, generator=g, dtype=torch.float64).to(dtype)),
        torch.nn.Parameter(base.t()),  # non-contiguous
        torch.nn.Parameter(torch.randn(1, generator=g, dtype=torch.float64).to(dtype)),
    ]


def gradient(p, step, kind="mixed", seed=0):
    """The gradient of ``p`` at ``step``: noise around a drifting signal, with zeros and constants mixed in."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    shape = p.shape
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    t = float(step)
    if kind == "noise":
        out = noise
    elif kind == "trend":
        out = 0.05 * t + 0.1 * noise
    elif kind == "zeros":
        out = torch.zeros(shape, dtype=torch.float64)
    elif kind == "constant":
        out = torch.full(shape, 0.7, dtype=torch.float64)
    else:  # mixed per element
        flat = torch.stack([noise, 0.05 * t + 0.1 * noise, torch.zeros(shape, dtype=torch.float64), torch.full(shape, 0.7, dtype=torch.float64)])
        pick = torch.arange(p.numel()).reshape(shape) % 4
        out = flat.gather(0, pick.unsqueeze(0)).squeeze(0)
    return out.to(p.dtype).contiguous()


def train(params, optimizer, steps, kind="mixed", seed=0, skip=None):
    """Feed ``steps`` gradients; ``skip(step, i)`` leaves parameter i without a gradient."""
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if skip is not None and skip(step, i) else gradient(p, step, kind, seed + i)
        optimizer.step()
    return [p.detach().clone() for p in params]


def fused_sgd_filter(fused_wave_sgd_, slots, **options):
    """g_hat of a fused SGD step (``fused_wave_sgd_`` of a kernel module) over ``slots`` (oldest
    first, the last is the current gradient): the older ones are recorded by warm-up steps, then
    SGD with lr 1 and no momentum moves a zero parameter to exactly -g_hat. ``options``: the
    filter's, plus the kernel's own (e.g. ``backend``)."""
    n, p, state = len(slots), torch.zeros_like(slots[0]), {}
    for g in slots:
        histories, full = claim_histories([p], [state], buffer_size=n, buffer_dtype=None)
        p.zero_()
        fused_wave_sgd_(
            [p], [g], [None], histories, full, **options, weight_decay=0.0, momentum=0.0, lr=1.0, dampening=0.0,
            nesterov=False, maximize=False,
        )  # fmt: skip
    return -p
