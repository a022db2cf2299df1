import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from retfm.data import Manifest
from retfm.data.datasets import ManifestDataset, Preprocessing, eval_transform, train_transform
from retfm.errors import RetfmError
from tests.conftest import fundus_rgb


@pytest.fixture
def manifest(tmp_path):
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(fundus_rgb(64, seed=i)).save(tmp_path / f"images/{i}.png")
        rows.append({"image_id": f"id{i}", "path": f"images/{i}.png", "site": f"s{i % 2}",
                     "split": "train" if i < 4 else "test", "sex": "F" if i % 2 else None,
                     "age": float(50 + i) if i != 3 else None, "dr_grade": i % 3 if i != 5 else None})
    manifest = Manifest(pd.DataFrame(rows), tmp_path)
    manifest.write()
    return Manifest.read(tmp_path)


def test_items_carry_image_label_id_and_groups(manifest):
    pre = Preprocessing(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    dataset = ManifestDataset(manifest, eval_transform(pre), label="dr_grade")
    assert len(dataset) == 5  # the row without a label is left out
    item = dataset[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0 and item["image"].min() < -0.9  # black surround
    assert (item["image_id"], item["label"], item["site"], item["sex"]) == ("id0", 0, "s0", "unknown")
    batch = next(iter(DataLoader(dataset, batch_size=5)))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["label"].tolist() == [0, 1, 2, 0, 1]
    assert torch.isnan(batch["age"][3]) and batch["age"][0] == 50
    assert torch.equal(dataset[2]["image"], dataset[2]["image"])  # evaluation is deterministic
    assert len(ManifestDataset(manifest, split="test")) == 2


def test_train_augmentation_is_reproducible_per_seed_epoch_and_index(manifest):
    transform = train_transform(Preprocessing(size=32))
    a = ManifestDataset(manifest, transform, seed=1)
    b = ManifestDataset(manifest, transform, seed=1)
    assert torch.equal(a[1]["image"], b[1]["image"])
    assert not torch.equal(a[1]["image"], ManifestDataset(manifest, transform, seed=2)[1]["image"])
    first = a[1]["image"]
    a.set_epoch(1)
    assert not torch.equal(first, a[1]["image"])
    serial = torch.cat([x["image"] for x in DataLoader(b, batch_size=3, num_workers=0)])
    parallel = torch.cat([x["image"] for x in DataLoader(b, batch_size=3, num_workers=2)])
    assert torch.equal(serial, parallel)  # the same images whatever the number of loader workers


def test_unknown_label_is_named(manifest):
    with pytest.raises(RetfmError, match="label column 'glaucoma' not in the manifest.*dr_grade"):
        ManifestDataset(manifest, label="glaucoma")
