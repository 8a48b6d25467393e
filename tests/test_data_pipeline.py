"""The reading contract: every sample once per epoch over ranks x workers, deterministic
order, exact resume at any global index and on another world size, loud bad-data handling."""

import itertools
import os

import pytest

from scaleyard.data_loaders.index import DataError, load_index
from scaleyard.data_loaders.pipeline import ShardStream, StreamConfig, stack
from scaleyard.data_loaders.writer import write_split

TOTAL = 204  # 11 shards of 20 (the last holds 4): uneven on purpose


class KeyDecoder:
    def __call__(self, raw, position):
        return {"key": raw["__key__"], "value": int(raw["value.txt"])}


def write_numbers(folder, total=TOTAL, shard_size=20):
    samples = ({"__key__": f"{i:05d}", "value.txt": str(i)} for i in range(total))
    return write_split(samples, folder, builder="numbers", version="1", split="train",
                       schema={"value.txt": "int"}, shard_size=shard_size, seek_every=4)


@pytest.fixture()
def numbers(tmp_path):
    write_numbers(tmp_path / "numbers")
    return load_index(tmp_path / "numbers")


def positions(index, *, world=1, rank=0, workers=0, start=0, steps=5, batch=8, seed=0, lanes=4, block=7):
    config = StreamConfig(seed=seed, lanes=lanes, shuffle_block=block, num_workers=workers)
    stream = ShardStream(index, config, decode=KeyDecoder(), collate=stack, batch_per_rank=batch,
                         rank=rank, world_size=world, start=start)
    return [batch["value"] for batch in itertools.islice(iter(stream), steps)], stream


def global_sequence(index, world, workers, steps, batch, start=0, seed=0):
    """Per global batch: the union of every rank's samples (sorted, since DDP sums over ranks)."""
    per_rank = [positions(index, world=world, rank=r, workers=workers, steps=steps, batch=batch // world,
                          start=start, seed=seed)[0] for r in range(world)]
    return [sorted(itertools.chain(*(per_rank[r][k] for r in range(world)))) for k in range(steps)]


def test_two_ranks_two_workers_cover_each_epoch_exactly_once(numbers):
    steps = 2 * TOTAL // 12 + 1  # a bit more than two epochs of 12-sample global batches
    seen = list(itertools.chain(*global_sequence(numbers, world=2, workers=2, steps=steps, batch=12)))
    first, second = seen[:TOTAL], seen[TOTAL : 2 * TOTAL]
    assert sorted(first) == list(range(TOTAL))
    assert sorted(second) == list(range(TOTAL))
    single = list(itertools.chain(*global_sequence(numbers, world=1, workers=0, steps=steps, batch=12)))
    assert seen == single  # same global batches with 1 rank / 0 workers and 2 ranks / 2 workers


def test_order_depends_on_epoch_and_seed_only(numbers):
    one_epoch = -(-TOTAL // 8)
    run_a, _ = positions(numbers, steps=2 * one_epoch)
    run_b, _ = positions(numbers, steps=2 * one_epoch)
    other_seed, _ = positions(numbers, steps=one_epoch, seed=1)
    flat = list(itertools.chain(*run_a))
    assert run_a == run_b
    assert flat[:TOTAL] != flat[TOTAL : 2 * TOTAL]
    assert list(itertools.chain(*other_seed))[:TOTAL] != flat[:TOTAL]
    assert flat[:TOTAL] != list(range(TOTAL))  # shuffled at all


@pytest.mark.parametrize("start", [0, 8, 13, 101, 200, 205, 333])
def test_resume_at_any_global_index_matches_uninterrupted(numbers, start):
    """Including mid-shard, mid-row and across the epoch boundary."""
    full, _ = positions(numbers, steps=60, batch=1)
    flat = list(itertools.chain(*full))
    resumed, _ = positions(numbers, steps=60 - start if start < 60 else 20, batch=1, start=start)
    expected, _ = positions(numbers, steps=start + 20, batch=1)
    assert list(itertools.chain(*resumed))[:20] == list(itertools.chain(*expected))[start : start + 20]
    assert flat[: min(start, 60)] == list(itertools.chain(*expected))[: min(start, 60)]


def test_world_size_two_then_one_continues_the_same_sequence(numbers):
    uninterrupted = global_sequence(numbers, world=1, workers=0, steps=40, batch=8)
    first_part = global_sequence(numbers, world=2, workers=1, steps=15, batch=8)
    _, stream = positions(numbers, world=2, rank=0, steps=15, batch=4)
    resume_at = stream.state_dict()["global_index"]
    assert resume_at == 15 * 8
    second_part = global_sequence(numbers, world=1, workers=0, steps=25, batch=8, start=resume_at)
    assert first_part + second_part == uninterrupted


def test_resume_does_not_open_earlier_shards(numbers, monkeypatch):
    from scaleyard.data_loaders import pipeline
    from scaleyard.data_loaders.order import EpochOrder, OrderSpec

    opened = []
    original = pipeline.read_shard

    def recording(source, first, required):
        opened.append((source.url, first))
        return original(source, first, required)

    monkeypatch.setattr(pipeline, "read_shard", recording)
    positions(numbers, steps=1, batch=1, lanes=1, start=150, block=4)
    # lanes=1: the global order is the flat order; position 150 sits in one shard, entered at the
    # start of its shuffle block (148), by seeking to a recorded offset
    slot, offset = EpochOrder(OrderSpec.from_index(numbers, 0, 1, 4), 0).locate(148)
    assert len(opened) == 1
    assert opened[0][1] == offset and opened[0][0].endswith(numbers.shards[EpochOrder(
        OrderSpec.from_index(numbers, 0, 1, 4), 0).shard_order[slot]].name)


def test_seeking_into_a_shard_reads_the_same_samples(numbers):
    from scaleyard.data_loaders.pipeline import ShardSource, read_shard

    shard = numbers.shards[0]
    url = numbers.shard_url(shard)
    seeking = ShardSource(url, shard.count, shard.offsets, numbers.seek_every)
    streaming = ShardSource(url, shard.count, (), 0)
    assert seeking.seekable and not streaming.seekable and len(shard.offsets) == 5
    for first in (0, 1, 7, 19):
        keys = [s["__key__"] for s, _ in read_shard(seeking, first, ("value.txt",))]
        assert keys == [s["__key__"] for s, _ in read_shard(streaming, first, ("value.txt",))]
        assert len(keys) == shard.count - first


def test_missing_shard_is_an_error_naming_it(numbers):
    os.remove(os.path.join(numbers.root, numbers.shards[3].name))
    with pytest.raises(DataError, match=numbers.shards[3].name):
        positions(numbers)


def test_changed_shard_fails_hash_verification(numbers):
    path = os.path.join(numbers.root, numbers.shards[2].name)
    with open(path, "r+b") as handle:
        handle.seek(600)
        handle.write(b"X")
    positions(numbers, steps=1)  # without verification the run starts
    config = StreamConfig(verify_hashes=True, lanes=4)
    with pytest.raises(DataError, match=f"{numbers.shards[2].name}.*sha256"):
        ShardStream(numbers, config, decode=KeyDecoder(), collate=stack, batch_per_rank=4)


def test_truncated_shard_and_missing_field_are_skipped_and_counted(tmp_path):
    samples = [{"__key__": f"{i:05d}", "value.txt": str(i)} for i in range(60)]
    del samples[5]["value.txt"]
    samples[5]["other.txt"] = "no value here"
    write_split(iter(samples), tmp_path / "d", builder="numbers", version="1", split="train",
                schema={"value.txt": "int"}, shard_size=20)
    index = load_index(tmp_path / "d")
    shard = os.path.join(index.root, index.shards[1].name)
    with open(shard, "r+b") as handle:
        handle.truncate(os.path.getsize(shard) // 2)
    batches, stream = positions(index, steps=6, batch=10, lanes=1, block=20)
    values = sorted(v for batch in batches for v in batch)
    assert 5 not in values and 19 in values and 59 in values
    assert len(values) == 60 - stream.skipped
    assert 6 <= stream.skipped <= 12  # the missing field, and about half of shard 1
    assert any("lacks field" in p for p in stream.problems)
    assert any("ended after" in p for p in stream.problems)


def test_lanes_must_divide_by_world_size(numbers):
    with pytest.raises(DataError, match="data.lanes"):
        positions(numbers, world=3, lanes=4)


def test_shards_read_through_pipe_urls(numbers, tmp_path):
    """Shards on other storage: webdataset opens `pipe:` commands (and fsspec URLs) the same way."""
    local, _ = positions(numbers, steps=30, batch=8)
    storage = tmp_path / "storage"  # the shards leave the index's folder: only the pipe can find them
    storage.mkdir()
    for shard in numbers.shards:
        os.rename(os.path.join(numbers.root, shard.name), storage / shard.name)
    config = StreamConfig(lanes=4, shuffle_block=7, shard_base=f"pipe:cat {storage}/{{name}}")
    stream = ShardStream(numbers, config, decode=KeyDecoder(), collate=stack, batch_per_rank=8)
    piped = [batch["value"] for batch in itertools.islice(iter(stream), 30)]
    assert piped == local
