"""Shards written elsewhere (img2dataset-style folders): `scaleyard data index`, then the unchanged
pipeline reads them where they lie, with its guarantees (counts, exact resume, world-size-independent
order, skip accounting), and images of any format and mode decode to RGB at one size."""

from __future__ import annotations

import io
import itertools
import json

import numpy as np
import pytest
import torch
from foreign_fixture import make_foreign_folder
from PIL import Image

from scaleyard.data_loaders.decoders import CaptionDecoder, Compose, ImageDecoder, LabelDecoder
from scaleyard.data_loaders.images import decode_image
from scaleyard.data_loaders.index import DataError, load_index, sha256_file
from scaleyard.data_loaders.indexer import index_shards
from scaleyard.data_loaders.pipeline import ShardStream, StreamConfig, stack

from conftest import scaleyard, scaleyard_in_process

SIZE = 24
DECODE = Compose((ImageDecoder(symmetric=True), CaptionDecoder()))


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    return make_foreign_folder(tmp_path_factory.mktemp("foreign") / "shards")


@pytest.fixture(scope="module")
def indexed(foreign, tmp_path_factory):
    out = tmp_path_factory.mktemp("indexed") / "train"
    index_shards(str(foreign.root), out, size=SIZE, workers=1, seek_every=8)
    return load_index(out)


def stream(index, *, start=0, world=1, rank=0, batch=6, crop_seed=0, workers=0, required=("image.npy", "txt")):
    return ShardStream(index, StreamConfig(seed=crop_seed, lanes=4, shuffle_block=5, num_workers=workers),
                       decode=DECODE, collate=stack, batch_per_rank=batch, rank=rank, world_size=world,
                       start=start, required=required)


def read(s, steps):
    """(global position, key, image) of every sample the stream hands over in `steps` batches."""
    out = []
    for batch in itertools.islice(iter(s), steps):
        out += list(zip(batch["position"], batch["key"], batch["image"]))
    return out


def test_index_counts_what_the_reader_reads(foreign, indexed):
    assert indexed.total == foreign.total and [s.count for s in indexed.shards] == foreign.counts
    assert [s.name for s in indexed.shards] == [str(p.resolve()) for p in foreign.shards]  # read where they lie
    assert indexed.extra["corrupt"]["count"] == 1
    assert foreign.corrupt[0] in indexed.extra["corrupt"]["members"][0]
    assert indexed.extra["incomplete"]["txt"]["count"] == len(foreign.uncaptioned)
    assert indexed.extra["image_stats"]["modes"].keys() >= {"L", "P", "RGBA", "CMYK", "I;16", "RGB"}
    assert indexed.extra["image_shape"] == [3, SIZE, SIZE]
    s = stream(indexed, batch=10)
    samples = read(s, foreign.total // 10)  # one epoch
    assert s.seen == foreign.total and s.skipped == 2  # the truncated JPEG and the sample without caption
    assert len(samples) + s.skipped == indexed.total
    keys = {key for _, key, _ in samples}
    assert len(keys) == foreign.total - 2 and foreign.uncaptioned[0] not in keys
    assert foreign.corrupt[0].split(".")[0] not in keys
    assert any("truncated" in p for p in s.problems) and any("lacks field(s) ['txt']" in p for p in s.problems)
    images = torch.stack([image for _, _, image in samples])
    assert images.shape == (len(samples), 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1


@pytest.fixture(scope="module")
def random_crops(foreign, tmp_path_factory):
    return index_shards(str(foreign.root), tmp_path_factory.mktemp("random") / "train", size=SIZE, crop="random",
                        workers=1, seek_every=8)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_inside_a_foreign_shard_is_exact(random_crops, workers):
    full = read(stream(random_crops, crop_seed=3), 10)
    for start in (6, 18, 30):  # batch boundaries inside shards (lanes start mid-shard; offsets every 8)
        tail = read(stream(random_crops, start=start, crop_seed=3, workers=workers), 10 - start // 6)
        assert [(p, k) for p, k, _ in tail] == [(p, k) for p, k, _ in full if p >= start]
        reference = [image for p, _, image in full if p >= start]
        assert all(torch.equal(a, b) for (_, _, a), b in zip(tail, reference))


def test_order_does_not_depend_on_the_world_size(indexed):
    one = read(stream(indexed, batch=6), 5)
    two = [item for rank in (0, 1) for item in read(stream(indexed, batch=3, world=2, rank=rank), 5)]
    assert sorted((p, k) for p, k, _ in two) == [(p, k) for p, k, _ in one]


def test_random_crops_are_seeded_per_sample(random_crops, indexed):
    index = random_crops
    first, again = read(stream(index), 3), read(stream(index), 3)
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(first, again))
    other_seed = read(stream(index, crop_seed=1), 3)
    centre = {k: image for _, k, image in read(stream(indexed), 10)}
    assert any(not torch.equal(image, centre[k]) for _, k, image in first)  # some crops moved off centre
    assert {k for _, k, _ in other_seed} != {k for _, k, _ in first}  # (the run seed also reorders)


def test_images_of_every_mode_become_rgb_at_the_size():
    def encoded(image, fmt, **options):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **options)
        return buffer.getvalue()

    grey16 = Image.fromarray(np.full((30, 50), 40000, dtype=np.uint16))
    out = decode_image(encoded(grey16, "PNG"), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert abs(int(out[8, 8, 0]) - 40000 // 257) <= 1  # rescaled, not clipped to white
    clear = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    assert (decode_image(encoded(clear, "PNG"), 8) == 255).all()  # transparent -> white, not black
    cmyk = decode_image(encoded(Image.new("CMYK", (20, 40), (0, 255, 255, 0)), "JPEG"), 8)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # CMYK red stays red
    # the crop keeps the centre of the longer side: a left-black / right-white image, centre-cropped
    half = np.zeros((10, 40), dtype=np.uint8)
    half[:, 20:] = 255
    cropped = decode_image(encoded(Image.fromarray(half), "PNG"), 10)
    assert cropped[:, 0, 0].max() < 10 and cropped[:, -1, 0].min() > 245
    with pytest.raises(Exception):  # noqa: B017 - PIL's own error for undecodable bytes; the reader counts it
        decode_image(b"not an image", 8)


def test_missing_shards_and_empty_sources_fail_before_anything_is_written(foreign, tmp_path):
    out = tmp_path / "out"
    pattern = str(foreign.root / "{00000..00004}.tar")
    with pytest.raises(DataError, match=r"00003\.tar does not exist and 1 more"):
        index_shards(pattern, out, workers=1)
    with pytest.raises(DataError, match="matches nothing"):
        index_shards(str(tmp_path / "nowhere" / "{0..3}.tar"), out, workers=1)
    with pytest.raises(DataError, match="holds no .tar shards"):
        index_shards(str(tmp_path), out, workers=1)
    assert not out.exists()
    code, err = scaleyard_in_process("data", "index", pattern, "--out", str(out))
    assert code == 2 and "00003.tar does not exist" in err and not out.exists()


def test_an_existing_index_is_kept_unless_forced(foreign, tmp_path):
    out = tmp_path / "idx"
    assert scaleyard_in_process("data", "index", str(foreign.root), "--out", str(out), "--size", "16",
                                "--workers", "1")[0] == 0
    before = (out / "index.json").read_text()
    code, err = scaleyard_in_process("data", "index", str(foreign.root), "--out", str(out), "--size", "32")
    assert code == 2 and "already exists; pass --force" in err
    assert (out / "index.json").read_text() == before
    code, _ = scaleyard_in_process("data", "index", str(foreign.root), "--out", str(out), "--size", "32",
                                   "--force", "--workers", "1")
    assert code == 0 and json.loads((out / "index.json").read_text())["extra"]["image_shape"] == [3, 32, 32]


def test_pipe_urls_and_json_captions(foreign, tmp_path):
    source = "pipe:cat " + str(foreign.root / "{00000..00002}.tar")
    index = index_shards(source, tmp_path / "piped", size=SIZE, caption="json:caption", workers=2)
    assert index.shards[0].name.startswith("pipe:cat ") and not index.shards[0].offsets
    local = load_index(tmp_path / "piped")
    assert [s.sha256 for s in local.shards] == [sha256_file(p) for p in foreign.shards]
    s = stream(local, batch=10)
    batches = list(itertools.islice(iter(s), foreign.total // 10))
    assert s.skipped == 1  # the truncated image; the sample without .txt has its caption in .json
    captions = [c for b in batches for c in b["caption"]]
    assert len(captions) == foreign.total - 1 and all(c.startswith("a ") for c in captions)


def test_classify_style_decoders_read_the_labels(indexed):
    """Jobs that read image.npy + cls with the default required fields (classify) need no change."""
    s = ShardStream(indexed, StreamConfig(lanes=4, shuffle_block=5),
                    decode=Compose((ImageDecoder(), LabelDecoder())), collate=stack, batch_per_rank=20)
    batch = next(iter(s))
    assert batch["image"].shape == (len(batch["label"]), 3, SIZE, SIZE)
    assert set(batch["label"].tolist()) <= {0, 1, 2} and len(indexed.extra["class_names"]) == 3


@pytest.mark.slow  # a real t2i run (model build, 8 steps, evaluation) in a subprocess
def test_t2i_trains_on_an_indexed_foreign_folder(foreign, tmp_path):
    assert scaleyard("data", "index", str(foreign.root), "--out", str(tmp_path / "data"), "--size", "16",
                     "--workers", "1").returncode == 0
    data = tmp_path / "data"
    done = scaleyard("run", "t2i", "--preset", "tiny", f"data.path={data}", f"data.eval_path={data}",
                     "model.channels=3", "model.image_size=16", "eval.samples=8", "data.max_skip_share=0.1",
                     f"run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["samples_seen"] == 8 * 16
