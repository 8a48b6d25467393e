"""Per-modality decoding through the real pipeline: molecules (padded + mask), tables (schema),
captions, images with a position-seeded flip."""

import itertools

import torch

from scaleyard.data_loaders.builders import build
from scaleyard.data_loaders.decoders import (
    CaptionDecoder,
    Compose,
    ImageDecoder,
    JsonDecoder,
    MoleculeDecoder,
    TableDecoder,
    pad_molecules,
)  # fmt: skip
from scaleyard.data_loaders.pipeline import ShardStream, StreamConfig, stack


def first_batch(index, decode, collate, batch=8):
    stream = ShardStream(index, StreamConfig(lanes=2, shuffle_block=4), decode=decode, collate=collate,
                         batch_per_rank=batch)
    return next(iter(stream))


def test_molecules_are_padded_with_a_mask(tmp_path):
    index = build("qm9", tmp_path, shard_size=10, limit=30)["train"]
    batch = first_batch(index, Compose((MoleculeDecoder(),)), pad_molecules)
    atoms, pos, mask = batch["atoms"], batch["pos"], batch["mask"]
    assert atoms.shape[0] == 8 and pos.shape == (*atoms.shape, 3) and mask.dtype == torch.bool
    counts = mask.sum(1)
    assert counts.min() < counts.max()  # molecules of different sizes in one batch
    assert bool((atoms[~mask] == 0).all()) and bool((atoms[mask] > 0).all())
    assert all(isinstance(s, str) and s for s in batch["smiles"])
    assert {"homo", "lumo", "gap"} <= batch["properties"][0].keys()


def test_table_rows_follow_the_schema(tmp_path):
    index = build("adult", tmp_path, shard_size=10, limit=30)["train"]
    columns = tuple(index.extra["columns"])
    batch = first_batch(index, Compose((TableDecoder(columns),)), stack)
    numeric = [c for c in columns if c["kind"] == "numerical"]
    categorical = [c for c in columns if c["kind"] == "categorical"]
    assert batch["numeric"].shape == (8, len(numeric)) and batch["numeric"].dtype == torch.float32
    assert batch["categorical"].shape == (8, len(categorical))
    sizes = torch.tensor([len(c["categories"]) for c in categorical])
    assert bool((batch["categorical"] < sizes).all()) and bool((batch["categorical"] >= 0).all())
    ages = batch["numeric"][:, [c["name"] for c in numeric].index("age")]
    assert bool(((ages >= 17) & (ages <= 90)).all())


def test_images_captions_and_deterministic_flip(tmp_path):
    index = build("shapes", tmp_path, shard_size=10, limit=20, resolution=16)["train"]
    plain = Compose((ImageDecoder(field="image.png", symmetric=True), CaptionDecoder(), JsonDecoder()))
    batch = first_batch(index, plain, stack)
    assert batch["image"].shape == (8, 3, 16, 16)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].min() < 0
    assert all(meta["shape"] in caption for meta, caption in zip(batch["meta"], batch["caption"]))
    flipping = Compose((ImageDecoder(field="image.png", flip=True, seed=3),))
    runs = [first_batch(index, flipping, stack)["image"] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])  # the flip is a function of (seed, position): replays on resume
    plain_unit = batch["image"] / 2 + 0.5
    mirrored = [torch.allclose(a, b.flip(-1)) and not torch.allclose(a, b) for a, b in zip(runs[0], plain_unit)]
    kept = [torch.allclose(a, b) and not torch.allclose(a, b.flip(-1)) for a, b in zip(runs[0], plain_unit)]
    assert any(mirrored) and any(kept)  # a per-sample coin, not all or nothing


def test_every_split_is_readable_end_to_end(tmp_path):
    written = build("fashion_mnist", tmp_path, shard_size=25, limit=60)
    for index in written.values():
        stream = ShardStream(index, StreamConfig(lanes=3, shuffle_block=5), decode=Compose((ImageDecoder(),)),
                             collate=stack, batch_per_rank=20)
        keys = list(itertools.chain(*(b["key"] for b in itertools.islice(iter(stream), 3))))
        assert sorted(keys) == [f"{i:06d}" for i in range(60)]
