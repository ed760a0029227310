"""Lossy maps on request: capture(keep_bits=k) keeps k of float16's 10 mantissa bits (DESIGN §4, "bit rounding")."""

import json

import numpy as np
import pytest
import zarr

import attnscope as ats

from .conftest import RUN, cli, error_line

PROMPT = "a red circle and a blue square"


def rounded(x: np.ndarray, bits: int) -> np.ndarray:
    """``x`` (float16) rounded to ``bits`` mantissa bits by arithmetic, not bit masks: to the nearest multiple of
    the quantum 2**(e - bits) of its binade (e = floor(log2 |x|), at least float16's -14 for subnormals), ties to
    even."""
    x64 = x.astype(np.float64)
    out = x64.copy()
    finite = np.isfinite(x64) & (x64 != 0)
    e = np.maximum(np.floor(np.log2(np.abs(x64[finite]))), -14)
    quantum = 2.0 ** (e - bits)
    out[finite] = np.round(x64[finite] / quantum) * quantum  # np.round: halves to even
    return out.astype(np.float16)


def test_rounded_reference_on_hand_values():
    # 1.375 = 1.011b: 2 bits keep 1.01|1 -> a tie, to even 1.10b = 1.5; 1.125 = 1.001b -> tie, to even 1.00b = 1;
    # subnormals share the quantum 2**(-14 - bits): 2**-20 is 1/16 of 2**-16, so 0; 3 * 2**-17 is 1.5 -> 2 * 2**-16
    x = np.array([1.375, 1.125, 0.0, 0.3, -2.75, 2.0**-20, 3 * 2.0**-17], np.float16)
    np.testing.assert_array_equal(rounded(x, 2), np.array([1.5, 1.0, 0.0, 0.3125, -3.0, 0.0, 2.0**-15], np.float16))


@pytest.mark.parametrize("bits", [3, 7])
def test_stored_maps_are_the_lossless_maps_rounded(shapes, tmp_path, bits):
    run = dict(num_inference_steps=4, seed=3)
    exact = ats.capture(shapes, PROMPT, store=tmp_path / "exact.zarr", **run)
    lossy = ats.capture(shapes, PROMPT, store=tmp_path / "lossy.zarr", keep_bits=bits, **run)
    assert lossy.manifest["capture"]["keep_bits"] == bits and exact.manifest["capture"]["keep_bits"] is None
    np.testing.assert_array_equal(np.asarray(lossy.images[0]), np.asarray(exact.images[0]))  # the run is the same
    changed = 0
    for site in exact.sites:
        a = exact.attention(site).values
        b = lossy.attention(site).values
        np.testing.assert_array_equal(b, rounded(a, bits))
        # plain zarr, no attnscope, reads the same values
        plain = zarr.open_group(str(tmp_path / "lossy.zarr"), mode="r")["sites"][site]["attention"][:]
        np.testing.assert_array_equal(plain, b)
        normal = np.abs(a.astype(np.float64)) >= 2.0**-14  # subnormals: an absolute 2**-(14 + bits + 1)
        rel = np.abs(b[normal].astype(np.float64) / a[normal] - 1)
        assert rel.max() <= 2.0 ** -(bits + 1)
        assert np.abs(b[~normal].astype(np.float64) - a[~normal]).max(initial=0) <= 2.0 ** -(14 + bits + 1)
        changed += int((a != b).sum())
    assert changed > 0


def test_fewer_bits_make_a_smaller_store(shapes, tmp_path):
    sizes = {}
    for bits in (None, 3):
        ats.capture(shapes, PROMPT, seed=1, store=tmp_path / f"{bits}.zarr", num_inference_steps=3, height=96,
                    width=96, heads="all", keep_bits=bits)
        sizes[bits] = sum(f.stat().st_size for f in (tmp_path / f"{bits}.zarr/sites").rglob("*") if f.is_file())
    assert sizes[3] < 0.7 * sizes[None], sizes


@pytest.mark.parametrize("bad", [0, 11, -1, 2.5, True, "3"])
def test_a_bad_keep_bits_is_one_error_before_anything_is_written(shapes, tmp_path, bad):
    with pytest.raises(ats.AttnscopeError, match=r"keep_bits=.*expected None \(lossless\) or an int from 1 to 10"):
        ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "t.zarr", keep_bits=bad, **RUN)
    assert not (tmp_path / "t.zarr").exists()


def test_a_rerun_keeps_the_parents_bits(shapes, tmp_path):
    parent = ats.capture(shapes, PROMPT, seed=2, store=tmp_path / "p.zarr", keep_bits=4, **RUN)
    child = ats.rerun(parent, store=tmp_path / "c.zarr")
    assert child.manifest["capture"]["keep_bits"] == 4
    for site in parent.sites:
        np.testing.assert_array_equal(child.attention(site).values, parent.attention(site).values)
    lossless = ats.rerun(parent, store=tmp_path / "l.zarr", keep_bits=None)
    assert lossless.manifest["capture"]["keep_bits"] is None
    site = parent.sites[0]
    np.testing.assert_array_equal(rounded(lossless.attention(site).values, 4), parent.attention(site).values)


def test_cli_capture_and_sweep_take_keep_bits(tmp_path):
    done = cli("capture", "--prompt", PROMPT, "--steps", "2", "--keep-bits", "5", "--out", tmp_path / "a.zarr")
    assert done.exit_code == 0, done.stderr
    manifest = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())["attributes"]["manifest"]
    assert manifest["capture"]["keep_bits"] == 5
    assert "--keep-bits 0: expected" in error_line(
        cli("capture", "--prompt", PROMPT, "--steps", "2", "--keep-bits", "0", "--out", tmp_path / "b.zarr"))
    assert not (tmp_path / "b.zarr").exists()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    done = cli("sweep", prompts, "--seeds", "0", "--steps", "2", "--keep-bits", "3", "--out", tmp_path / "s",
               "--no-progress")
    assert done.exit_code == 0, done.stderr
    cat = ats.open_catalog(tmp_path / "s")
    assert cat.trace(0).manifest["capture"]["keep_bits"] == 3
    assert "--keep-bits 11: expected" in error_line(
        cli("sweep", prompts, "--seeds", "0", "--keep-bits", "11", "--out", tmp_path / "s2", "--no-progress"))
    assert not (tmp_path / "s2").exists()
