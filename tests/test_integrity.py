"""Damaged, partial and crafted traces, reproduced the way a user meets them: real files deleted, cut,
overwritten or edited on disk, a model with NaN weights, two real processes writing one path."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.store import SiteLayout, StoreLayout, TraceWriter
from attnscope.testing import tiny_sd_pipeline

from .conftest import RUN, cli

RUN10 = {**RUN, "num_inference_steps": 10}
SITE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # 16×16 maps: steps 0–7 in one shard, 8–9 in another


@pytest.fixture(scope="module")
def base(tmp_path_factory, sd_pipe):
    return ats.capture(sd_pipe, "a red circle and a blue square", seed=0,
                       store=tmp_path_factory.mktemp("base") / "t.zarr", **RUN10).path


@pytest.fixture
def trace(base, tmp_path):
    """A fresh copy of a complete 10-step trace, to damage."""
    return shutil.copytree(base, tmp_path / "t.zarr")


def _shard(path, site=SITE, step=8):
    meta = json.loads((path / "sites" / site / "attention" / "zarr.json").read_text())
    per = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
    return path / "sites" / site / "attention" / "c" / str(step // per) / "0" / "0" / "0" / "0" / "0"


def _edit_root(path, edit):
    meta = json.loads((path / "zarr.json").read_text())
    edit(meta)
    (path / "zarr.json").write_text(json.dumps(meta))


def test_checksum_codec_in_every_map_chunk(trace):
    meta = json.loads((trace / "sites" / SITE / "attention" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in inner] == ["bytes", "blosc", "crc32c"]


def test_deleted_shard_is_an_error_naming_site_and_steps(trace):
    _shard(trace).unlink()
    tr = ats.open_trace(trace)
    with pytest.raises(ats.AttnscopeError, match=rf"site '{SITE}'.*steps \[8, 9\] are missing.*the trace is complete"):
        tr.attention(SITE)
    with pytest.raises(ats.AttnscopeError, match="steps \\[8, 9\\] are missing"):
        ats.stats.dominance(tr, targets=["circle", "square"])
    result = cli("stats", trace, "--targets", "circle,square")
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "steps [8, 9] are missing" in result.stderr


def test_deleted_shard_skipped_by_choice_with_a_warning(trace, base):
    _shard(trace).unlink()
    tr = ats.open_trace(trace, missing="skip")
    with pytest.warns(ats.AttnscopeWarning, match="steps \\[8, 9\\] are missing.*left out"):
        da = tr.attention(SITE)
    assert list(da["step"].values) == list(range(8))
    original = ats.open_trace(base).attention(SITE).sel(step=list(range(8)))
    np.testing.assert_array_equal(da.values, original.values)  # the other steps are untouched


def test_overwritten_bytes_fail_the_checksum(trace):
    shard = _shard(trace)
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 3
    raw[middle: middle + 64] = bytes(64)  # 64 bytes overwritten inside the first chunk's compressed data
    shard.write_bytes(bytes(raw))
    tr = ats.open_trace(trace)
    with pytest.raises(ats.AttnscopeError, match=rf"site '{SITE}' \(attention\), steps 8–9: the stored chunk cannot "
                                                 r"be decoded .*checksum.*the trace is damaged"):
        _ = tr.attention(SITE).values


def test_truncated_shard_is_one_clear_error(trace):
    shard = _shard(trace)
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 2])
    tr = ats.open_trace(trace)
    with pytest.raises(ats.AttnscopeError, match=rf"site '{SITE}' \(attention\), steps 8–9: .*damaged"):
        _ = ats.stats.dominance(tr, targets=["circle"]).mass_share.values


def test_nan_weights_are_recorded_and_reported(tmp_path):
    pipe = tiny_sd_pipeline()
    with torch.no_grad():
        pipe.unet.conv_in.weight.fill_(float("nan"))
    with pytest.warns(ats.AttnscopeWarning, match="produced NaN attention at 7 of 7 sites, from step 0"):
        tr = ats.capture(pipe, "a red circle", seed=0, store=tmp_path / "nan.zarr", **RUN)
    assert set(tr.nan_maps) == set(tr.sites) and tr.nan_maps[SITE] == [0, 1, 2]
    with pytest.warns(ats.AttnscopeWarning, match="model produced NaN attention at site"):
        ats.stats.dominance(tr, targets=["circle"])
    result = cli("stats", tmp_path / "nan.zarr", "--targets", "circle")
    assert "NaN attention" in result.stderr


def test_gated_steps_are_not_nan_maps(tmp_path, sd_pipe):
    tr = ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "plain.zarr", **RUN)
    gated = ats.rerun(tr, interventions=[ats.regulate.TGate(gate_step=1)], store=tmp_path / "gated.zarr", pipe=sd_pipe)
    assert gated.gated_steps and gated.nan_maps == {}  # NaN on purpose: not reported as the model's


def _incomplete(path, written):
    layout = StoreLayout(num_steps=5, samples=1, prompt_of_sample=(0,), image_of_sample=(0,), token_positions=(0, 1),
                         token_text=[["<|startoftext|>", "circle</w>"]], timesteps=(9.0, 8.0, 7.0, 6.0, 5.0),
                         sites=[SiteLayout("attn2", {"heads": 1}, heads=1, spatial=(2, 2), branches=("cond",),
                                           steps=tuple(range(5)))],
                         attrs={"manifest": {"run": {"num_steps": 5, "samples": 1, "height": 16, "width": 16}},
                                "sites": ["attn2"]})
    w = TraceWriter(path)
    w.init(layout)
    for step in range(written):
        w.put("attn2", "cond", step, np.full((1, 1, 2, 2, 2), 0.5 / (step + 1), np.float16))
    w.close(complete=False)


def test_a_run_with_every_step_written_but_not_finished_says_so(tmp_path):
    _incomplete(tmp_path / "last.zarr", written=5)  # every step on disk, no images, no completion mark
    with pytest.warns(ats.AttnscopeWarning, match=r"incomplete: all 5 steps written, the run did not finish"):
        tr = ats.open_trace(tmp_path / "last.zarr")
    assert tr.written == "all 5 steps written, the run did not finish" and "5 of 5" not in repr(tr)
    assert ats.stats.convergence(tr, of="maps").attrs["incomplete"] == tr.written


def test_incomplete_trace_says_so_once_and_suggests_no_gate(tmp_path):
    _incomplete(tmp_path / "cut.zarr", written=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = ats.open_trace(tmp_path / "cut.zarr")
        _ = tr.attention("attn2").values
        conv = ats.stats.convergence(tr, of="maps")
    said = [str(w.message) for w in caught if issubclass(w.category, ats.AttnscopeWarning)]
    assert len(said) == 1 and "incomplete: 3 of 5 steps written" in said[0]
    assert conv.attrs["incomplete"] == "3 of 5 steps written" and (conv["stable_step"].values == -1).all()
    with pytest.raises(ats.AttnscopeError, match=r"no gate step: the trace is incomplete \(3 of 5 steps written\)"):
        ats.stats.suggest_gate_step(tr, tol=10.0)
    with pytest.raises(ats.AttnscopeError, match="incomplete"):
        ats.stats.suggest_gate_step(conv, tol=10.0)


@pytest.mark.parametrize("version", [0, -1])
def test_format_version_below_one_is_refused(trace, version):
    _edit_root(trace, lambda m: m["attributes"].__setitem__("attnscope_format", version))
    with pytest.raises(ats.AttnscopeError, match=f"claims trace format {version}; formats start at 1"):
        ats.open_trace(trace)


def test_crafted_image_shape_is_refused_before_any_allocation(trace):
    def craft(meta):
        meta["consolidated_metadata"]["metadata"]["images"]["shape"] = [1, 100000, 100000, 3]
    _edit_root(trace, craft)
    images = json.loads((trace / "images" / "zarr.json").read_text())
    images["shape"] = [1, 100000, 100000, 3]
    (trace / "images" / "zarr.json").write_text(json.dumps(images))
    tracemalloc.start()
    try:
        with pytest.raises(ats.AttnscopeError, match=r"array 'images' has shape \[1, 100000, 100000, 3\], expected "
                                                     r"\[1, 32, 32, 3\]"):
            _ = ats.open_trace(trace).images
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 << 20
    result = cli("plot", trace, "-o", trace.parent / "p.png")
    assert result.exit_code == 2 and "array 'images' has shape" in result.stderr
    assert not (trace.parent / "p.png").exists()


def test_crafted_site_name_is_refused(trace):
    _edit_root(trace, lambda m: m["attributes"].__setitem__("sites", ["../../../escape"]))
    with pytest.raises(ats.AttnscopeError, match="site name '../../../escape' is not a module path"):
        ats.open_trace(trace)


def test_writer_never_writes_outside_the_store(tmp_path):
    layout = StoreLayout(num_steps=1, samples=1, prompt_of_sample=(0,), image_of_sample=(0,), token_positions=(0,),
                         token_text=[["<|startoftext|>"]],
                         sites=[SiteLayout("../../escape", {}, heads=1, spatial=(2, 2), branches=("cond",), steps=(0,))])
    (tmp_path / "inner").mkdir()
    w = TraceWriter(tmp_path / "inner" / "t.zarr")
    w.init(layout)
    with pytest.raises(ats.AttnscopeError, match="site name '../../escape' is not a module path"):
        w.close(complete=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["inner"]


_SLOW_CAPTURE = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import attnscope as ats
    from attnscope.testing import tiny_sd_pipeline
    import pathlib
    def slow(pipe, i, t, kw):  # hold the store open until the test says so
        release = pathlib.Path(sys.argv[1] + ".release")
        for _ in range(1200):
            if release.exists() or i > 0:
                break
            time.sleep(0.1)
        return kw
    try:
        ats.capture(tiny_sd_pipeline(), "a red circle", seed=int(sys.argv[2]), store=sys.argv[1],
                    overwrite=sys.argv[3] == "1", num_inference_steps=20, height=32, width=32,
                    callback_on_step_end=slow)
    except ats.AttnscopeError as e:
        print("error:", e)
        sys.exit(2)
    print("done")
""")


def test_two_processes_writing_one_path(tmp_path):
    store = tmp_path / "same.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(seed, overwrite):
        return subprocess.Popen([sys.executable, "-c", _SLOW_CAPTURE, str(store), str(seed), overwrite],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    first = start(0, "0")
    deadline = time.monotonic() + 120
    while not (store / "zarr.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    second, third = start(1, "0"), start(2, "1")  # the same path, without and with overwrite
    out2, out3 = second.communicate(timeout=300), third.communicate(timeout=300)
    (tmp_path / "same.zarr.release").touch()  # let the first one go on
    out1 = first.communicate(timeout=300)
    assert first.returncode == 0 and "done" in out1[0], out1
    assert second.returncode == 2 and "exists" in out2[0], out2
    assert third.returncode == 2 and "being written by another process" in out3[0], out3
    tr = ats.open_trace(store)
    assert tr.complete and tr.manifest["run"]["seed"] == 0
    assert not np.isnan(tr.attention(SITE).values).any()


# -- found by an audit (2026-12-06) ------------------------------------------------------------------------------
def test_a_capture_killed_while_setting_up_the_store_is_named_and_overwritten(sd_pipe, tmp_path):
    """The root attributes were written last: a kill during set-up left a directory that open_trace called
    "not an attnscope trace" and overwrite=True refused to replace."""
    child = textwrap.dedent(f"""
        import os, signal, zarr, attnscope as ats
        from attnscope.testing import tiny_sd_pipeline
        zarr.Group.update_attributes = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-set-up
        ats.capture(tiny_sd_pipeline(), "a red circle", seed=0, store={str(tmp_path / 'k.zarr')!r},
                    num_inference_steps=2, height=32, width=32)
    """)
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == -signal.SIGKILL
    with pytest.raises(ats.AttnscopeError, match="capture stopped while it was setting up the store.*overwrite=True"):
        ats.open_trace(tmp_path / "k.zarr")
    assert ats.capture(sd_pipe, "a red circle", seed=0, store=tmp_path / "k.zarr", overwrite=True, **RUN).complete


def test_a_capture_to_a_url_writes_the_local_path_of_file_urls_and_refuses_others(sd_pipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tr = ats.capture(sd_pipe, "a red circle", seed=0, store=f"file://{tmp_path}/f.zarr", **RUN)
    assert tr.path == tmp_path / "f.zarr" and not (tmp_path / "file:").exists()
    with pytest.raises(ats.AttnscopeError, match=r"store='s3://bucket/r.zarr': a capture writes a local directory.*"
                                                 r"upload_trace"):
        ats.capture(sd_pipe, "a red circle", seed=0, store="s3://bucket/r.zarr", **RUN)
    assert not (tmp_path / "s3:").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["attributes"]["manifest"].update(capture=[]), r"manifest entries \['capture'\] are not objects"),
    (lambda m: m["consolidated_metadata"]["metadata"].pop("step"), r"the root arrays \['step'\] are missing"),
    (lambda m: m["attributes"].update(format_min_reader="2"), r"'format_min_reader' attribute is '2'; expected an int"),
    (lambda m: m["attributes"].update(format_min_reader=99), r"needs a reader of format 99 or later"),
])
def test_crafted_root_metadata_is_one_clear_error(trace, edit, message):
    _edit_root(trace, edit)
    with pytest.raises(ats.AttnscopeError, match=message):
        tr = ats.open_trace(trace)
        tr.attention(tr.sites[0]).load()


@pytest.mark.parametrize("key, what", [
    ("images/c/0/0/0/0", "the stored images"), ("sample/c/0", "coordinate 'sample'"),
    ("token_text/c/0/0", "coordinate 'token_text'"), ("timestep/c/0", "coordinate 'timestep'"),
])
def test_a_lost_root_chunk_is_damage_not_zeros(trace, key, what):
    # 'sample' is [0] and would read back as zeros from its fill value: the writer stores every root chunk, so a lost
    # one is an error naming it, never a black image, empty token text or sample 0
    (trace / key).unlink()
    tr = ats.open_trace(trace)
    with pytest.raises(ats.AttnscopeError, match=rf"{what} lost 1 chunk\(s\) \({key.split('/', 1)[1]} of array"):
        _ = tr.coords, tr.images


def test_a_root_array_with_a_changed_byte_fails_its_checksum(trace):
    chunk = trace / "token_text" / "c" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(ats.AttnscopeError, match="coordinate 'token_text' cannot be read.*damaged"):
        _ = ats.open_trace(trace).tokens


def test_a_black_image_is_stored_and_read_back(tmp_path):
    layout = StoreLayout(num_steps=1, samples=1, prompt_of_sample=(0,), image_of_sample=(0,), token_positions=(0,),
                         token_text=[["<sot>"]], sites=[SiteLayout("attn2", {}, heads=1, spatial=(2, 2),
                                                                  branches=("cond",), steps=(0,))])
    writer = TraceWriter(tmp_path / "t.zarr")
    writer.init(layout)
    writer.timestep(0, 999.0)
    writer.put("attn2", "cond", 0, np.zeros((1, 1, 2, 2, 1), np.float16))
    writer.close(complete=True, images=np.zeros((1, 8, 8, 3), np.uint8), attrs={"manifest": {}, "sites": ["attn2"]})
    assert (tmp_path / "t.zarr" / "images" / "c" / "0" / "0" / "0" / "0").is_file()
    assert (tmp_path / "t.zarr" / "sample" / "c" / "0").is_file()


def test_a_store_without_the_mark_is_read_as_before(trace):
    # traces written before every root chunk was stored: a chunk equal to the fill value was left out, not lost
    _edit_root(trace, lambda m: m["attributes"].pop("root_chunks_stored"))
    (trace / "sample" / "c" / "0").unlink()
    assert ats.open_trace(trace).coords["sample"].values.tolist() == [0]


@pytest.mark.parametrize("make, kind", [(os.mkfifo, "a named pipe"), (lambda p: os.symlink("/dev/zero", p), "a device")])
def test_a_store_holding_a_pipe_or_device_is_refused_before_any_read(trace, make, kind):
    # a FIFO would block the read for ever, /dev/zero would read without end
    make(trace / "images" / "c" / "0" / "0" / "0" / "1")
    with pytest.raises(ats.AttnscopeError, match=rf"'images/c/0/0/0/1' is {kind}.*not a regular file"):
        ats.open_trace(trace)


def test_an_unknown_codec_names_the_array_and_codec(trace):
    def edit(meta):
        site = meta["consolidated_metadata"]["metadata"][f"sites/{SITE}/attention"]
        site["codecs"][0]["configuration"]["codecs"][1]["name"] = "lz-unknown"
    _edit_root(trace, edit)
    with pytest.raises(ats.AttnscopeError, match=rf"^'[^']*': array 'sites/{SITE}/attention' has codec 'lz-unknown', "
                                                 r"which zarr .* cannot decode"):
        ats.open_trace(trace)


@pytest.mark.parametrize("target", ["dir", "file"])
def test_a_link_out_of_the_store_is_refused_before_any_read(trace, tmp_path_factory, target):
    # a link to / made open_trace walk the whole file system; one to another file read it as a chunk
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret").write_bytes(b"\x00" * 64)
    if target == "dir":
        os.symlink(outside, trace / "images" / "elsewhere")
    else:
        chunk = trace / "images" / "c" / "0" / "0" / "0" / "0"
        chunk.unlink()
        os.symlink(outside / "secret", chunk)
    with pytest.raises(ats.AttnscopeError, match=r"'images/(elsewhere|c/0/0/0/0)' links out of the store"):
        ats.open_trace(trace)


def test_a_link_inside_the_store_is_read(trace):
    chunk = trace / "images" / "c" / "0" / "0" / "0" / "0"
    before = np.asarray(ats.open_trace(trace).images[0])
    moved = trace / "images" / "moved"
    chunk.rename(moved)
    os.symlink(moved, chunk)
    assert np.array_equal(np.asarray(ats.open_trace(trace).images[0]), before)
