"""Attention Regulation's gradient descent without autograd: the loss of ``regulation_loss`` and its
analytic gradient, fused into eleven tensor operations per iteration with no host synchronisation.

Layout: (n targets + 1 "rest" column) × rows (samples × heads) × pixels. The rest column holds
the log-sum-exp of the non-target logits, computed once per run, so one softmax over n + 1 columns
gives the target probabilities ``A``: the first n · rows rows, contiguous. The weights are an
(n · rows, K) matrix, so ``E = Z + W B`` and ``∂L/∂W = (∂L/∂E) Bᵀ`` are single matrix products.

The gradient of ``L = mean over groups of regulation_loss`` (N rows, n targets, P pixels, K bumps)::

    ∂L/∂q_rj   = 2 (q_rj − q*) / (N n)        to the order statistics below and above rank
                                               q (P − 1), weights (1 − f, f): torch.quantile's rule
    ∂L/∂A_rpj += 2 m (mean_p A_rj − τ/n) / (N n P)
    ∂L/∂E_j    = A_j (∂L/∂A_j − Σ_i A_i ∂L/∂A_i)     softmax; the rest column has no gradient
    ∂L/∂W      = (∂L/∂E) Bᵀ + 2 λ W / (N K n)

Each iteration stores the weights, ``w_c (q − q*)`` (the quantile's gradient weights times its gap)
and the mass gap in one row of a trace; the losses of all iterations are one product of the
squared trace with a fixed weight matrix after the loop, and the best iteration one ``min``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ..errors import AttnscopeError

__all__ = ["RegulationDescent", "one_thread", "quantile_positions", "topk_quantile"]

#: CPU tensors with fewer elements than this are handled on one thread (see :func:`one_thread`)
SERIAL_BELOW = 1 << 18


def quantile_positions(size: int, quantile: float, dtype: torch.dtype = torch.float32) -> tuple[int, int, float]:
    """Ascending ranks ``(below, above)`` and weight ``f`` of torch.quantile's linear interpolation.

    ``rank = quantile · (size − 1)`` computed in ``dtype`` as torch does; the quantile is
    ``(1 − f) x_(below) + f x_(above)`` of the sorted values.

    >>> quantile_positions(64, 0.9)[:2], round(quantile_positions(64, 0.9)[2], 4)
    ((56, 57), 0.7)
    >>> quantile_positions(11, 0.9)      # rank exactly 9: no interpolation
    (9, 9, 0.0)
    """
    if size < 1:
        raise AttnscopeError(f"size={size!r}: the quantile of an empty set is undefined")
    if not 0 <= quantile <= 1:
        raise AttnscopeError(f"quantile={quantile!r}: expected a number in [0, 1]")
    rank = torch.tensor(quantile, dtype=dtype) * (size - 1)
    below = int(rank.floor())
    frac = float(rank - below)
    return below, (below + 1 if frac > 0 else below), frac


def _top_positions(size: int, below: int, above: int) -> tuple[int, bool, int, int]:
    """``k``, ``largest`` and the positions of ranks below/above in ``topk(k, largest)``'s sorted output."""
    if size - below <= above + 1:  # the upper tail is shorter: the k largest, descending
        return size - below, True, size - 1 - below, size - 1 - above
    return above + 1, False, below, above


def topk_quantile(x: torch.Tensor, quantile: float, dim: int = -1) -> torch.Tensor:
    """``torch.quantile(x, quantile, dim)`` (linear interpolation) from a partial sort, bit for bit.

    Only the shorter tail beyond the two order statistics is sorted (``torch.topk``), not all of
    ``dim``; gradients go to the same two elements with weights ``(1 − f, f)``.

    >>> import torch
    >>> x = torch.rand(3, 37)
    >>> torch.equal(topk_quantile(x, 0.9), torch.quantile(x, 0.9, dim=-1))
    True
    """
    below, above, frac = quantile_positions(x.shape[dim], quantile, x.dtype)
    k, largest, at_below, at_above = _top_positions(x.shape[dim], below, above)
    values = torch.topk(x, k, dim, largest=largest).values
    return torch.lerp(values.select(dim, at_below), values.select(dim, at_above), frac)


@contextmanager
def one_thread(elements: int, device: torch.device) -> Iterator[None]:
    """One intra-op thread inside the block (restored after it), for CPU tensors of fewer than
    :data:`SERIAL_BELOW` elements.

    Some kernels (softmax, matrix products) open a parallel region even for a few hundred elements;
    on tensors this small the hand-off to a second thread costs more than the work, and on a busy
    machine, where that thread must wait for a core, up to milliseconds.

    >>> import torch
    >>> with one_thread(100, torch.device("cpu")):
    ...     torch.get_num_threads()
    1
    """
    threads = torch.get_num_threads() if device.type == "cpu" and elements < SERIAL_BELOW else 1
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


class RegulationDescent:
    """Plain gradient descent ``W ← W − N · lr · ∇L`` on the regulation loss, analytic gradient.

    Built once per shape (its buffers are reused); :meth:`run` descends from given logits and weights.

    Parameters
    ----------
    rows : int
        Samples × heads (a sample's rows consecutive).
    n : int
        Number of target token columns.
    basis : tensor (K, pixels)
        The Gaussian bumps, flattened, in the dtype and on the device to compute in.
    lr, iterations, tau, groups, quantile, quantile_target, mass_weight, weight_decay
        As in :class:`AttentionRegulation` and :func:`regulation_loss`; ``groups`` = samples.

    Examples
    --------
    >>> import torch
    >>> from attnscope.regulate import gaussian_basis, regulation_loss
    >>> z, w, basis = torch.randn(4, 64, 16), torch.rand(4, 9, 2), gaussian_basis(8, 8).reshape(9, 64)
    >>> descent = RegulationDescent(4, 2, basis, lr=25.0, iterations=5, tau=0.4, groups=1)
    >>> descent.run(z, [3, 7], w).losses().shape            # iterations × groups
    torch.Size([5, 1])
    >>> edited = z.clone()
    >>> edited[..., [3, 7]] += torch.einsum("rkn,kp->rpn", w, basis)
    >>> loss = regulation_loss(torch.softmax(edited, -1)[..., [3, 7]], w, 0.4)
    >>> torch.allclose(descent.losses()[0], loss, rtol=1e-5)
    True
    >>> best, initial, first, best_loss = descent.result()
    >>> tuple(best.shape), bool(best_loss[0] <= first[0])
    ((4, 64, 2), True)
    """

    def __init__(self, rows: int, n: int, basis: torch.Tensor, *, lr: float, iterations: int, tau: float, groups: int,
                 quantile: float = 0.9, quantile_target: float = 0.9, mass_weight: float = 80.0,
                 weight_decay: float = 0.09):
        k, pixels = basis.shape
        if n < 1 or groups < 1 or rows % groups:
            raise AttnscopeError(f"n={n!r}, groups={groups!r}: expected target columns and a number of groups "
                                 f"dividing the {rows} rows")
        if not isinstance(iterations, int) or iterations < 1:
            raise AttnscopeError(f"iterations={iterations!r}: expected a positive integer")
        self.rows, self.n, self.k, self.pixels, self.iterations, self.groups = rows, n, k, pixels, iterations, groups
        self.elements = (n + 1) * rows * pixels
        options = {"dtype": basis.dtype, "device": basis.device}
        self.basis, self.basis_t = basis, basis.t().contiguous()
        self.logits = torch.empty(n * rows, pixels, **options)     # the targets' Z
        self._orders: dict[tuple, torch.Tensor] = {}

        below, above, frac = quantile_positions(pixels, quantile, basis.dtype)
        self.top, self.largest, at_below, at_above = _top_positions(pixels, below, above)
        first, pair = (at_below, [1.0]) if below == above else (
            (at_above, [frac, 1 - frac]) if self.largest else (at_below, [1 - frac, frac]))
        pair_t = torch.tensor(pair, **options)
        self.q_matrix = torch.outer(pair_t, pair_t)     # w_c (q − q*) = Σ_c' V_c' w_c' w_c − q* w_c
        self.q_bias = -quantile_target * pair_t
        mass_scale = mass_weight / pixels               # G = (m/P)(mean A − τ/n) + Σ_c w_c (q − q*) δ_c
        self.mass_vector = torch.full((pixels, 1), mass_scale / pixels, **options)
        self.mass_bias = torch.tensor([-mass_scale * tau / n], **options)
        step = rows * lr                                 # G = (N n / 2) ∂L/∂A: the step folds the factor back
        self.alpha = 2 * step / (rows * n)
        self.decay = 2 * weight_decay / (rows * k * n)
        self.beta = 1 - step * self.decay

        self._buffers(first, len(pair), options)
        self.loss_weights = self._loss_weights(pair, mass_weight, weight_decay, options)
        self.members = self._members(len(pair), options)
        self._evaluate, self._step = self._loop()

    def _buffers(self, first: int, m: int, options: dict) -> None:
        """One iteration's buffers, and the trace of all iterations (the target rows first, so
        their views are contiguous)."""
        n, rows, pixels, targets = self.n, self.rows, self.pixels, self.n * self.rows
        self.e = torch.empty(n + 1, rows, pixels, **options)      # E; its rest rows are set per run
        self.e_targets = self.e[:n].view(targets, pixels)
        self.s = torch.empty(n + 1, rows, pixels, **options)
        self.a = self.s[:n]
        self.a_rows = self.a.view(targets, pixels)
        self.values = torch.empty(targets, self.top, **options)
        self.indices = torch.empty(targets, self.top, dtype=torch.long, device=options["device"])
        self.values_pair, self.indices_pair = self.values[:, first:first + m], self.indices[:, first:first + m]
        self.g = torch.empty(n, rows, pixels, **options)
        self.h = torch.empty(n, rows, pixels, **options)
        self.row_sum = torch.empty(1, rows, pixels, **options)
        # per iteration [W (n·rows, K) | w_c (q − q*) (n·rows, m) | (m/P) mass gap (n·rows)]
        lengths = (targets * self.k, targets * m, targets)
        self.trace = torch.zeros(self.iterations, sum(lengths), **options)
        w_part, q_part, d_part = self.trace.split(lengths, 1)
        self.w = w_part.view(self.iterations, -1, self.k).unbind(0)
        self.q = q_part.view(self.iterations, targets, m).unbind(0)
        self.d = d_part.view(self.iterations, targets, 1).unbind(0)

    def _start(self, z: torch.Tensor, cols: list[int], weights: torch.Tensor) -> None:
        """The target logits, the log-sum-exp of all other columns, and the initial weights."""
        shape = (self.rows, self.pixels)
        if tuple(z.shape[:2]) != shape or len(cols) != self.n or tuple(weights.shape) != (self.rows, self.k, self.n):
            raise AttnscopeError(f"logits {tuple(z.shape)}, {len(cols)} columns, weights {tuple(weights.shape)}: "
                                 f"expected ({self.rows}, {self.pixels}, tokens), {self.n} and "
                                 f"({self.rows}, {self.k}, {self.n})")
        key = (tuple(cols), z.shape[-1], z.device)
        if key not in self._orders:  # targets first: built once, no host-to-device copy per run
            chosen = set(cols)
            self._orders[key] = torch.tensor(cols + [c for c in range(z.shape[-1]) if c not in chosen],
                                             device=z.device)
        ordered = z.index_select(-1, self._orders[key]).to(self.logits.dtype)
        self.logits.view(self.n, self.rows, self.pixels).copy_(ordered[..., :self.n].permute(2, 0, 1))
        torch.logsumexp(ordered[..., self.n:], -1, out=self.e[self.n])
        self.w[0].view(self.n, self.rows, self.k).copy_(weights.permute(2, 0, 1))

    def _loss_weights(self, pair: list[float], mass_weight: float, weight_decay: float,
                      options: dict) -> torch.Tensor:
        """(trace length, groups): ``trace² @ this`` is each group's regulation_loss."""
        n, per_group = self.n, self.rows // self.groups
        scale = 1 / (per_group * n)
        kept = max(range(len(pair)), key=lambda c: pair[c])      # (q − q*)² from the larger w_c
        q_row = torch.tensor([scale / pair[c] ** 2 if c == kept else 0.0 for c in range(len(pair))], **options)
        mass = scale * self.pixels**2 / mass_weight if mass_weight else 0.0   # m gap² from ((m/P) gap)²
        member = torch.eye(self.groups, **options).repeat_interleave(per_group, 1)[:, None, :, None]
        parts = [(member * weight_decay * scale / self.k).expand(-1, n, -1, self.k),
                 (member * q_row).expand(-1, n, -1, -1), (member * mass).expand(-1, n, -1, -1)]
        return torch.cat([p.reshape(self.groups, -1) for p in parts], 1).t().contiguous()

    def _members(self, m: int, options: dict) -> torch.Tensor:
        """(trace length, groups): 1 where a trace entry is the group's (its loss weight 0 or not), else 0."""
        per_group = self.rows // self.groups
        member = torch.eye(self.groups, **options).repeat_interleave(per_group, 1)[:, None, :, None]
        parts = [member.expand(-1, self.n, -1, width) for width in (self.k, m, 1)]
        return torch.cat([p.reshape(self.groups, -1) for p in parts], 1).t().contiguous()

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> tuple[Callable[[int], None], Callable[[int], None]]:
        """``evaluate(t)``: iteration t's loss terms into the trace and ``h = (N n / 2) ∂L/∂E`` of the
        targets; ``step(t)``: the weights of iteration t + 1. Closures over the buffers: eleven tensor
        operations an iteration, without attribute look-ups."""
        addmm, softmax, topk, mul, total = torch.addmm, torch.softmax, torch.topk, torch.mul, torch.sum
        logits, basis, basis_t, e, e_targets, s, a, a_rows = (self.logits, self.basis, self.basis_t, self.e,
                                                              self.e_targets, self.s, self.a, self.a_rows)
        top, largest, found, values_pair, indices_pair = (self.top, self.largest, (self.values, self.indices),
                                                          self.values_pair, self.indices_pair)
        q_bias, q_matrix, mass_bias, mass_vector = self.q_bias, self.q_matrix, self.mass_bias, self.mass_vector
        g, g_rows, h, h_rows, row_sum = self.g, self.g.view_as(a_rows), self.h, self.h.view_as(a_rows), self.row_sum
        beta, alpha, ws, qs, ds = self.beta, -self.alpha, self.w, self.q, self.d

        def evaluate(t: int) -> None:
            q, d = qs[t], ds[t]
            addmm(logits, ws[t], basis, out=e_targets)                   # E = Z + W B
            softmax(e, 0, out=s)                                         # A: targets and rest
            topk(a_rows, top, 1, largest=largest, out=found)             # the order statistics
            addmm(q_bias, values_pair, q_matrix, out=q)                  # w_c (q − q*)
            addmm(mass_bias, a_rows, mass_vector, out=d)                 # (m/P)(mean A − τ/n)
            g_rows.copy_(d)                                              # G = (N n / 2) ∂L/∂A
            g_rows.scatter_add_(1, indices_pair, q)
            mul(a, g, out=h)                                             # A G
            total(h, 0, keepdim=True, out=row_sum)                       # Σ_j A_j G_j
            h.addcmul_(a, row_sum, value=-1)                             # A (G − Σ A G)

        def step(t: int) -> None:
            addmm(ws[t], h_rows, basis_t, beta=beta, alpha=alpha, out=ws[t + 1])   # W − N lr ∇L

        return evaluate, step

    def run(self, z: torch.Tensor, cols: list[int], weights: torch.Tensor) -> RegulationDescent:
        """Descend from logits ``z`` (rows, pixels, tokens) and ``weights`` (rows, K, n) on columns ``cols``.

        All iterations run; the last one is evaluated, not stepped from. The results stay here (and
        are overwritten by the next run).
        """
        with torch.inference_mode(), one_thread(self.elements, self.basis.device):  # no autograd bookkeeping
            self._start(z, cols, weights)
            evaluate, step = self._evaluate, self._step
            for t in range(self.iterations - 1):
                evaluate(t)
                step(t)
            evaluate(self.iterations - 1)
        return self

    # -- results ---------------------------------------------------------------------------------
    def _columns(self, matrix: torch.Tensor) -> torch.Tensor:
        """An (n·rows, X) matrix as (rows, X, n) (a view)."""
        return matrix.view(self.n, self.rows, -1).permute(1, 2, 0)

    def weights(self, t: int) -> torch.Tensor:
        """The weights of iteration ``t``, (rows, K, n) (a view)."""
        return self._columns(self.w[t])

    def gradient(self, z: torch.Tensor, cols: list[int], weights: torch.Tensor) -> torch.Tensor:
        """∂L/∂W at ``weights``, (rows, K, n); L = mean over groups of :func:`regulation_loss`."""
        with torch.inference_mode(), one_thread(self.elements, self.basis.device):
            self._start(z, cols, weights)
            self._evaluate(0)
        return self._columns(torch.addmm(self.w[0], self.h.view(-1, self.pixels), self.basis_t, beta=self.decay,
                                         alpha=2 / (self.rows * self.n)))

    def losses(self) -> torch.Tensor:
        """Each iteration's loss per group, (iterations, groups); NaN for a group with a non-finite term.

        A NaN or infinite term (non-finite logits) spoils its own group only: in the product with the
        loss weights it would meet the other groups' zero weights, and 0 · NaN is NaN.
        """
        squared = self.trace.square()
        finite = torch.isfinite(squared)
        losses = torch.mm(torch.where(finite, squared, 0.0), self.loss_weights)   # as it is where all are finite
        spoilt = torch.mm(finite.logical_not().to(squared.dtype), self.members) > 0
        return losses.masked_fill_(spoilt, float("nan"))

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best Δ, initial Δ (both (rows, pixels, n)), first and best loss per group (the first lowest wins)."""
        with one_thread(self.elements, self.basis.device):
            return self._result()

    def _result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`result`: losses from the trace, the first lowest per group, its Δ and the initial Δ."""
        losses = self.losses()
        best_loss, best_at = torch.nan_to_num(losses, nan=float("inf"), posinf=float("inf")).min(0)
        targets = self.n * self.rows
        per_group = self.trace[:, :targets * self.k].view(self.iterations, self.n, self.groups, -1)
        best_w = per_group.gather(0, best_at.view(1, 1, -1, 1).expand(1, self.n, -1, per_group.shape[3]))
        deltas = torch.mm(torch.cat([best_w.view(targets, self.k), self.w[0]]), self.basis)
        deltas = deltas.view(2, self.n, self.rows, self.pixels).permute(0, 2, 3, 1)
        return deltas[0], deltas[1], losses[0], best_loss
