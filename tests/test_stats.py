import pandas as pd
import pytest

from retfm.data import Manifest
from retfm.data.stats import manifest_stats


def test_counts_quality_and_representativeness(tmp_path):
    table = pd.DataFrame({
        "image_id": [f"i{k}" for k in range(10)], "path": [f"images/{k}.png" for k in range(10)],
        "site": ["a"] * 6 + ["b"] * 4, "split": ["train"] * 5 + ["val"] * 1 + ["test"] * 4,
        "sex": ["F", "M"] * 5, "age": [35, 45, 55, 65, 75, 85, 45, 55, None, 65],
        "quality": [0.1 * k for k in range(10)], "dr_grade": [0, 1, 2, 0, 1, 2, 0, 1, 2, 0],
    })
    stats = manifest_stats(Manifest(table, tmp_path))
    assert stats["images"] == 10 and stats["splits"] == {"train": 5, "val": 1, "test": 4}
    assert stats["groups"]["site"]["a"] == {"all": 6, "train": 5, "val": 1, "test": 0}
    assert stats["groups"]["age_band"]["unknown"]["all"] == 1 and stats["groups"]["age_band"]["40-49"]["all"] == 2
    assert stats["labels"]["dr_grade"]["0"]["all"] == 4
    assert stats["quality"]["below_0.5"] == 5 and stats["quality"]["p50"] == pytest.approx(0.45)
    site_a = next(r for r in stats["representativeness"] if r["column"] == "site" and r["group"] == "a")
    assert site_a["share"] == 0.6 and site_a["share_train"] == 1.0 and site_a["share_test"] == 0.0
    assert site_a["max_gap_pp"] == 60.0
