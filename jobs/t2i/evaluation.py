"""t2i evaluation: validation loss at fixed times, a sample grid, and (with a trained `classify`
run) Frechet distance and caption accuracy. Runs on rank 0 with the EMA weights when enabled."""

from __future__ import annotations

import torch

from scaleyard.jobs.t2i.latents import cached_text
from scaleyard.jobs.t2i.metrics import classifier_readout, frechet_distance
from scaleyard.models.diffusion import flow
from scaleyard.platform.job import EvalResult

EVAL_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
GRID = 16


@torch.no_grad()
def evaluate(job, model, step: int) -> EvalResult:
    from scaleyard.jobs.t2i.job import eval_stream

    cfg, device = job.cfg, job.ctx.device
    if not cfg.data.eval_path:
        return EvalResult()
    process = cfg.model.process
    generator = torch.Generator().manual_seed(1234)  # the same noise at every evaluation
    sums, count = dict.fromkeys(EVAL_TIMES, 0.0), 0
    for batch in eval_stream(cfg, job.geometry, cfg.eval.val_samples, 128):
        images = batch["image"].to(device)
        tokens, mask = model.encode(batch["caption"], device, cached_text(batch))
        for t in EVAL_TIMES:
            noise = torch.randn(images.shape, generator=generator).to(device)
            times = torch.full((len(images),), t, device=device)
            sums[t] += float(flow.training_loss(model.denoiser, images, tokens, mask, times, noise, process).sum())
        count += len(images)
    metrics = {f"loss_t{t}": sums[t] / count for t in EVAL_TIMES}
    metrics["loss"] = sum(metrics.values()) / len(EVAL_TIMES)
    result = EvalResult(metrics=metrics)
    if cfg.eval.samples == 0:
        return result

    real = next(eval_stream(cfg, job.geometry, cfg.eval.samples, cfg.eval.samples))
    captions = real["caption"]
    tokens, mask = model.encode(captions, device, cached_text(real))
    null_tokens, null_mask = model.encode([""] * len(captions), device)
    noise = torch.randn(real["image"].shape, generator=generator).to(device)
    generated = flow.sample(model.denoiser, noise, tokens, mask, null_tokens, null_mask, steps=cfg.eval.steps,
                            sampler=cfg.eval.sampler, guidance=cfg.eval.guidance, process=process)
    real_images = real["image"]
    if job.geometry.latent:  # generated and real latents through the split's autoencoder
        generated, real_images = _decode(job, generated), _decode(job, real_images.to(device))
    generated = ((generated.float() + 1) / 2).clamp(0, 1)
    result.images["samples"] = generated[:GRID].cpu()
    result.text["sample_captions"] = "\n".join(f"{i}. {c}" for i, c in enumerate(captions[:GRID]))
    if cfg.eval.classifier:
        classifier = _classifier(job, cfg.eval.classifier, device)
        real_features, _ = classifier_readout(classifier, ((real_images + 1) / 2).to(device))
        fake_features, predicted = classifier_readout(classifier, generated)
        result.metrics["frechet_distance"] = frechet_distance(real_features, fake_features)
        if "label" in real:
            result.metrics["caption_accuracy"] = float((torch.from_numpy(predicted) == real["label"]).float().mean())
    return result


def _classifier(job, run_dir: str, device: torch.device):
    if getattr(job, "_classifier", None) is None:
        from scaleyard.jobs.classify.job import load_classifier

        job._classifier = load_classifier(run_dir, device)
    return job._classifier


def _decode(job, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images in [-1, 1] with the split's autoencoder (loaded once per run)."""
    if getattr(job, "_autoencoder", None) is None:
        from scaleyard.data_loaders.index import load_index
        from scaleyard.jobs.t2i.latents import load_decoder

        job._autoencoder = load_decoder(job.cfg, load_index(job.cfg.data.path), job.ctx.device)
    decoded = [job._autoencoder.decode(chunk.float()) for chunk in latents.split(64)]
    return torch.cat(decoded).float()
