"""The public surface is what it claims to be."""

import inspect

import attnscope as ats


def test_all_exports_exist_and_are_documented():
    for name in ats.__all__:
        obj = getattr(ats, name)
        if callable(obj) and not isinstance(obj, tuple):
            assert inspect.getdoc(obj), f"{name} has no docstring"
    assert set(ats.__all__) >= {"capture", "open_trace", "hooks", "Trace", "Recorder", "AttnscopeError", "load_pipeline",
                                "shapes"}


def test_shapes_world_is_reachable_from_the_top_level():
    import subprocess
    import sys

    code = "import attnscope as ats; print(ats.shapes.detect.__name__, ats.shapes.sample_scene.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["detect", "sample_scene"]


def test_public_functions_open_with_an_example():
    for name in ("capture", "open_trace", "hooks", "discover_sites", "load_pipeline"):
        assert "Examples" in inspect.getdoc(getattr(ats, name)), name


def test_one_error_class():
    assert issubclass(ats.AttnscopeError, ValueError)
