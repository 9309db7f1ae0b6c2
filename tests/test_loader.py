"""Training input pipeline: shard order and shuffle-buffer seed per epoch, actors, dropped bad samples, equal
per-worker batches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from images import encode, gradient_array, write_shards
from processes import modules_after

from pipeline import schema
from pipeline.augment import build_eval_transform, build_train_transform
from pipeline.config import AugmentConfig, LoaderConfig
from pipeline.loader import (
    TrainInput,
    actor_count,
    batches_per_epoch,
    epoch_splits,
    iter_train_batches,
    label_selector,
    shard_order,
    shuffle_seed,
    worker_batches,
    worker_eval_batches,
)
from pipeline.preprocessing import Preprocessing
from pipeline.sources import Unit, open_images

PREP = Preprocessing(crop_size=16, resize_size=18)
LOADER = LoaderConfig(batch_size=4, shuffle_buffer=8, actors=2, actor_cpus=0.5, prefetch_batches=1)
AUGMENT = AugmentConfig(color_jitter=0.2)


def node(node_id: str, cpus: float, gpus: float = 0, alive: bool = True) -> dict:
    """A `ray.nodes()` entry."""
    resources = {"CPU": cpus, **({"GPU": gpus} if gpus else {})}
    return {"NodeID": node_id, "Alive": alive, "Resources": resources}


def test_the_loaders_modules_leave_torch_unimported():
    """The processes that only coordinate the input (Ray Data's split coordinator, `EpochSplits`, `ErrorLog`)
    unpickle these modules; an import of torch there would cost each about 1.5 CPU-seconds at start."""
    assert modules_after("import pipeline.loader, pipeline.sources, pipeline.augment, pipeline.preprocessing") == []


def test_shard_order_is_a_seeded_permutation_per_epoch():
    units = [Unit(f"train-{i:06d}", "train", 10, (f"/d/train-{i:06d}.tar",)) for i in range(20)]
    first = shard_order(units, seed=0, epoch=0)
    assert sorted(u.name for u in first) == [u.name for u in units]
    assert first == shard_order(units, seed=0, epoch=0)
    assert first != shard_order(units, seed=0, epoch=1)
    assert first != shard_order(units, seed=1, epoch=0)


def test_shuffle_buffer_seed_is_fixed_by_seed_epoch_and_rank():
    seeds = {(s, e, r): shuffle_seed(s, e, r) for s in (0, 1) for e in (0, 1, 2) for r in (0, 1, 2)}
    assert all(shuffle_seed(*k) == v for k, v in seeds.items())  # the same on every call (and machine)
    assert len(set(seeds.values())) == len(seeds)  # another seed, epoch or rank: another buffer order
    assert all(0 <= v < 2**32 for v in seeds.values())


def test_actor_pool_follows_the_cluster_cpus():
    nodes = [node("head", 8), node("gpu", 16, gpus=2), node("dead", 64, alive=False)]
    assert actor_count(LoaderConfig(), nodes) == 23  # 24 CPUs alive, 1 reserved, 1 CPU each
    assert actor_count(LoaderConfig(actor_cpus=0.5, reserved_cpus=4), nodes) == 40
    assert actor_count(LoaderConfig(cpu_only_nodes=True), nodes) == 7
    assert actor_count(LoaderConfig(actors=3), nodes) == 3
    assert actor_count(LoaderConfig(), [node("tiny", 1)]) == 1


def test_actors_can_be_pinned_to_cpu_only_nodes():
    nodes = [node("head", 8), node("gpu-b", 16, gpus=2), node("gpu-a", 16, gpus=1)]
    assert label_selector(LoaderConfig(), nodes) == {}
    pinned = label_selector(LoaderConfig(cpu_only_nodes=True, actor_labels={"pool": "cpu"}), nodes)
    assert pinned == {"pool": "cpu", "ray.io/node-id": "!in(gpu-a,gpu-b)"}
    assert label_selector(LoaderConfig(cpu_only_nodes=True), [node("head", 8)]) == {}
    with pytest.raises(ValueError, match="every node of the cluster has GPUs"):
        label_selector(LoaderConfig(cpu_only_nodes=True), [node("gpu-a", 16, gpus=1)])


def test_batches_per_epoch_floors_the_split_and_the_batch():
    assert batches_per_epoch(44, 2, 4) == 5
    assert batches_per_epoch(47, 3, 5) == 3


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """45 train samples in 5 shards (the 23rd corrupt), 6 val samples; 40x30 JPEGs."""
    root = tmp_path_factory.mktemp("prepared")
    train = [(f"img{i:03d}", encode(gradient_array(40, 30, seed=i), "JPEG", quality=90), i % 3) for i in range(45)]
    key, data, label = train[22]
    scan = data.index(b"\xff\xda")  # cut inside the entropy-coded data: the header still reads
    train[22] = (key, data[: scan + (len(data) - scan) // 2], label)
    val = [(f"val{i:03d}", encode(gradient_array(40, 30, seed=100 + i), "JPEG", quality=90), i % 3) for i in range(6)]
    write_shards(root, {"train": train, "val": val}, per_shard=10, classes=["a", "b", "c"])
    return root


def expected_train_pixels(dataset_dir, keys, epoch: int) -> dict[str, np.ndarray]:
    """What the train transform gives these keys in this epoch, without Ray."""
    import tarfile

    data = {}
    for shard in sorted(dataset_dir.glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    data[m.name[:-4]] = tar.extractfile(m).read()
    batch = {
        schema.KEY: np.array(keys, dtype=object),
        schema.IMAGE: np.array([data[k] for k in keys], dtype=object),
        schema.ERROR: np.array([""] * len(keys), dtype=object),
    }
    out = build_train_transform(PREP, AUGMENT)(batch, epoch=epoch)
    return dict(zip(keys, out[schema.PIXELS]))


@pytest.mark.timeout(180)
def test_train_dataset_augments_in_actors_and_drops_bad_samples(ray_session, dataset_dir):
    source = open_images(str(dataset_dir), splits=["train"])
    train_input = TrainInput(source, PREP, AUGMENT, LOADER)
    rows = train_input.dataset(epoch=0).take_all()
    keys = sorted(r[schema.KEY] for r in rows)
    assert keys == sorted(f"img{i:03d}" for i in range(45) if i != 22)
    assert set(rows[0]) == {schema.KEY, schema.LABEL, schema.PIXELS}
    assert all(r[schema.PIXELS].shape == (16, 16, 3) and r[schema.PIXELS].dtype == np.uint8 for r in rows)
    assert {r[schema.KEY]: r[schema.LABEL] for r in rows}["img005"] == 2
    # The actors applied epoch 0's augmentation: the same pixels as the transform without Ray.
    expected = expected_train_pixels(dataset_dir, keys[:6], epoch=0)
    got = {r[schema.KEY]: r[schema.PIXELS] for r in rows}
    assert all(np.array_equal(got[k], expected[k]) for k in keys[:6])
    dropped = train_input.dropped()
    assert dropped["dropped"] == {0: 1}
    assert dropped["examples"][0]["key"] == "img022"
    assert "undecodable" in dropped["examples"][0]["reason"]


@pytest.mark.timeout(180)
def test_every_worker_gets_the_same_number_of_batches(ray_session, dataset_dir):
    ray = ray_session
    source = open_images(str(dataset_dir), splits=["train"])
    splits = epoch_splits(TrainInput(source, PREP, AUGMENT, LOADER), world_size=2)

    @ray.remote(num_cpus=0.25)
    def train_worker(epoch: int, rank: int) -> list[tuple[list[str], tuple, list[int]]]:
        return [
            (
                list(b[schema.KEY]),
                b[schema.PIXELS].shape,
                b[schema.PIXELS].reshape(len(b[schema.KEY]), -1).sum(1).tolist(),
            )
            for b in worker_batches(splits, LOADER, epoch, rank)
        ]

    seen = {}
    for epoch in (0, 1):
        ranks = ray.get([train_worker.remote(epoch, r) for r in range(2)])
        # 44 good rows, split equally (22 each), 5 full batches of 4 per worker.
        assert [len(batches) for batches in ranks] == [5, 5] == [batches_per_epoch(44, 2, 4)] * 2
        assert all(shape == (4, 16, 16, 3) for batches in ranks for _, shape, _ in batches)
        keys = [k for batches in ranks for ks, _, _ in batches for k in ks]
        assert len(keys) == len(set(keys)) == 40 and "img022" not in keys
        seen[epoch] = {k: s for batches in ranks for ks, _, sums in batches for k, s in zip(ks, sums)}
    common = set(seen[0]) & set(seen[1])
    assert len(common) >= 30
    assert sum(seen[0][k] != seen[1][k] for k in common) >= len(common) - 2  # new augmentation per epoch

    # A worker group lost after one rank was served its part of epoch 2: the restarted group's ranks share a
    # fresh split, whichever asks first (a part of the old one, whose barrier still waits for the lost rank's
    # consumer, would hang the run).
    ray.get(splits.iterator.remote(2, 0, "train", "lost group"))
    parts = [ray.get(splits.iterator.remote(2, rank, "train", "new group")) for rank in (1, 0)]

    @ray.remote(num_cpus=0.25)
    def consume(part, rank: int) -> list[str]:
        return [k for b in iter_train_batches(part, LOADER, 2, rank) for k in b[schema.KEY]]

    keys = [
        k for got in ray.get([consume.remote(part, rank) for part, rank in zip(parts, (1, 0))], timeout=90) for k in got
    ]
    assert len(keys) == len(set(keys)) == 40


@pytest.mark.timeout(180)
def test_eval_rows_are_not_augmented_and_each_comes_once(ray_session, dataset_dir):
    ray = ray_session
    source = open_images(str(dataset_dir))
    # Pinning by node label: here, to the one local node.
    pinned = LOADER.model_copy(
        update={"actor_labels": {"ray.io/node-id": f"in({ray.get_runtime_context().get_node_id()})"}}
    )
    train_input = TrainInput(source.select(["train"]), PREP, AUGMENT, pinned, val=source.select(["val"]))
    splits = epoch_splits(train_input, world_size=2)

    @ray.remote(num_cpus=0.25)
    def eval_worker(epoch: int, rank: int) -> dict[str, np.ndarray]:
        batches = worker_eval_batches(splits, pinned, epoch, rank)
        return {k: p for b in batches for k, p in zip(b[schema.KEY], b[schema.PIXELS])}

    coordinators = split_coordinators()
    parts = ray.get([eval_worker.remote(0, r) for r in range(2)])
    assert sorted(k for part in parts for k in part) == [f"val{i:03d}" for i in range(6)]  # each once
    rows = {k: p for part in parts for k, p in part.items()}
    data = encode(gradient_array(40, 30, seed=103), "JPEG", quality=90)
    batch = {schema.KEY: np.array(["val003"], dtype=object), schema.IMAGE: np.array([data], dtype=object)}
    assert np.array_equal(rows["val003"], build_eval_transform(PREP)(batch)[schema.PIXELS][0])
    # The next epoch iterates the same split again: the same rows, and no second split coordinator.
    again = {k: p for part in ray.get([eval_worker.remote(1, r) for r in range(2)]) for k, p in part.items()}
    assert again.keys() == rows.keys() and all(np.array_equal(again[k], rows[k]) for k in rows)
    assert split_coordinators() == coordinators + 1
    with pytest.raises(ValueError, match="no validation source"):
        TrainInput(source.select(["train"]), PREP, AUGMENT, LOADER).eval_dataset()


def split_coordinators() -> int:
    """How many `streaming_split` coordinators this Ray has started, live or gone (the GCS's actor table)."""
    import ray

    return sum(a["ActorClassName"] == "SplitCoordinator" for a in ray._private.state.actors().values())


def epoch_keys(source, loader: LoaderConfig, epoch: int) -> list[str]:
    """The keys of one worker's batches of `epoch`, in order, through a real `TrainInput`."""
    rows = TrainInput(source, PREP, AugmentConfig(preset="none"), loader).dataset(epoch)
    return [k for batch in iter_train_batches(rows, loader, epoch) for k in batch[schema.KEY]]


@pytest.mark.timeout(180)
def test_batch_order_follows_the_shard_order_and_the_buffer_seed(ray_session, dataset_dir):
    """The shard order of each epoch, then the seeded local shuffle: the same (seed, epoch) gives the
    same batches in the same order, another seed or epoch another order."""
    source = open_images(str(dataset_dir), splits=["train"])
    in_shard_order = LOADER.model_copy(update={"pool": "tasks", "shuffle_buffer": 0})
    orders = []
    for epoch in (0, 1):
        keys = epoch_keys(source, in_shard_order, epoch)
        shards = list(dict.fromkeys(f"train-{int(k[3:]) // 10:06d}" for k in keys))
        assert shards == [u.name for u in shard_order(source.units, LOADER.seed, epoch)], (epoch, shards)
        assert keys == sorted(keys, key=lambda k: (shards.index(f"train-{int(k[3:]) // 10:06d}"), k))
        orders.append(shards)
    assert orders[0] != orders[1]

    # One shard, so that only the shuffle buffer orders the rows: 10 rows, 2 full batches of 4.
    one = replace(source, units=source.units[:1])
    shuffled = LOADER.model_copy(update={"pool": "tasks", "shuffle_buffer": 16})
    first = epoch_keys(one, shuffled, 0)
    assert len(first) == 8 and first == epoch_keys(one, shuffled, 0)
    assert first != [f"img{i:03d}" for i in range(8)]  # shuffled, not read order
    assert first != epoch_keys(one, shuffled, 1)
    assert first != epoch_keys(one, shuffled.model_copy(update={"seed": 1}), 0)
