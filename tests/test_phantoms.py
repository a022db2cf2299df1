"""Phantom fundus cohorts: site profiles, label table, determinism, geometry and visible disease signs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from retfm.data.phantoms import (COUNTRIES, LABEL_COLUMNS, SiteProfile, generate_cohort, render_fundus,
                                 site_profiles)

SITES = site_profiles(4, seed=0)
REFERENCE = SITES[0]


def render(seed: int = 3, size: int = 192, *, eye: str = "R", dr_grade: int = 0, cdr: float = 0.3, amd: bool = False,
           site: SiteProfile = REFERENCE, lesions: float = 1.0) -> tuple[np.ndarray, dict]:
    return render_fundus(np.random.default_rng(seed), size, eye=eye, dr_grade=dr_grade, cdr=cdr, amd=amd, site=site,
                         lesions=lesions)


def disc_window(rgb: np.ndarray, geometry: dict, radii: float = 0.25) -> np.ndarray:
    half = round(radii * geometry["fov_r"])
    x, y = round(geometry["disc_x"]), round(geometry["disc_y"])
    return rgb[y - half:y + half + 1, x - half:x + half + 1].astype(int)


def fov_pixels(rgb: np.ndarray, geometry: dict, inside: float = 0.9) -> np.ndarray:
    yy, xx = np.mgrid[:rgb.shape[0], :rgb.shape[1]]
    return rgb[np.hypot(xx - geometry["fov_cx"], yy - geometry["fov_cy"]) < inside * geometry["fov_r"]].astype(float)


def disc_is_pale(rgb: np.ndarray, geometry: dict) -> bool:
    """The optic disc is where the geometry says: there, green (low elsewhere in the fundus) is high."""
    return np.median(disc_window(rgb, geometry, 0.08)[..., 1]) > 2 * np.median(fov_pixels(rgb, geometry)[:, 1])


# ---- sites ------------------------------------------------------------------------------------------------------

def test_site_profiles_are_deterministic_and_do_not_depend_on_the_number_of_sites():
    assert site_profiles(4, seed=0) == SITES
    assert site_profiles(6, seed=0)[:4] == SITES
    assert site_profiles(4, seed=1) != SITES
    assert [s.name for s in SITES] == ["site1", "site2", "site3", "site4"]
    assert [s.country for s in site_profiles(10, seed=0)] == [COUNTRIES[k % len(COUNTRIES)] for k in range(10)]


def test_site_roles_and_ranges():
    profiles = site_profiles(12, seed=5)
    reference = profiles[0]
    assert (reference.colour_cast, reference.brightness, reference.blur_sigma, reference.scale) == ((1, 1, 1), 1, 0, 1)
    assert reference.layout == "circle" and not reference.notch and not reference.text_overlay
    assert any(p.brightness < 0.7 for p in profiles[:3])
    assert any(p.notch and p.text_overlay for p in profiles[:3])
    for p in profiles:
        assert 0.75 <= p.scale <= 1.5 and 70 <= p.jpeg_quality <= 95 and p.layout in ("circle", "clipped")
        assert len(p.dr_grade_probs) == 5 and sum(p.dr_grade_probs) == pytest.approx(1, abs=1e-3)
        assert 0 < p.glaucoma_prevalence < 1 and 0 < p.female_share < 1
        assert sum(share for _, share in p.ethnicity_mix) == pytest.approx(1)
    assert len({p.colour_cast for p in profiles}) == len(profiles)  # every site looks different
    assert len({p.dr_grade_probs for p in profiles}) == len(profiles)


# ---- cohort -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    calls = []
    table = generate_cohort(out, sites=3, per_site=7, size=96, seed=0, progress=calls.append)
    return out, table, calls


def test_labels_table_columns_rows_and_files(cohort):
    out, table, calls = cohort
    assert list(table.columns) == list(LABEL_COLUMNS)
    assert calls == [1] * 21
    on_disk = pd.read_csv(out / "labels.csv")
    assert list(on_disk.columns) == list(LABEL_COLUMNS) and len(on_disk) == 21
    pd.testing.assert_frame_equal(on_disk, table, check_dtype=False)
    assert table["path"].iloc[0] == "images/site1_P0001_R.jpg" and table["patient_id"].iloc[0] == "site1-P0001"
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(table["path"].str[len("images/"):])
    assert set(table["eye"]) == {"L", "R"} and set(table["sex"]) <= {"F", "M"}
    assert table["dr_grade"].between(0, 4).all() and table["age"].between(18, 95).all()
    assert (table["referable_dr"] == (table["dr_grade"] >= 2).astype(int)).all()
    assert set(table["glaucoma"]) <= {0, 1} and set(table["amd"]) <= {0, 1}
    assert (table["cdr"] == table["cdr"].round(2)).all()
    assert table.loc[table["glaucoma"] == 1, "cdr"].between(0.6, 0.9).all()
    assert table.loc[table["glaucoma"] == 0, "cdr"].between(0.2, 0.5).all()
    for _, row in table.iterrows():
        site = SITES[int(row["site"][4:]) - 1]
        assert (row["country"], row["device"]) == (site.country, site.device)
        with Image.open(out / row["path"]) as image:
            assert image.format == "JPEG" and image.height == round(96 * site.scale) and not image.getexif()


def test_two_eyes_per_patient_with_shared_demographics_and_similar_grades(cohort):
    _, table, _ = cohort
    patients = table.groupby("patient_id")
    assert patients.ngroups == 3 * 4  # ceil(7 / 2) per site; the last patient has one eye
    assert sorted(patients.size().value_counts().items()) == [(1, 3), (2, 9)]
    assert (patients[["sex", "age", "ethnicity", "site"]].nunique() == 1).all().all()
    assert (patients["eye"].nunique() == patients.size()).all()
    assert (patients["dr_grade"].agg(lambda g: g.max() - g.min()) <= 1).all()


def test_bigger_cohort_labels_follow_prevalence_and_age(tmp_path, monkeypatch):
    import retfm.data.phantoms as phantoms

    monkeypatch.setattr(phantoms, "render_fundus", lambda *a, **k: (np.zeros((8, 8, 3), np.uint8), {}))
    table = generate_cohort(tmp_path, sites=3, per_site=400, size=32, seed=1)  # labels only: images are stubbed
    assert set(table["dr_grade"]) == {0, 1, 2, 3, 4}
    old = table["age"] >= table["age"].median()
    assert table.loc[old, "amd"].mean() > table.loc[~old, "amd"].mean()
    assert table.loc[old, "glaucoma"].mean() > table.loc[~old, "glaucoma"].mean()
    assert table.groupby("site")["dr_grade"].mean().nunique() == 3


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def files(folder, **kw):
        generate_cohort(folder, size=64, **kw)
        return {p.name: p.read_bytes() for p in sorted((folder / "images").iterdir())} | \
            {"labels.csv": (folder / "labels.csv").read_bytes()}

    first = files(tmp_path / "a", sites=2, per_site=3, seed=7)
    assert files(tmp_path / "b", sites=2, per_site=3, seed=7) == first
    other = files(tmp_path / "c", sites=2, per_site=3, seed=8)
    assert all(other[name] != first[name] for name in first if name.endswith(".jpg"))
    more = files(tmp_path / "d", sites=3, per_site=4, seed=7)  # images do not depend on what else is drawn
    assert all(more[name] == first[name] for name in first if name.endswith(".jpg"))


# ---- images -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eye", ["L", "R"])
def test_geometry_matches_the_image(eye):
    rgb, geometry = render(eye=eye, size=160)
    assert rgb.shape == (160, 160, 3) and rgb.dtype == np.uint8
    yy, xx = np.mgrid[:160, :160]
    distance = np.hypot(xx - geometry["fov_cx"], yy - geometry["fov_cy"])
    assert rgb[distance > geometry["fov_r"] + 2].max() < 20
    inside = rgb[distance < 0.9 * geometry["fov_r"]].max(axis=1)
    assert np.median(inside) > 90 and np.mean(inside > 30) > 0.98
    assert disc_is_pale(rgb, geometry)
    assert (geometry["disc_x"] > geometry["fov_cx"]) == (eye == "R")


def test_scaled_clipped_site_geometry():
    site = dataclasses.replace(REFERENCE, layout="clipped", scale=1.25)
    rgb, geometry = render(site=site, size=128)
    assert rgb.shape[0] == 160 and abs(rgb.shape[1] - 160 * 4 / 3) <= 1
    assert geometry["fov_r"] > rgb.shape[0] / 2  # the circle is cut at the top and bottom
    assert rgb[0, round(geometry["fov_cx"])].max() > 40 and rgb[0, 0].max() < 20
    assert disc_is_pale(rgb, geometry)


def test_same_generator_other_grade_same_eye_more_lesions():
    base, geometry = render(dr_grade=0, size=256)
    assert np.array_equal(render(dr_grade=0, size=256)[0], base)
    changed = {}
    for grade in range(1, 5):
        diff = render(dr_grade=grade, size=256)[0].astype(int) - base
        changed[grade] = (np.sum(diff[..., 1].clip(max=0) < -25), np.sum((diff[..., 1] > 40) & (diff[..., 2] > 20)))
    darker, paler = zip(*(changed[g] for g in range(1, 5)))
    assert 0 < darker[0] < darker[1] < darker[2]  # microaneurysms, then blots, then flame haemorrhages
    assert paler[0] == 0 < paler[1] < paler[2]  # hard exudates from grade 2, cotton-wool spots from grade 3
    grade3, grade4 = render(dr_grade=3, size=256)[0].astype(int), render(dr_grade=4, size=256)[0].astype(int)
    new_vessels = np.abs(grade4 - grade3).max(axis=2) > 25
    assert new_vessels.sum() > 50
    yy, xx = np.nonzero(new_vessels)
    near_disc = np.hypot(xx - geometry["disc_x"], yy - geometry["disc_y"]) < 0.3 * geometry["fov_r"]
    assert near_disc.mean() > 0.4  # a disc-centred circle of 9% of the FOV area holds most of them


def test_subtler_lesions_change_fewer_pixels_and_leave_the_eye_alone():
    base = render(dr_grade=0, size=256)[0].astype(int)
    def changed(lesions):
        return np.sum(np.abs(render(dr_grade=3, size=256, lesions=lesions)[0].astype(int) - base).max(axis=2) > 25)
    assert 0 < changed(0.2) < changed(0.5) < changed(1.0)
    assert np.array_equal(render(dr_grade=0, size=256, lesions=0.3)[0], base)  # no signs, nothing to scale
    with pytest.raises(ValueError, match="lesions=0"):
        render(lesions=0)


def test_dark_red_lesions_on_every_site():
    def dark_red(rgb, geometry):  # red well above green, green well below the fundus's usual green: blood
        pixels = fov_pixels(rgb, geometry)
        red, green = pixels[:, 0], pixels[:, 1]
        return np.sum((red > 2 * green + 15) & (green < 0.6 * np.median(green)))

    for site in SITES:
        healthy, geometry = render(site=site, dr_grade=0)
        sick, _ = render(site=site, dr_grade=3)
        assert dark_red(sick, geometry) > dark_red(healthy, geometry) + 100, site.name


def test_cup_area_follows_cup_to_disc_ratio():
    def cup_area(cdr):
        rgb, geometry = render(cdr=cdr, size=256, seed=11)
        window = disc_window(rgb, geometry)
        return np.sum(window[..., 2] > 150)  # the cup is the palest part of the disc, the only place blue is high

    small, large = cup_area(0.3), cup_area(0.8)
    assert large > 3 * small > 0


def test_drusen_are_yellow_and_around_the_macula():
    healthy, geometry = render(seed=4, size=256)
    drusen = np.abs(render(seed=4, size=256, amd=True)[0].astype(int) - healthy).max(axis=2) > 25
    yy, xx = np.nonzero(drusen)
    assert len(xx) > 100
    fovea_x = geometry["fov_cx"] - 0.12 * geometry["fov_r"]  # temporal to the centre, away from the disc
    assert np.median(np.hypot(xx - fovea_x, yy - geometry["fov_cy"])) < 0.3 * geometry["fov_r"]


def test_sites_differ_in_colour_and_the_dark_site_is_dark():
    means = {}
    for site in SITES:
        rgb, geometry = render(site=site)
        means[site.name] = fov_pixels(rgb, geometry).mean(axis=0)
    names = list(means)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(means[a] - means[b]).max() > 8, (a, b)
    dark = next(s.name for s in SITES if s.brightness < 0.7)
    assert means[dark].mean() < 0.7 * means["site1"].mean()


def test_notch_and_text_overlay():
    plain = dataclasses.replace(REFERENCE, noise_sigma=0)
    rgb, geometry = render(site=plain)
    marked, _ = render(site=dataclasses.replace(plain, notch=True, text_overlay=True))
    corner = (slice(0, 20), slice(0, 50))
    assert rgb[corner].max() < 10 and marked[corner].max() > 150
    x, y = geometry["fov_cx"] + 0.74 * geometry["fov_r"], geometry["fov_cy"] - 0.74 * geometry["fov_r"]
    assert rgb[round(y), round(x)].max() < 10 and marked[round(y), round(x)].max() > 30
    assert np.mean(np.abs(marked.astype(int) - rgb) > 10) < 0.02  # both are small


def test_bad_requests_are_refused():
    for bad in ({"eye": "X"}, {"dr_grade": 5}, {"cdr": 1.2}):
        with pytest.raises(ValueError):
            render(**bad)


def test_a_vessel_of_one_point_draws_nothing_and_breaks_nothing():
    """At 96 px some vessels are clipped to a single point (seen with 2 sites x 40 images, seed 0)."""
    from retfm.data.phantoms import _draw_vessel

    mask = np.zeros((8, 8), np.float32)
    _draw_vessel(mask, np.array([[4.0, 4.0]]), np.array([1.0]), 4.0)
    assert not mask.any()
