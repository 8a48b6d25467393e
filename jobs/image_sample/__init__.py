"""Sampling job for trained image-diffusion runs (serial samplers, SRDS, the safe denoiser)."""
