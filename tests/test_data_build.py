"""Shard builders from real sources: deterministic, indexed, with clear errors."""

import json

import pytest

from scaleyard.data_loaders.builders import build
from scaleyard.data_loaders.index import DataError, load_index

from conftest import scaleyard


@pytest.mark.parametrize("name,options", [("fashion_mnist", {}), ("shapes", {"resolution": 16}),
                                          ("qm9", {"heavy_atoms_only": True}), ("adult", {})])
def test_builders_are_deterministic(tmp_path, name, options):
    first = build(name, tmp_path / "a", shard_size=40, limit=100, **options)
    second = build(name, tmp_path / "b", shard_size=40, limit=100, **options)
    for split in first:
        assert [s.sha256 for s in first[split].shards] == [s.sha256 for s in second[split].shards]
        assert first[split].total == sum(s.count for s in first[split].shards) <= 100
        assert [s.count for s in first[split].shards][:2] == [40, 40]


def test_fashion_mnist_samples_have_real_images_and_captions(tmp_path):
    import io
    import tarfile

    import numpy as np

    index = build("fashion_mnist", tmp_path, shard_size=50, limit=50)["train"]
    with tarfile.open(tmp_path / "train" / index.shards[0].name) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    image = np.load(io.BytesIO(members["000000.image.npy"]))
    meta = json.loads(members["000000.json"])
    assert image.shape == (28, 28) and image.dtype == np.uint8 and image.std() > 10
    assert meta["class_name"] in members["000000.txt"].decode()
    captions = {members[f"{i:06d}.txt"].decode() for i in range(50)}
    assert len(captions) > 10  # several templates and classes


def test_qm9_and_adult_content(tmp_path):
    import io
    import tarfile

    import numpy as np

    index = build("qm9", tmp_path / "qm9", shard_size=100, limit=20, heavy_atoms_only=True)["train"]
    with tarfile.open(tmp_path / "qm9" / "train" / index.shards[0].name) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    atoms = np.load(io.BytesIO(members["000002.atoms.npy"]))  # QM9 #2 is ammonia: N only (heavy atoms)
    assert atoms.tolist() == [7] and members["000002.smiles.txt"] == b"N"
    adult = build("adult", tmp_path / "adult", shard_size=100, limit=10)
    columns = adult["train"].extra["columns"]
    assert {c["name"]: c["kind"] for c in columns}["age"] == "numerical"
    assert {c["name"]: c.get("categories") for c in columns}["income"] == ["<=50K", ">50K"]


def test_missing_source_names_the_package(tmp_path):
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        build("fashion_mnist", tmp_path / "x", limit=5, source=str(tmp_path / "nowhere"))


def test_cli_build_info_and_refusal_to_overwrite(tmp_path):
    out = tmp_path / "shapes"
    done = scaleyard("data", "build", "shapes", "--out", str(out), "--limit", "30", "--shard-size", "10",
                     "--option", "resolution=12")
    assert done.returncode == 0, done.stderr
    assert "30 samples in 3 shards" in done.stdout
    info = scaleyard("data", "info", str(out), "--verify")
    assert info.returncode == 0 and "hashes verified" in info.stdout
    again = scaleyard("data", "build", "shapes", "--out", str(out), "--limit", "30")
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert load_index(out / "train").total == 30
    unknown = scaleyard("data", "build", "cifar", "--out", str(tmp_path / "c"))
    assert unknown.returncode == 2 and "fashion_mnist" in unknown.stderr
