"""`scaleyard sample` for t2i runs (jobs/image_sample): PNGs, grid and settings; SRDS and serial
give the same images; a killed run resumes; bad input is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import scaleyard, scaleyard_in_process

PROMPTS = ("--prompt", "a shirt", "--prompt", "an ankle boot, black: \"tall\"")


@pytest.fixture(scope="module")
def t2i_run(fmnist, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("t2i") / "run"
    code, err = scaleyard_in_process("run", "t2i", "--preset", "tiny", f"data.path={fmnist}/train",
                                     f"data.eval_path={fmnist}/test", "eval.samples=0", "train.ema_decay=0.9",
                                     f"run.dir={run}")
    assert code == 0, err
    return run


@pytest.fixture(scope="module")
def reader(classify_args, tmp_path_factory) -> Path:
    """A classify run (a few steps: a reader whose answers are fixed, not good)."""
    run = tmp_path_factory.mktemp("classify") / "run"
    code, err = scaleyard_in_process("run", "classify", *classify_args, "train.steps=1", f"run.dir={run}")
    assert code == 0, err
    return run


def test_every_seed_and_index_has_its_own_noise():
    from scaleyard.jobs.image_sample.job import noise_for

    draws = [noise_for([k], seed, (1, 4, 4)) for seed in (0, 1, 2**32) for k in (0, 1)]
    assert len({d.numpy().tobytes() for d in draws}) == 6
    assert noise_for([3, 1], 7, (2, 2)).equal(torch.cat([noise_for([3], 7, (2, 2)), noise_for([1], 7, (2, 2))]))


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "samples").glob("*.png"))}


def test_sample_writes_pngs_grid_and_settings_and_srds_draws_the_same_images(t2i_run, tmp_path):
    code, err = scaleyard_in_process("sample", str(t2i_run), "--out", str(tmp_path / "serial"), *PROMPTS, "--n", "3",
                                     "--steps", "9", "--sampler", "euler")
    assert code == 0, err
    images = pixels(tmp_path / "serial")
    assert list(images) == [f"{k:06d}.png" for k in range(6)]
    assert all(image.shape == (28, 28) for image in images.values())
    assert len({image.tobytes() for image in images.values()}) == 6  # every image has its own noise
    settings = json.loads((tmp_path / "serial" / "settings.json").read_text())
    assert settings["prompts"] == ["a shirt", "an ankle boot, black: \"tall\""]  # punctuation survives
    assert settings["ema"] is True and settings["config"]["steps"] == 9
    assert Image.open(tmp_path / "serial" / "grid.png").size == (3 * 30, 2 * 30)

    code, err = scaleyard_in_process("sample", str(t2i_run), "--out", str(tmp_path / "srds"), *PROMPTS, "--n", "3",
                                     "--steps", "9", "--sampler", "srds", "srds.tolerance=0", "srds.base=euler")
    assert code == 0, err
    assert pixels(tmp_path / "srds").keys() == images.keys()
    for name, image in pixels(tmp_path / "srds").items():  # equal up to float error, so to 1 level of 255
        assert np.abs(image.astype(int) - images[name]).max() <= 1, name
    summary = json.loads((tmp_path / "srds" / "summary.json").read_text())
    assert summary["metrics"]["srds_iterations"] == 3  # tolerance 0: B = 3 iterations


def test_a_killed_sampling_run_resumes_drawing_only_what_is_missing(t2i_run, tmp_path):
    out = tmp_path / "out"
    args = ("sample", str(t2i_run), "--out", str(out), *PROMPTS, "--n", "2", "--steps", "4")
    assert scaleyard_in_process(*args)[0] == 0
    before = pixels(out)
    (out / "samples" / "000002.png").unlink()  # as if the run died before writing it
    (out / "summary.json").unlink()
    assert scaleyard_in_process(*args)[0] == 0
    assert json.loads((out / "summary.json").read_text())["metrics"]["drawn_here"] == 1
    assert {k: v.tobytes() for k, v in pixels(out).items()} == {k: v.tobytes() for k, v in before.items()}
    code, err = scaleyard_in_process(*args[:-2], "--steps", "5")  # other settings, same folder
    assert code != 0 and "different config" in err and "steps" in err


def test_readback_counts_the_region_and_scores_the_rest(t2i_run, reader, fmnist, tmp_path):
    import torch

    from scaleyard.jobs.classify.job import load_classifier
    from scaleyard.jobs.image_sample.images import read_png

    out = tmp_path / "read"
    code, err = scaleyard_in_process("sample", str(t2i_run), "--out", str(out), *PROMPTS, "--n", "20", "--steps", "3",
                                     f"readback.reader={reader}", "readback.region=label=0",
                                     f"readback.real={fmnist}/test", "readback.real_limit=100")
    assert code == 0, err
    metrics = json.loads((out / "summary.json").read_text())["metrics"]
    classifier = load_classifier(reader)
    images = torch.stack([read_png(p) for p in sorted((out / "samples").glob("*.png"))])
    with torch.no_grad():
        predicted = classifier.out(classifier.features((images + 1) / 2)).argmax(-1)
    assert metrics["readback_images"] == 40 and metrics["real_images"] == 100
    assert metrics["region_share"] == pytest.approx(float((predicted == 0).float().mean()))
    if metrics["region_share"] < 1:
        assert metrics["frechet_distance_rest"] > 0


def test_bad_input_is_refused_before_anything_is_written(t2i_run, tmp_path, reader):
    # the real command line once (exit status and stderr of the installed entry point)
    missing = scaleyard("sample", str(t2i_run), "--out", str(tmp_path / "a"), "--prompts", str(tmp_path / "no.txt"))
    assert missing.returncode != 0 and "no.txt does not exist" in missing.stderr
    assert not (tmp_path / "a").exists()
    code, err = scaleyard_in_process("sample", str(t2i_run), "--out", str(tmp_path / "b"))
    assert code != 0 and "no prompt given" in err
    code, err = scaleyard_in_process("sample", str(t2i_run), "--out", str(tmp_path / "c"), "--prompt", "x",
                                     "safe.negation=" + str(tmp_path))
    assert code != 0 and "safe.negation" in err and "index.json" in err
    code, err = scaleyard_in_process("sample", str(t2i_run), "--out", str(tmp_path / "f"), "--prompt", "x",
                                     f"readback.reader={reader}", "readback.region=color=red")
    assert code != 0 and "readback.region" in err and "label=K" in err
    classify = reader
    code, err = scaleyard_in_process("run", "image_sample", f"source={classify}", "prompts=[x]",
                                     f"run.dir={tmp_path / 'd'}")
    assert code != 0 and "is a run of job 'classify', not t2i" in err
    code, err = scaleyard_in_process("sample", str(classify), "--out", str(tmp_path / "e"), "--steps", "4")
    assert code != 0 and "--steps: only for runs of jobs with a sampling job" in err
    assert not any((tmp_path / name).exists() for name in "abcdef")
