"""The hook core (fifth audit): the object ``ats.hooks(...)`` returns is one ``with`` block."""

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope.errors import AttnscopeError
from attnscope.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline

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



class ModuleCache:
    """Keeps each joint site's whole module output (a forward hook on the attention module: at joint sites
    ``on_output`` shows the image stream only) from the first run and hands it back (bypass) in later runs."""

    role = "intervention"

    def __init__(self, image_only=False):
        self.cache, self.bypassed, self.image_only, self.handles = {}, 0, image_only, []

    def stages(self, ctx):
        return ()

    def on_install(self, session):
        for site in session.sites:
            self.handles.append(site.module.register_forward_hook(self._keep(session, site.name)))

    def _keep(self, session, name):
        def keep(module, args, output):
            step = session.step_context
            if step is not None and step.run == 0:
                self.cache[(name, step.step)] = output[0] if self.image_only and isinstance(output, tuple) else output
        return keep

    def on_remove(self, error):
        for handle in self.handles:
            handle.remove()

    def bypass(self, ctx):
        out = self.cache.get((ctx.site.name, ctx.step)) if ctx.step_context.run > 0 else None
        self.bypassed += out is not None
        return out


@pytest.mark.parametrize("make", [tiny_sd3_pipeline, tiny_flux_pipeline], ids=["sd3", "flux"])
def test_a_joint_site_bypass_is_checked_against_the_module_output(make):
    """Joint sites (SD3; Flux double and single stream) had no check: a cache of another batch, or of the image
    stream only, failed inside the transformer block with torch's or Python's own error."""
    pipe = make()
    run = dict(num_inference_steps=2, height=32, width=32, output_type="np")
    cache = ModuleCache()
    with ats.hooks(pipe, cache):
        first = pipe("a red circle", generator=torch.Generator().manual_seed(0), **run).images
        replayed = pipe("a red circle", generator=torch.Generator().manual_seed(0), **run).images
        assert cache.bypassed == len(cache.cache) > 0  # every site, double and single stream, replayed
        np.testing.assert_array_equal(replayed, first)  # the module's own outputs: the same image
        with pytest.raises(AttnscopeError, match=r"client <.*ModuleCache.*>: bypass\(\) returned a tuple \(shape "
                                                 r"\((\d+), .* at \S+ step 0, expected None or the module.s output, a tuple "
                                                 r"\(shape \((?!\1,)\d+, 64, …\), shape \(\d+, \d+, …\)\)"):
            pipe("a red circle", generator=torch.Generator().manual_seed(0), num_images_per_prompt=2, **run)
    image_only = ModuleCache(image_only=True)
    with ats.hooks(pipe, image_only):
        pipe("a red circle", generator=torch.Generator().manual_seed(0), **run)
        with pytest.raises(AttnscopeError, match=r"bypass\(\) returned shape \(\d+, 64, \d+\) at .* expected None or "
                                                 r"the module.s output, a tuple"):
            pipe("a red circle", generator=torch.Generator().manual_seed(0), **run)


def test_under_the_classic_attn_processor_the_maps_are_what_it_computes():
    """AttnProcessor (set by the user, e.g. for its plain bmm) scales by ``attn.scale`` and applies no q/k norms;
    the hook core's mirror used SDPA's ``head_dim**-0.5`` and the norms, so on a module with another scale or a
    norm the recorded maps were not the model's and an edit ran another attention."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny_sd_pipeline()
    pipe.unet.set_attn_processor(AttnProcessor())
    site = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    module = pipe.unet.get_submodule(site)
    module.scale = 0.5  # not head_dim ** -0.5
    module.norm_q = torch.nn.LayerNorm(module.inner_dim // module.heads)  # AttnProcessor does not apply it
    seen_by_model = []
    own = module.get_attention_scores
    module.get_attention_scores = lambda *a, **k: seen_by_model.append(own(*a, **k)) or seen_by_model[-1]
    plain = _image(pipe)
    model_probs = torch.stack(seen_by_model)
    seen_by_model.clear()

    class Keep:
        def __init__(self):
            self.probs = []

        def stages(self, ctx):
            return ("probs",) if ctx.site.name == site else ()

        def on_probs(self, ctx, probs):
            self.probs.append(probs.flatten(0, 1).clone())

    keep = Keep()
    with ats.hooks(pipe, keep, exact=True):
        hooked = _image(pipe)
    np.testing.assert_array_equal(hooked, plain)
    torch.testing.assert_close(torch.stack(keep.probs), model_probs, rtol=0, atol=1e-6)
    with ats.hooks(pipe, Keep()):  # default: output from the same probabilities, equal up to rounding
        np.testing.assert_allclose(_image(pipe), plain, atol=1e-5)
