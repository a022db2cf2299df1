import json
import shutil
import tarfile
from collections import Counter

import fsspec
import pytest
import torch
import webdataset
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from retfm.cli.main import app
from retfm.data import Manifest
from retfm.data.config import IngestConfig
from retfm.data.datasets import ManifestDataset, Preprocessing, eval_transform, train_transform
from retfm.data.ingest import ingest
from retfm.data.phantoms import generate_cohort
from retfm.data.shards import ShardDataset, write_shards
from retfm.errors import RetfmError
from retfm.hashing import file_sha256

PRE = Preprocessing(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """12 phantom images from 2 sites, ingested, then sharded 5 per shard (5 + 5 + 2)."""
    root = tmp_path_factory.mktemp("shards")
    generate_cohort(root / "raw", sites=2, per_site=6, size=96, seed=0)
    ingest(root / "raw", root / "ds", IngestConfig(size=64, workers=1))
    write_shards(root / "ds", root / "shards", shard_size=5)
    return root


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _ids(dataset) -> list[str]:
    return [item["image_id"] for item in dataset]


def test_index_counts_shards_and_names_the_manifest(cohort):
    index = json.loads((cohort / "shards/index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s["count"] for s in index["shards"]] == [5, 5, 2] and index["total"] == 12
    assert all(s["sha256"] == file_sha256(cohort / "shards" / s["file"]) for s in index["shards"])
    assert index["source_manifest_sha256"] == file_sha256(cohort / "ds/manifest.parquet")
    assert index["columns"][0] == "image_id" and {"site", "dr_grade", "patient_id"} <= set(index["columns"])
    assert not {"source", "path"} & set(index["columns"])
    assert index["deidentified"] is False and index["retfm_version"]
    assert sorted(p.name for p in (cohort / "shards").iterdir()) == [
        "index.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]  # no temporary files left


def test_shards_hold_the_ingested_bytes_and_safe_rows(cohort):
    table = Manifest.read(cohort / "ds").table.set_index("image_id")
    seen = []
    for tar_path in sorted((cohort / "shards").glob("*.tar")):
        members = _members(tar_path)
        for name, data in members.items():
            key, extension = name.split(".")
            if extension == "png":
                assert data == (cohort / "ds" / table.loc[key, "path"]).read_bytes()  # not re-encoded
                seen.append(key)
            else:
                row = json.loads(data)
                assert row["image_id"] == key and row["dr_grade"] == table.loc[key, "dr_grade"]
                assert row["site"] == table.loc[key, "site"] and row["age"] == table.loc[key, "age"]
    assert seen == list(table.index)  # manifest order


def test_no_original_file_name_reaches_a_shard(cohort):
    sources = Manifest.read(cohort / "ds").table["source"].tolist()
    assert any("site1_P0001_R" in s for s in sources)
    blobs = [p.read_bytes() for p in (cohort / "shards").iterdir()]
    for source in sources:
        stem = source.rsplit("/", 1)[-1].rsplit(".", 1)[0].encode()
        assert not any(stem in blob for blob in blobs), source


def test_resharding_is_byte_identical_and_replaces_old_shards(cohort, tmp_path):
    write_shards(cohort / "ds", tmp_path / "again", shard_size=5)
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "index.json"):
        assert (tmp_path / "again" / name).read_bytes() == (cohort / "shards" / name).read_bytes()
    write_shards(cohort / "ds", tmp_path / "again", shard_size=8, shuffle_seed=3)
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == ["index.json", "shard-000000.tar",
                                                                       "shard-000001.tar"]
    shuffled = _ids(ShardDataset(tmp_path / "again", shuffle_shards=False))
    in_order = _ids(ShardDataset(cohort / "shards", shuffle_shards=False))
    assert sorted(shuffled) == sorted(in_order) and shuffled != in_order
    assert in_order == Manifest.read(cohort / "ds").table["image_id"].tolist()


def test_streaming_matches_manifest_dataset(cohort):
    reference = {item["image_id"]: item for item in
                 ManifestDataset(Manifest.read(cohort / "ds"), eval_transform(PRE), label="dr_grade")}
    dataset = ShardDataset(cohort / "shards", eval_transform(PRE), label="dr_grade", shuffle_buffer=4)
    items = list(dataset)
    assert len(dataset) == 12 and sorted(i["image_id"] for i in items) == sorted(reference)
    for item in items:
        expected = reference[item["image_id"]]
        assert torch.equal(item["image"], expected["image"])
        assert {k: item[k] for k in expected if k != "image"} == {k: v for k, v in expected.items() if k != "image"}
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["label"].dtype == torch.int64


def test_brace_patterns_and_fsspec_urls_stream_the_same_samples(cohort):
    expected = sorted(_ids(ShardDataset(cohort / "shards")))
    pattern = ShardDataset(str(cohort / "shards/shard-{000000..000002}.tar"))
    assert len(pattern) == 12 and sorted(_ids(pattern)) == expected
    assert sorted(_ids(ShardDataset(f"file://{cohort / 'shards'}"))) == expected
    memory = fsspec.filesystem("memory")
    try:
        for path in (cohort / "shards").iterdir():
            memory.pipe(f"/retfm-test-shards/{path.name}", path.read_bytes())
        remote = ShardDataset("memory://retfm-test-shards")
        assert len(remote) == 12 and sorted(_ids(remote)) == expected
    finally:
        memory.rm("/retfm-test-shards", recursive=True)


def test_two_workers_together_see_every_sample_once(cohort):
    dataset = ShardDataset(cohort / "shards", eval_transform(PRE), label="dr_grade")
    seen = Counter()
    for batch in DataLoader(dataset, batch_size=3, num_workers=2):
        seen.update(batch["image_id"])
    assert len(seen) == 12 and set(seen.values()) == {1}


def test_ranks_split_shards_without_overlap(cohort, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        dataset = ShardDataset(cohort / "shards")
        ids = _ids(dataset)
        assert len(dataset) == len(ids)  # len() is this rank's share, from index.json
        per_rank.append(set(ids))
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) == 12
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RetfmError, match="3 shard.*4 ranks"):
        list(ShardDataset(cohort / "shards"))


def test_set_epoch_reshuffles_deterministically_and_augments_per_sample(cohort, tmp_path):
    write_shards(cohort / "ds", tmp_path / "small", shard_size=2)
    dataset = ShardDataset(tmp_path / "small", seed=5, shuffle_buffer=4)
    first = _ids(dataset)
    assert _ids(dataset) == first
    dataset.set_epoch(1)
    second = _ids(dataset)
    assert second != first and sorted(second) == sorted(first)
    dataset.set_epoch(0)
    assert _ids(dataset) == first
    augmented = ShardDataset(tmp_path / "small", train_transform(PRE), seed=5)

    def images(workers):
        loader = DataLoader(augmented, batch_size=4, num_workers=workers)
        return {i: image for batch in loader for i, image in zip(batch["image_id"], batch["image"], strict=True)}

    serial, parallel = images(0), images(2)
    assert all(torch.equal(serial[i], parallel[i]) for i in serial)  # whatever the number of workers
    augmented.set_epoch(1)
    assert any(not torch.equal(serial[i], image) for i, image in images(0).items())


def test_broken_shards_are_named(cohort, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cohort / "shards", broken)
    data = (broken / "shard-000001.tar").read_bytes()
    (broken / "shard-000001.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(RetfmError, match=r"shard-000001\.tar: unreadable shard at member \w+\.png"):
        list(ShardDataset(broken))
    with tarfile.open(cohort / "shards/shard-000001.tar") as tar:
        first_sample = tar.getmembers()[1]
    end = first_sample.offset_data + -(-first_sample.size // 512) * 512
    (broken / "shard-000001.tar").write_bytes(data[:end])  # cut cleanly after the first sample: a valid short tar
    with pytest.raises(RetfmError, match=r"shard-000001\.tar: 1 sample.*index\.json lists 5.*truncated"):
        list(ShardDataset(broken))
    (broken / "shard-000001.tar").unlink()
    with pytest.raises(RetfmError, match=r"shard-000001\.tar: shard not found"):
        list(ShardDataset(broken))

    not_image, no_image = tmp_path / "not-image.tar", tmp_path / "no-image.tar"
    with webdataset.TarWriter(str(not_image), encoder=False) as tar:
        tar.write({"__key__": "a", "png": b"not an image", "json": b'{"image_id": "a"}'})
    with webdataset.TarWriter(str(no_image), encoder=False) as tar:
        tar.write({"__key__": "b", "txt": b"hello", "json": b'{"image_id": "b"}'})
    with pytest.raises(RetfmError, match=r"not-image\.tar: member a\.png is not a readable image"):
        list(ShardDataset([str(not_image)]))
    with pytest.raises(RetfmError, match=r"no-image\.tar: sample b has no image member \(members: b\.json, b\.txt\)"):
        list(ShardDataset([str(no_image)]))
    with pytest.raises(TypeError, match="no index.json"):  # the protocol for "no length"; list() relies on it
        len(ShardDataset([str(no_image)]))


def test_columns_are_chosen_and_identifying_ones_refused(cohort, tmp_path):
    index = write_shards(cohort / "ds", tmp_path / "few", shard_size=20, split="train", columns=["dr_grade"])
    assert index["columns"] == ["image_id", "dr_grade"] and index["split"] == "train"
    rows = [json.loads(v) for k, v in _members(tmp_path / "few/shard-000000.tar").items() if k.endswith(".json")]
    assert len(rows) == index["total"] and all(set(r) == {"image_id", "dr_grade"} for r in rows)
    with pytest.raises(RetfmError, match="manifest.parquet: column 'source' cannot go into shards"):
        write_shards(cohort / "ds", tmp_path / "bad", columns=["source"])
    with pytest.raises(RetfmError, match="column 'nope' is not in the manifest"):
        write_shards(cohort / "ds", tmp_path / "bad", columns=["nope"])
    with pytest.raises(RetfmError, match="label column 'glaucoma' not in the shards"):
        ShardDataset(tmp_path / "few", label="glaucoma")


def test_cli_shards_and_explains_itself(cohort, tmp_path):
    runner = CliRunner()
    help_text = runner.invoke(app, ["data", "shard", "--help"])
    assert help_text.exit_code == 0 and "--shard-size" in help_text.output
    result = runner.invoke(app, ["data", "shard", str(cohort / "ds"), "--out", str(tmp_path / "cli"),
                                 "--shard-size", "5", "--split", "test", "--shuffle", "--seed", "1"])
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "cli/index.json").read_text())
    assert index["shuffle_seed"] == 1 and index["split"] == "test"
    assert index["total"] == (Manifest.read(cohort / "ds").table["split"] == "test").sum()
