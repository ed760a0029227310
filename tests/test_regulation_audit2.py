"""Attention Regulation audited at its edges (2027-01): bad targets, numpy inputs, non-finite logits, state left over
from an earlier installation, and gates rebuilt from a manifest. Each test failed before its fix."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

import attnscope as ats
from attnscope import AttnscopeError
from attnscope.hooks import CallContext, RowLayout, StepContext
from attnscope.regulate import AttentionRegulation, gaussian_basis, risk_above
from attnscope.regulate._descent import RegulationDescent
from attnscope.regulate._scope import nth_occurrences

PROMPT = "a red circle and a blue square"
TOKENS = ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "and</w>", "a</w>", "blue</w>", "circle</w>",
          "<|endoftext|>"]


def _run(pipe, reg, prompt=PROMPT, steps=2, **kwargs):
    with ats.hooks(pipe, reg):
        return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="np",
                    **kwargs).images


def _context(pipe, session, prompts, step=0):
    """The call context of an 8×8 ``up_blocks.1`` site of the shapes model for ``prompts`` with CFG."""
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    text = tuple(tuple(pipe.tokenizer.convert_ids_to_tokens(row.tolist())) for row in ids)
    site = next(s for s in session.sites if s.name.startswith("up_blocks.1.attentions.0"))
    layout = RowLayout.for_batch(batch=2 * len(prompts), guidance=True, num_prompts=len(prompts))
    step_ctx = StepContext(run=0, step=step, timestep=999.0, num_steps=20, latent_shape=(16, 16), rows=layout,
                           token_ids=ids, token_text=text)
    return CallContext(site=site, step_context=step_ctx, spatial_shape=(8, 8), tokens=ids.shape[1])


# -- targets ------------------------------------------------------------------------------------------------------
def test_numpy_int_targets_are_positions_and_their_record_is_json(shapes):
    """np.int64 positions (an np.arange, a .values item) crashed in nth_occurrences with AttributeError ('lower'),
    and describe() kept them, so a manifest could not be written."""
    plain = _run(shapes, AttentionRegulation([3, 7], iterations=2))
    reg = AttentionRegulation([np.int64(3), np.int64(7)], iterations=2)
    assert np.array_equal(_run(shapes, reg), plain)
    assert json.loads(json.dumps(reg.describe()))["params"]["targets"] == [3, 7]


def test_a_word_given_again_with_other_spacing_or_case_takes_the_next_occurrence():
    """" circle" counted as another word than "circle", so both took the first circle and the second was silently
    not regulated."""
    assert nth_occurrences(TOKENS, ["circle", " circle "]) == [[3], [7]]
    assert nth_occurrences(TOKENS, ["circle", "Circle"]) == [[3], [7]]
    assert nth_occurrences(TOKENS, ["red  circle", "circle"]) == [[2, 3], [3]]   # another target: its own count


def square_or_none(prompt):
    return ["square"] if "square" in prompt else None


@pytest.mark.parametrize("given", [None, [], [3.5], [["circle"]]])
def test_a_targets_function_giving_no_targets_is_named_in_the_error(shapes, given):
    """The error said "target None: expected a word ..." without saying that the function gave it, or for which
    prompt."""
    def targets(prompt):
        return given

    with pytest.raises(AttnscopeError, match=rf"targets='targets' gave {re.escape(repr(given))} for the prompt "
                                             rf"'{PROMPT}': expected words, phrases or token positions"):
        _run(shapes, AttentionRegulation(targets, iterations=2))
    with pytest.raises(AttnscopeError, match=r"prompt 1 of 2 \('a red circle'\): targets='square_or_none' gave None: "
                                             r"expected"):
        _run(shapes, AttentionRegulation(square_or_none, iterations=2), prompt=[PROMPT, "a red circle"])


def test_positions_outside_the_prompt_embeddings_are_refused_at_the_start(shapes, tmp_path):
    """With prompt_embeds, a position past the token axis (or a negative one) failed mid-run with torch's
    IndexError; a Recorder beside it had already created its store."""
    embeds, negative = shapes.encode_prompt(PROMPT, "cpu", 1, True)
    store = tmp_path / "a.zarr"
    for targets, bad in (([3, 100], r"\[100\]"), ([-1, 3], r"\[-1\]")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ats.AttnscopeWarning)   # the end-of-text column cannot be given back
            with pytest.raises(AttnscopeError, match=rf"token position\(s\) {bad} out of range 0\.\.15 \(the prompt "
                                                     rf"embeddings have 16 tokens\)"):
                with ats.hooks(shapes, AttentionRegulation(targets, iterations=2), ats.Recorder(store)):
                    shapes(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2)
        assert not store.exists()
    assert AttentionRegulation([np.int64(3)]).scope._positions_without_text(16) == [3]   # numpy's ints are positions


def test_a_target_cut_off_by_the_tokenizer_says_the_prompt_fills_its_tokens(sd_pipe):
    """CLIP keeps 77 tokens; a target after them was "not in the prompt" with no hint why."""
    long = PROMPT + " and a green triangle" * 20 + " and a yellow cat"
    with pytest.raises(AttnscopeError, match=r"target 'cat' is not in the prompt.*\(the prompt fills all 77 token "
                                             r"positions: the tokenizer may have cut words off its end\)"):
        _run(sd_pipe, AttentionRegulation(["circle", "cat"], iterations=2), prompt=long, height=32, width=32)
    with pytest.raises(AttnscopeError, match=r"target 'cat' is not in the prompt; its words are: a, red, circle, and, "
                                             r"blue, square$"):   # a short prompt: no hint
        _run(sd_pipe, AttentionRegulation(["circle", "cat"], iterations=2), height=32, width=32)


# -- settings -------------------------------------------------------------------------------------------------------
def test_numpy_numbers_are_taken_as_the_numbers_they_are():
    """lr=np.float32(50) was refused with "expected a number in (0, ∞)", iterations=np.int64(5) with "expected a
    positive integer" (a sweep over np.linspace values)."""
    reg = AttentionRegulation(["circle"], lr=np.float32(50), iterations=np.int64(5), seed=np.int64(2),
                              tau=np.float64(0.4), decay=np.float32(0.5), scale_lr=np.bool_(False))
    same = AttentionRegulation(["circle"], lr=50.0, iterations=5, seed=2, tau=0.4, decay=0.5, scale_lr=False)
    assert json.loads(json.dumps(reg.describe())) == same.describe()


@pytest.mark.parametrize("value", ["no", 0, None])
def test_scale_lr_must_be_true_or_false(value):
    """scale_lr="no" was taken as True."""
    with pytest.raises(AttnscopeError, match=rf"scale_lr={re.escape(repr(value))}: expected True or False"):
        AttentionRegulation(["circle"], scale_lr=value)


def test_a_large_seed_runs(shapes):
    """seed=2**62 failed mid-run with ValueError('Overflow when unpacking long long') from the generator's seed."""
    reg = AttentionRegulation(["circle", "square"], seed=2**62, iterations=2)
    _run(shapes, reg)
    assert reg.history and all(torch.isfinite(best).all() for _, best in reg.history.values())


def test_the_record_of_a_gate_in_a_manifest_is_refused_with_a_way_to_rebuild_it():
    """AttentionRegulation(**params) of a gated run said only "expected a gate such as risk_above(0.3)"."""
    gated = AttentionRegulation(["circle", "square"], when=risk_above(0.3, step=4, targets=["red circle", "blue square"]))
    params = json.loads(json.dumps(gated.describe()["params"]))
    with pytest.raises(AttnscopeError, match=r"the record of a gate \(a manifest's params\) does not rebuild it; pass "
                                             r"when=ats\.regulate\.risk_above\(0\.3, step=4, targets=\.\.\.\)"):
        AttentionRegulation(**params)


# -- non-finite logits ----------------------------------------------------------------------------------------------
def test_non_finite_terms_of_one_group_leave_the_other_groups_losses_alone():
    """The losses were one product of the trace with block weights: a NaN of group 0 met group 1's zero weights
    (0 · NaN = NaN), so group 1 lost its keep-best and got its initial Δ."""
    torch.manual_seed(0)
    basis = gaussian_basis(8, 8).reshape(9, 64)
    z, w = torch.randn(4, 64, 10), torch.rand(4, 9, 2)
    z[0, 5, 3] = float("nan")                                          # group 0 (rows 0, 1)
    both = RegulationDescent(4, 2, basis, lr=25.0, iterations=4, tau=0.4, groups=2).run(z, [3, 7], w)
    alone = RegulationDescent(2, 2, basis, lr=25.0, iterations=4, tau=0.4, groups=1).run(z[2:], [3, 7], w[2:])
    losses = both.losses()
    assert torch.isnan(losses[:, 0]).all()
    torch.testing.assert_close(losses[:, 1], alone.losses()[:, 0])      # before: all NaN
    best, _, _, best_loss = both.result()
    torch.testing.assert_close(best[2:], alone.result()[0])
    assert float(best_loss[0]) == float("inf") and torch.isfinite(best_loss[1])


def test_nan_logits_of_one_sample_do_not_change_another_samples_edit(shapes):
    """End to end on the hook: a NaN in sample 0's logits changed sample 1's edited logits (by up to 3.4)."""
    prompts = [PROMPT, "a green circle and a red square"]
    torch.manual_seed(1)
    logits = torch.randn(4, 4, 64, 16)                                 # [uncond 0, uncond 1, cond 0, cond 1]
    broken = logits.clone()
    broken[2, 0, 5, 3] = float("nan")
    edited = {}
    for name, z, batch in (("clean", logits, prompts), ("broken", broken, prompts), ("alone", logits[[1, 3]], prompts[1:])):
        reg = AttentionRegulation(["circle", "square"])
        with ats.hooks(shapes, reg) as session:
            edited[name] = reg.on_logits(_context(shapes, session, batch), z)
    assert torch.equal(edited["broken"][3], edited["alone"][1]) and torch.equal(edited["clean"][3], edited["alone"][1])


# -- state of an earlier installation --------------------------------------------------------------------------------
def test_a_call_left_unfinished_is_not_given_back_in_a_later_installation(shapes):
    """A call whose probabilities never came (an exception between the logits and the probs stage) left its
    restore behind; a later installation's probs stage at the same site and step overwrote the SOT/EOT columns
    with that earlier call's probabilities."""
    reg = AttentionRegulation(["circle", "square"], iterations=2)
    torch.manual_seed(2)
    with ats.hooks(shapes, reg) as session:
        reg.on_logits(_context(shapes, session, [PROMPT]), torch.randn(2, 4, 64, 16))   # no on_probs: it failed
    probs = torch.softmax(torch.randn(2, 4, 64, 16), -1)
    with ats.hooks(shapes, reg) as session:
        assert reg.on_probs(_context(shapes, session, [PROMPT]), probs) is None


# -- when=risk_above from a trace ---------------------------------------------------------------------------------------
def test_deciding_from_a_trace_without_the_decision_step_says_so(shapes, tmp_path):
    """The error was "steps: [3] outside this run's steps 0..1 (2 steps)" for a run of 4 steps, 2 of them captured."""
    tr = ats.capture(shapes, PROMPT, seed=0, store=tmp_path / "a.zarr", num_inference_steps=4, steps=[0, 1])
    reg = AttentionRegulation(["circle", "square"], iterations=2,
                              when=risk_above(0.2, step=3, targets=["red circle", "blue square"]))
    with pytest.raises(AttnscopeError, match=r"risk_above\(step=3\): the trace has no maps of step 3 at .*\(its "
                                             r"captured steps: \[0, 1\]\)"):
        ats.rerun(tr, [reg], store=tmp_path / "b.zarr")

