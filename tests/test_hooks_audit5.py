"""The hook core (fifth audit): the object ``ats.hooks(...)`` returns is one ``with`` block."""

import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.testing import tiny_sd_pipeline

RUN = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def _image(pipe):
    return pipe("a red circle", generator=torch.Generator().manual_seed(0), **RUN).images


def test_entering_one_hooks_object_twice_is_one_clear_error_and_the_clients_can_be_reused():
    pipe = tiny_sd_pipeline()
    plain = _image(pipe)
    processors = dict(pipe.unet.attn_processors)
    reweight = ats.regulate.Reweight("circle", 3.0)
    block = ats.hooks(pipe, reweight)
    with block:
        edited = _image(pipe)
    assert abs(edited - plain).max() > 0
    with pytest.raises(AttnscopeError, match=r"already entered.*call ats\.hooks\(pipe, \*clients\) again"):
        with block:
            pass
    nested = ats.hooks(pipe, reweight)
    with pytest.raises(AttnscopeError, match="already entered"):  # nested in itself: refused, all put back
        with nested:
            with nested:
                pass
    assert pipe.unet.attn_processors == processors
    with ats.hooks(pipe, reweight):  # a new block with the same client gives the same edit
        again = _image(pipe)
    assert (again == edited).all()
    assert (_image(pipe) == plain).all()


def test_a_block_whose_start_failed_may_be_entered_again():
    pipe = tiny_sd_pipeline()
    block = ats.hooks(pipe, ats.regulate.Reweight("circle", 3.0))
    with ats.hooks(pipe):
        with pytest.raises(AttnscopeError, match="already"):  # the pipeline has hooks: refused, nothing installed
            with block:
                pass
    with block:  # the pipeline is free now: the same object installs
        _image(pipe)
