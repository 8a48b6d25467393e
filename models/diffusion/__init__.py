"""Image diffusion: DiT variants and U-ViT (`transformer`), the generative processes with their
samplers and classifier-free guidance (`flow`), SRDS parallel-in-time sampling (`srds`) and the
training-free safe denoiser (`safe_denoiser`)."""
