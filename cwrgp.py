"""
Whitening losses for self-supervised learning, centred on CW-RGP, from "An Investigation into
Whitening Loss for Self-supervised Learning" (Weng et al., NeurIPS 2022, arXiv 2210.03586).

Read this first: the CW-RGP loss of two views in plain torch, for a batch that is one sub-batch.
Each view's channels are cut into groups by its own random permutation; in each group the b
samples are whitened over the group's c channels (Σ is b × b), and the loss pulls the two views'
whitened rows together.

>>> import torch
>>> import torch.nn.functional as F
>>> def cw_rgp(z1, z2, perm1, perm2, groups=4):
...     def whiten(z, perm):  # z (b, d); perm: a permutation of range(d), its runs of c the groups
...         z = z - z.mean(1, keepdim=True)  # one mean per sample, over all d channels
...         x = z[:, perm].reshape(len(z), groups, -1).transpose(0, 1)  # (g, b, c)
...         cov = x @ x.mT / (x.shape[-1] - 1)  # Σ = Z̄Z̄ᵀ/(c−1), one (b, b) per group
...         eigenvalues, U = torch.linalg.eigh(cov)
...         W = U @ torch.diag_embed(eigenvalues ** -0.5) @ U.mT  # W = U diag(λ^-1/2) Uᵀ
...         white = torch.empty_like(z)
...         white[:, perm] = (W @ x).transpose(0, 1).reshape(z.shape)  # Ẑ = WZ̄, channels in order
...         return F.normalize(white, dim=1)
...     return (2 - 2 * (whiten(z1, perm1) * whiten(z2, perm2)).sum(1)).mean()  # 2 − 2·cos
>>> gen = torch.Generator().manual_seed(0)
>>> z1 = torch.randn(64, 512, generator=gen, dtype=torch.float64)  # 64 images, d = 512
>>> z2 = z1 + 0.5 * torch.randn(64, 512, generator=gen, dtype=torch.float64)  # their other view
>>> perm1, perm2 = torch.randperm(512, generator=gen), torch.randperm(512, generator=gen)
>>> loss = cw_rgp(z1, z2, perm1, perm2)

cw_rgp_loss (groups=4, sub_batch=64) computes the same number when given the same partition:
samples (repetitions, batch), the order of the batch, whose runs of sub_batch are the sub-batches
(here one, in order), and channels (repetitions, views, sub-batches, d), one permutation each.

>>> from cwrgp import cw_rgp_loss
>>> samples = torch.arange(64).reshape(1, 64)
>>> channels = torch.stack([perm1, perm2]).reshape(1, 2, 1, 512)
>>> torch.allclose(loss, cw_rgp_loss(z1, z2, partition=(samples, channels)))
True

The code below is that computation made exact, safe and fast: any number of views, sub-batches
and repetitions, Σ in float64, a gradient that stays finite where eigenvalues repeat, errors that
name the fix, and a form that torch.compile and CUDA graphs take whole. It follows the paper's
order, the machinery (refusals, compile safety, argument checks) last. Symbols:
docs/paper-to-code.md; proofs: docs/derivations.md. Einops letters: i repetitions, v views,
s sub-batches, b samples, d channels, g groups, c channels per group; x (n, k) is a matrix whose
n rows are whitened.
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
CW_RGP = dict(axis="channel", method="zca", groups=4, sub_batch=64)  # the paper's CIFAR recipe
W_MSE = dict(axis="batch", method="cholesky", groups=1, sub_batch=128)  # Ermolov et al., ICML 2021


# ── 1. The whitening loss L = (1/m)‖Φ(Z₁) − Φ(Z₂)‖²_F, and its recipes ──────────────────────────

def whitening_loss(*views, axis="channel", groups=4, sub_batch=None, iters=1, method="zca",
                   eps=0.0, normalize=True, generator=None, partition=None, solver="auto"):
    """The whitening loss of V ≥ 2 views, each an (m, d) embedding of the same m images -> scalar.

    Per repetition (`iters` of them) the batch is split at random into sub-batches of `sub_batch`
    samples (None: one), shared by the views; every view's sub-batch has its own random channel
    permutation, cut into `groups` groups and whitened along `axis`: "channel" (CW, CW-RGP) or
    "batch" (BW, W-MSE), by `method` "zca", "cholesky" or "pca" (PCA fails as a loss) with ZCA's
    `solver` "eigh", "newton" (matrix products only) or "auto" (newton on CUDA, eigh elsewhere),
    and shrinkage Σ ← (1−eps)Σ + eps·I, 0 ≤ eps < 1. normalize=True L2-normalises the whitened
    rows (each term 2 − 2·cos, the released loss). Returns the mean over rows, view pairs and
    repetitions, float32 for half-precision inputs and under autocast; gradients flow through the
    whitening.

    Shape rules at eps = 0, c = d/groups: groups divides d, sub_batch divides m, BW needs
    sub_batch > c, CW c ≥ sub_batch (c > sub_batch if groups=1): (256, 512) views need
    sub_batch ≤ 128 (cw_rgp_loss: 64).

    A `partition` (random_group_partition's (samples, channels)) instead of a `generator` makes
    the loss a pure tensor function: torch.compile(fullgraph=True) takes it whole, and with solver
    "newton" it replays in a CUDA graph. Bad arguments, non-finite or singular whitening raise
    ValueError naming the fix when eager; compiled or captured, the loss is NaN instead.
    """
    m, d, sub_batch, groups, iters, eps, solver = _check_loss(
        views, axis, groups, sub_batch, iters, method, eps, solver)
    V, device = len(views), views[0].device
    if partition is None:
        partition = random_group_partition(V, m, d, groups, sub_batch, iters, generator, device)
    else:
        _check_partition(partition, generator, (iters, m), (iters, V, m // sub_batch, d))
    samples, channels = partition
    z = torch.stack(views)
    with torch.autocast(z.device.type, enabled=False):
        # float32 at least (no half-precision decompositions); index_select's backward is a row copy
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        shuffled = z.index_select(1, samples.flatten())
        grouped = rearrange(shuffled, "v (i s b) d -> i v s b d", i=iters, b=sub_batch)
        perm = None if groups == 1 else channels  # groups=1 draws the identity: skip it
        white = _whiten(grouped, axis, groups, method, solver, eps, perm)  # Φ(Z)
        if normalize:
            white = F.normalize(white, dim=-1)
        first, second = torch.triu_indices(V, V, 1, device=device)
        # (1/m)‖Φ(Z_v) − Φ(Z_w)‖²_F for every pair v < w, then the mean over pairs and repetitions
        return (white.index_select(1, first) - white.index_select(1, second)).pow(2).sum(-1).mean()

def cw_rgp_loss(*views, **kw):
    """whitening_loss with CW_RGP, the paper's CIFAR recipe (CW, ZCA, groups=4, sub_batch=64);
    kw overrides."""
    return whitening_loss(*views, **{**CW_RGP, **kw})

def w_mse_loss(*views, **kw):
    """whitening_loss with W_MSE (BW, Cholesky, groups=1, sub_batch=128); kw overrides."""
    return whitening_loss(*views, **{**W_MSE, **kw})

class CWRGPLoss(nn.Module):
    """cw_rgp_loss as a module: kw (whitening_loss's but `partition`) fixed; `generator` draws
    each call's partition."""

    def __init__(self, generator=None, **kw):
        super().__init__()
        unknown = set(kw) - set(whitening_loss.__kwdefaults__) | ({"partition"} & set(kw))
        if unknown:
            raise ValueError(f"CWRGPLoss got unknown or per-call arguments {sorted(unknown)}")
        self.generator, self.kw = generator, kw

    def forward(self, *views, generator=None, partition=None):
        """The CW-RGP loss of V ≥ 2 (m, d) views -> scalar; a generator or partition given here
        wins."""
        if generator is None and partition is None:
            generator = self.generator
        return cw_rgp_loss(*views, generator=generator, partition=partition, **self.kw)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in {**CW_RGP, **self.kw}.items())


# ── 2. Random group partition ───────────────────────────────────────────────────────────────────

def random_group_partition(views, batch, dim, groups, sub_batch=None, iters=1, generator=None,
                           device=None):
    """One loss evaluation's partitions -> (samples (i, m), channels (i, v, m/b, d)), long, on
    `device`.

    samples: an order of the batch per repetition, its runs of sub_batch the sub-batches of every
    view; channels: a permutation per repetition, view and sub-batch, its runs of c = dim/groups the
    groups (the identity for groups=1, as W-MSE). Drawn from `generator` or `device`'s default.
    """
    views = _positive_int(views, "views")
    batch = _positive_int(batch, "batch")
    dim = _positive_int(dim, "dim")
    groups, iters = _check_groups(groups, dim), _positive_int(iters, "iters")
    sub_batch = _check_sub_batch(sub_batch, batch)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    draw_device = generator.device if generator is not None else device
    samples = _permutations((iters, batch), sub_batch < batch, generator, draw_device)
    channels = _permutations((iters, views, batch // sub_batch, dim), groups > 1, generator,
                             draw_device, torch.float64)
    return samples.to(device), channels.to(device)

def _permutations(shape, random, generator, device, dtype=None):
    """Permutations of range(shape[-1]) along the last axis: uniformly random if `random` (the
    argsort of iid uniforms, all at once), else the identity, which draws nothing."""
    if not random:
        return torch.arange(shape[-1], device=device).expand(shape)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype).argsort(-1)


# ── 3. Batch and channel whitening: centre, group, the covariance, whiten its rows ─────────────

def batch_whiten(z, groups=1, method="zca", eps=0.0, perm=None, solver="auto"):
    """BW of a (b, d) embedding -> (b, d), with ẐᵀẐ/(b−1) = I_c in each group of c = d/groups
    channels.

    Z̄ = Z − 1μᵀ (one mean per channel), Σ = Z̄ᵀZ̄/(b−1), Ẑ = Z̄Wᵀ; needs b > c unless eps > 0.
    perm: a (d,) permutation whose runs of c channels are the groups (None: in order); the output
    is in the input's order. method, solver, eps as in whitening_loss. Half-precision or integer
    z -> float32.
    """
    return _whiten_one(z, "batch", groups, method, solver, eps, perm)

def channel_whiten(z, groups=1, method="zca", eps=0.0, perm=None, solver="auto"):
    """CW of a (b, d) embedding -> (b, d), with ẐẐᵀ/(c−1) = I_b in each group of c = d/groups
    channels.

    Z̄: one mean per sample over all d channels, Σ = Z̄Z̄ᵀ/(c−1), Ẑ = WZ̄; needs c ≥ b (c > b with
    groups=1) unless eps > 0. The other arguments as batch_whiten."""
    return _whiten_one(z, "channel", groups, method, solver, eps, perm)

def _whiten(z, axis, groups, method, solver, eps, perm):
    """z (..., b, d) -> Φ(z) (..., b, d). Both whiten the rows of x (n, k): CW a group's b samples
    over its c channels, BW its c channels over the b samples (Ẑ = Z̄Wᵀ is Ẑᵀ = WZ̄ᵀ)."""
    if perm is not None:
        z = z.gather(-1, perm.unsqueeze(-2).expand_as(z))
    # CW: one mean per sample, over all d channels; BW: one mean per channel, over the b samples
    mean_axis, rows = (-1, "g b c") if axis == "channel" else (-2, "g c b")
    z = z - z.mean(mean_axis, keepdim=True)
    x = rearrange(z, f"... b (g c) -> ... {rows}", g=groups)
    out = rearrange(_whiten_rows(x, method, solver, eps), f"... {rows} -> ... b (g c)")
    if perm is not None:  # channel k back to perm[k]; the scatter's backward is a gather
        out = torch.empty_like(out).scatter(-1, perm.unsqueeze(-2).expand_as(out), out)
    return out

def _whiten_rows(x, method, solver, eps):
    """W x for x (..., n, k), W from Σ = x xᵀ/(k−1); refused below x's numerical rank."""
    if not eps:
        # W(αΣ) = W(Σ)/√α: with no shrinkage (which is absolute) scaling x to max |x| = 1 changes
        # nothing, gradient included, and keeps Σ and the backward in range (docs/derivations.md §5)
        scale = x.detach().abs().amax((-2, -1), keepdim=True)
        x = x / torch.where(scale > 0, scale, 1.0)
    # ZCA by eigh takes the chain through Σ = a·x xᵀ, a = 1/(k−1), in its own backward
    cov_scale = 1 / (x.shape[-1] - 1) if not eps and (method, solver) == ("zca", "eigh") else None
    cov = _covariance(x if cov_scale is None else x.detach(), eps)
    return _refuse_or_poison(*_whitened(cov, x, method, solver, _data_tolerance(x), cov_scale))

def _covariance(x, eps):
    """Σ = (1−ε)·x xᵀ/(k−1) + εI in float64: training reaches cond 4e4, where float32's rounding
    of Σ would be a third of λ_min (docs/paper-to-code.md, what differs)."""
    x = x.double()
    cov = einsum(x, x, "... n k, ... n2 k -> ... n n2") / (x.shape[-1] - 1)
    if eps:
        cov = (1 - eps) * cov + eps * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return cov


# ── 4. Whitening matrices W with WΣWᵀ = I: ZCA by eigh or Newton–Schulz, Cholesky, PCA ─────────

def whitening_matrix(cov, method="zca", solver="auto"):
    """(..., n, n) symmetric positive-definite covariances -> W (..., n, n) with W cov Wᵀ = I.

    method "zca": W = Σ^(-1/2), by solver "eigh" or "newton" (both exact; "auto": newton on CUDA);
    "cholesky": W = L⁻¹ with Σ = LLᵀ; "pca": W = Λ^(-1/2)Uᵀ, eigenvalues descending. Computed in
    float64, differentiable, returned in cov's dtype (float64 for integers). ValueError for a cov
    not finite, not symmetric beyond rounding, or singular (λ_min ≤ n·eps·λ_max in cov's dtype).
    """
    dtype = _check_covariance(cov, method)
    work = cov.double()
    if work.requires_grad:  # only the symmetric part is a covariance; its gradient is symmetric
        work = (work + work.mT) / 2
    values, n, eps = work.detach(), cov.shape[-1], torch.finfo(dtype).eps
    asymmetry = (values - values.mT).abs().amax((-2, -1))
    asymmetric = asymmetry > math.sqrt(eps) * values.abs().amax((-2, -1))
    eye = torch.eye(n, dtype=work.dtype, device=work.device).expand_as(work)
    W, failures = _whitened(work, eye, method, _resolve_solver(solver, cov.device), n * eps)
    return _refuse_or_poison(W, failures[:1] + [(asymmetric, ASYMMETRIC)] + failures[1:]).to(dtype)

def _whitened(cov, x, method, solver, relative_tolerance, cov_scale=None):
    """W x for float64 Σ (..., n, n) and x (..., n, k), and the (flags, message) failures, among
    them λ_min ≤ t·λ_max (t = relative_tolerance); non-finite and zero Σ are swapped for I and
    refused."""
    values = cov.detach()
    non_finite = ~torch.isfinite(values).all(-1).all(-1)
    not_positive = ~non_finite & ~(values.diagonal(dim1=-2, dim2=-1).sum(-1) > 0)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    cov = torch.where((non_finite | not_positive)[..., None, None], eye, cov)
    if (method, solver) == ("zca", "eigh"):
        out, failures = _zca_eigh(cov, x, relative_tolerance, cov_scale)
    else:
        whiten = {"zca": _zca_newton, "cholesky": _cholesky, "pca": _pca}[method]
        out, failures = whiten(cov, x, relative_tolerance)
    return out, [(non_finite, NON_FINITE), (not_positive, SINGULAR)] + failures

def _zca_eigh(cov, x, relative_tolerance, cov_scale=None):
    """ZCA, Σ^(-1/2) x from Σ = UΛUᵀ, exact to float64 rounding (about cond(Σ)·eps₆₄ relative)."""
    eigenvalues, U = torch.linalg.eigh(cov.detach())
    singular = eigenvalues[..., 0] <= relative_tolerance * eigenvalues[..., -1]
    return _InverseSqrtTimes.apply(cov, x, eigenvalues, U, cov_scale), [(singular, SINGULAR)]

# Converged, max |ZY − I| is below 1e-9 (at cond 1e15, n ≤ 512); unconverged, it is of order one.
NEWTON_RESIDUAL = 1e-6

def newton_steps(relative_tolerance, n):
    """The Newton–Schulz steps after which every Σ with λ_min > t·λ_max has converged: on an
    eigenvector the eigenvalue p of ZY goes to p(3 − p)²/4, from p = λ/tr(Σ) ≥ t/n to 1 − 1e-15."""
    p, steps = relative_tolerance / n, 0
    while p < 1 - 1e-15:
        p, steps = p * (3 - p) ** 2 / 4, steps + 1
    return steps

def _zca_newton(cov, x, relative_tolerance):
    """ZCA by the coupled Newton–Schulz iteration, Z → (Σ/τ)^(-1/2), W = Z/√τ: matrix products
    only, equal to eigh with its gradient (autograd through the steps) wherever the rule accepts
    Σ."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    # τ = tr Σ puts Y₀'s eigenvalues in (0, 1]
    tau = cov.detach().diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    Y, Z = cov / tau, eye.expand_as(cov)
    for _ in range(newton_steps(relative_tolerance, cov.shape[-1])):
        T = (3 * eye - Z @ Y) / 2  # T = (3I − ZY)/2, Y ← YT, Z ← TZ
        Y, Z = Y @ T, T @ Z
    unconverged = ~((Z @ Y - eye).detach().abs().amax((-2, -1)) <= NEWTON_RESIDUAL)
    return (Z / tau.sqrt()).to(x.dtype) @ x, [(unconverged, SINGULAR)]

def _cholesky(cov, x, relative_tolerance):
    """W = L⁻¹ with Σ = LLᵀ; the squared pivots play the eigenvalues' part in the rule."""
    L, info = torch.linalg.cholesky_ex(cov)
    pivots = L.detach().diagonal(dim1=-2, dim2=-1) ** 2
    largest_variance = cov.detach().diagonal(dim1=-2, dim2=-1).amax(-1)
    singular = (info > 0) | (pivots.amin(-1) <= relative_tolerance * largest_variance)
    white = torch.linalg.solve_triangular(L, x.to(L.dtype), upper=False)
    return white.to(x.dtype), [(singular, SINGULAR)]

def _pca(cov, x, relative_tolerance):
    """W = Λ^(-1/2)Uᵀ, eigenvalues descending, by autograd through eigh; its gradient does not
    exist where eigenvalues coincide (refused when one is needed: docs/derivations.md §6)."""
    eigenvalues, U = torch.linalg.eigh(cov)
    ascending = eigenvalues.detach()
    failures = [(ascending[..., 0] <= relative_tolerance * ascending[..., -1], SINGULAR)]
    if cov.requires_grad and cov.shape[-1] > 1:
        smallest_gap = ascending.diff(dim=-1).amin(-1)
        failures.append((smallest_gap <= relative_tolerance * ascending[..., -1], PCA_TIES))
    W = U.flip(-1).mT / eigenvalues.flip(-1).sqrt().unsqueeze(-1)
    return W.to(x.dtype) @ x, failures


# ── 5. ZCA's exact gradient, finite where eigenvalues repeat (docs/derivations.md §5) ─────────────

class _InverseSqrtTimes(torch.autograd.Function):
    """Y = Σ^(-1/2) x = U (Uᵀx / s) from Σ = U diag(s²) Uᵀ, never forming W (x = I gives W)."""

    @staticmethod
    def forward(ctx, cov, x, eigenvalues, U, cov_scale):
        x_eig = U.to(x.dtype).mT @ x
        ctx.save_for_backward(U, eigenvalues, x_eig)
        ctx.cov_scale = cov_scale
        return U.to(x.dtype) @ (x_eig / eigenvalues.sqrt().to(x.dtype).unsqueeze(-1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        """x′ = Uᵀx, G′ = Uᵀ ∂L/∂Y, H′ = K ∘ sym(G′x′ᵀ), K_ij = −1/(s_i s_j (s_i + s_j))
        (Daleckii–Krein); ∂L/∂Σ = U H′ Uᵀ, ∂L/∂x = U (G′/s + 2a H′x′), the second term only if
        Σ = a·x xᵀ (cov_scale = a)."""
        U, eigenvalues, x_eig = ctx.saved_tensors
        s, U_x = eigenvalues.sqrt(), U.to(grad_out.dtype)
        grad_eig = U_x.mT @ grad_out
        outer = (grad_eig @ x_eig.mT).double()  # K and H′ in float64, whose range holds 1/s³
        s_i, s_j = s.unsqueeze(-1), s.unsqueeze(-2)
        grad_cov_eig = -1 / (s_i * s_j * (s_i + s_j)) * (outer + outer.mT) / 2
        grad_cov = U @ grad_cov_eig @ U.mT if ctx.needs_input_grad[0] else None
        grad_x = grad_eig / s.to(grad_out.dtype).unsqueeze(-1)
        if ctx.cov_scale is not None:
            grad_x = grad_x + (2 * ctx.cov_scale * grad_cov_eig).to(grad_out.dtype) @ x_eig
        return grad_cov, U_x @ grad_x if ctx.needs_input_grad[1] else None, None, None, None


# ── 6. The paper's indicator of dimensional collapse ────────────────────────────────────────────

def stable_rank(z):
    """‖Z̄‖²_F / ‖Z̄‖²₂ of the channel-centred (b, d) embedding, in float64, no gradient: between 1
    (collapsed to a line) and min(b − 1, d), 0 when all rows are equal. Divide by d to normalise."""
    _check_embedding(z)
    if z.shape[0] < 2:
        raise ValueError(f"the stable rank needs at least 2 samples to centre, got {z.shape[0]}")
    z = z.detach().double()
    z = z - z.mean(0)
    size = z.abs().amax()  # scale-free: dividing by max |Z̄| keeps the squares in range
    if not bool(torch.isfinite(size)):
        raise ValueError("the embedding contains NaN or Inf: its stable rank is undefined")
    if size == 0:
        return torch.zeros((), dtype=z.dtype, device=z.device)
    singular_values = torch.linalg.svdvals(z / size)
    return singular_values.pow(2).sum() / singular_values[0].pow(2)


# ── 7. Machinery: the refusal rule, compile and capture safety, precision, argument checks ───────

NON_FINITE = ("covariance contains NaN or Inf: the embedding is not finite (the network diverged: "
              "lower the learning rate or check the inputs)")
SINGULAR = ("covariance is singular (numerically rank-deficient): the embedding does not span its "
            "group. Use eps > 0 (shrinkage), or reshape: batch whitening needs sub_batch > "
            "channels per group, channel whitening needs channels per group >= sub_batch.")
PCA_TIES = ("PCA whitening has no gradient where two eigenvalues of the covariance coincide (its "
            "eigenvectors are not unique): use method 'zca' or 'cholesky', or detach the input")
ASYMMETRIC = ("cov is not symmetric (beyond rounding): a covariance is symmetric, and W cov Wᵀ = I "
              "needs one")

def _data_tolerance(x):
    """t for x (..., n, k): σ_min(x) ≤ k·eps·σ_max(x) is rank loss in x's dtype (matrix_rank's
    rule), so λ_min ≤ (k·eps)²·λ_max is singular; never below n·eps₆₄ (docs/derivations.md §3)."""
    n, k = x.shape[-2:]
    return max((k * torch.finfo(x.dtype).eps) ** 2, n * torch.finfo(torch.float64).eps)

def _host_reads_allowed():
    """False while torch.compile traces or a CUDA graph is captured: nothing may then be read
    back."""
    if torch.compiler.is_compiling():  # first, so that torch.compile never traces the CUDA query
        return False
    return not (torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing())

def _refuse_or_poison(out, failures):
    """Eager: ValueError for the first of the failures (flags (...), message) found, after one read
    back to the host. Compiled or captured: the failed matrices of out (..., n, k) become NaN."""
    if _host_reads_allowed():
        found = torch.stack([flags.any() for flags, _ in failures]).tolist()
        for hit, (_, message) in zip(found, failures):
            if hit:
                raise ValueError(message)
        return out
    failed = torch.stack([flags for flags, _ in failures]).any(0)
    return out.masked_fill(failed[..., None, None], float("nan"))

def _resolve_solver(solver, device):
    """ZCA's solver: "auto" is Newton–Schulz on CUDA (no host sync) and eigh elsewhere."""
    if _check_choice(solver, "solver", SOLVERS) == "auto":
        return "newton" if device.type == "cuda" else "eigh"
    return solver

def _whiten_one(z, axis, groups, method, solver, eps, perm):
    """batch_whiten and channel_whiten, their arguments checked."""
    _check_embedding(z)
    _check_choice(method, "method", METHODS)
    b, d = z.shape
    groups, eps = _check_groups(groups, d), _check_eps(eps)
    _check_whitenable(axis, b, d // groups, groups, eps)
    if perm is not None:
        _check_permutation(perm, (d,), "perm")
    with torch.autocast(z.device.type, enabled=False):
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        return _whiten(z, axis, groups, method, _resolve_solver(solver, z.device), eps, perm)

def _check_loss(views, axis, groups, sub_batch, iters, method, eps, solver):
    if len(views) == 1 and isinstance(views[0], (list, tuple)):
        raise ValueError(f"the views were passed as one {type(views[0]).__name__}: pass them as "
                         "separate arguments, e.g. cw_rgp_loss(z1, z2) or cw_rgp_loss(*views)")
    if len(views) < 2:
        raise ValueError(f"the loss needs at least two views, got {len(views)}")
    for v in views:
        _check_embedding(v)
    shapes = sorted({tuple(v.shape) for v in views})
    if len(shapes) > 1:
        raise ValueError(f"all views must have the same (m, d) shape, got {shapes}")
    _check_choice(axis, "axis", AXES)
    _check_choice(method, "method", METHODS)
    m, d = views[0].shape
    sub_batch, groups = _check_sub_batch(sub_batch, m), _check_groups(groups, d)
    iters, eps = _positive_int(iters, "iters"), _check_eps(eps)
    _check_whitenable(axis, sub_batch, d // groups, groups, eps)
    return m, d, sub_batch, groups, iters, eps, _resolve_solver(solver, views[0].device)

def _check_partition(partition, generator, samples_shape, channels_shape):
    if generator is not None:
        raise ValueError("pass either a generator to draw the partition or a partition, not both")
    samples, channels = partition
    _check_permutation(samples, samples_shape, "partition's samples")
    _check_permutation(channels, channels_shape, "partition's channels")

def _check_covariance(cov, method):
    _check_choice(method, "method", METHODS)
    shape = tuple(getattr(cov, "shape", ()))
    if not isinstance(cov, torch.Tensor) or len(shape) < 2 or not 0 < shape[-1] == shape[-2]:
        raise ValueError(f"cov must be (..., n, n) with n ≥ 1, got shape {shape}")
    if cov.is_complex() or cov.dtype == torch.bool:
        raise ValueError(f"cov must be real, got {cov.dtype}")
    return cov.dtype if cov.is_floating_point() else torch.float64

def _check_whitenable(axis, b, c, groups, eps):
    """The shape rules (docs/derivations.md §3); b is the number of samples whitened together."""
    if axis == "batch" and b < 2:
        raise ValueError(f"batch whitening needs at least 2 samples for a covariance, got {b}")
    if axis == "batch" and eps == 0 and b <= c:
        raise ValueError(f"batch whitening of {b} samples cannot whiten c={c} channels per group: "
                         f"centring leaves rank {b - 1} < c. Need sub_batch > c: use a larger "
                         "sub_batch, more groups, or eps > 0")
    if axis == "channel" and c < 2:
        raise ValueError(f"channel whitening needs at least 2 channels per group, got c={c}")
    # Centring is per sample over all d channels, so with one group it removes one of c dimensions.
    if axis == "channel" and eps == 0 and (c - 1 if groups == 1 else c) < b:
        rule = ("c > sub_batch (with groups=1 centring removes one dimension)" if groups == 1
                else "c >= sub_batch")
        raise ValueError(f"channel whitening needs {rule}, got c={c} channels per group for "
                         f"sub-batches of {b}: use a smaller sub_batch, fewer groups, or eps > 0")

def _check_embedding(z):
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"the embedding must be a torch.Tensor, got {torch.typename(z)}: convert "
                         "it with torch.from_numpy(z) (a NumPy array) or torch.as_tensor(z)")
    if z.ndim != 2:
        raise ValueError(f"expected a (b, d) embedding tensor, got {z.shape}")
    if z.is_complex() or z.dtype == torch.bool:
        raise ValueError(f"the embedding must be real (floating or integer), got {z.dtype}")
    if z.numel() == 0:
        raise ValueError(f"the embedding is empty, shape {tuple(z.shape)}: it needs b, d ≥ 1")

def _check_permutation(perm, shape, name):
    if not isinstance(perm, torch.Tensor):
        raise ValueError(f"{name} must be an integer tensor, got {torch.typename(perm)}")
    if perm.is_floating_point() or perm.is_complex() or perm.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of permutations, got {perm.dtype}")
    if tuple(perm.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(perm.shape)}")
    if _host_reads_allowed():  # compiled or captured, the values cannot be looked at
        identity = torch.arange(shape[-1], device=perm.device).expand(shape)
        if not torch.equal(perm.sort(-1).values, identity):
            raise ValueError(f"{name} must be permutations of range({shape[-1]}) on its last axis")

def _check_sub_batch(sub_batch, b):
    sub_batch = b if sub_batch is None else _positive_int(sub_batch, "sub_batch")
    if b % sub_batch:
        raise ValueError(f"batch of {b} cannot be split into sub-batches of {sub_batch}: pass a "
                         f"sub_batch that divides {b}, or sub_batch=None for the whole batch")
    return sub_batch

def _check_groups(groups, d):
    groups = _positive_int(groups, "groups")
    if d % groups:
        raise ValueError(f"groups={groups!r} must be a positive divisor of the d={d} channels")
    return groups

def _check_eps(eps):
    if isinstance(eps, (str, bytes)) or not hasattr(eps, "__float__") or not 0 <= float(eps) < 1:
        raise ValueError("eps must be a number in [0, 1): Σ ← (1−eps)Σ + eps·I is no covariance "
                         f"below 0 and is I at 1, got {eps!r}")
    return float(eps)

def _check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value

def _positive_int(value, name):
    # ints and numpy ints have __index__; 8.0 and "8" have not
    index = operator.index(value) if hasattr(type(value), "__index__") else 0
    if index < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return index
