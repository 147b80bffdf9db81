"""
Whitening losses for self-supervised learning, centred on CW-RGP: channel whitening with random
group partition, from "An Investigation into Whitening Loss for Self-supervised Learning"
(Weng, Huang, Zhao, Anwer, Khan, Khan; NeurIPS 2022, arXiv 2210.03586).

One view's embedding z is (b, d): b samples, d channels. After a permutation of the channels they
are cut into g groups of c = d/g channels, and every group is whitened on its own:

  batch whitening (BW, W-MSE):   Z̄ = Z − mean over samples,   Σ = Z̄ᵀZ̄/(b−1) (c×c),   Ẑ = Z̄Wᵀ
  channel whitening (CW, paper): Z̄ = Z − mean over channels,  Σ = Z̄Z̄ᵀ/(c−1) (b×b),   Ẑ = WZ̄

with W Σ Wᵀ = I from ZCA (W = Σ^(-1/2)), Cholesky (W = L⁻¹, Σ = LLᵀ) or PCA (W = Λ^(-1/2)Uᵀ).
The loss pulls the whitened views together: L = (1/m) Σ_rows ‖Φ(Z₁) − Φ(Z₂)‖².

What this file adds to the released recipe: every view, sub-batch, group and repetition of a step
is whitened by one batched decomposition; the small covariances are formed and decomposed in
float64 and everything else runs in float32 (half-precision inputs and autocast included); ZCA has
an exact backward that stays finite when eigenvalues repeat; shapes that cannot be whitened are
refused with the rule and the fix. Axis letters: i repetitions, v views, n sub-batches, b samples,
d channels, g groups, c channels per group.
"""

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn
from torch.autograd.function import once_differentiable

METHODS = ("zca", "cholesky", "pca")
AXES = ("channel", "batch")


# ----------------------------------------------------------------------------------------------
# Whitening matrices: W with W Σ Wᵀ = I

def _refuse_non_finite(cov):
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(
            "covariance contains NaN or Inf: the embedding is not finite (the network diverged: "
            "lower the learning rate or check the inputs), or so large that its covariance overflows"
        )


def _refuse_singular(smallest, largest, relative_tolerance):
    if bool((smallest <= relative_tolerance * largest).any()):
        raise ValueError(
            "covariance is singular (numerically rank-deficient): the embedding does not span its "
            "group. Use eps > 0 (shrinkage), or reshape the problem: batch whitening needs "
            "sub_batch > channels per group, channel whitening needs channels per group >= sub_batch."
        )


def _data_tolerance(x):
    """Below which fraction of λ_max the covariance of x (..., n, k) is numerically singular.

    x itself is only known to its dtype's rounding: σ_min(x) ≤ k·eps·σ_max(x) is numerical rank
    loss (the rule of torch.linalg.matrix_rank), so λ_min ≤ (k·eps)²·λ_max; and never below the
    float64 decomposition's own floor n·eps₆₄.
    """
    n, k = x.shape[-2:]
    return max((k * torch.finfo(x.dtype).eps) ** 2, n * torch.finfo(torch.float64).eps)


# The n for which LAPACK on the host decomposes a batch of CUDA n×n covariances faster than cuSOLVER,
# transfers included (H200, torch 2.11; docs/results.md). cuSOLVER covers n ≤ 32 with one batched
# Jacobi kernel but takes larger matrices one at a time; above 128 its speed per matrix wins again.
_HOST_EIGH_SIZES = range(33, 129)


def _checked_eigh(cov, relative_tolerance):
    """Eigendecomposition (float64, no autograd) of covariances that must be finite and full rank.
    CUDA covariances of the sizes above are decomposed on the host, and checked there, so the step
    waits for the device once."""
    work = cov.detach().double()
    if work.is_cuda and work.shape[-1] in _HOST_EIGH_SIZES:
        work = work.cpu()
    _refuse_non_finite(work)
    eigenvalues, U = torch.linalg.eigh(work)
    _refuse_singular(eigenvalues[..., 0], eigenvalues[..., -1], relative_tolerance)
    return eigenvalues.to(cov.device), U.to(cov.device)


def _divided_differences(s):
    """K_ij = (f(λ_i) − f(λ_j)) / (λ_i − λ_j) for f(λ) = λ^(-1/2), s = √λ, in closed form.

    (λ_i^(-1/2) − λ_j^(-1/2)) / (λ_i − λ_j) = −1 / (s_i s_j (s_i + s_j)), and at i = j the same
    formula gives f′(λ_i) = −1/(2 s_i³). No λ_i − λ_j is left in a denominator, so it is exact when
    eigenvalues repeat, where autograd through eigh divides by zero.
    """
    s_i, s_j = s.unsqueeze(-1), s.unsqueeze(-2)
    return -1 / (s_i * s_j * (s_i + s_j))


class _InverseSqrt(torch.autograd.Function):
    """W = Σ^(-1/2) = U diag(1/s) Uᵀ from Σ = U diag(s²) Uᵀ, with an exact backward.

    The derivative of Σ^(-1/2) in direction dΣ is U (K ∘ Uᵀ dΣ U) Uᵀ (Daleckii–Krein, K from
    _divided_differences). The map is self-adjoint, so the backward applies it to the symmetric
    part of the incoming gradient.
    """

    @staticmethod
    def forward(ctx, cov, eigenvalues, U):
        s = eigenvalues.sqrt()
        ctx.save_for_backward(s, U)
        return (U / s.unsqueeze(-2)) @ U.mT

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_W):
        s, U = ctx.saved_tensors
        grad_sym = (grad_W + grad_W.mT) / 2
        return U @ (_divided_differences(s) * (U.mT @ grad_sym @ U)) @ U.mT, None, None


def _covariance(x, eps):
    """Σ = x xᵀ/(k−1) of the rows of x (..., n, k), shrunk as Σ ← (1−ε)Σ + εI, in float64.

    Within the first epoch on Fashion-MNIST Σ reaches condition numbers of 4e4 (docs/conditioning.py),
    where float32 rounding of Σ (n·eps ≈ 8e-6 of λ_max) is a third of λ_min. In float64 λ_min keeps
    its digits, and only these small n×n matrices pay for the precision.
    """
    x = x.double()
    cov = einsum(x, x, "... n k, ... n2 k -> ... n n2") / (x.shape[-1] - 1)
    if eps:
        cov = (1 - eps) * cov + eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return cov


class _ZCAWhitenRows(torch.autograd.Function):
    """Y = Σ^(-1/2) x with Σ = (1−ε) x xᵀ/m + εI, m = k − 1, as one op with an exact backward.

    In the eigenbasis (x′ = Uᵀx, G′ = UᵀG for the incoming gradient G = ∂L/∂Y):
        Y        = U (x′ / s)
        ∂L/∂x    = U ( G′ / s  +  2(1−ε)/m · H′ x′ ),     H′ = K ∘ sym(G′ x′ᵀ)
    the first term through W, the second through Σ (H′ is ∂L/∂Σ in the eigenbasis, K from
    _divided_differences). Fusing the chain rule this way takes 7 matrix products instead of 11.
    """

    @staticmethod
    def forward(ctx, x, eps):
        eigenvalues, U = _checked_eigh(_covariance(x, eps), _data_tolerance(x))
        U, s = U.to(x.dtype), eigenvalues.sqrt().unsqueeze(-1).to(x.dtype)
        x_eig = U.mT @ x
        ctx.save_for_backward(U, s, x_eig)
        ctx.sigma_scale = 2 * (1 - eps) / (x.shape[-1] - 1)
        return U @ (x_eig / s)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        U, s, x_eig = ctx.saved_tensors
        grad_eig = U.mT @ grad_out
        outer = grad_eig @ x_eig.mT
        grad_cov_eig = _divided_differences(s.squeeze(-1)) * (outer + outer.mT) / 2
        return U @ (grad_eig / s + ctx.sigma_scale * (grad_cov_eig @ x_eig)), None


def whitening_matrix(cov, method="zca"):
    """(..., n, n) symmetric positive-definite covariances -> (..., n, n) W with W cov Wᵀ = I.

    method "zca": W = Σ^(-1/2), the symmetric choice (exact backward, see _InverseSqrt);
    "cholesky": W = L⁻¹ with Σ = LLᵀ (lower triangular); "pca": W = Λ^(-1/2)Uᵀ, eigenvalues in
    descending order (its output depends on the eigenvectors' signs, which is why it fails as a
    loss). Computed in float64, returned in cov's dtype. A covariance that is not finite, or
    numerically singular (λ_min ≤ n·eps·λ_max in cov's dtype), raises ValueError.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(f"cov must be (..., n, n), got shape {tuple(cov.shape)}")
    tolerance = cov.shape[-1] * torch.finfo(cov.dtype).eps
    return _whitening_matrix(cov.double(), method, tolerance).to(cov.dtype)


def _whitening_matrix(cov, method, relative_tolerance):
    # Only the symmetric part is a covariance; taking it makes the gradient the symmetric one.
    cov = (cov + cov.mT) / 2
    if method == "zca":
        return _InverseSqrt.apply(cov, *_checked_eigh(cov, relative_tolerance))
    if method == "pca":
        # Autograd through eigh: PCA's output depends on the eigenvectors themselves.
        _refuse_non_finite(cov)
        eigenvalues, U = torch.linalg.eigh(cov)
        _refuse_singular(eigenvalues[..., 0].detach(), eigenvalues[..., -1].detach(), relative_tolerance)
        eigenvalues, U = eigenvalues.flip(-1), U.flip(-1)
        return U.mT / eigenvalues.sqrt().unsqueeze(-1)
    _refuse_non_finite(cov)
    L, info = torch.linalg.cholesky_ex(cov)
    # The squared pivots of the factorisation play the eigenvalues' part; info > 0: not positive definite.
    pivots = L.diagonal(dim1=-2, dim2=-1) ** 2
    smallest = torch.where(info > 0, 0.0, pivots.amin(-1))
    _refuse_singular(smallest, cov.diagonal(dim1=-2, dim2=-1).amax(-1), relative_tolerance)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device).expand_as(cov)
    return torch.linalg.solve_triangular(L, eye, upper=False)


# ----------------------------------------------------------------------------------------------
# Batch and channel whitening of grouped channels

def _compute_dtype(z):
    # Decompositions have no half-precision kernels and lose the whitening in fp16/bf16 anyway.
    return z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32


def _check_whitenable(axis, method, b, d, groups, eps):
    """The shape rules; b is the number of samples whitened together (the sub-batch)."""
    if axis not in AXES:
        raise ValueError(f"axis must be 'channel' or 'batch', got {axis!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(groups, int) or groups < 1 or d % groups:
        raise ValueError(f"groups={groups!r} must be a positive divisor of the d={d} channels")
    c = d // groups
    if axis == "batch":
        if b < 2:
            raise ValueError(f"batch whitening needs at least 2 samples to estimate a covariance, got {b}")
        if eps == 0 and b <= c:
            raise ValueError(
                f"batch whitening of {b} samples cannot whiten c={c} channels per group: centring "
                f"leaves rank {b - 1} < c. Need sub_batch > c: use a larger sub_batch, more groups, "
                f"or eps > 0"
            )
    else:
        if c < 2:
            raise ValueError(f"channel whitening needs at least 2 channels per group, got c={c}")
        # Centring is per sample over all d channels, so with one group it removes one of c dimensions.
        rank = c - 1 if groups == 1 else c
        if eps == 0 and rank < b:
            rule = "c > sub_batch (with groups=1 centring removes one dimension)" if groups == 1 else "c >= sub_batch"
            raise ValueError(
                f"channel whitening needs {rule}, got c={c} channels per group for sub-batches of "
                f"{b}: use a smaller sub_batch, fewer groups, or eps > 0"
            )


def _whiten(z, axis, groups, method, eps, perm):
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
    if method == "zca":
        white = _ZCAWhitenRows.apply(x, eps)
    else:
        W = _whitening_matrix(_covariance(x, eps), method, _data_tolerance(x))
        white = W.to(x.dtype) @ x
    out = rearrange(white, f"... {rows} -> ... b (g c)")
    if perm is not None:
        # scatter puts channel k back at perm[k]; its backward is a gather, cheaper than scatter_add
        out = torch.empty_like(out).scatter(-1, perm.unsqueeze(-2).expand_as(out), out)
    return out


def _whiten_one(z, axis, groups, method, eps, perm):
    if z.ndim != 2:
        raise ValueError(f"expected a (b, d) embedding, got shape {tuple(z.shape)}")
    b, d = z.shape
    _check_whitenable(axis, method, b, d, groups, eps)
    if perm is not None and (
        perm.shape != (d,) or not torch.equal(perm.sort().values, torch.arange(d, device=perm.device))
    ):
        raise ValueError(f"perm must be a permutation of range({d}), got shape {tuple(perm.shape)}")
    with torch.autocast(z.device.type, enabled=False):
        return _whiten(z.to(_compute_dtype(z)), axis, groups, method, eps, perm)


def batch_whiten(z, groups=1, method="zca", eps=0.0, perm=None):
    """(b, d) -> (b, d): each group of channels has Ẑᵀ Ẑ/(b−1) = I_c afterwards.

    perm: a (d,) permutation of the channels that sets the groups (group k is the channels
    perm[k·c:(k+1)·c]); None keeps the channels in order. The output is in the input's channel order.
    Half-precision inputs are whitened and returned in float32.
    """
    return _whiten_one(z, "batch", groups, method, eps, perm)


def channel_whiten(z, groups=1, method="zca", eps=0.0, perm=None):
    """(b, d) -> (b, d): within each group of channels the samples become orthogonal,
    Ẑ Ẑᵀ/(c−1) = I_b. Arguments as batch_whiten."""
    return _whiten_one(z, "channel", groups, method, eps, perm)


# ----------------------------------------------------------------------------------------------
# Random group partition and the whitening loss

def random_group_partition(views, batch, dim, groups, sub_batch=None, iters=1, generator=None, device=None):
    """Draw the random partitions of one loss evaluation.

    Returns (samples, channels):
      samples  (i, b) long: an order of the batch per repetition; consecutive runs of sub_batch
               form the sub-batches, shared by all views.
      channels (i, v, n, d) long: a channel permutation for every repetition, view and sub-batch;
               consecutive runs of c = d/groups channels form the groups. With groups=1 it is the
               identity, as W-MSE (and Cholesky whitening is not permutation-invariant).
    Drawn from `generator` (on its device) or the default generator of `device`.
    """
    sub_batch = sub_batch or batch
    n = batch // sub_batch
    draw_device = generator.device if generator is not None else device
    if sub_batch == batch:
        samples = torch.arange(batch, device=draw_device).expand(iters, batch)
    else:
        samples = torch.rand(iters, batch, generator=generator, device=draw_device).argsort(-1)
    if groups == 1:
        channels = torch.arange(dim, device=draw_device).expand(iters, views, n, dim)
    else:
        # argsort of iid uniforms is a uniformly random permutation, drawn for all (i, v, n) at once
        keys = torch.rand(iters, views, n, dim, generator=generator, device=draw_device, dtype=torch.float64)
        channels = keys.argsort(-1)
    return samples.to(device), channels.to(device)


def whitening_loss(*views, axis="channel", groups=4, sub_batch=None, iters=1, method="zca", eps=0.0,
                   normalize=True, generator=None):
    """The whitening loss between V ≥ 2 views, each (b, d) -> scalar.

    For each of `iters` repetitions: one random split of the batch into sub-batches of `sub_batch`
    samples (None: the whole batch), shared by the views; every view's sub-batch whitened along
    `axis` ("channel": CW, "batch": BW) with its own random group partition into `groups` groups;
    then the mean over rows of ‖ẑ_v − ẑ_w‖², averaged over the V(V−1)/2 pairs and the repetitions.
    normalize=True L2-normalises the whitened rows first, making each term 2 − 2·cos. Gradients
    flow through the whitening. The result is float32 for half-precision inputs or under autocast.
    """
    if len(views) < 2:
        raise ValueError(f"the loss needs at least two views, got {len(views)}")
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) > 1:
        raise ValueError(f"all views must have the same (b, d) shape, got {sorted(shapes)}")
    if views[0].ndim != 2:
        raise ValueError(f"each view must be a (b, d) embedding, got shape {tuple(views[0].shape)}")
    b, d = views[0].shape
    sub_batch = sub_batch or b
    if b % sub_batch:
        raise ValueError(
            f"batch of {b} cannot be split into sub-batches of {sub_batch}: pass a sub_batch that "
            f"divides {b}, or sub_batch=None for the whole batch"
        )
    _check_whitenable(axis, method, sub_batch, d, groups, eps)
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive integer, got {iters!r}")
    z = torch.stack(views)
    samples, channels = random_group_partition(len(views), b, d, groups, sub_batch, iters, generator, z.device)
    with torch.autocast(z.device.type, enabled=False):
        z = z.to(_compute_dtype(z))
        # index_select, not z[:, samples]: its backward is a row copy rather than an index_put
        shuffled = z.index_select(1, samples.flatten())
        grouped = rearrange(shuffled, "v (i n b) d -> i v n b d", i=iters, b=sub_batch)
        # Φ(Z) for all repetitions, views and sub-batches at once: one batched decomposition
        white = _whiten(grouped, axis, groups, method, eps, None if groups == 1 else channels)
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
    """Drop-in module: CWRGPLoss(groups=4, sub_batch=64, ...)(z1, z2, ...) -> scalar."""

    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, *views, generator=None):
        return cw_rgp_loss(*views, generator=generator, **self.kw)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


def stable_rank(z):
    """‖Z̄‖²_F / ‖Z̄‖²₂ of the channel-centred (b, d) embedding: the paper's indicator of
    dimensional collapse, between 1 (collapsed to a line) and min(b − 1, d). Divide by d to
    normalise."""
    if z.ndim != 2:
        raise ValueError(f"expected a (b, d) embedding, got shape {tuple(z.shape)}")
    z = z.detach().to(_compute_dtype(z))
    singular_values = torch.linalg.svdvals(z - z.mean(0))
    return singular_values.pow(2).sum() / singular_values[0].pow(2)
