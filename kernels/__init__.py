"""Fused kernels of the WaveGuard step, shipped as ``waveguard_optim.kernels``."""
