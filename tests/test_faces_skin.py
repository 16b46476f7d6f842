"""faces and skin_tone: the Haar detector on real photographs that scikit-image ships, skin tone on colours whose
ITA and Monk tone are known by hand, channel order, the unknown paths, and one shared detection per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from probe.score.metrics import faces as faces_module
from probe.score.metrics.faces import FaceBox, Faces, FaceSettings, crop, detect_faces, largest_face
from probe.score.metrics.skin import (
    MONK_HEX,
    MONK_SWATCHES,
    SkinTone,
    ita_category,
    ita_degrees,
    measure_skin,
    nearest_monk,
    rgb_to_lab,
    skin_mask,
)
from probe.score.protocol import ImageItem, ImageMetric, ScoringContext
from probe.store.features import FeatureCache

data = pytest.importorskip("skimage.data")
color = pytest.importorskip("skimage.color")


def _hex(code: str) -> list[int]:
    return [int(code[i : i + 2], 16) for i in (1, 3, 5)]


def _patch(rgb: list[int] | np.ndarray, size: int = 32) -> np.ndarray:
    return np.tile(np.asarray(rgb, dtype=np.uint8), (size, size, 1))


def _item(tmp_path: Path, name: str, rgb: np.ndarray) -> ImageItem:
    from PIL import Image

    path = tmp_path / f"{name}.png"
    Image.fromarray(rgb).save(path)  # PIL writes and reads RGB
    return ImageItem(key=name, path=path, prompt="a photo of the face of a person")


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    astronaut = data.astronaut()
    return {"astronaut": astronaut, "astronaut_flipped": np.ascontiguousarray(astronaut[:, ::-1]),
            "chelsea": data.chelsea(), "coffee": data.coffee(), "camera": data.camera()}


@pytest.fixture(scope="module")
def found(photos: dict[str, np.ndarray]) -> dict[str, list[FaceBox]]:
    return {name: detect_faces(image) for name, image in photos.items()}


# --- the detector on real photographs --------------------------------------------------------------------------


def test_astronaut_has_exactly_one_face_where_her_face_is(found: dict[str, list[FaceBox]]) -> None:
    (box,) = found["astronaut"]
    assert box.detector == "frontalface_alt2"
    # Eileen Collins' face spans about x 175-270, y 65-165 in the 512x512 photo.
    assert 160 <= box.x <= 200 and 50 <= box.y <= 90 and 70 <= box.w <= 120 and box.w == box.h


def test_flipped_astronaut_still_has_one_face_mirrored(found: dict[str, list[FaceBox]]) -> None:
    (box,) = found["astronaut_flipped"]
    (original,) = found["astronaut"]
    assert abs((512 - box.x - box.w) - original.x) <= 6 and abs(box.y - original.y) <= 6


@pytest.mark.parametrize("name", ["chelsea", "coffee"])
def test_cat_and_coffee_have_no_face(found: dict[str, list[FaceBox]], name: str) -> None:
    assert found[name] == []


def test_cameraman_seen_from_the_side_is_found_by_the_mirrored_profile_cascade(found: dict[str, list[FaceBox]]) -> None:
    (box,) = found["camera"]  # greyscale input; the frontal cascade misses him, he faces left
    assert box.detector == "profileface_mirrored"
    assert 160 <= box.x <= 210 and 90 <= box.y <= 130


def test_lfw_faces_found_and_non_faces_rejected() -> None:
    """skimage's lfw_subset: 100 LFW faces then 100 non-faces, 25x25; upscaled to 100x100 for the cascades."""
    import cv2

    lfw = (data.lfw_subset() * 255).round().astype(np.uint8)
    picks = list(range(0, 40)) + list(range(100, 140))
    hits = [bool(detect_faces(cv2.resize(lfw[i], (100, 100), interpolation=cv2.INTER_CUBIC))) for i in picks]
    assert sum(hits[:40]) >= 30 and sum(hits[40:]) == 0


def test_nms_merges_overlaps_and_helpers(photos: dict[str, np.ndarray]) -> None:
    def on_her_face(settings: FaceSettings) -> list[FaceBox]:
        return [b for b in detect_faces(photos["astronaut"], settings) if abs(b.x + b.w / 2 - 224) < 30 and b.y < 100]

    # With few neighbours required, frontal and profile cascades both fire on her face; NMS keeps the frontal box.
    raw = on_her_face(FaceSettings(min_neighbors=1, nms_iou=1.0))
    assert {b.detector for b in raw} == {"frontalface_alt2", "profileface"}
    assert [b.detector for b in on_her_face(FaceSettings(min_neighbors=1))] == ["frontalface_alt2"]
    small, big = FaceBox(0, 0, 10, 10, "a", 9.0), FaceBox(5, 5, 40, 40, "b", 1.0)
    assert largest_face([small, big]) is big and largest_face([]) is None
    inner = FaceBox(20, 30, 40, 40, "c", 1.0)  # grown by 10 px per side, clipped to the image
    assert crop(np.zeros((100, 100, 3), np.uint8), inner, margin=0.25).shape == (60, 60, 3)
    assert crop(np.zeros((60, 50, 3), np.uint8), inner, margin=0.25).shape == (40, 40, 3)
    assert FaceSettings(frontal=["haarcascade_frontalface_alt2.xml"]).id == FaceSettings().id


def test_unknown_face_setting_is_a_usage_error() -> None:
    from probe.errors import UsageError

    with pytest.raises(UsageError, match="min_neighbors"):
        Faces(min_neighbours=3)


# --- metrics through ImageItems and one shared detection ---------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, np.ndarray]):
    """Faces then SkinTone on one context, counting detector calls."""
    tmp = tmp_path_factory.mktemp("faces")
    items = [_item(tmp, name, photos[name]) for name in ("astronaut", "coffee")]
    ctx = ScoringContext(features=FeatureCache(tmp / "cache"))
    calls: list[tuple[int, ...]] = []
    real = faces_module.detect_faces

    def counting(rgb: np.ndarray, settings: FaceSettings | None = None) -> list[FaceBox]:
        calls.append(rgb.shape)
        return real(rgb, settings)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(faces_module, "detect_faces", counting)
        faces, skin = Faces(), SkinTone()
        return faces.score(items, ctx), skin.score(items, ctx), calls, faces.config(ctx), skin.config(ctx)


def test_two_metrics_detect_once_per_image(scored) -> None:
    _, _, calls, _, _ = scored
    assert len(calls) == 2


def test_faces_metric_scores(scored) -> None:
    (astronaut, coffee), _, _, config, _ = scored
    assert isinstance(Faces(), ImageMetric)
    assert (astronaut.metric, astronaut.key, astronaut.value, astronaut.label) == ("faces", "astronaut", 1.0, "face")
    assert astronaut.extra["largest"] == astronaut.extra["boxes"][0] and astronaut.extra["detectors"] == ["frontalface_alt2"]
    assert (coffee.value, coffee.label, coffee.extra["boxes"], coffee.extra["largest"]) == (0.0, "no_face", [], None)
    assert config["opencv"].startswith("4.") and "haarcascade_profileface.xml" in config["cascades"]


def test_skin_tone_on_the_astronaut_and_without_a_face(scored) -> None:
    _, (astronaut, coffee), _, _, config = scored
    assert isinstance(SkinTone(), ImageMetric)
    assert astronaut.label == f"monk_{astronaut.extra['monk']}" and astronaut.extra["n_skin_pixels"] > 1000
    assert astronaut.value is not None and 40 < astronaut.value < 70  # light skin under studio light
    assert (coffee.value, coffee.label, coffee.extra["reason"]) == (None, "unknown", "no_face")
    assert config["monk_hex"] == list(MONK_HEX) and config["faces"]["settings_id"] == FaceSettings().id


@pytest.fixture
def fixed_face(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every image 'has' one face at (8, 8, 48, 48): the skin maths without the detector."""
    monkeypatch.setattr(faces_module, "detect_faces", lambda rgb, settings=None: [FaceBox(8, 8, 48, 48, "fake", 1.0)])


@pytest.mark.usefixtures("fixed_face")
def test_skin_tone_metric_reads_rgb_and_reports_too_few_skin_pixels(tmp_path: Path) -> None:
    ctx = ScoringContext(features=FeatureCache(tmp_path / "cache"))
    warm = _item(tmp_path, "warm", _patch(_hex(MONK_HEX[5]), 64))  # Monk 6, #a07e56
    blue = _item(tmp_path, "blue", _patch([20, 40, 230], 64))
    ok, unknown = SkinTone().score([warm, blue], ctx)
    assert ok.label == "monk_6" and ok.value == pytest.approx(10.9, abs=0.2) and ok.extra["ita_category"] == "tan"
    assert (unknown.value, unknown.label, unknown.extra["reason"], unknown.extra["n_skin_pixels"]) == (
        None, "unknown", "too_few_skin_pixels", 0)


# --- skin maths on known colours --------------------------------------------------------------------------------


@pytest.mark.parametrize(("lab", "ita", "category"), [
    ((70.0, 10.0, 20.0), 45.0, "light"),        # atan2(20, 20)
    ((50.0, 10.0, 20.0), 0.0, "brown"),         # atan2(0, 20)
    ((30.0, 10.0, 20.0), -45.0, "dark"),        # atan2(-20, 20)
    ((60.0, 12.0, 10.0), 45.0, "light"),        # atan2(10, 10)
])
def test_ita_of_constructed_patches(lab: tuple[float, float, float], ita: float, category: str) -> None:
    rgb = color.lab2rgb(np.array([[lab]]))
    exact = measure_skin(np.tile(rgb, (32, 32, 1)))  # float RGB: no quantisation
    assert exact["ita"] == pytest.approx(ita, abs=0.01) and exact["ita_category"] == category
    quantised = measure_skin(np.tile((rgb * 255).round().astype(np.uint8), (32, 32, 1)))
    assert quantised["ita"] == pytest.approx(ita, abs=1.0)  # 8-bit rounding moves L*, b* by < 0.5


def test_ita_formula_and_categories() -> None:
    assert ita_degrees(60.0, 0.0) == pytest.approx(90.0)
    assert ita_degrees(40.0, -10.0) == pytest.approx(-135.0)  # b <= 0 stays defined with atan2
    assert ita_degrees(np.array([70.0, 30.0]), np.array([20.0, 20.0])) == pytest.approx([45.0, -45.0])
    cases = {56: "very_light", 55: "light", 41.5: "light", 41: "intermediate", 28.5: "intermediate",
             20: "tan", 10: "brown", -29: "brown", -30: "dark", -80: "dark"}
    assert {k: ita_category(k) for k in cases} == cases


def test_monk_swatches_map_back_to_their_own_tone() -> None:
    assert [nearest_monk(lab) for lab in MONK_SWATCHES] == list(range(1, 11))
    through_pixels = [measure_skin(_patch(_hex(code)))["monk"] for code in MONK_HEX]
    assert through_pixels == list(range(1, 11))
    assert MONK_SWATCHES[0][0] > 90 and MONK_SWATCHES[-1][0] < 20  # tone 1 lightest, tone 10 darkest


def test_bgr_instead_of_rgb_changes_the_answer() -> None:
    warm = _patch(_hex(MONK_HEX[5]))  # #a07e56, Monk 6
    bgr = warm[..., ::-1]
    rgb_lab, bgr_lab = rgb_to_lab(warm[0, 0]), rgb_to_lab(bgr[0, 0])
    assert rgb_lab[2] > 20 and bgr_lab[2] < -10  # yellowish becomes bluish
    assert abs(ita_degrees(rgb_lab[0], rgb_lab[2]) - ita_degrees(bgr_lab[0], bgr_lab[2])) > 60
    assert measure_skin(warm)["monk"] == 6
    assert measure_skin(bgr)["reason"] == "too_few_skin_pixels"


def test_skin_mask_keeps_every_monk_tone_and_rejects_non_skin() -> None:
    for shift in (-5.0, 0.0, 5.0):
        lab = MONK_SWATCHES + [shift, 0.0, 0.0]
        rgb = (np.clip(color.lab2rgb(lab[None]), 0, 1) * 255).round().astype(np.uint8)
        assert skin_mask(rgb).all(), shift
    others = np.array([[[0, 0, 255], [0, 255, 0], [128, 128, 128], [250, 250, 250], [5, 5, 5], [135, 206, 235],
                        [180, 60, 70]]], dtype=np.uint8)  # blue, green, grey, white, black, sky, lips
    assert not skin_mask(others).any() and not skin_mask(others, "chai-ngan").any()
    monk = np.array([[_hex(code) for code in MONK_HEX]], dtype=np.uint8)
    assert not skin_mask(monk, "chai-ngan")[0, 9]  # the textbook YCrCb box drops Monk 10: why it is not the default


def test_too_few_skin_pixels_is_unknown() -> None:
    mixed = _patch([20, 40, 230])
    mixed[:3, :3] = _hex(MONK_HEX[3])  # 9 skin pixels among 1024
    assert measure_skin(mixed) == {"reason": "too_few_skin_pixels", "n_skin_pixels": 9}
    assert measure_skin(mixed, min_pixels=5, min_fraction=0.0)["monk"] == 4
