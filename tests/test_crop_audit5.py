"""Inpainting with ``padding_mask_crop`` (audit 5): the pipeline generates only a box around the mask and pastes it back
into the whole image, so the maps cover that box. Capture records the box (manifest ``run.crop_region``) as diffusers
computes it, and the figures, report and viewer draw each map inside it; a trace without the box keeps the warning."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
import xarray as xr
import zarr
from PIL import Image

import attnscope as ats
from attnscope.plot._heatmaps import word_panels

PROMPT = "a red circle and a blue square"
MASK_BOX = (36, 8, 60, 24)  # x1, y1, x2, y2 of the painted mask: wider than tall, so diffusers grows it in y


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(seed, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask_image():
    mask = np.zeros((64, 64), np.uint8)
    x1, y1, x2, y2 = MASK_BOX
    mask[y1:y2, x1:x2] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def inpaint(sd_pipe):
    import diffusers

    return quiet(diffusers.StableDiffusionInpaintPipeline(**sd_pipe.components))


@pytest.fixture(scope="module")
def crop(inpaint, tmp_path_factory):
    """A 64 px image inpainted with padding_mask_crop=4, the crop generated at 32 × 48 (height × width); exact=True,
    so the generation is bit for bit that of a plain call."""
    d = tmp_path_factory.mktemp("crop")
    return ats.capture(inpaint, PROMPT, seed=0, store=d / "crop.zarr", image=picture(1), mask_image=mask_image(),
                       num_inference_steps=2, height=32, width=48, padding_mask_crop=4, exact=True)


def diffusers_box(height, width, pad):
    """diffusers' own crop box for the mask, from its image processor (no pipeline, no attnscope)."""
    from diffusers.image_processor import VaeImageProcessor

    return list(VaeImageProcessor.get_crop_region(mask_image(), width, height, pad=pad))


def test_capture_records_the_box_diffusers_crops(inpaint, crop, tmp_path):
    """The manifest held no box: the figures could not tell where the maps lie. It now holds diffusers' box as plain
    ints, the pipeline's processor is left as it was, and the generation is that of a plain call."""
    box = crop.manifest["run"]["crop_region"]
    assert box == diffusers_box(32, 48, 4) and all(type(v) is int for v in box)
    x1, y1, x2, y2 = box
    assert x1 <= MASK_BOX[0] and y1 <= MASK_BOX[1] and x2 >= MASK_BOX[2] and y2 >= MASK_BOX[3]
    stored = json.loads((crop.path / "zarr.json").read_text())["attributes"]["manifest"]["run"]["crop_region"]
    assert stored == box
    assert "get_crop_region" not in vars(inpaint.mask_processor)  # the pipeline's own method again
    plain = inpaint(PROMPT, image=picture(1), mask_image=mask_image(), num_inference_steps=2, height=32, width=48,
                    padding_mask_crop=4, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(crop.images[0]))
    square = ats.capture(inpaint, PROMPT, seed=0, store=tmp_path / "square.zarr", image=picture(1),
                         mask_image=mask_image(), num_inference_steps=2, height=32, width=32, padding_mask_crop=2)
    assert square.manifest["run"]["crop_region"] == diffusers_box(32, 32, 2)
    whole = ats.capture(inpaint, PROMPT, seed=0, store=tmp_path / "whole.zarr", image=picture(1),
                        mask_image=mask_image(), num_inference_steps=2, height=64, width=64)
    assert "crop_region" not in whole.manifest["run"]


def rendered(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].astype(int)


def test_a_hot_map_pixel_is_drawn_at_its_place_in_the_box(crop):
    """A hand-made 8 × 8 map, hot in row 2, column 5 only, drawn by word_panels: the pixels it changes (against an
    all-zero map) lie, in image coordinates, around the centre of that cell of the box: x1 + 5.5 · (x2 − x1) / 8 − ½,
    y1 + 2.5 · (y2 − y1) / 8 − ½. Before, the map was stretched over the whole image."""
    x1, y1, x2, y2 = crop.manifest["run"]["crop_region"]
    hot = np.zeros((1, 8, 8))
    hot[0, 2, 5] = 1.0

    def draw(values):
        maps = xr.DataArray(values, dims=("word", "y", "x"), coords={"word": ["circle"]})
        fig, axes = word_panels(crop, maps, alpha=1.0)
        return fig, axes[1]

    fig, ax = draw(hot)
    changed = np.argwhere(np.abs(rendered(fig) - rendered(draw(np.zeros_like(hot))[0])).sum(-1) > 60)
    height_px = fig.canvas.get_width_height()[1]
    display = np.column_stack([changed[:, 1] + 0.5, height_px - changed[:, 0] - 0.5])
    x, y = ax.transData.inverted().transform(display).mean(axis=0)
    cell = (x2 - x1) / 8, (y2 - y1) / 8
    assert abs(x - (x1 + 5.5 * cell[0] - 0.5)) < cell[0] / 4
    assert abs(y - (y1 + 2.5 * cell[1] - 0.5)) < cell[1] / 4
    assert ax.get_xlim() == (-0.5, 63.5) and ax.get_ylim() == (63.5, -0.5)  # the whole image is shown


def test_heatmaps_and_report_draw_the_maps_inside_the_box_without_a_warning(crop, tmp_path):
    x1, y1, x2, y2 = crop.manifest["run"]["crop_region"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ats.AttnscopeWarning)
        fig = ats.plot.heatmaps(crop, ["circle"], layout={"a red circle": (0.0, 0.0, 0.5, 1.0)})
        path = ats.report(crop, tmp_path / "crop.html", words=["circle"])
    ax = fig.axes[1]
    assert ax.images[-1].get_extent() == [x1 - 0.5, x2 - 0.5, y2 - 0.5, y1 - 0.5]
    region = ax.patches[0]  # the left half of the maps: the left half of the box
    assert (region.get_x(), region.get_y()) == (x1 - 0.5, y1 - 0.5)
    assert (region.get_width(), region.get_height()) == ((x2 - x1) / 2, y2 - y1)
    assert "drawn inside that box" in path.read_text()


def test_in_crop_box_places_a_hot_pixel_by_hand():
    """A 4 × 4 map hot at (1, 2), placed in the box x 8–16, y 4–12 of a 20 × 24 image: its 2 × 2 block of upsampled
    pixels is y 4 + 2–3, x 8 + 4–5 (the brightest, an exact 2× bilinear upsampling); NaN outside the box."""
    from attnscope.plot._select import in_crop_box

    native = np.zeros((4, 4), np.float32)
    native[1, 2] = 1.0
    out = in_crop_box(native, (8, 4, 16, 12), (20, 24))
    assert out.shape == (20, 24)
    inside = np.zeros((20, 24), bool)
    inside[4:12, 8:16] = True
    assert np.isfinite(out[inside]).all() and np.isnan(out[~inside]).all()
    assert sorted(map(tuple, np.argwhere(out == np.nanmax(out)).tolist())) == [(6, 12), (6, 13), (7, 12), (7, 13)]


def test_viewer_places_the_maps_in_the_box(crop):
    """The viewer's maps: inside the box, each site's map (raw zarr, float64, heads and steps averaged, the word's
    token summed) upsampled to the box with torch's bilinear interpolation, averaged over the sites; NaN around."""
    pytest.importorskip("anywidget")
    x1, y1, x2, y2 = crop.manifest["run"]["crop_region"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ats.AttnscopeWarning)
        viewer = ats.view(crop, words=["circle"])
    shown = viewer.current_map()[0]
    group = zarr.open_group(str(crop.path), mode="r")
    per_site = []
    for site in crop.sites:
        raw = np.asarray(group["sites"][site]["attention"][:], dtype=np.float64)[:, 0].mean(axis=(0, 1))
        texts = crop.attention(site)["token_text"].isel(sample=0).values.tolist()
        word = raw[..., [i for i, t in enumerate(texts) if t == "circle</w>"]].sum(-1)
        per_site.append(torch.nn.functional.interpolate(torch.from_numpy(word)[None, None], size=(y2 - y1, x2 - x1),
                                                        mode="bilinear", align_corners=False)[0, 0].numpy())
    np.testing.assert_allclose(shown[y1:y2, x1:x2], np.mean(per_site, axis=0), rtol=1e-4, atol=1e-6)
    outside = np.ones(shown.shape, bool)
    outside[y1:y2, x1:x2] = False
    assert np.isnan(shown[outside]).all()


def test_a_trace_without_the_box_keeps_the_warning(crop, tmp_path):
    """A crop trace captured before the box was recorded: the maps are still drawn over the whole image, with the
    warning that they are not aligned with it."""
    old = tmp_path / "old.zarr"
    shutil.copytree(crop.path, old)
    meta = json.loads((old / "zarr.json").read_text())
    del meta["attributes"]["manifest"]["run"]["crop_region"]
    (old / "zarr.json").write_text(json.dumps(meta))
    tr = ats.open_trace(old)
    with pytest.warns(ats.AttnscopeWarning, match="does not record the crop's box.*not aligned"):
        fig = ats.plot.heatmaps(tr, ["circle"])
    assert fig.axes[1].images[-1].get_extent() == [-0.5, 63.5, 63.5, -0.5]


@pytest.mark.parametrize("box", [[8, 4, 80, 36], [8, 4, 8, 36], [8, 4, 40], "8,4,40,36", [8.0, 4, 40, 36]])
def test_a_crafted_box_is_refused_when_the_trace_is_opened(crop, tmp_path, box):
    """The store treats its manifest as untrusted: a box outside the image (or not four ints) was only noticed when
    a figure was drawn; now ``open_trace`` refuses it, naming the field."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(crop.path, bad)
    meta = json.loads((bad / "zarr.json").read_text())
    meta["attributes"]["manifest"]["run"]["crop_region"] = box
    (bad / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(ats.AttnscopeError, match=r"bad\.zarr.*manifest run\.crop_region is .*expected \[x1, y1, x2, y2\]"):
        ats.open_trace(bad)
