"""Attention Regulation and Reweight against the official algorithm's definitions (docs/regulation.md, "The algorithm, from the official code")."""

import math

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.hooks import CallContext, CrossAttentionSite, RowLayout, StepContext
from attnscope.regulate import AttentionRegulation, Reweight, default_regulation_sites, gaussian_basis, regulation_loss
from attnscope.regulate._descent import RegulationDescent, one_thread, quantile_positions, topk_quantile
from attnscope.regulate._regulation import _put_columns

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


def _maps(z, cols, weights, basis):
    """softmax(Z + Δ) of the target columns, Δ = W·basis on them only: the loss's input, by autograd."""
    edited = z.clone()
    edited[..., cols] = z[..., cols] + torch.einsum("rkn,kp->rpn", weights, basis)
    return torch.softmax(edited, -1)[..., cols]


def _reference_descent(z, cols, weights, basis, lr, iterations, tau, groups):
    """The straightforward loop: autograd of regulation_loss(...).mean(), keep the best Δ per group."""
    rows = z.shape[0]
    best_loss = torch.full((groups,), float("inf"), dtype=z.dtype)
    best = first = None
    trajectory = []
    for _ in range(iterations):
        weights = weights.detach().requires_grad_(True)
        delta = torch.einsum("rkn,kp->rpn", weights, basis).detach()
        loss = regulation_loss(_maps(z, cols, weights, basis), weights, tau, groups=groups)
        (grad,) = torch.autograd.grad(loss.mean(), weights)
        loss = loss.detach()
        trajectory.append(weights.detach())
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        mask = better.repeat_interleave(rows // groups)[:, None, None]
        best = delta if best is None else torch.where(mask, delta, best)
        first = loss if first is None else first
        weights = weights.detach() - rows * lr * grad
    return best, first, best_loss, trajectory


@pytest.mark.parametrize("pixels", [64, 256, 37, 1, 2])
def test_topk_quantile_equals_torch_quantile(pixels):
    torch.manual_seed(pixels)
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(3, pixels, 4, dtype=dtype)
        for q in (0.9, 0.5, 0.1, 0.0, 1.0, 0.33):
            assert torch.equal(topk_quantile(x, q, dim=1), torch.quantile(x, q, dim=1)), (dtype, q)
    below, above, frac = quantile_positions(37, 0.9)
    assert (below, above) == (32, 33) and frac == pytest.approx(0.4, abs=1e-5)


@pytest.mark.parametrize("rows, tokens, cols, groups, bumps, quantile", [
    (4, 16, [2, 3, 6, 7], 1, (8, 8), 0.9),   # the shapes model: 8x8 maps, 4 target columns
    (6, 10, [4], 3, 37, 0.9),                # a prime pixel count (random bumps), n = 1, 3 groups
    (6, 12, [1, 2, 5, 9], 3, (4, 8), 0.9),   # a 4x8 map, n = 4, 3 groups
    (3, 5, [0], 1, 11, 0.9),                 # 11 pixels: rank 9 exactly, one order statistic
    (4, 9, [1, 3], 2, (8, 8), 0.3),          # a low quantile: the smallest values, ascending
])
def test_analytic_gradient_equals_autograd(rows, tokens, cols, groups, bumps, quantile):
    torch.manual_seed(rows * tokens)
    for dtype in (torch.float64, torch.float32):
        basis = (gaussian_basis(*bumps, dtype=dtype).flatten(1) if isinstance(bumps, tuple)
                 else torch.rand(5, bumps, dtype=dtype))
        z = torch.randn(rows, basis.shape[1], tokens, dtype=dtype) * 2
        weights = torch.rand(rows, basis.shape[0], len(cols), dtype=dtype)
        tau = min(1.0, 0.2 * len(cols))
        leaf = weights.clone().requires_grad_(True)
        loss = regulation_loss(_maps(z, cols, leaf, basis), leaf, tau, quantile=quantile, groups=groups)
        (expected,) = torch.autograd.grad(loss.mean(), leaf)
        descent = RegulationDescent(rows, len(cols), basis, lr=25.0, iterations=3, tau=tau, groups=groups,
                                    quantile=quantile)
        got = descent.gradient(z, cols, weights)
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(descent.losses()[0], loss.detach(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("batch, cols, spatial", [(1, [2, 3, 6, 7], (8, 8)), (3, [4], (4, 8)), (2, [1, 5], (16, 16))])
def test_optimise_matches_an_autograd_reference_loop(batch, cols, spatial):
    """Best Δ, initial Δ, first/best losses and every iteration's weights, in float64 (exact up to
    rounding) and on the shapes model's float32 sizes."""
    h, w = spatial
    basis = gaussian_basis(h, w, dtype=torch.float64).reshape(-1, h * w)
    lr = 100.0 * h * w / 256
    torch.manual_seed(batch)
    z = torch.randn(batch * 4, h * w, 16, dtype=torch.float64) * 2
    reg = AttentionRegulation(["circle"], iterations=20)
    best, initial = reg._optimise(z, cols, basis, lr, groups=batch, key=("site", 3),
                                   samples=(list(range(batch)), batch))
    first, best_loss = reg.history[("site", 3)]
    def drawn(dtype):   # the weights _optimise draws: seed 0, site index 0, step 3; one draw for all samples
        generator = torch.Generator().manual_seed((0 * 1_000_003 + 0) * 10_007 + 3)
        return torch.rand((4, basis.shape[0], len(cols)), generator=generator, dtype=dtype).repeat(batch, 1, 1)

    weights = drawn(torch.float64)
    tau = min(1.0, 0.2 * len(cols))
    expected, expected_first, expected_best, trajectory = _reference_descent(z, cols, weights, basis, lr, 20, tau,
                                                                             batch)
    assert first.shape == best_loss.shape == (batch,)
    torch.testing.assert_close(best, expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(initial, torch.einsum("rkn,kp->rpn", weights, basis), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(first, expected_first, rtol=1e-12, atol=0)
    torch.testing.assert_close(best_loss, expected_best, rtol=1e-9, atol=0)
    descent = RegulationDescent(batch * 4, len(cols), basis, lr=lr, iterations=20, tau=tau, groups=batch)
    descent.run(z, cols, weights)
    for t, reference in enumerate(trajectory):
        torch.testing.assert_close(descent.weights(t), reference, rtol=1e-9, atol=1e-9)
    if spatial == (8, 8):   # float32, as in generation: rounding grows over the 20 steps, to ~1e-6 here
        best32, _ = reg._optimise(z.float(), cols, basis.float(), lr, groups=batch, key=("site", 3),
                                   samples=(list(range(batch)), batch))
        expected32 = _reference_descent(z.float(), cols, drawn(torch.float32), basis.float(), lr, 20, tau, batch)[0]
        torch.testing.assert_close(best32, expected32, rtol=1e-5, atol=1e-5 * float(expected32.abs().max()))


def test_descent_helpers_restore_state_and_write_columns():
    threads = torch.get_num_threads()
    with one_thread(10, torch.device("cpu")):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads
    with one_thread(1 << 30, torch.device("cpu")):                       # large tensors keep all threads
        assert torch.get_num_threads() == threads
    out, values = torch.zeros(4, 2, 3, 5), torch.arange(36.0).reshape(3, 2, 3, 2)
    cols = torch.tensor([1, 4])
    _put_columns(out, [0, 2, 3], cols, values)                           # non-consecutive rows: a list
    expected = torch.zeros(4, 2, 3, 5)
    expected[[0, 2, 3], :, :, 1], expected[[0, 2, 3], :, :, 4] = values[..., 0], values[..., 1]
    assert torch.equal(out, expected)
    _put_columns(out, slice(1, 4), cols, values)                         # consecutive rows: a view
    expected[1:4, :, :, 1], expected[1:4, :, :, 4] = values[..., 0], values[..., 1]
    assert torch.equal(out, expected)
    with pytest.raises(AttnscopeError, match="groups=2"):
        RegulationDescent(3, 1, gaussian_basis(8, 8).reshape(9, 64), lr=1.0, iterations=2, tau=0.2, groups=2)


def _spelled(pipe, ids):
    return tuple(tuple(pipe.tokenizer.convert_ids_to_tokens(row.tolist())) for row in ids)


def _context(pipe, session, step=0, spatial=(8, 8), ids=None):
    if ids is None:
        ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
    site = next(s for s in session.sites if s.name.startswith("up_blocks.1.attentions.0"))
    layout = RowLayout.for_batch(batch=2, guidance=True, num_prompts=1)
    step_ctx = StepContext(run=0, step=step, timestep=999.0, num_steps=20, latent_shape=(16, 16), rows=layout,
                           token_ids=ids, token_text=_spelled(pipe, ids))
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


# -- a sample's result does not depend on its batch ------------------------------------------------
BATCH_PROMPTS = ["a red circle and a blue square", "a green square and a green circle",
                 "a blue triangle and a red triangle", "a yellow circle above a red square",
                 "a red square and a blue circle"]


def _regulated(pipe, prompts, seeds, **kwargs):
    """Images (float arrays) of one pipeline call with regulation on the object nouns."""
    from attnscope.models import object_nouns

    with ats.hooks(pipe, AttentionRegulation(object_nouns, iterations=6)):
        out = pipe(prompts, num_inference_steps=6, output_type="np",
                   generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs)
    return list(out.images)


def _batch_context(pipe, session, prompts, step, images_per_prompt=1):
    """The call context of an ``up_blocks.1`` site for ``prompts`` × ``images_per_prompt`` with CFG."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    samples = len(prompts) * images_per_prompt
    site = next(s for s in session.sites if s.name.startswith("up_blocks.1.attentions.0"))
    layout = RowLayout.for_batch(batch=2 * samples, guidance=True, num_prompts=len(prompts))
    step_ctx = StepContext(run=0, step=step, timestep=999.0, num_steps=20, latent_shape=(16, 16), rows=layout,
                           token_ids=ids, token_text=_spelled(pipe, ids))
    return CallContext(site=site, step_context=step_ctx, spatial_shape=(8, 8), tokens=ids.shape[1])


def _regulate_calls(pipe, prompts, logits_per_step, images_per_prompt=1, targets=None):
    """Edited logits and restored probabilities of a fresh regulation, step after step (temporal state included)."""
    from attnscope.models import object_nouns

    reg = AttentionRegulation(targets or object_nouns)
    outputs = []
    with ats.hooks(pipe, reg) as session:
        for step, logits in enumerate(logits_per_step):
            ctx = _batch_context(pipe, session, prompts, step, images_per_prompt)
            edited = reg.on_logits(ctx, logits)
            outputs.append((edited, reg.on_probs(ctx, torch.softmax(edited, -1))))
    return outputs


def test_regulation_of_a_sample_is_bit_identical_alone_or_in_any_batch(pipe):
    """No coupling across samples: the same logits give the same edit whatever else is in the batch
    (1, 2 and 5 prompts per call, and two images per prompt), over three steps of temporal smoothing."""
    torch.manual_seed(5)
    samples = len(BATCH_PROMPTS)
    steps = [torch.randn(2 * samples, 4, 64, 77) for _ in range(3)]      # [uncond rows; cond rows]

    def rows(logits, picked):                                             # the uncond and cond rows of some samples
        return torch.cat([logits[picked], logits[[samples + i for i in picked]]])

    def sample_of(outputs, i, n):                                         # sample i's cond row of a batch of n
        return [(edited[n + i], probs[n + i]) for edited, probs in outputs]

    five = _regulate_calls(pipe, BATCH_PROMPTS, steps)
    for batch in ([0], [1], [2], [3], [4], [0, 1], [2, 3]):
        part = _regulate_calls(pipe, [BATCH_PROMPTS[i] for i in batch], [rows(z, batch) for z in steps])
        for j, i in enumerate(batch):
            for (e5, p5), (e, p) in zip(sample_of(five, i, samples), sample_of(part, j, len(batch))):
                assert torch.equal(e5, e) and torch.equal(p5, p), f"sample {i} differs in batch {batch}"
    # num_images_per_prompt: prompts 1 and 2 with two images each; image k of a prompt = sample 2p + k
    picked = [1, 1, 2, 2]
    twice = _regulate_calls(pipe, BATCH_PROMPTS[1:3], [rows(z, picked) for z in steps], images_per_prompt=2)
    for k, i in enumerate(picked):
        alone = _regulate_calls(pipe, [BATCH_PROMPTS[i]], [rows(z, [i]) for z in steps])
        for (e2, p2), (e, p) in zip(sample_of(twice, k, 4), sample_of(alone, 0, 1)):
            assert torch.equal(e2, e) and torch.equal(p2, p), f"image {k} differs"
    assert not torch.equal(five[0][0][samples], steps[0][samples])        # it did edit


def test_each_prompt_of_a_group_gets_its_own_end_of_text_back(pipe):
    """Two prompts with the same target columns but different lengths are optimised as one group; each gets its
    own first EOT column back (B's at 12, not A's at 8, which is B's word 'and'), as when it runs alone."""
    prompts = ["a green square and a green circle", "a green square and a green circle and a red triangle"]
    torch.manual_seed(3)
    logits = torch.randn(4, 4, 64, 77)                                   # [uncond A, uncond B, cond A, cond B]
    (edited, probs), = _regulate_calls(pipe, prompts, [logits], targets=["square", "circle"])
    (alone_edited, alone), = _regulate_calls(pipe, prompts[1:], [logits[[1, 3]]], targets=["square", "circle"])
    unedited = torch.softmax(logits, -1)
    torch.testing.assert_close(probs[3][..., [0, 12]], unedited[3][..., [0, 12]], rtol=0, atol=0)
    torch.testing.assert_close(probs[2][..., [0, 8]], unedited[2][..., [0, 8]], rtol=0, atol=0)
    assert not torch.allclose(probs[3][..., 8], unedited[3][..., 8])    # B's 'and': edited softmax, not given back
    assert torch.equal(probs[3], alone[1]) and torch.equal(edited[3], alone_edited[1])


def test_prompt_embeds_warn_that_the_end_of_text_is_not_given_back(pipe):
    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    reg = AttentionRegulation([3, 7], iterations=2)
    with ats.hooks(pipe, reg), pytest.warns(ats.AttnscopeWarning, match="prompt_embeds, so its end-of-text column"):
        pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, output_type="latent")


def test_a_regulated_image_is_the_same_alone_or_in_a_batch(pipe):
    """End to end the denoiser itself is not bit-identical across batch sizes on CPU (its matrix
    products block differently: ~1e-6 in the image, regulated or not), so the images agree to 1e-4;
    before the per-sample draw of the initial weights they differed by up to 0.8."""
    seeds = [40, 41, 42, 43, 44]
    alone = [_regulated(pipe, [p], [s])[0] for p, s in zip(BATCH_PROMPTS, seeds)]
    pairs = _regulated(pipe, BATCH_PROMPTS[:2], seeds[:2]) + _regulated(pipe, BATCH_PROMPTS[2:4], seeds[2:4])
    five = _regulated(pipe, BATCH_PROMPTS, seeds)
    for i in range(5):
        assert np.abs(five[i] - alone[i]).max() < 1e-4, f"sample {i} differs in a batch of five"
    for i in range(4):
        assert np.abs(pairs[i] - alone[i]).max() < 1e-4, f"sample {i} differs in a batch of two"
    nipp = _regulated(pipe, BATCH_PROMPTS[1:3], [7, 8, 9, 10], num_images_per_prompt=2)
    for i, seed in enumerate([7, 8, 9, 10]):
        assert np.abs(nipp[i] - _regulated(pipe, [BATCH_PROMPTS[1 + i // 2]], [seed])[0]).max() < 1e-4, f"image {i}"
    plain = pipe(BATCH_PROMPTS[0], num_inference_steps=6, output_type="np",
                 generator=torch.Generator().manual_seed(seeds[0])).images[0]
    assert np.abs(plain - alone[0]).max() > 0.05                              # regulation did act


def test_rerun_of_a_batched_trace_reproduces_each_regulated_sample(pipe, tmp_path):
    from attnscope.models import object_nouns

    seeds = [3, 4, 5]
    tr = ats.capture(pipe, BATCH_PROMPTS[2:], seed=seeds, store=tmp_path / "batch.zarr", num_inference_steps=6,
                     sites="up_blocks.1.*")
    again = ats.rerun(tr, [AttentionRegulation(object_nouns, iterations=6)])
    for i, (prompt, seed) in enumerate(zip(BATCH_PROMPTS[2:], seeds)):
        alone = (_regulated(pipe, [prompt], [seed])[0] * 255).round()
        assert np.abs(np.asarray(again.images[i], float) - alone).max() <= 1, f"sample {i}"


def test_a_repeated_target_takes_the_next_occurrence(pipe):
    prompt = "a red circle and a blue circle"
    reg = AttentionRegulation(["circle", "circle"], iterations=2)
    with ats.hooks(pipe, reg) as session:
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        assert reg.scope.columns(_context(pipe, session, ids=ids)) == [[3, 7]]
    with pytest.raises(AttnscopeError, match="'circle' is given 3 times but occurs 2 time"):
        with ats.hooks(pipe, AttentionRegulation(["circle"] * 3)):
            pipe(prompt, num_inference_steps=2)


# -- bad settings and combinations found by an audit (2026-12-06) -----------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: Reweight("circle", float("nan")), r"factor=nan: expected a finite non-negative number"),
    (lambda: Reweight("circle", math.inf), r"factor=inf: expected a finite non-negative number"),
    (lambda: Reweight(1.5, 2.0), r"targets=1.5: expected words, phrases or token positions"),
    (lambda: Reweight("circle", 2.0, sites=3), r"sites=3: expected a site name or glob"),
    (lambda: AttentionRegulation(["circle"], quantile=2.0), r"quantile=2.0: expected a number in \(0, 1\]"),
    (lambda: AttentionRegulation(["circle"], quantile_target=math.nan), r"quantile_target=nan"),
    (lambda: AttentionRegulation(["circle"], weight_decay=math.nan), r"weight_decay=nan"),
    (lambda: AttentionRegulation(["circle"], lr=math.inf), r"lr=inf: expected a number in \(0, ∞\)"),
    (lambda: AttentionRegulation(["circle"], tau=-1), r"tau=-1"),
    (lambda: AttentionRegulation(["circle"], mass_weight=-5), r"mass_weight=-5"),
    (lambda: AttentionRegulation(["circle"], decay=math.inf), r"decay=inf"),
])
def test_bad_settings_are_refused_when_made(make, message):
    """They were taken (a NaN factor or an infinite decay gave a blank image) or failed mid-run."""
    with pytest.raises(AttnscopeError, match=message):
        make()


def _run(pipe, *clients, prompt=PROMPT, steps=4, **kwargs):
    with ats.hooks(pipe, *clients):
        return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs).images


def test_bad_input_found_at_the_run_start_leaves_no_store(shapes, tmp_path):
    embeds, negative = shapes.encode_prompt(PROMPT, "cpu", 1, True)
    store = tmp_path / "a.zarr"
    for client in (Reweight("circle", 2.0), AttentionRegulation(["circle"])):   # words, but no prompt text
        with pytest.raises(AttnscopeError, match="targets given as words need the prompt's tokens"):
            with ats.hooks(shapes, client, ats.Recorder(store)):
                shapes(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=4)
        assert not store.exists()
    gate = ats.regulate.risk_above(0.1, step=1, targets=["green dog", "blue square"])
    with pytest.raises(AttnscopeError, match="risk_above, prompt 'a red circle and a blue square': target 'green dog'"):
        _run(shapes, AttentionRegulation(["circle", "square"], steps=None, when=gate), ats.Recorder(store))
    assert not store.exists()
    for step, steps in ((2, "first_half"), (4, None)):    # decides at or after the last regulated step of 4
        gate = ats.regulate.risk_above(0.0, step=step, targets=["red circle", "blue square"])
        with pytest.raises(AttnscopeError, match=rf"risk_above\(step={step}\): the intervention would never act"):
            _run(shapes, AttentionRegulation(["circle", "square"], steps=steps, when=gate), ats.Recorder(store))
        assert not store.exists()


def test_history_holds_every_sample_when_prompts_differ_in_columns(shapes):
    """Samples whose target columns differ are optimised in groups; history kept only the last group's."""
    reg = AttentionRegulation(["circle", "square"], steps=None, iterations=2)
    prompts = [PROMPT, "a circle and a blue square", PROMPT]
    _run(shapes, reg, prompt=prompts, steps=2)
    for first, best in reg.history.values():
        assert first.shape == best.shape == (3,) and not torch.isnan(first).any() and bool((best <= first).all())
    gated = AttentionRegulation(["circle", "square"], steps=None, iterations=2,
                                when=ats.regulate.risk_above(1.0, step=0, targets=["circle", "square"]))
    _run(shapes, gated, prompt=prompts, steps=2)   # a risk above 1: no sample is regulated, every entry NaN
    assert gated.history == {} or all(torch.isnan(f).all() for f, _ in gated.history.values())


def test_tgate_and_spatial_temporal_compose(shapes):
    """At TGATE's first gated step SpatialTemporal said "needs classifier-free guidance" and the run failed."""
    layout = {"a red circle": (0, 0, 0.5, 1), "a blue square": (0.5, 0, 1, 1)}
    both = _run(shapes, ats.regulate.SpatialTemporal(layout), ats.regulate.TGate(3), steps=6, guidance_scale=7.5)
    gated = _run(shapes, ats.regulate.TGate(3), steps=6, guidance_scale=7.5)
    spatial = _run(shapes, ats.regulate.SpatialTemporal(layout), steps=6, guidance_scale=7.5)
    assert np.abs(both - gated).max() > 0.01 and np.abs(both - spatial).max() > 0.01


def test_a_rerun_of_a_risk_gated_rerun_reproduces_it(shapes, tmp_path):
    """The second rerun judged the first rerun's regulated maps again and decided otherwise."""
    tr = ats.capture(shapes, [PROMPT, "a green triangle and a yellow circle"], seed=[0, 1], store=tmp_path / "a.zarr",
                     num_inference_steps=4)

    def regulation():
        gate = ats.regulate.risk_above(0.1, step=1, targets=ats.models.object_phrases)
        return AttentionRegulation(ats.models.object_nouns, when=gate)

    a = ats.rerun(tr, [regulation()], store=tmp_path / "r1.zarr")
    b = ats.rerun(a, [regulation()], store=tmp_path / "r2.zarr")
    when = [t.manifest["interventions"][0]["params"]["when"] for t in (a, b)]
    assert when[0]["at_risk"] == when[1]["at_risk"] and when[0]["risk"] == when[1]["risk"]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images))


# -- a slice of steps read back from a manifest (audit 2027-01) ------------------------------------------------
def test_steps_slice_round_trips_through_the_manifest(shapes, tmp_path):
    """A slice is recorded as {"start", "stop", "step"}; that mapping fed back to the constructor failed at the run."""
    import json

    parent = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=6)
    first = ats.rerun(parent, [Reweight("circle", 3.0, steps=slice(1, None, 2))], store=tmp_path / "b.zarr")
    params = json.loads(json.dumps(first.manifest["interventions"][0]["params"]))
    assert params["steps"] == {"start": 1, "stop": None, "step": 2}
    again = Reweight(**params)
    assert again.describe() == first.manifest["interventions"][0]
    assert again.scope.steps_of_run(6) == (1, 3, 5)
    second = ats.rerun(parent, [again], store=tmp_path / "c.zarr")  # the same run: the same image, not the parent's
    assert np.array_equal(np.asarray(second.images[0]), np.asarray(first.images[0]))
    assert not np.array_equal(np.asarray(second.images[0]), np.asarray(parent.images[0]))
    regulation = AttentionRegulation(["circle", "square"], steps=slice(1, None, 2))
    params = json.loads(json.dumps(regulation.describe()["params"]))
    rebuilt = AttentionRegulation(**params)
    assert rebuilt.describe() == regulation.describe() and rebuilt.scope.steps_of_run(6) == (1, 3, 5)
    assert Reweight("circle", 2.0, steps={"stop": 2}).scope.steps_of_run(6) == (0, 1)   # keys left out are None


@pytest.mark.parametrize("steps, message", [
    ({"start": 1, "end": 4}, r"steps=\{'start': 1, 'end': 4\}: a mapping is read as a slice; expected the keys "
                             r"start, stop, step"),
    ({"start": "1"}, r"steps=\{'start': '1'\}: .*each an int or None"),
    ({}, r"steps=\{\}: a mapping is read as a slice"),
    ("sometimes", r"steps='sometimes': expected an int, a list or range of ints, a slice, \"first_half\" or None"),
    ([1.5], r"steps=\[1.5\]: expected"),
    ([], r"steps=\[\]: expected"),
    (True, r"steps=True: expected"),
    (slice(0, 4, 0), r"steps=slice\(0, 4, 0\): expected a slice whose step is not 0"),
    (slice(0.5, 4), r"steps=slice\(0.5, 4, None\): expected a slice of ints"),
])
def test_bad_steps_are_refused_when_made(steps, message):
    for make in (lambda: Reweight("circle", 2.0, steps=steps), lambda: AttentionRegulation(["circle"], steps=steps)):
        with pytest.raises(AttnscopeError, match=message):
            make()


# -- a second audit (2026-12-06): seeds, booleans, and default sites of a run at another size ---------------------
@pytest.mark.parametrize("make, message", [
    (lambda: AttentionRegulation(["circle"], seed="x"), r"seed='x': expected an integer"),
    (lambda: AttentionRegulation(["circle"], seed=1.5), r"seed=1.5: expected an integer"),
    (lambda: AttentionRegulation(["circle"], seed=True), r"seed=True: expected an integer"),
    (lambda: AttentionRegulation(["circle"], iterations=True), r"iterations=True: expected a positive integer"),
])
def test_bad_seed_and_iterations_are_refused_when_made(make, message):
    """A str seed failed mid-run with a raw TypeError, a float one with torch's RuntimeError; True ran one iteration."""
    with pytest.raises(AttnscopeError, match=message):
        make()


def test_default_sites_follow_each_runs_latent_size(pipe):
    """The default sites are chosen by map size, so a second run at another size (same object, same hooks) gets
    the sites a fresh object gets at that size, not the first run's."""
    def sites_of(reg):
        return {site for site, _ in reg.history}

    fresh = {}
    for size in (32, 128):  # 16×16 and 64×64 latents: the ≥ 8 px level is deeper at the larger size
        reg = AttentionRegulation(["circle"], iterations=2)
        _run(pipe, reg, steps=2, height=size, width=size)
        fresh[size] = sites_of(reg)
    assert fresh[32] != fresh[128]
    reused = AttentionRegulation(["circle"], iterations=2)
    with ats.hooks(pipe, reused):
        for size in (32, 128, 32):
            pipe(PROMPT, num_inference_steps=2, height=size, width=size, generator=torch.Generator().manual_seed(0))
            assert sites_of(reused) == fresh[size], size
