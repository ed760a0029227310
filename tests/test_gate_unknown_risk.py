"""risk_above(...).decide_from(trace) where the risk cannot be computed: one error, not every sample judged safe."""

import numpy as np
import pytest

import attnscope as ats

from .conftest import RUN


def test_a_risk_that_the_trace_cannot_give_is_one_error_not_a_silent_no(shapes, tmp_path):
    # a Reweight rerun on a token axis cut to the prompt: its rows no longer sum to 1 over the stored columns,
    # so the sink share (a feature of the risk) is unknown — NaN, and NaN > θ would judge every sample safe
    parent = ats.capture(shapes, "a red circle and a blue square", seed=0, store=tmp_path / "p.zarr", tokens="prompt",
                         **RUN)
    child = ats.rerun(parent, [ats.regulate.Reweight("square", 3.0)], store=tmp_path / "c.zarr")
    assert np.isnan(ats.stats.dominance(child, targets=["circle", "square"])["sink_share"].values).all()
    gate = ats.regulate.risk_above(0.0, step=1, targets=["circle", "square"])
    with pytest.raises(ats.AttnscopeError, match=r"risk of sample\(s\) \[0\] cannot be computed from this trace"):
        gate.decide_from(child)
    assert gate.at_risk is None  # nothing decided
    assert gate.decide_from(parent) == [True]  # the plain parent decides (risk > 0)
