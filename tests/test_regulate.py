"""Attention Regulation and Reweight against the official algorithm's definitions (shared/SEEDS.md)."""

import math

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.context import CallContext, RowLayout, StepContext
from attnscope.regulate import AttentionRegulation, Reweight, default_regulation_sites, gaussian_basis, regulation_loss
from attnscope.sites import CrossAttentionSite

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def pipe():
    p = ats.load_pipeline("shapes")
    p.set_progress_bar_config(disable=True)
    return p


def test_basis_shape_and_values():
    g = gaussian_basis(16, 16)
    assert g.shape == (49, 16, 16)
    assert g[0, 2, 2] == 1.0 and g[0, 2, 4] == pytest.approx(math.exp(-2))  # sigma 1, centre (2, 2)
    assert gaussian_basis(64, 64).shape == (49, 64, 64)
    g64 = gaussian_basis(64, 64)
    assert g64[0, 8, 8] == 1.0 and g64[0, 8, 12] == pytest.approx(math.exp(-16 / 32))  # sigma 4, centre (8, 8)
    assert gaussian_basis(8, 8).shape == (9, 8, 8)      # the official code crashes here (sigma 0)
    assert gaussian_basis(4, 4).shape == (1, 4, 4)
    rect = gaussian_basis(8, 32)                        # per axis: 3 centres (sigma 1) x 7 centres (sigma 2)
    assert rect.shape == (21, 8, 32)
    peak = (rect[1] == rect[1].max()).nonzero().tolist()
    assert peak == [[2, 8]] and rect[1, 2, 10] == pytest.approx(math.exp(-4 / 8))


def _site(name, block, level):
    return CrossAttentionSite(name=name, family="unet", kind="cross", block=block, level=level, heads=5, head_dim=64,
                              token_dim=1024, module=None)


def test_default_sites_follow_the_official_choice_by_position():
    sd2 = ([_site(f"down_blocks.{b}.attentions.{i}.transformer_blocks.0.attn2", "down", b) for b in range(3) for i in range(2)]
           + [_site("mid_block.attentions.0.transformer_blocks.0.attn2", "mid", 3)]
           + [_site(f"up_blocks.{b}.attentions.{i}.transformer_blocks.0.attn2", "up", 3 - b) for b in range(1, 4)
              for i in range(3)])
    chosen = default_regulation_sites(sd2, (64, 64))   # SD-2 base at 512 px
    assert chosen == ["down_blocks.2.attentions.0.transformer_blocks.0.attn2",
                      "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
                      "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                      "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
                      "up_blocks.1.attentions.2.transformer_blocks.0.attn2"]
    small = default_regulation_sites(sd2, (16, 16))   # a 16x16 latent: level 1 is the deepest still at 8 px
    assert small == [s.name for s in sd2 if s.name.startswith(("down_blocks.1.", "up_blocks.2."))]


def test_loss_equals_the_formula_on_a_hand_made_tensor():
    rng = np.random.default_rng(0)
    a = rng.random((4, 10, 2))                           # rows (2 samples x 2 heads), pixels, targets
    w = rng.random((4, 3, 2))
    tau = min(1, 0.2 * 2)
    terms = (np.quantile(a, 0.9, axis=1) - 0.9) ** 2 + 80 * (a.mean(1) - tau / 2) ** 2   # (rows, n)
    expected_all = terms.mean() + 0.09 * (w**2).mean()
    got = regulation_loss(torch.tensor(a), torch.tensor(w), tau)
    assert got.shape == (1,) and float(got[0]) == pytest.approx(expected_all)
    per_sample = regulation_loss(torch.tensor(a), torch.tensor(w), tau, groups=2)
    expected = [terms[:2].mean() + 0.09 * (w[:2] ** 2).mean(), terms[2:].mean() + 0.09 * (w[2:] ** 2).mean()]
    np.testing.assert_allclose(per_sample.numpy(), expected)
    assert float(per_sample.mean()) == pytest.approx(expected_all)  # the official scalar is the mean


def test_one_descent_step_lowers_the_loss():
    torch.manual_seed(0)
    z = torch.randn(8, 64, 16) * 2                       # rows (heads), pixels (8x8), tokens
    cols = [3, 7]
    basis = gaussian_basis(8, 8).reshape(-1, 64)
    w = torch.rand(8, basis.shape[0], 2, requires_grad=True)

    def loss_of(weights):
        logits = z.clone()
        logits[..., cols] = z[..., cols] + torch.einsum("rkn,kp->rpn", weights, basis)
        return regulation_loss(torch.softmax(logits, -1)[..., cols], weights, 0.4).mean()

    before = loss_of(w)
    (grad,) = torch.autograd.grad(before, w)
    # the official step rows * lr * grad with lr 100, scaled for an 8x8 map: 64 / (256 * 1 * 1) = 0.25
    after = loss_of((w - 8 * 100.0 * 0.25 * grad).detach())
    assert float(after) < 0.75 * float(before.detach())


def _context(pipe, session, step=0, spatial=(8, 8)):
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    site = next(s for s in session.sites if s.name.startswith("up_blocks.1.attentions.0"))
    layout = RowLayout.for_batch(batch=2, guidance=True, num_prompts=1)
    step_ctx = StepContext(run=0, step=step, timestep=999.0, num_steps=20, latent_shape=(16, 16), rows=layout,
                           token_ids=ids)
    return CallContext(site=site, step_context=step_ctx, spatial_shape=spatial, tokens=ids.shape[1])


def test_only_the_cond_half_and_target_columns_change_and_sot_eot_come_back(pipe):
    reg = AttentionRegulation(["circle", "square"], iterations=4)
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 64, 16)                   # [uncond; cond], heads, 8x8 pixels, tokens
    with ats.hooks(pipe, reg) as session:
        ctx = _context(pipe, session)
        assert reg.stages(ctx) == ("logits", "probs")
        edited = reg.on_logits(ctx, logits)
        probs = reg.on_probs(ctx, torch.softmax(edited, -1))
    targets, others = [3, 7], [i for i in range(16) if i not in (3, 7)]
    assert torch.equal(edited[0], logits[0])                                   # uncond half untouched
    assert torch.equal(edited[1][..., others], logits[1][..., others])         # only the target columns
    assert (edited[1][..., targets] - logits[1][..., targets]).abs().min() > 0
    original = torch.softmax(logits, -1)
    eot = pipe.tokenizer([PROMPT]).input_ids[0].index(pipe.tokenizer.eos_token_id)
    assert eot == 8
    torch.testing.assert_close(probs[1][..., [0, eot]], original[1][..., [0, eot]])   # SOT and first EOT restored
    assert torch.equal(probs[0], torch.softmax(edited, -1)[0])
    assert not torch.allclose(probs[1][..., targets], original[1][..., targets])


def test_regulation_raises_the_targets_attention_where_they_are_weak(pipe):
    reg = AttentionRegulation(["circle", "square"])
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 64, 16)
    logits[1, ..., 7] -= 2.0                                                   # 'square' weak
    with ats.hooks(pipe, reg) as session:
        ctx = _context(pipe, session)
        edited = reg.on_logits(ctx, logits)
    first, best = reg.history[(ctx.site.name, 0)]
    assert float(best[0]) < float(first[0])                                    # the descent found a better Δ
    before = torch.softmax(logits[1], -1)[..., 7].mean()
    after = torch.softmax(edited[1], -1)[..., 7].mean()
    assert after > 1.5 * before


def test_steps_sites_and_temporal_state_in_a_real_generation(pipe):
    reg = AttentionRegulation(["circle", "square"], iterations=3)
    with ats.hooks(pipe, reg):
        a = pipe(PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(0)).images[0]
    calls = sorted(reg.history)
    assert {step for _, step in calls} == {0, 1, 2}                            # first half of 6 steps
    assert {site for site, _ in calls} == {"down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                           "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                           "up_blocks.1.attentions.1.transformer_blocks.0.attn2"}
    with ats.hooks(pipe, reg):
        b = pipe(PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(0)).images[0]
    plain = pipe(PROMPT, num_inference_steps=6, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))                        # deterministic, no state carried over
    assert not np.array_equal(np.asarray(a), np.asarray(plain))


def test_bad_input(pipe):
    with pytest.raises(AttnscopeError, match="'hexagon' is not in the prompt; its words are: a, red, circle"):
        with ats.hooks(pipe, AttentionRegulation(["circle", "hexagon"])):
            pipe(PROMPT, num_inference_steps=2)
    with pytest.raises(AttnscopeError, match="'nowhere.*' matches no cross-attention site"):
        with ats.hooks(pipe, AttentionRegulation(["circle"], sites="nowhere.*")):
            pass
    with pytest.raises(AttnscopeError, match="iterations=0"):
        AttentionRegulation(["circle"], iterations=0)
    with pytest.raises(AttnscopeError, match="factor=-1"):
        Reweight("circle", -1)


def test_reweight_scales_the_right_column(pipe):
    rw = Reweight("square", 2.5)
    probs = torch.softmax(torch.randn(2, 4, 64, 16), -1)
    with ats.hooks(pipe, rw) as session:
        ctx = _context(pipe, session)
        assert rw.stages(ctx) == ("probs",)
        out = rw.on_probs(ctx, probs)
    torch.testing.assert_close(out[1][..., 7], 2.5 * probs[1][..., 7])
    others = [i for i in range(16) if i != 7]
    assert torch.equal(out[1][..., others], probs[1][..., others]) and torch.equal(out[0], probs[0])
    assert rw.describe() == {"name": "Reweight", "params": {"word": "square", "factor": 2.5, "sites": None,
                                                            "steps": None}}


def test_reweight_in_a_generation_scales_the_recorded_attention(pipe, tmp_path):
    """Observers see the final tensors: at the first site of step 0 (same input as a plain run) the
    recorded column is exactly factor x the plain one; nothing else changes there."""
    plain = ats.capture(pipe, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=4)
    rec = ats.Recorder(tmp_path / "b.zarr")
    with ats.hooks(pipe, Reweight("square", 2.0), rec):
        out = pipe(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
        rec.add_images(out.images)
    first = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    a = plain.attention(first).isel(step=0).values.astype(np.float32)
    b = ats.open_trace(tmp_path / "b.zarr").attention(first).isel(step=0).values.astype(np.float32)
    np.testing.assert_allclose(b[..., 7], np.float16(2.0 * a[..., 7]), rtol=2e-3)
    others = [i for i in range(a.shape[-1]) if i != 7]
    np.testing.assert_allclose(b[..., others], a[..., others], atol=1e-3)
