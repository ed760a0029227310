"""Traces on object storage: upload_trace and open_trace on s3:// (a real S3-compatible HTTP server on
localhost, moto's) and file:// URLs, and the errors for URLs that hold no trace or cannot be read."""

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import attnscope as ats
import attnscope.plot  # noqa: F401  (ats.plot)
import attnscope.store

from .conftest import BUCKET

SITE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"


@pytest.fixture(scope="session")
def local(sd_pipe, tmp_path_factory):
    """A small complete trace on disk, with output summaries (``sd_pipe``: conftest's tiny_sd_pipeline())."""
    store = tmp_path_factory.mktemp("urls") / "a.zarr"
    return ats.capture(sd_pipe, "a red circle", seed=0, store=store,
                       num_inference_steps=2, height=32, width=32, output_change=True)


@pytest.fixture(scope="session")
def remote(s3, local):
    """``local`` uploaded once to s3://traces/a.zarr."""
    return ats.store.upload_trace(local.path, f"s3://{BUCKET}/a.zarr/", storage_options=s3.options)


def local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def bucket_files(client, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix + "/")
            for o in page.get("Contents", [])]
    return {k[len(prefix) + 1:]: client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in keys}


def assert_reads_alike(tr, ref):
    """Everything a user reads from ``tr`` equals what the local trace ``ref`` gives."""
    assert (tr.tokens, tr.words, tr.sites, tr.manifest, tr.complete) == (ref.tokens, ref.words, ref.sites,
                                                                         ref.manifest, ref.complete)
    assert [np.asarray(i).tolist() for i in tr.images] == [np.asarray(i).tolist() for i in ref.images]
    xr.testing.assert_identical(tr.attention(SITE).compute(), ref.attention(SITE).compute())
    xr.testing.assert_allclose(ats.stats.dominance(tr, targets=["circle"]).compute(),
                               ats.stats.dominance(ref, targets=["circle"]).compute())
    xr.testing.assert_allclose(tr.output_change(), ref.output_change())
    xr.testing.assert_allclose(ats.stats.convergence(tr), ats.stats.convergence(ref))
    xr.testing.assert_allclose(ats.stats.map_shape(tr, ["circle"]), ats.stats.map_shape(ref, ["circle"]))
    layout = {"a red circle": (0.0, 0.0, 0.5, 1.0)}
    xr.testing.assert_allclose(ats.stats.region_share(tr, layout), ats.stats.region_share(ref, layout))


def drawn(fig):
    return [[np.asarray(im.get_array()) for im in ax.images] for ax in fig.axes if ax.get_label() != "<colorbar>"]


def test_upload_copies_every_file_and_the_s3_trace_reads_like_the_local_one(s3, local, remote):
    assert remote == f"s3://{BUCKET}/a.zarr"
    on_disk = local_files(local.path)
    assert bucket_files(s3.client, "a.zarr") == on_disk  # read back with boto3, not through attnscope

    tr = ats.open_trace(remote, storage_options=s3.options)
    assert tr.path == remote and isinstance(tr.path, str) and remote in repr(tr)
    assert tr.output_change() is not None
    assert_reads_alike(tr, local)
    fig, ref = ats.plot.heatmaps(tr, ["circle"]), ats.plot.heatmaps(local, ["circle"])
    assert [ax.get_title() for ax in fig.axes if ax.get_label() != "<colorbar>"] == ["a red circle", "circle"]
    for a, b in zip(drawn(fig), drawn(ref), strict=True):
        assert len(a) == len(b) > 0 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_aws_environment_variables_configure_s3_when_no_storage_options(s3, local, remote, monkeypatch):
    import s3fs

    for name, value in {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # instances made before the variables were set
    tr = ats.open_trace(remote)
    assert tr.storage_options is None
    assert (tr.tokens, tr.sites) == (local.tokens, local.sites)
    xr.testing.assert_allclose(ats.stats.dominance(tr, targets=["circle"]).compute(),
                               ats.stats.dominance(local, targets=["circle"]).compute())
    xr.testing.assert_allclose(ats.stats.convergence(remote), ats.stats.convergence(local))  # a URL as the source
    from .conftest import cli  # the command line takes the URL as it is (not mangled into a path)

    by_url, by_path = cli("stats", remote, "--targets", "circle"), cli("stats", local.path, "--targets", "circle")
    assert by_url.exit_code == 0, by_url.output
    assert by_url.stdout == by_path.stdout


def test_file_urls_open_as_local_paths_and_take_uploads(local, tmp_path):
    tr = ats.open_trace(local.path.as_uri())
    assert isinstance(tr.path, Path) and tr.path == local.path
    xr.testing.assert_allclose(ats.stats.dominance(tr, targets=["circle"]).compute(),
                               ats.stats.dominance(local, targets=["circle"]).compute())

    dst = (tmp_path / "copy of a.zarr").as_uri()  # percent-encoded space
    assert ats.store.upload_trace(local.path.as_uri(), dst) == dst
    assert local_files(tmp_path / "copy of a.zarr") == local_files(local.path)
    copy = ats.open_trace(dst)
    assert copy.path == tmp_path / "copy of a.zarr"
    assert_reads_alike(copy, local)


def test_an_upload_that_fails_midway_leaves_no_trace(local, tmp_path):
    dst = tmp_path / "b.zarr"
    dst.mkdir()
    (dst / "sites").write_bytes(b"")  # a file where the site groups must go: their copy fails (ENOTDIR)
    with pytest.raises(ats.AttnscopeError, match=rf"^'{dst.as_uri()}': "):
        ats.store.upload_trace(local.path, dst.as_uri())
    assert (dst / "images" / "zarr.json").is_file() and not (dst / "zarr.json").exists()  # data went, the root not
    with pytest.raises(ats.AttnscopeError, match=r"is not an attnscope trace: no Zarr group there"):
        ats.open_trace(dst.as_uri())


def test_a_half_uploaded_trace_is_not_a_trace_and_the_upload_can_be_retried(s3, local):
    url = f"s3://{BUCKET}/half.zarr"
    for name, data in local_files(local.path).items():  # a plain boto3 copy that stopped before the root
        if name != "zarr.json":
            s3.client.put_object(Bucket=BUCKET, Key=f"half.zarr/{name}", Body=data)
    with pytest.raises(ats.AttnscopeError, match=rf"^'{url}' is not an attnscope trace: no Zarr group there"):
        ats.open_trace(url, storage_options=s3.options)

    assert ats.store.upload_trace(local.path, url, storage_options=s3.options) == url  # a retry to the same URL
    assert ats.open_trace(url, storage_options=s3.options).tokens == local.tokens
    assert bucket_files(s3.client, "half.zarr") == local_files(local.path)
    with pytest.raises(ats.AttnscopeError, match=rf"^dst_url='{url}' already holds a Zarr group"):
        ats.store.upload_trace(local.path, url, storage_options=s3.options)


@pytest.mark.parametrize("url", [f"s3://{BUCKET}/missing.zarr", "s3://no-such-bucket/a.zarr"])
def test_urls_without_a_trace(s3, url):
    with pytest.raises(ats.AttnscopeError, match=rf"^'{url}' is not an attnscope trace: no Zarr group there"):
        ats.open_trace(url, storage_options=s3.options)


def test_unknown_schemes_and_missing_backends_name_what_to_install(monkeypatch):
    with pytest.raises(ats.AttnscopeError, match=r"^'foo://b/a.zarr': unknown URL scheme 'foo'"):
        ats.open_trace("foo://b/a.zarr")
    if "gcsfs" not in sys.modules:
        with pytest.raises(ats.AttnscopeError, match=r"^'gs://b/a.zarr': .*gs:// is not installed; pip install gcsfs"):
            ats.open_trace("gs://b/a.zarr")
    # as if s3fs were not installed: fsspec has not loaded it, and importing it fails
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(ats.AttnscopeError, match=r"^'s3://b/a.zarr': .* pip install 'attnscope\[s3\]'"):
        ats.open_trace("s3://b/a.zarr")
    with pytest.raises(ats.AttnscopeError, match=r"pip install 'attnscope\[s3\]'"):
        ats.store.upload_trace("a.zarr", "s3://b/a.zarr")


def test_an_unreachable_endpoint_is_named():
    with socket.socket() as s:  # a local port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
               "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}}
    with pytest.raises(ats.AttnscopeError, match=rf"^'s3://b/a.zarr': cannot reach the endpoint http://127.0.0.1:{port} "):
        ats.open_trace("s3://b/a.zarr", storage_options=options)


def test_upload_refuses_what_it_cannot_copy(s3, local, tmp_path):
    with pytest.raises(ats.AttnscopeError, match=r"dst_url='runs/a.zarr': expected a URL"):
        ats.store.upload_trace(local.path, "runs/a.zarr")
    with pytest.raises(ats.AttnscopeError, match="is not an attnscope trace"):
        ats.store.upload_trace(tmp_path, f"s3://{BUCKET}/empty.zarr", storage_options=s3.options)
    with pytest.raises(ats.AttnscopeError, match="copies a local trace directory; got a URL"):
        ats.store.upload_trace(f"s3://{BUCKET}/a.zarr", f"s3://{BUCKET}/c.zarr", storage_options=s3.options)
    with pytest.raises(ats.AttnscopeError, match=r"^'s3://no-such-bucket/a.zarr': "):
        ats.store.upload_trace(local.path, "s3://no-such-bucket/a.zarr", storage_options=s3.options)


def test_upload_trace_is_exported():
    assert "upload_trace" in ats.store.__all__ and ats.store.upload_trace.__module__ == "attnscope.store._upload"
