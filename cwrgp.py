"""
Whitening losses for self-supervised learning, centred on CW-RGP: channel whitening with random
group partition, from "An Investigation into Whitening Loss for Self-supervised Learning"
(Weng, Huang, Zhao, Anwer, Khan, Khan; NeurIPS 2022, arXiv 2210.03586).

One view's embedding Z is (m, d): a batch of m samples (the paper's m) and d channels. The loss
splits the batch into sub-batches of b = sub_batch samples (b = m without a split) and whitens each
on its own: after a permutation of the channels they are cut into g groups of c = d/g channels, and
every group is whitened on its own:

  batch whitening (BW, W-MSE):   Z̄ = Z − mean over the b samples,   Σ = Z̄ᵀZ̄/(b−1) (c×c),   Ẑ = Z̄Wᵀ
  channel whitening (CW, paper): Z̄ = Z − mean over the d channels,  Σ = Z̄Z̄ᵀ/(c−1) (b×b),   Ẑ = WZ̄

with W Σ Wᵀ = I from ZCA (W = Σ^(-1/2)), Cholesky (W = L⁻¹, Σ = LLᵀ) or PCA (W = Λ^(-1/2)Uᵀ).
The loss pulls the whitened views together: L = (1/m)‖Φ(Z₁) − Φ(Z₂)‖²_F, the mean over the m
samples of the squared distance. batch_whiten and channel_whiten whiten all the rows they are
given together: for them b is the number of rows. Symbols as in docs/paper-to-code.md#notation.

What this file adds to the released recipe: every view, sub-batch, group and repetition of a step
is whitened by one batched decomposition; the small covariances are formed and decomposed in
float64 and everything else runs in float32 (half-precision inputs and autocast included); ZCA has
two exact solvers, an eigendecomposition with a backward that stays finite when eigenvalues repeat
and a Newton–Schulz iteration that is only matrix products, so on a GPU the loss compiles and runs
inside a CUDA graph; shapes and arguments that cannot be whitened are refused with the rule and the
fix. Axis letters: i repetitions, v views, s sub-batches (m/b), b samples of a sub-batch, d
channels, g groups, c channels per group; a matrix whose n rows are whitened is x (n, k), its
covariance Σ (n, n).
"""

import math
import operator

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn
from torch.autograd.function import once_differentiable

METHODS = ("zca", "cholesky", "pca")
AXES = ("channel", "batch")
SOLVERS = ("auto", "eigh", "newton")

NON_FINITE = ("covariance contains NaN or Inf: the embedding is not finite (the network diverged: "
              "lower the learning rate or check the inputs)")
SINGULAR = ("covariance is singular (numerically rank-deficient): the embedding does not span its group. "
            "Use eps > 0 (shrinkage), or reshape the problem: batch whitening needs sub_batch > channels "
            "per group, channel whitening needs channels per group >= sub_batch.")
PCA_TIES = ("PCA whitening has no gradient where two eigenvalues of the covariance coincide (its "
            "eigenvectors are not unique there): use method 'zca' or 'cholesky', or detach the input")
ASYMMETRIC = "cov is not symmetric (beyond rounding): a covariance is symmetric, and W cov Wᵀ = I needs one"


# ----------------------------------------------------------------------------------------------
# Failures: raised where the host may look, NaN where it may not

def _host_reads_allowed():
    """False while torch.compile traces or a CUDA graph is captured: nothing may then be read back."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())


def _refuse_or_poison(out, failures):
    """out (..., n, k); failures: (flags, message) pairs, flags a bool tensor (...) per matrix.

    Eager, the first failure raises ValueError(message) after one read back to the host. Compiled
    or captured, the failed matrices become NaN instead, so the loss is NaN, never a finite wrong
    number.
    """
    if _host_reads_allowed():
        found = torch.stack([flags.any() for flags, _ in failures]).tolist()
        for hit, (_, message) in zip(found, failures):
            if hit:
                raise ValueError(message)
        return out
    failed = torch.stack([flags for flags, _ in failures]).any(0)
    return out.masked_fill(failed[..., None, None], float("nan"))


def _data_tolerance(x):
    """Below which fraction of λ_max the covariance of x (..., n, k) is numerically singular.

    x itself is only known to its dtype's rounding: σ_min(x) ≤ k·eps·σ_max(x) is numerical rank
    loss (the rule of torch.linalg.matrix_rank), so λ_min ≤ (k·eps)²·λ_max; and never below the
    float64 decomposition's own floor n·eps₆₄.
    """
    n, k = x.shape[-2:]
    return max((k * torch.finfo(x.dtype).eps) ** 2, n * torch.finfo(torch.float64).eps)


# ----------------------------------------------------------------------------------------------
# Whitening by each method: float64 covariances Σ (..., n, n), scaled to mean diagonal 1, and x
# (..., n, k) -> W x and the failures, among them the matrices with λ_min ≤ t·λ_max (t: relative tolerance)

def _divided_differences(s):
    """K_ij = (f(λ_i) − f(λ_j)) / (λ_i − λ_j) for f(λ) = λ^(-1/2), s = √λ, in closed form.

    (λ_i^(-1/2) − λ_j^(-1/2)) / (λ_i − λ_j) = −1 / (s_i s_j (s_i + s_j)), and at i = j the same
    formula gives f′(λ_i) = −1/(2 s_i³). No λ_i − λ_j is left in a denominator, so it is exact when
    eigenvalues repeat, where autograd through eigh divides by zero.
    """
    s_i, s_j = s.unsqueeze(-1), s.unsqueeze(-2)
    return -1 / (s_i * s_j * (s_i + s_j))


class _InverseSqrtTimes(torch.autograd.Function):
    """Y = Σ^(-1/2) x = U (Uᵀx / s) from Σ = U diag(s²) Uᵀ, with an exact backward; x = I gives W.

    In the eigenbasis (x′ = Uᵀx, G′ = UᵀG for the incoming gradient G = ∂L/∂Y), with
    H′ = K ∘ sym(G′ x′ᵀ) and K from _divided_differences:
        ∂L/∂Σ = U H′ Uᵀ    (Daleckii–Krein; a self-adjoint map, hence the symmetric part)
        ∂L/∂x = U (G′ / s)   through x itself, plus U (2a H′ x′) through Σ when Σ = a·x xᵀ + εI
    was formed from x (`cov_scale` = a; Σ then comes detached). Never forming W, nor the chain
    through Σ's own formula, the backward takes 7 matrix products instead of 11. The decomposition
    is float64; the products run in x's dtype.
    """

    @staticmethod
    def forward(ctx, cov, x, eigenvalues, U, cov_scale):
        U, s = U.to(x.dtype), eigenvalues.sqrt().to(x.dtype).unsqueeze(-1)
        x_eig = U.mT @ x
        ctx.save_for_backward(U, s, x_eig, cov_scale)
        return U @ (x_eig / s)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        U, s, x_eig, cov_scale = ctx.saved_tensors
        grad_eig = U.mT @ grad_out
        outer = grad_eig @ x_eig.mT
        grad_cov_eig = _divided_differences(s.squeeze(-1)) * (outer + outer.mT) / 2
        grad_cov = U @ grad_cov_eig @ U.mT if ctx.needs_input_grad[0] else None
        grad_x = None
        if ctx.needs_input_grad[1]:
            through_sigma = 0 if cov_scale is None else 2 * cov_scale.to(x_eig.dtype) * (grad_cov_eig @ x_eig)
            grad_x = U @ (grad_eig / s + through_sigma)
        return grad_cov, grad_x, None, None, None


def _zca_eigh(cov, x, relative_tolerance, cov_scale=None):
    """Σ^(-1/2) x by eigendecomposition: exact to float64 rounding (about cond(Σ)·eps₆₄ relative)."""
    eigenvalues, U = torch.linalg.eigh(cov.detach())
    singular = eigenvalues[..., 0] <= relative_tolerance * eigenvalues[..., -1]
    return _InverseSqrtTimes.apply(cov, x, eigenvalues, U, cov_scale), [(singular, SINGULAR)]


# A converged iteration has ZY = I to float64 rounding (below 1e-9 at cond 1e15, n up to 512); one
# that has not leaves 1 − p of order one on its slowest eigenvector.
NEWTON_RESIDUAL = 1e-6


def newton_steps(relative_tolerance, n):
    """The Newton–Schulz steps after which every covariance with λ_min > t·λ_max has converged.

    On an eigenvector of Σ the iteration maps the eigenvalue p of ZY to p(3 − p)²/4; p starts at
    λ/tr(Σ) ≥ t/n for the smallest eigenvalue the rule accepts, grows by 9/4 a step while small and
    then converges quadratically. The count is that scalar recursion's, from t/n to 1 − 1e-15.
    """
    p, steps = relative_tolerance / n, 0
    while p < 1 - 1e-15:
        p, steps = p * (3 - p) ** 2 / 4, steps + 1
    return steps


def _zca_newton(cov, x, relative_tolerance):
    """ZCA by the coupled Newton–Schulz iteration: Y → (Σ/n)^(1/2), Z → (Σ/n)^(-1/2), W = Z/√n.

    Y₀ = Σ/n (eigenvalues in (0, 1]: Σ has mean diagonal 1), Z₀ = I, T = (3I − ZY)/2, Y ← YT,
    Z ← TZ. Only matrix products: no host synchronisation, so it compiles and runs in a CUDA graph.
    With newton_steps(t, n) steps W agrees with the eigendecomposition's to float64 rounding for
    every covariance the rule accepts, and so does its gradient, taken by autograd through the
    steps: the steps are polynomials in Σ, smooth where eigenvalues repeat. A covariance whose
    iteration has not converged (max |ZY − I| > NEWTON_RESIDUAL) is flagged singular: that can only
    be one beyond the rule, so this solver refuses no covariance that the eigendecomposition accepts.
    """
    n = cov.shape[-1]
    eye = torch.eye(n, dtype=cov.dtype, device=cov.device)
    Y, Z = cov / n, eye.expand_as(cov)
    for _ in range(newton_steps(relative_tolerance, n)):
        T = (3 * eye - Z @ Y) / 2
        Y, Z = Y @ T, T @ Z
    unconverged = ~((Z @ Y - eye).detach().abs().amax((-2, -1)) <= NEWTON_RESIDUAL)
    return (Z / math.sqrt(n)).to(x.dtype) @ x, [(unconverged, SINGULAR)]


def _cholesky(cov, x, relative_tolerance):
    """W = L⁻¹ with Σ = LLᵀ; the squared pivots play the eigenvalues' part in the rule."""
    L, info = torch.linalg.cholesky_ex(cov)
    pivots = L.detach().diagonal(dim1=-2, dim2=-1) ** 2
    singular = (info > 0) | (pivots.amin(-1) <= relative_tolerance * cov.detach().diagonal(dim1=-2, dim2=-1).amax(-1))
    return torch.linalg.solve_triangular(L, x.to(L.dtype), upper=False).to(x.dtype), [(singular, SINGULAR)]


def _pca(cov, x, relative_tolerance):
    """W = Λ^(-1/2)Uᵀ, eigenvalues in descending order; autograd through eigh, since PCA's output
    depends on the eigenvectors themselves (and on their signs, which is why it fails as a loss).
    Where two eigenvalues coincide that gradient does not exist: refused when one is needed."""
    eigenvalues, U = torch.linalg.eigh(cov)
    ascending = eigenvalues.detach()
    failures = [(ascending[..., 0] <= relative_tolerance * ascending[..., -1], SINGULAR)]
    if cov.requires_grad and cov.shape[-1] > 1:
        failures.append((ascending.diff(dim=-1).amin(-1) <= relative_tolerance * ascending[..., -1], PCA_TIES))
    W = U.flip(-1).mT / eigenvalues.flip(-1).sqrt().unsqueeze(-1)
    return W.to(x.dtype) @ x, failures


DECOMPOSITIONS = {("zca", "eigh"): _zca_eigh, ("zca", "newton"): _zca_newton,
                  ("cholesky", None): _cholesky, ("pca", None): _pca}


def _whitened(cov, x, method, solver, relative_tolerance, cov_scale=None):
    """W x for float64 covariances (..., n, n) and x (..., n, k) (x = I: W itself), and the
    failures for _refuse_or_poison. cov_scale: a, where Σ = a·x xᵀ came from x itself (ZCA by eigh only)."""
    if cov.requires_grad:  # only the symmetric part is a covariance; its gradient is symmetric
        cov = (cov + cov.mT) / 2
    # W(αΣ) = W(Σ)/√α for all three methods: decomposing Σ/τ (τ its mean diagonal, detached, which
    # by that identity changes neither W nor its gradient) keeps every eigenvalue near 1 and the
    # backward's 1/s³ within float64's range at any scale. Non-finite and zero covariances are
    # swapped for I, so no decomposition can fail; they are refused (or NaN) with the rest.
    tau = cov.detach().diagonal(dim1=-2, dim2=-1).mean(-1)
    non_finite = ~torch.isfinite(cov.detach()).all(-1).all(-1) | ~torch.isfinite(tau)
    not_positive = ~non_finite & ~(tau > 0)
    swap = non_finite | not_positive
    tau = torch.where(swap, 1.0, tau)[..., None, None]
    cov = torch.where(swap[..., None, None], torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device), cov / tau)
    if cov_scale is not None:  # ZCA by eigh, its backward taking the chain through Σ's formula
        out, failures = _zca_eigh(cov, x, relative_tolerance, cov_scale / tau)
    else:
        out, failures = DECOMPOSITIONS[method, solver if method == "zca" else None](cov, x, relative_tolerance)
    failures = [(non_finite, NON_FINITE), (not_positive, SINGULAR)] + failures
    return out / tau.sqrt().to(x.dtype), failures


# ----------------------------------------------------------------------------------------------
# Arguments: every public entry point refuses what it cannot use, naming the argument

def _positive_int(value, name):
    try:
        index = operator.index(value)  # ints and numpy integers; not 8.0, not "8"
    except TypeError:
        index = 0
    if index < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return index


def _check_eps(eps):
    if isinstance(eps, (str, bytes)) or not hasattr(eps, "__float__") or not 0 <= float(eps) < 1:
        raise ValueError(f"eps must be a number in [0, 1): Σ ← (1−eps)Σ + eps·I is no covariance below 0 "
                         f"and is I at 1, got {eps!r}")
    return float(eps)


def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _resolve_solver(solver, device):
    """ZCA's solver: "auto" is Newton–Schulz on CUDA (no host sync) and eigh elsewhere."""
    if _check_choice(solver, "solver", SOLVERS) == "auto":
        return "newton" if device.type == "cuda" else "eigh"
    return solver


def _check_embedding(z):
    if not isinstance(z, torch.Tensor) or z.ndim != 2:
        raise ValueError(f"expected a (b, d) embedding tensor, got {getattr(z, 'shape', type(z).__name__)}")
    if z.is_complex() or z.dtype == torch.bool:
        raise ValueError(f"the embedding must be real (a floating or integer tensor), got {z.dtype}")
    if z.numel() == 0:
        raise ValueError(f"the embedding is empty: got shape {tuple(z.shape)}, need b ≥ 1 samples and d ≥ 1 channels")


def _check_sub_batch(sub_batch, b):
    sub_batch = b if sub_batch is None else _positive_int(sub_batch, "sub_batch")
    if b % sub_batch:
        raise ValueError(f"batch of {b} cannot be split into sub-batches of {sub_batch}: pass a sub_batch "
                         f"that divides {b}, or sub_batch=None for the whole batch")
    return sub_batch


def _check_groups(groups, d):
    groups = _positive_int(groups, "groups")
    if d % groups:
        raise ValueError(f"groups={groups!r} must be a positive divisor of the d={d} channels")
    return groups


def _check_whitenable(axis, b, c, groups, eps):
    """The shape rules; b is the number of samples whitened together (the sub-batch)."""
    if axis == "batch" and b < 2:
        raise ValueError(f"batch whitening needs at least 2 samples to estimate a covariance, got {b}")
    if axis == "batch" and eps == 0 and b <= c:
        raise ValueError(f"batch whitening of {b} samples cannot whiten c={c} channels per group: centring "
                         f"leaves rank {b - 1} < c. Need sub_batch > c: use a larger sub_batch, more groups, or eps > 0")
    if axis == "channel" and c < 2:
        raise ValueError(f"channel whitening needs at least 2 channels per group, got c={c}")
    # Centring is per sample over all d channels, so with one group it removes one of c dimensions.
    if axis == "channel" and eps == 0 and (c - 1 if groups == 1 else c) < b:
        rule = "c > sub_batch (with groups=1 centring removes one dimension)" if groups == 1 else "c >= sub_batch"
        raise ValueError(f"channel whitening needs {rule}, got c={c} channels per group for sub-batches of "
                         f"{b}: use a smaller sub_batch, fewer groups, or eps > 0")


def _check_permutation(perm, shape, name):
    """perm: an integer tensor of the given shape whose last axis holds permutations of range(shape[-1])."""
    if not isinstance(perm, torch.Tensor) or perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of permutations, got {getattr(perm, 'dtype', type(perm))}")
    if tuple(perm.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(perm.shape)}")
    if _host_reads_allowed():
        identity = torch.arange(shape[-1], device=perm.device).expand(shape)
        if not torch.equal(perm.sort(-1).values, identity):
            raise ValueError(f"{name} must hold permutations of range({shape[-1]}) along its last axis")


# ----------------------------------------------------------------------------------------------
# Batch and channel whitening of grouped channels

def whitening_matrix(cov, method="zca", solver="auto"):
    """(..., n, n) symmetric positive-definite covariances -> (..., n, n) W with W cov Wᵀ = I.

    method "zca": W = Σ^(-1/2), the symmetric choice, by `solver` "eigh" or "newton" (exact both;
    "auto": newton on CUDA); "cholesky": W = L⁻¹ with Σ = LLᵀ (lower triangular); "pca":
    W = Λ^(-1/2)Uᵀ, eigenvalues in descending order. Computed in float64, returned in cov's dtype
    (float64 for integer covariances). Refused with ValueError: a covariance that is not finite, not
    symmetric beyond rounding, or numerically singular (λ_min ≤ n·eps·λ_max in cov's dtype).
    """
    _check_choice(method, "method", METHODS)
    if not isinstance(cov, torch.Tensor) or cov.ndim < 2 or cov.shape[-1] != cov.shape[-2] or cov.shape[-1] == 0:
        raise ValueError(f"cov must be (..., n, n) with n ≥ 1, got shape {tuple(getattr(cov, 'shape', ()))}")
    if cov.is_complex() or cov.dtype == torch.bool:
        raise ValueError(f"cov must be real, got {cov.dtype}")
    dtype = cov.dtype if cov.is_floating_point() else torch.float64
    work = cov.double()
    values = work.detach()
    asymmetric = (values - values.mT).abs().amax((-2, -1)) > math.sqrt(torch.finfo(dtype).eps) * values.abs().amax((-2, -1))
    eye = torch.eye(cov.shape[-1], dtype=work.dtype, device=work.device).expand_as(work)
    W, failures = _whitened(work, eye, method, _resolve_solver(solver, cov.device),
                            cov.shape[-1] * torch.finfo(dtype).eps)
    failures.insert(1, (asymmetric, ASYMMETRIC))
    return _refuse_or_poison(W, failures).to(dtype)


def _compute_dtype(z):
    # Decompositions have no half-precision kernels and lose the whitening in fp16/bf16 anyway.
    return z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32


def _covariance(x, eps):
    """Σ = x xᵀ/(k−1) of the rows of x (..., n, k), shrunk as Σ ← (1−ε)Σ + εI, in float64.

    Training covariances reach condition numbers of 4e4 (docs/conditioning.py), where float32
    rounding of Σ (n·eps of λ_max) would be a third of λ_min; in float64 λ_min keeps its digits,
    and only these small n×n matrices pay for the precision.
    """
    x = x.double()
    cov = einsum(x, x, "... n k, ... n2 k -> ... n n2") / (x.shape[-1] - 1)
    if eps:
        cov = (1 - eps) * cov + eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return cov


def _whiten_rows(x, method, solver, eps):
    """W x for the rows of x (..., n, k), W from their covariance."""
    if not eps:
        # Without shrinkage whitening is scale-invariant, so scaling each matrix to max |x| = 1
        # changes nothing but keeps Σ, and the eigh backward's products in x's dtype, within range at
        # any scale; detached, since the output (and so, exactly, its gradient) does not depend on it.
        # (With shrinkage, which is absolute, the scale matters: autograd runs through Σ's formula.)
        scale = x.detach().abs().amax((-2, -1), keepdim=True)
        x = x / torch.where(scale > 0, scale, 1.0)
    # ZCA by eigh differentiates through Σ = x xᵀ/(k−1) itself, given that a = 1/(k−1)
    fused = not eps and (method, solver) == ("zca", "eigh")
    cov_scale = torch.tensor(1 / (x.shape[-1] - 1), dtype=torch.float64, device=x.device) if fused else None
    cov = _covariance(x.detach() if fused else x, eps)
    out, failures = _whitened(cov, x, method, solver, _data_tolerance(x), cov_scale)
    return _refuse_or_poison(out, failures)


def _whiten(z, axis, groups, method, solver, eps, perm):
    """z (..., b, d), perm (..., d) or None -> whitened (..., b, d) in z's channel order.

    Both whiten the rows of a matrix x: CW the b samples of a group over its c channels, BW the
    c channels of a group over the b samples (Ẑ = Z̄Wᵀ is Ẑᵀ = WZ̄ᵀ). Then Σ = x xᵀ/(k−1) is
    Z̄Z̄ᵀ/(c−1) for CW and Z̄ᵀZ̄/(b−1) for BW, and the output is Wx.
    """
    if perm is not None:
        z = z.gather(-1, perm.unsqueeze(-2).expand_as(z))
    if axis == "channel":
        z = z - z.mean(-1, keepdim=True)  # one mean per sample, over all d channels
        rows = "g b c"
    else:
        z = z - z.mean(-2, keepdim=True)  # one mean per channel, over the b samples
        rows = "g c b"
    x = rearrange(z, f"... b (g c) -> ... {rows}", g=groups)
    out = rearrange(_whiten_rows(x, method, solver, eps), f"... {rows} -> ... b (g c)")
    if perm is not None:
        # scatter puts channel k back at perm[k]; its backward is a gather, cheaper than scatter_add
        out = torch.empty_like(out).scatter(-1, perm.unsqueeze(-2).expand_as(out), out)
    return out


def _whiten_one(z, axis, groups, method, solver, eps, perm):
    _check_embedding(z)
    _check_choice(method, "method", METHODS)
    b, d = z.shape
    groups, eps = _check_groups(groups, d), _check_eps(eps)
    _check_whitenable(axis, b, d // groups, groups, eps)
    if perm is not None:
        _check_permutation(perm, (d,), "perm")
    with torch.autocast(z.device.type, enabled=False):
        return _whiten(z.to(_compute_dtype(z)), axis, groups, method, _resolve_solver(solver, z.device), eps, perm)


def batch_whiten(z, groups=1, method="zca", eps=0.0, perm=None, solver="auto"):
    """(b, d) -> (b, d): each group of channels has Ẑᵀ Ẑ/(b−1) = I_c afterwards.

    perm: a (d,) permutation of the channels that sets the groups (group k is the channels
    perm[k·c:(k+1)·c]); None keeps the channels in order. The output is in the input's channel order.
    Half-precision and integer inputs are whitened and returned in float32. solver: ZCA's, as in
    whitening_matrix.
    """
    return _whiten_one(z, "batch", groups, method, solver, eps, perm)


def channel_whiten(z, groups=1, method="zca", eps=0.0, perm=None, solver="auto"):
    """(b, d) -> (b, d): within each group of channels the samples become orthogonal,
    Ẑ Ẑᵀ/(c−1) = I_b. Arguments as batch_whiten."""
    return _whiten_one(z, "channel", groups, method, solver, eps, perm)


# ----------------------------------------------------------------------------------------------
# Random group partition and the whitening loss

def random_group_partition(views, batch, dim, groups, sub_batch=None, iters=1, generator=None, device=None):
    """Draw the random partitions of one loss evaluation.

    Returns (samples, channels):
      samples  (i, m) long: an order of the batch per repetition; consecutive runs of sub_batch
               form the sub-batches, shared by all views.
      channels (i, v, s, d) long: a channel permutation for every repetition, view and sub-batch;
               consecutive runs of c = d/groups channels form the groups. With groups=1 it is the
               identity, as W-MSE (and Cholesky whitening is not permutation-invariant).
    Drawn from `generator` (on its device) or the default generator of `device`.
    """
    views, batch, dim = (_positive_int(v, name) for v, name in ((views, "views"), (batch, "batch"), (dim, "dim")))
    groups, iters = _check_groups(groups, dim), _positive_int(iters, "iters")
    sub_batch = _check_sub_batch(sub_batch, batch)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator (or None), got {type(generator).__name__}")
    draw_device = generator.device if generator is not None else device
    if sub_batch == batch:
        samples = torch.arange(batch, device=draw_device).expand(iters, batch)
    else:
        samples = torch.rand(iters, batch, generator=generator, device=draw_device).argsort(-1)
    if groups == 1:
        channels = torch.arange(dim, device=draw_device).expand(iters, views, batch // sub_batch, dim)
    else:
        # argsort of iid uniforms is a uniformly random permutation, drawn for all (i, v, s) at once
        keys = torch.rand(iters, views, batch // sub_batch, dim, generator=generator, device=draw_device,
                          dtype=torch.float64)
        channels = keys.argsort(-1)
    return samples.to(device), channels.to(device)


def whitening_loss(*views, axis="channel", groups=4, sub_batch=None, iters=1, method="zca", eps=0.0,
                   normalize=True, generator=None, partition=None, solver="auto"):
    """The whitening loss between V ≥ 2 views, each (m, d) -> scalar.

    For each of `iters` repetitions: one random split of the batch into sub-batches of `sub_batch`
    samples (None: the whole batch), shared by the views; every view's sub-batch whitened along
    `axis` ("channel": CW, "batch": BW) with its own random group partition into `groups` groups;
    then the mean over rows of ‖ẑ_v − ẑ_w‖², averaged over the V(V−1)/2 pairs and the repetitions.
    normalize=True L2-normalises the whitened rows first, making each term 2 − 2·cos. Gradients
    flow through the whitening. The result is float32 for half-precision inputs or under autocast.

    The partition is drawn from `generator`, or given as `partition`, the (samples, channels) of
    random_group_partition. Given one, the loss is a pure tensor function: it compiles with
    torch.compile(fullgraph=True) and, with solver "newton" ("auto" on CUDA), runs inside a CUDA
    graph. Eager calls refuse non-finite or singular whitening with ValueError; compiled or captured
    ones, which cannot look, return NaN for it.
    """
    if len(views) < 2:
        raise ValueError(f"the loss needs at least two views, got {len(views)}")
    for v in views:
        _check_embedding(v)
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) > 1:
        raise ValueError(f"all views must have the same (m, d) shape, got {sorted(shapes)}")
    _check_choice(axis, "axis", AXES)
    _check_choice(method, "method", METHODS)
    m, d = views[0].shape
    sub_batch, groups = _check_sub_batch(sub_batch, m), _check_groups(groups, d)
    iters, eps = _positive_int(iters, "iters"), _check_eps(eps)
    _check_whitenable(axis, sub_batch, d // groups, groups, eps)
    z = torch.stack(views)
    solver = _resolve_solver(solver, z.device)
    if partition is None:
        samples, channels = random_group_partition(len(views), m, d, groups, sub_batch, iters, generator, z.device)
    elif generator is not None:
        raise ValueError("pass either a generator to draw the partition or a partition, not both")
    else:
        samples, channels = partition
        _check_permutation(samples, (iters, m), "partition's samples")
        _check_permutation(channels, (iters, len(views), m // sub_batch, d), "partition's channels")
    with torch.autocast(z.device.type, enabled=False):
        z = z.to(_compute_dtype(z))
        # index_select, not z[:, samples]: its backward is a row copy rather than an index_put
        shuffled = z.index_select(1, samples.flatten())
        grouped = rearrange(shuffled, "v (i s b) d -> i v s b d", i=iters, b=sub_batch)
        # Φ(Z) for all repetitions, views and sub-batches at once: one batched decomposition
        white = _whiten(grouped, axis, groups, method, solver, eps, None if groups == 1 else channels)
        if normalize:
            white = F.normalize(white, dim=-1)
        first, second = torch.triu_indices(len(views), len(views), 1, device=z.device)
        # (1/m)‖Φ(Z_v) − Φ(Z_w)‖²_F for every pair (v, w), then the mean over pairs and repetitions
        return (white.index_select(1, first) - white.index_select(1, second)).pow(2).sum(-1).mean()


def cw_rgp_loss(*views, **kw):
    """CW-RGP with the paper's CIFAR recipe: channel whitening, ZCA, groups=4, sub_batch=64, eps=0."""
    return whitening_loss(*views, **{"axis": "channel", "method": "zca", "groups": 4, "sub_batch": 64, **kw})


def w_mse_loss(*views, **kw):
    """W-MSE (Ermolov et al., ICML 2021): batch whitening, Cholesky, one group, sub_batch=128."""
    return whitening_loss(*views, **{"axis": "batch", "method": "cholesky", "groups": 1, "sub_batch": 128, **kw})


class CWRGPLoss(nn.Module):
    """Drop-in module: CWRGPLoss(groups=4, sub_batch=64, ..., generator=None)(z1, z2, ...) -> scalar.

    A generator given here draws every call's partition unless the call passes its own generator
    or partition."""

    def __init__(self, generator=None, **kw):
        super().__init__()
        unknown = set(kw) - set(whitening_loss.__kwdefaults__) | ({"partition"} & set(kw))
        if unknown:
            raise ValueError(f"CWRGPLoss got unknown or per-call arguments {sorted(unknown)}")
        self.generator, self.kw = generator, kw

    def forward(self, *views, generator=None, partition=None):
        if generator is None and partition is None:
            generator = self.generator
        return cw_rgp_loss(*views, generator=generator, partition=partition, **self.kw)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


def stable_rank(z):
    """‖Z̄‖²_F / ‖Z̄‖²₂ of the channel-centred (b, d) embedding: the paper's indicator of
    dimensional collapse, between 1 (collapsed to a line) and min(b − 1, d), and 0 when every row
    is the same (collapsed to a point). Divide by d to normalise. Needs b ≥ 2 and finite values."""
    _check_embedding(z)
    if z.shape[0] < 2:
        raise ValueError(f"the stable rank needs at least 2 samples to centre, got {z.shape[0]}")
    z = z.detach().double()
    z = z - z.mean(0)
    # scale-invariant: scaling to max |Z̄| = 1 keeps the squares within range at any scale
    size = z.abs().amax()
    if not bool(torch.isfinite(size)):
        raise ValueError("the embedding contains NaN or Inf: its stable rank is undefined")
    if size == 0:
        return torch.zeros((), dtype=z.dtype, device=z.device)
    singular_values = torch.linalg.svdvals(z / size)
    return singular_values.pow(2).sum() / singular_values[0].pow(2)
