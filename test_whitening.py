"""
Property tests of cwrgp.py. First against an independent float64 reference written here from the
formulas (loops, plain torch.linalg), then the properties the paper relies on: whitened outputs,
ZCA as the nearest whitening, random group partition, full-rank behaviour, gradients, the loss,
and the refusals. Shapes are drawn valid by construction: g and c first, then d = g·c.
"""

import math
import os

import numpy
import pytest
import torch
import torch._dynamo
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cwrgp
from cwrgp import (CWRGPLoss, batch_whiten, channel_whiten, cw_rgp_loss, random_group_partition,
                   stable_rank, w_mse_loss, whitening_loss, whitening_matrix)

# CI replays the same examples on every run, so a red CI is a real failure and never a new draw;
# local runs keep exploring (and keep the failures they find in .hypothesis/).
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")

TOL = {torch.float64: 1e-8, torch.float32: 1e-3}  # float32 outputs carry cond(Σ)·eps of rounding
WHITEN = {"batch": batch_whiten, "channel": channel_whiten}
seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------------------------
# Drawing valid problems

@st.composite
def problems(draw, axes=("batch", "channel"), methods=("zca", "cholesky", "pca"), max_groups=4,
             dtype=None, margin=None):
    """(axis, method, b, groups, c, dtype). With margin 1 the square-ish blocks can have any
    condition number; margin 3 (rank 3× the size, the default for float32 and for finite
    differences) keeps cond(Σ) near 10: for a Gaussian block the chance of cond above 1e4 is then
    about (10/1e4)^((k−n+1)/2) ≤ 1e-7, where float32's 1e-3 tolerance and gradcheck both still
    hold."""
    axis = draw(st.sampled_from(axes))
    method = draw(st.sampled_from(methods))
    dtype = dtype or draw(st.sampled_from([torch.float64, torch.float32]))
    margin = margin or (3 if dtype == torch.float32 else 1)
    groups = draw(st.integers(1, max_groups))
    if axis == "batch":
        c = draw(st.integers(1, 5))
        b = draw(st.integers(margin * c + 1, margin * c + 8))
    else:
        b = draw(st.integers(1, 5))
        rank_lost = 1 if groups == 1 else 0  # per-sample centring over all channels
        c = draw(st.integers(max(2, margin * b + rank_lost), margin * b + rank_lost + 6))
    return axis, method, b, groups, c, dtype


def embedding(seed, b, d, dtype=torch.float64, requires_grad=False):
    """Gaussian rows with channel offsets and mild channel scales, so centring has work to do."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(b, d, generator=gen, dtype=torch.float64)
    z = (z * torch.exp(0.3 * torch.randn(d, generator=gen, dtype=torch.float64))
         + torch.randn(d, generator=gen, dtype=torch.float64))
    return z.to(dtype).requires_grad_(requires_grad)


def random_perm(seed, d):
    return torch.randperm(d, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# The independent reference: float64, loops, one decomposition per group, straight from the formulas

def reference_matrix(cov, method):
    if method == "zca":
        eigenvalues, U = torch.linalg.eigh(cov)
        return U @ torch.diag(eigenvalues.rsqrt()) @ U.T
    if method == "cholesky":
        return torch.linalg.inv(torch.linalg.cholesky(cov))
    eigenvalues, U = torch.linalg.eigh(cov)
    return torch.diag(eigenvalues.flip(0).rsqrt()) @ U.flip(1).T


def reference_whiten(z, axis, groups, method, eps=0.0, perm=None):
    z = z.double()
    b, d = z.shape
    c = d // groups
    perm = torch.arange(d) if perm is None else perm
    x = z[:, perm]
    x = x - (x.mean(1, keepdim=True) if axis == "channel" else x.mean(0, keepdim=True))
    out = torch.empty_like(x)
    for k in range(groups):
        xg = x[:, k * c:(k + 1) * c]
        cov = xg @ xg.T / (c - 1) if axis == "channel" else xg.T @ xg / (b - 1)
        cov = (1 - eps) * cov + eps * torch.eye(len(cov), dtype=cov.dtype)
        W = reference_matrix(cov, method)
        out[:, k * c:(k + 1) * c] = W @ xg if axis == "channel" else xg @ W.T
    restored = torch.empty_like(out)
    restored[:, perm] = out
    return restored


def reference_loss(views, samples, channels, axis, groups, method, eps=0.0, normalize=True):
    """The loss for given partitions: samples (i, b), channels (i, v, n, d)."""
    total, count = 0.0, 0
    for i in range(samples.shape[0]):
        sub_batches = samples[i].view(channels.shape[2], -1)
        whitened = [torch.empty(views[0].shape, dtype=torch.float64) for _ in views]
        for k, rows in enumerate(sub_batches):
            for v, z in enumerate(views):
                whitened[v][rows] = reference_whiten(z[rows], axis, groups, method, eps,
                                                     channels[i, v, k])
        for v in range(len(views)):
            for w in range(v + 1, len(views)):
                a, e = whitened[v], whitened[w]
                if normalize:
                    a, e = a / a.norm(dim=1, keepdim=True), e / e.norm(dim=1, keepdim=True)
                total = total + (a - e).pow(2).sum(1).mean()
                count += 1
    return total / count


def group_covariances(out, axis, groups):
    """Each group's covariance in the whitened space: Ẑᵀ Ẑ/(b−1) for BW, Ẑ Ẑᵀ/(c−1) for CW."""
    b, d = out.shape
    c = d // groups
    blocks = out.view(b, groups, c).transpose(0, 1)
    if axis == "batch":
        return blocks.mT @ blocks / (b - 1)
    return blocks @ blocks.mT / (c - 1)


# ----------------------------------------------------------------------------------------------
# 1-2. Whitened outputs and agreement with the reference

@settings(max_examples=150, deadline=None)
@given(problems(), seeds, st.booleans())
def test_whitened_groups_have_identity_covariance(problem, seed, permute):
    """BW gives ẐᵀẐ/(b−1) = I_c and CW gives ẐẐᵀ/(c−1) = I_b in every group, for every method,
    with or without a channel permutation (the permutation's groups, not contiguous ones), to the
    rounding that cond(Σ) allows (square-ish float64 blocks reach cond 1e9)."""
    axis, method, b, groups, c, dtype = problem
    d = groups * c
    z = embedding(seed, b, d, dtype)
    perm = random_perm(seed, d) if permute else None
    out = WHITEN[axis](z, groups=groups, method=method, perm=perm)
    assert out.dtype == dtype and out.shape == (b, d)
    grouped_order = out if perm is None else out[:, perm]
    eye = torch.eye(c if axis == "batch" else b, dtype=dtype).expand(groups, -1, -1)
    inputs = centred_groups(z.double() if perm is None else z.double()[:, perm], axis, groups)
    cond = torch.linalg.cond(inputs).max().item() ** 2
    tol = max(TOL[dtype], 4 * cond * torch.finfo(dtype).eps)
    torch.testing.assert_close(group_covariances(grouped_order, axis, groups), eye, rtol=0,
                               atol=tol)


@settings(max_examples=150, deadline=None)
@given(problems(dtype=torch.float64), seeds, st.booleans(), st.sampled_from([0.0, 0.1]))
def test_whitening_matches_float64_reference(problem, seed, permute, eps):
    """batch_whiten/channel_whiten equal the loop-per-group reference for every method, with and
    without a permutation and shrinkage."""
    axis, method, b, groups, c, dtype = problem
    z = embedding(seed, b, groups * c)
    perm = random_perm(seed + 1, groups * c) if permute else None
    expected = reference_whiten(z, axis, groups, method, eps, perm)
    torch.testing.assert_close(WHITEN[axis](z, groups=groups, method=method, eps=eps, perm=perm),
                               expected)


@settings(max_examples=60, deadline=None)
@given(problems(dtype=torch.float64, methods=("zca", "cholesky")), seeds, st.integers(2, 4),
       st.integers(1, 3), st.integers(1, 3), st.booleans())
def test_loss_matches_float64_reference(problem, seed, num_views, sub_batches, iters, normalize):
    """whitening_loss equals the reference loss computed from the partitions that
    random_group_partition draws from the same generator seed (any views, sub-batches,
    repetitions)."""
    axis, method, b, groups, c, _ = problem
    d = groups * c
    views = [embedding(seed + v, b * sub_batches, d) for v in range(num_views)]
    samples, channels = random_group_partition(num_views, b * sub_batches, d, groups, b, iters,
                                               torch.Generator().manual_seed(seed))
    expected = reference_loss(views, samples, channels, axis, groups, method, normalize=normalize)
    loss = whitening_loss(*views, axis=axis, groups=groups, sub_batch=b, iters=iters, method=method,
                          normalize=normalize, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss, expected)


def test_whitening_matrix_whitens_a_batch_of_covariances():
    """W Σ Wᵀ = I for a (…, n, n) batch, for every method; ZCA's W is symmetric and Cholesky's is
    lower triangular."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 9, generator=gen, dtype=torch.float64)
    cov = x @ x.mT / 8
    eye = torch.eye(5, dtype=torch.float64).expand_as(cov)
    for method in ("zca", "cholesky", "pca"):
        W = whitening_matrix(cov, method)
        torch.testing.assert_close(W @ cov @ W.mT, eye)
    torch.testing.assert_close(whitening_matrix(cov, "zca"), whitening_matrix(cov, "zca").mT)
    torch.testing.assert_close(whitening_matrix(cov, "cholesky"),
                               whitening_matrix(cov, "cholesky").tril())


# ----------------------------------------------------------------------------------------------
# 3. ZCA is the nearest whitening; Cholesky is Gram–Schmidt

def centred_groups(z, axis, groups):
    """The centred blocks Z̄_k, each (b, c), in the layout whitening sees."""
    b, d = z.shape
    z = z - (z.mean(1, keepdim=True) if axis == "channel" else z.mean(0, keepdim=True))
    return z.view(b, groups, d // groups).transpose(0, 1)


@settings(max_examples=100, deadline=None)
@given(problems(dtype=torch.float64), seeds)
def test_zca_output_is_the_scaled_polar_factor(problem, seed):
    """ZCA's output is √(n−1)·UVᵀ where Z̄ = USVᵀ (n = b for BW, c for CW): the whitened matrix
    nearest to Z̄, so it is no farther from Z̄ than the Cholesky or PCA output."""
    axis, _, b, groups, c, _ = problem
    z = embedding(seed, b, groups * c)
    blocks = centred_groups(z, axis, groups)
    U, _, Vh = torch.linalg.svd(blocks, full_matrices=False)
    n = b if axis == "batch" else c
    polar = math.sqrt(n - 1) * (U @ Vh)
    zca = WHITEN[axis](z, groups=groups, method="zca")
    torch.testing.assert_close(zca.view(b, groups, c).transpose(0, 1), polar)
    distance = {m: (WHITEN[axis](z, groups=groups, method=m).view(b, groups, c).transpose(0, 1)
                    - blocks).norm()
                for m in ("zca", "cholesky", "pca")}
    assert (distance["zca"] <= distance["cholesky"] + 1e-9
            and distance["zca"] <= distance["pca"] + 1e-9)


@settings(max_examples=100, deadline=None)
@given(problems(dtype=torch.float64), seeds)
def test_cholesky_output_is_gram_schmidt(problem, seed):
    """Cholesky whitening orthonormalises in order (QR with a positive diagonal): BW's output is
    √(b−1)·Q of Z̄ = QR, and CW's is √(c−1)·Qᵀ of Z̄ᵀ = QR."""
    axis, _, b, groups, c, _ = problem
    z = embedding(seed, b, groups * c)
    blocks = centred_groups(z, axis, groups)
    if axis == "batch":
        Q, R = torch.linalg.qr(blocks)
        expected = math.sqrt(b - 1) * Q * R.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)
    else:
        Q, R = torch.linalg.qr(blocks.mT)
        expected = math.sqrt(c - 1) * (Q * R.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)).mT
    out = WHITEN[axis](z, groups=groups, method="cholesky")
    torch.testing.assert_close(out.view(b, groups, c).transpose(0, 1), expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(4, 12), st.floats(1e-7, 1e-3), seeds)
def test_pca_whitening_jumps_where_zca_and_cholesky_move_smoothly(b, delta, seed):
    """Near repeated eigenvalues (where a whitening loss drives the embedding) a tiny mixing of two
    channels, z → z(I + δJ), rotates PCA's eigenvectors by ~45°, so its output jumps by O(1);
    ZCA and Cholesky outputs move by at most O(δ). This is why PCA's whitened target is unstable."""
    z = (white_embedding("batch", b, 2, seed)
         * torch.tensor([math.sqrt(1 + 1e-10), 1.0], dtype=torch.float64))
    mixed = z @ torch.tensor([[1.0, delta], [delta, 1.0]], dtype=torch.float64)

    def change(method):
        before = batch_whiten(z, method=method)
        return ((batch_whiten(mixed, method=method) - before).norm() / before.norm()).item()
    assert change("pca") > 0.5
    assert change("zca") < 10 * delta and change("cholesky") < 10 * delta


# ----------------------------------------------------------------------------------------------
# 4. Random group partition

@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.integers(1, 3),
       st.integers(1, 3), seeds)
def test_random_group_partition_is_a_partition(views, groups, c, sub_batches, iters, seed):
    """Every draw is a permutation: each sample in exactly one sub-batch, each channel in exactly
    one group of c channels; groups=1 keeps the channel order; the same seed draws the same
    partition."""
    d, sub_batch = groups * c, 3
    batch = sub_batch * sub_batches
    samples, channels = random_group_partition(views, batch, d, groups, sub_batch, iters,
                                               torch.Generator().manual_seed(seed))
    assert samples.shape == (iters, batch) and channels.shape == (iters, views, sub_batches, d)
    assert torch.equal(samples.sort(-1).values, torch.arange(batch).expand(iters, batch))
    grouped = channels.view(iters, views, sub_batches, groups, c)
    assert torch.equal(grouped.flatten(-2).sort(-1).values, torch.arange(d).expand_as(channels))
    if groups == 1:
        assert torch.equal(channels, torch.arange(d).expand_as(channels))
    again = random_group_partition(views, batch, d, groups, sub_batch, iters,
                                   torch.Generator().manual_seed(seed))
    assert torch.equal(again[0], samples) and torch.equal(again[1], channels)


def test_random_group_partition_draws_independently_per_view_and_sub_batch():
    """Partitions differ between views, sub-batches and repetitions, and each channel lands in each
    group about equally often (a uniform partition)."""
    samples, channels = random_group_partition(2, 8, 64, 4, 4, 200,
                                               torch.Generator().manual_seed(0))
    assert not torch.equal(channels[:, 0], channels[:, 1])
    assert not torch.equal(channels[:, :, 0], channels[:, :, 1])
    assert not torch.equal(samples[0], samples[1])
    group_of = channels.argsort(-1) // 16  # the group of each channel
    counts = torch.stack([(group_of == k).sum((0, 1, 2)) for k in range(4)]).double()
    expected = channels.shape[0] * 2 * 2 / 4  # 200 repetitions × 2 views × 2 sub-batches, 4 groups
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)  # 5 σ of a binomial count


@settings(max_examples=100, deadline=None)
@given(problems(), seeds)
def test_permuted_whitening_is_unpermuted_contiguous_whitening(problem, seed):
    """Whitening with permutation p equals whitening the permuted input in contiguous groups and
    putting the channels back: f(z, perm=p)[:, p] = f(z[:, p])."""
    axis, method, b, groups, c, dtype = problem
    d = groups * c
    z, p = embedding(seed, b, d, dtype), random_perm(seed, d)
    whiten = WHITEN[axis]
    torch.testing.assert_close(whiten(z, groups=groups, method=method, perm=p)[:, p],
                               whiten(z[:, p], groups=groups, method=method),
                               rtol=0, atol=TOL[dtype])


# ----------------------------------------------------------------------------------------------
# 5. Full-rank behaviour: BW only needs the embedding to be full rank

@settings(max_examples=100, deadline=None)
@given(problems(axes=("batch",), methods=("zca", "cholesky"), dtype=torch.float64), seeds)
def test_batch_whitening_forgets_any_invertible_mixing(problem, seed):
    """For any invertible A acting within the groups, BW(ZA) = BW(Z)·Q with Q orthogonal: the
    whitened output depends on the embedding only through its column space, i.e. its rank."""
    _, method, b, groups, c, _ = problem
    z = embedding(seed, b, groups * c)
    gen = torch.Generator().manual_seed(seed + 1)
    A = torch.block_diag(*[torch.randn(c, c, generator=gen, dtype=torch.float64)
                           + 3 * torch.eye(c, dtype=torch.float64)
                           for _ in range(groups)])
    white, mixed = batch_whiten(z, groups, method), batch_whiten(z @ A, groups, method)
    Q = torch.block_diag(*[wk.T @ mk / (b - 1)
                           for wk, mk in zip(white.split(c, 1), mixed.split(c, 1))])
    torch.testing.assert_close(white @ Q, mixed)
    torch.testing.assert_close(Q.T @ Q, torch.eye(groups * c, dtype=torch.float64))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["batch", "channel"]), st.sampled_from(["zca", "cholesky", "pca"]),
       st.integers(1, 4), st.sampled_from([torch.float64, torch.float32]), seeds)
def test_rank_deficient_input_is_refused_or_shrunk_to_its_rank(axis, method, rank, dtype, seed):
    """A rank-deficient embedding (a product of thin factors, rounded to its dtype) is refused
    without shrinkage; with ε > 0 the output is finite and has the centred input's rank."""
    gen = torch.Generator().manual_seed(seed)
    b, d = (12, 8) if axis == "batch" else (8, 12)
    z = (torch.randn(b, rank, generator=gen, dtype=torch.float64)
         @ torch.randn(rank, d, generator=gen, dtype=torch.float64))
    z = z.to(dtype)
    with pytest.raises(ValueError, match="singular"):
        WHITEN[axis](z, method=method)
    out = WHITEN[axis](z, method=method, eps=0.1).double()
    z = z.double()
    centred = z - (z.mean(1, keepdim=True) if axis == "channel" else z.mean(0))
    assert torch.isfinite(out).all()
    rtol = 1e-5 if dtype == torch.float32 else None  # float32 rounding is rank noise at ~1e-7
    assert (torch.linalg.matrix_rank(out, rtol=rtol)
            == torch.linalg.matrix_rank(centred, rtol=rtol) <= rank)


# ----------------------------------------------------------------------------------------------
# 6. Gradients

@settings(max_examples=40, deadline=None)
@given(problems(dtype=torch.float64, margin=3), seeds, st.booleans(),
       st.sampled_from([0.0, 0.1, 0.5]))
@example(("batch", "zca", 13, 4, 4, torch.float64), 528, True, 0.0)
@example(("channel", "zca", 3, 2, 10, torch.float64), 7, True, 0.5)
def test_whitening_gradients_match_finite_differences(problem, seed, permute, eps):
    """gradcheck (float64) of batch_whiten and channel_whiten for every method and partition, with
    and without shrinkage ε, on draws whose Σ is well conditioned: at cond(Σ) ≳ 1e5 finite
    differences cannot check a gradient at any step (the next test checks those against autograd
    through the reference)."""
    axis, method, b, groups, c, _ = problem
    z = embedding(seed, b, groups * c, requires_grad=True)
    perm = random_perm(seed, groups * c) if permute else None

    def whiten(x):
        return WHITEN[axis](x, groups=groups, method=method, eps=eps, perm=perm)
    assert torch.autograd.gradcheck(whiten, (z,))


@settings(max_examples=40, deadline=None)
@given(problems(dtype=torch.float64), seeds, st.booleans())
@example(("batch", "zca", 5, 4, 4, torch.float64), 528, True)
def test_whitening_gradients_match_autograd_through_the_reference(problem, seed, permute):
    """At any condition number the rule accepts (margin 1: square-ish blocks), the gradient of the
    whitened output equals autograd through the float64 loop-per-group reference."""
    axis, method, b, groups, c, _ = problem
    z = embedding(seed, b, groups * c, requires_grad=True)
    perm = random_perm(seed, groups * c) if permute else None
    weights = torch.randn(b, groups * c, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    (grad,) = torch.autograd.grad(
        (WHITEN[axis](z, groups=groups, method=method, perm=perm) * weights).sum(), z)
    (expected,) = torch.autograd.grad(
        (reference_whiten(z, axis, groups, method, perm=perm) * weights).sum(), z)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-8)


@settings(max_examples=12, deadline=None)
@given(problems(dtype=torch.float64, methods=("zca", "cholesky"), max_groups=2, margin=3), seeds,
       st.booleans(), st.sampled_from([0.0, 0.3]))
def test_loss_gradients_match_finite_differences(problem, seed, normalize, eps):
    """gradcheck (float64) of the whitening loss for two views with two sub-batches, with and
    without shrinkage: gradients flow through the whitening, nothing is detached."""
    axis, method, b, groups, c, _ = problem
    views = [embedding(seed + v, 2 * b, groups * c, requires_grad=True) for v in range(2)]

    def loss(*vs):
        return whitening_loss(*vs, axis=axis, groups=groups, sub_batch=b, method=method, eps=eps,
                              normalize=normalize, generator=torch.Generator().manual_seed(seed))
    assert torch.autograd.gradcheck(loss, views)


@settings(max_examples=100, deadline=None)
@given(problems(methods=("zca", "cholesky"), dtype=torch.float64), seeds)
def test_gradient_respects_the_whitening_invariances(problem, seed):
    """BW is unchanged by a per-channel shift and a per-group scale, so any gradient through it sums
    to zero over the batch and is orthogonal to each group of Z̄. CW is unchanged by a per-sample
    shift and a global scale: the gradient sums to zero over each sample's channels and is
    orthogonal to Z̄."""
    axis, method, b, groups, c, _ = problem
    z = embedding(seed, b, groups * c, requires_grad=True)
    projection = torch.randn(b, groups * c, generator=torch.Generator().manual_seed(seed + 1),
                             dtype=torch.float64)
    (WHITEN[axis](z, groups=groups, method=method) * projection).sum().backward()
    grad, zc = z.grad, z.detach() - (z.detach().mean(0) if axis == "batch"
                                     else z.detach().mean(1, keepdim=True))
    scale = grad.abs().max() * zc.abs().max() * z.numel() + 1e-3  # the gradient can be exactly 0
    if axis == "batch":
        torch.testing.assert_close(grad.sum(0), torch.zeros(groups * c, dtype=torch.float64),
                                   rtol=0, atol=1e-10 * scale)
        per_group = (grad * zc).view(b, groups, c).sum((0, 2))
        torch.testing.assert_close(per_group, torch.zeros(groups, dtype=torch.float64),
                                   rtol=0, atol=1e-10 * scale)
    else:
        torch.testing.assert_close(grad.sum(1), torch.zeros(b, dtype=torch.float64),
                                   rtol=0, atol=1e-10 * scale)
        assert abs((grad * zc).sum()) <= 1e-10 * scale


def white_embedding(axis, b, c, seed):
    """An embedding whose covariance is exactly I: every eigenvalue repeated."""
    gen = torch.Generator().manual_seed(seed)
    if axis == "batch":
        x = torch.randn(b, c, generator=gen, dtype=torch.float64)
        Q, _ = torch.linalg.qr(x - x.mean(0))
        return math.sqrt(b - 1) * Q
    x = torch.randn(c, b, generator=gen, dtype=torch.float64)
    Q, _ = torch.linalg.qr(x - x.mean(0))
    return math.sqrt(c - 1) * Q.T


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["batch", "channel"]), st.integers(2, 5), seeds)
def test_zca_gradient_is_exact_at_an_already_white_input(axis, n, seed):
    """At an input that is already white (Σ = I, all eigenvalues equal) ZCA's gradient is finite
    and matches finite differences; there autograd through eigh divides by λ_i − λ_j = 0."""
    b, c = (n + 3, n) if axis == "batch" else (n, n + 3)
    z = white_embedding(axis, b, c, seed).requires_grad_()
    out = WHITEN[axis](z, method="zca")
    torch.testing.assert_close(out, z.detach() - (z.detach().mean(0) if axis == "batch"
                                                  else z.detach().mean(1, keepdim=True)))
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), z)
    assert torch.isfinite(grad).all()
    assert torch.autograd.gradcheck(lambda x: WHITEN[axis](x, method="zca"), (z,))


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(0, 3), seeds)
def test_zca_matrix_gradient_matches_autograd_through_eigh(n, repeated, seed):
    """The closed-form backward of Σ^(-1/2) equals autograd through eigh where the eigenvalues are
    distinct, and stays finite where `repeated` of them coincide."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.rand(n, generator=gen, dtype=torch.float64) * 3 + 0.5
    cov = (U * eigenvalues) @ U.T
    G = torch.randn(n, n, generator=gen, dtype=torch.float64)
    cov_ours = cov.clone().requires_grad_()
    (whitening_matrix(cov_ours) * G).sum().backward()
    cov_ref = cov.clone().requires_grad_()
    (reference_matrix((cov_ref + cov_ref.T) / 2, "zca") * G).sum().backward()
    torch.testing.assert_close(cov_ours.grad, cov_ref.grad)
    eigenvalues[:min(repeated + 1, n)] = 1.0
    cov_repeated = ((U * eigenvalues) @ U.T).requires_grad_()
    # finite differences perturb one entry at a time: keep the perturbed matrix a covariance
    assert torch.autograd.gradcheck(lambda a: whitening_matrix((a + a.mT) / 2), (cov_repeated,))


# ----------------------------------------------------------------------------------------------
# 7. The loss

@settings(max_examples=60, deadline=None)
@given(problems(methods=("zca", "cholesky"), max_groups=1, dtype=torch.float64), seeds,
       st.booleans())
def test_loss_of_identical_views_is_zero_with_one_group(problem, seed, normalize):
    """With one group every view is whitened the same way, so identical views give zero loss."""
    axis, method, b, groups, c, _ = problem
    z = embedding(seed, 2 * b, c)
    loss = whitening_loss(z, z.clone(), axis=axis, groups=groups, sub_batch=b, method=method,
                          normalize=normalize)
    assert loss.abs() < 1e-12


@settings(max_examples=30, deadline=None)
@given(problems(methods=("zca", "cholesky"), dtype=torch.float64), seeds, st.booleans(),
       st.sampled_from([0.0, 0.2]))
def test_symmetric_loss_has_the_gradient_of_two_stop_gradient_losses(problem, seed, normalize, eps):
    """The paper's decomposition, for whitening_loss itself: the symmetric loss L of two views has
    the gradient of L′ = (1/m)‖Ẑ₁ − sg(Ẑ₂)‖² + (1/m)‖sg(Ẑ₁) − Ẑ₂‖², where Ẑ_v is built here from
    cwrgp's own batch_whiten/channel_whiten of each sub-batch with view v's permutation (rows
    L2-normalised if normalize); L′'s value is 2L. It fails if the loss detaches a view, scales a
    term or whitens other sub-batches or groups than its partition says (float64 rounding)."""
    axis, method, b, groups, c, _ = problem
    d = groups * c
    views = [embedding(seed + k, 2 * b, d, requires_grad=True) for k in range(2)]
    samples, channels = hand_made_partition(seed, 2, 2 * b, d, groups, b)
    symmetric = whitening_loss(*views, axis=axis, groups=groups, sub_batch=b, method=method,
                               eps=eps, normalize=normalize, partition=(samples, channels))

    def whitened(view):
        """Ẑ_v, its rows in the partition's sample order (the same order for both views)."""
        parts = [WHITEN[axis](views[view][rows], groups=groups, method=method, eps=eps,
                              perm=channels[0, view, k])
                 for k, rows in enumerate(samples[0].view(2, b))]
        out = torch.cat(parts)
        return torch.nn.functional.normalize(out, dim=1) if normalize else out

    def mean_square(a, e):
        return (a - e).pow(2).sum(1).mean()
    white1, white2 = whitened(0), whitened(1)
    decomposed = mean_square(white1, white2.detach()) + mean_square(white1.detach(), white2)
    torch.testing.assert_close(decomposed, 2 * symmetric)
    expected_gradients = torch.autograd.grad(decomposed, views)
    for got, want in zip(torch.autograd.grad(symmetric, views), expected_gradients):
        torch.testing.assert_close(got, want)


def test_recipe_defaults_and_module():
    """cw_rgp_loss is CW/ZCA/g=4/sub_batch=64, w_mse_loss is BW/Cholesky/g=1/sub_batch=128, and
    CWRGPLoss computes cw_rgp_loss; arguments override the defaults."""
    views = [embedding(v, 256, 512, torch.float32) for v in range(4)]
    kw = dict(axis="channel", method="zca", groups=4, sub_batch=64)
    torch.testing.assert_close(cw_rgp_loss(*views, generator=torch.Generator().manual_seed(1)),
                               whitening_loss(*views, generator=torch.Generator().manual_seed(1),
                                              **kw))
    torch.testing.assert_close(
        CWRGPLoss(groups=2)(*views[:2], generator=torch.Generator().manual_seed(2)),
        whitening_loss(*views[:2], generator=torch.Generator().manual_seed(2),
                       **{**kw, "groups": 2}))
    small = [v[:, :64] for v in views[:2]]
    torch.testing.assert_close(w_mse_loss(*small, generator=torch.Generator().manual_seed(3)),
                               whitening_loss(*small, axis="batch", method="cholesky", groups=1,
                                              sub_batch=128,
                                              generator=torch.Generator().manual_seed(3)))


def test_stable_rank_measures_dimensional_collapse():
    """Stable rank ‖Z̄‖²_F/‖Z̄‖²₂: min(b−1, d) for a white embedding, 1 for a collapsed (rank-one)
    one, and unchanged by a per-channel shift."""
    white = white_embedding("batch", 40, 8, 0)
    assert stable_rank(white).item() == pytest.approx(8)
    line = torch.randn(40, 1, dtype=torch.float64) * torch.randn(1, 8, dtype=torch.float64)
    assert stable_rank(line).item() == pytest.approx(1)
    assert stable_rank(white + 5).item() == pytest.approx(8)


# ----------------------------------------------------------------------------------------------
# 8. Refusals and precision

def views_of(b, d, count=2):
    return [embedding(v, b, d, torch.float32) for v in range(count)]


@pytest.mark.parametrize("call, message", [
    (lambda: whitening_loss(*views_of(8, 12), groups=5), "divisor"),
    (lambda: whitening_loss(*views_of(12, 8), sub_batch=5),
     "cannot be split into sub-batches of 5"),
    (lambda: whitening_loss(*views_of(8, 16), axis="batch", groups=2, sub_batch=8),
     r"sub_batch > c"),
    (lambda: whitening_loss(*views_of(16, 16), axis="channel", groups=2, sub_batch=16),
     r"c >= sub_batch"),
    (lambda: whitening_loss(*views_of(8, 8), axis="channel", groups=1, sub_batch=8),
     r"c > sub_batch \(with groups=1"),
    (lambda: whitening_loss(*views_of(8, 16, count=1)), "at least two views"),
    (lambda: cw_rgp_loss(views_of(8, 16)), r"one list: pass them as separate arguments, e\.g\. "
                                           r"cw_rgp_loss\(z1, z2\)"),
    (lambda: cw_rgp_loss(tuple(views_of(8, 16))), r"one tuple: .* cw_rgp_loss\(\*views\)"),
    (lambda: cw_rgp_loss(*[v.numpy() for v in views_of(8, 16)]),
     r"must be a torch\.Tensor, got numpy\.ndarray: convert it with torch\.from_numpy"),
    (lambda: whitening_loss(*views_of(8, 16), embedding(0, 8, 12, torch.float32)), "same"),
    (lambda: whitening_loss(torch.zeros(2, 8, 16), torch.zeros(2, 8, 16)), r"\(b, d\)"),
    (lambda: whitening_loss(*views_of(8, 16), axis="rows"), "axis"),
    (lambda: whitening_loss(*views_of(8, 64), method="svd"), "method"),
    (lambda: whitening_loss(*views_of(8, 64), iters=0), "iters"),
    (lambda: batch_whiten(torch.zeros(8), 1), r"\(b, d\)"),
    (lambda: batch_whiten(embedding(0, 8, 4), perm=torch.tensor([0, 1, 1, 2])), "permutation"),
    (lambda: channel_whiten(embedding(0, 4, 8), groups=3), "divisor"),
    (lambda: whitening_matrix(torch.zeros(3, 4)), r"\(\.\.\., n, n\)"),
])
def test_bad_input_is_refused_with_the_rule(call, message):
    """Every shape that cannot be whitened raises ValueError naming the rule (and the fix)."""
    with pytest.raises(ValueError, match=message):
        call()


def test_shape_refusals_name_the_fix():
    """The shape errors say what to change, not only what is wrong."""
    with pytest.raises(ValueError, match="larger sub_batch, more groups, or eps > 0"):
        whitening_loss(*views_of(8, 16), axis="batch", groups=2, sub_batch=8)
    with pytest.raises(ValueError, match="smaller sub_batch, fewer groups, or eps > 0"):
        whitening_loss(*views_of(32, 16), axis="channel", groups=2, sub_batch=32)
    # shrinkage makes the same shapes whitenable
    assert torch.isfinite(whitening_loss(*views_of(32, 16), axis="channel", groups=2, sub_batch=32,
                                         eps=0.1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embedding_raises_instead_of_returning_nan(bad):
    """A NaN or Inf in any view raises a ValueError that names the cause."""
    views = views_of(64, 128)
    views[1][3, 7] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        whitening_loss(*views, sub_batch=32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        channel_whiten(views[1][:8], groups=4)


def test_half_precision_and_autocast_whiten_in_float32():
    """bf16/fp16 views and an active autocast give a float32 loss equal to the float32 loss of the
    same values, and whitening returns float32; float64 stays float64."""
    views = views_of(128, 512)
    rounded = [v.bfloat16() for v in views]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    reference = cw_rgp_loss(*[v.float() for v in rounded], generator=gen())
    loss = cw_rgp_loss(*rounded, generator=gen())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference)
    # bf16 rounding of the inputs only
    assert abs(loss - cw_rgp_loss(*views, generator=gen())) < 1e-2
    assert cw_rgp_loss(*[v.half() for v in views], generator=gen()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = cw_rgp_loss(*views, generator=gen())
        assert channel_whiten(rounded[0][:64], groups=4).dtype == torch.float32
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, cw_rgp_loss(*views, generator=gen()))
    assert cw_rgp_loss(*[v.double() for v in views], generator=gen()).dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# 9. ZCA by Newton–Schulz: the same W as the eigendecomposition

EPS64 = torch.finfo(torch.float64).eps


def conditioned_covariance(seed, n, cond, repeated):
    """Σ = Q diag(λ) Qᵀ, λ_max = 1 and λ_min = 1/cond, the others log-uniform between, `repeated`
    of them equal to λ_max (repeated = n − 1 is the worst case for Newton–Schulz: the largest
    trace)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = cond ** -torch.rand(n, generator=gen, dtype=torch.float64)
    eigenvalues[0], eigenvalues[-1] = 1.0, 1 / cond
    eigenvalues[1:1 + repeated] = 1.0
    cov = (Q * eigenvalues) @ Q.T
    return (cov + cov.T) / 2


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.floats(0, 1), st.integers(0, 11), seeds)
@example(64, 0.99, 63, 0)
def test_newton_and_eigh_give_the_same_whitening_matrix_and_gradient(n, depth, repeated, seed):
    """whitening_matrix by Newton–Schulz equals the eigendecomposition's, W and ∂/∂Σ, to 1e-10 up
    to cond(Σ) = 1e5, and to the eigendecomposition's own accuracy (a few cond·eps₆₄) beyond, up to
    the rule's threshold (λ_min > n·eps₆₄·λ_max), repeated eigenvalues included."""
    cond = (0.5 / (n * EPS64)) ** depth  # depth 1: just inside the threshold
    cov = conditioned_covariance(seed, n, cond, min(repeated, n - 1))
    G = torch.randn(n, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    results = {}
    for solver in ("eigh", "newton"):
        leaf = cov.clone().requires_grad_()
        W = whitening_matrix(leaf, solver=solver)
        (W * (G + G.T)).sum().backward()
        results[solver] = W.detach(), leaf.grad
    bound = 1e-10 if cond <= 1e5 else 20 * cond * EPS64
    assert relative(results["newton"][0], results["eigh"][0]) <= bound
    assert relative(results["newton"][1], results["eigh"][1]) <= bound


@settings(max_examples=40, deadline=None)
@given(problems(methods=("zca",), margin=3), seeds, st.booleans())
def test_newton_whitening_and_its_gradient_equal_eigh(problem, seed, permute):
    """batch_whiten/channel_whiten and their gradients are the same by either ZCA solver: to 1e-10
    in float64, to float32's test tolerance in float32."""
    axis, _, b, groups, c, dtype = problem
    d = groups * c
    perm = random_perm(seed, d) if permute else None
    weights = torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    outputs = {}
    for solver in ("eigh", "newton"):
        z = embedding(seed, b, d, dtype, requires_grad=True)
        out = WHITEN[axis](z, groups=groups, perm=perm, solver=solver)
        (grad,) = torch.autograd.grad((out * weights).sum(), z)
        outputs[solver] = out.detach(), grad
    tol = 1e-10 if dtype == torch.float64 else TOL[dtype]
    for got, expected in zip(outputs["newton"], outputs["eigh"]):
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [2, 8, 64])
def test_newton_converges_wherever_the_rule_accepts_and_refuses_what_it_cannot_whiten(n, dtype):
    """newton_steps is enough for the covariance the rule only just accepts (all eigenvalues but
    one at λ_max, the smallest just above t·λ_max: the slowest start), and a singular covariance
    is refused, as by eigh."""
    cond = 0.5 / (n * torch.finfo(dtype).eps)
    cov = conditioned_covariance(0, n, cond, n - 1).to(dtype)
    W = whitening_matrix(cov, solver="newton").double()
    assert (relative(W, whitening_matrix(cov, solver="eigh").double())
            <= 20 * cond * EPS64 + 10 * torch.finfo(dtype).eps)
    # seeded: at n = 2 in float64 about 8 % of random rank-one covariances round to a smallest
    # eigenvalue that eigh refuses but Newton–Schulz converges on
    v = torch.randn(n, max(n - 1, 1), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0))
    singular = (v @ v.T).to(dtype)
    for solver in ("eigh", "newton"):
        with pytest.raises(ValueError, match="singular"):
            whitening_matrix(singular, solver=solver)


def test_solver_auto_is_eigh_on_the_cpu_and_unknown_solvers_are_refused():
    """"auto" picks the eigendecomposition on the CPU (the same loss to the last bit), and a solver
    name that does not exist is refused; Cholesky and PCA ignore the solver."""
    views = views_of(128, 256)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(cw_rgp_loss(*views, generator=gen()),
                       cw_rgp_loss(*views, generator=gen(), solver="eigh"))
    assert torch.equal(w_mse_loss(*[v[:, :64] for v in views], generator=gen(), solver="newton"),
                       w_mse_loss(*[v[:, :64] for v in views], generator=gen()))
    with pytest.raises(ValueError, match="solver"):
        cw_rgp_loss(*views, solver="svd")


# ----------------------------------------------------------------------------------------------
# 10. A loss that compiles: given its partition, a pure tensor function

@settings(max_examples=40, deadline=None)
@given(problems(methods=("zca", "cholesky")), seeds, st.integers(2, 3), st.integers(1, 2))
def test_loss_with_a_partition_equals_the_loss_with_its_generator(problem, seed, num_views, iters):
    """whitening_loss(partition=random_group_partition(..., generator)) is exactly the loss drawn
    from that generator."""
    axis, method, b, groups, c, dtype = problem
    d = groups * c
    views = [embedding(seed + v, 2 * b, d, dtype) for v in range(num_views)]
    kw = dict(axis=axis, method=method, groups=groups, sub_batch=b, iters=iters)
    partition = random_group_partition(num_views, 2 * b, d, groups, b, iters,
                                       torch.Generator().manual_seed(seed))
    assert torch.equal(whitening_loss(*views, partition=partition, **kw),
                       whitening_loss(*views, generator=torch.Generator().manual_seed(seed), **kw))


COMPILED_RECIPES = {  # name: (loss, d)
    "cw-rgp eigh": (lambda *vs, partition: cw_rgp_loss(*vs, partition=partition, solver="eigh"),
                    256),
    "cw-rgp newton": (lambda *vs, partition: cw_rgp_loss(*vs, partition=partition, solver="newton"),
                      256),
    "w-mse": (lambda *vs, partition: w_mse_loss(*vs, partition=partition), 64),
}


def recipe_partition(name, d):
    groups, sub_batch = (1, 128) if name == "w-mse" else (4, 64)
    return random_group_partition(2, 128, d, groups, sub_batch, 1, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", COMPILED_RECIPES)
def test_loss_compiles_without_graph_breaks_and_matches_eager(name):
    """Given a partition, the loss traces with 0 graph breaks, and torch.compile(fullgraph=True)
    gives eager's loss and gradients."""
    loss, d = COMPILED_RECIPES[name]
    partition = recipe_partition(name, d)
    views = [embedding(v, 128, d, torch.float32, requires_grad=True) for v in range(2)]
    torch._dynamo.reset()
    assert torch._dynamo.explain(loss)(*views, partition=partition).graph_break_count == 0
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss, compiled):
        value = fn(*views, partition=partition)
        results.append([value.detach(), *torch.autograd.grad(value, views)])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("failure", ["nan", "singular"])
@pytest.mark.parametrize("name", COMPILED_RECIPES)
def test_compiled_loss_is_nan_where_eager_refuses(name, failure):
    """A non-finite or rank-deficient embedding: eager raises the ValueError, compiled (which
    cannot read a value back) returns NaN, never a finite number."""
    loss, d = COMPILED_RECIPES[name]
    partition = recipe_partition(name, d)
    views = [embedding(v, 128, d, torch.float32) for v in range(2)]
    if failure == "nan":
        views[1][5, 3] = float("nan")
    else:
        views[1] = views[1][:, :1].repeat(1, d) + torch.arange(d)  # rank 2 after centring
    with pytest.raises(ValueError, match="NaN or Inf" if failure == "nan" else "singular"):
        loss(*views, partition=partition)
    torch._dynamo.reset()
    assert torch.isnan(
        torch.compile(loss, fullgraph=True, backend="aot_eager")(*views, partition=partition))


def test_partition_is_checked():
    """A partition of the wrong shape, not of integers, or not of permutations is refused, as is a
    partition together with a generator."""
    views = views_of(128, 256)
    samples, channels = random_group_partition(2, 128, 256, 4, 64, 1,
                                               torch.Generator().manual_seed(0))
    for bad, message in [((samples[:, :64], channels), "samples"),
                         ((samples, channels[:, :1]), "channels"),
                         ((samples.float(), channels), "integer"),
                         ((samples, channels.clamp(max=3)), "permutations")]:
        with pytest.raises(ValueError, match=message):
            cw_rgp_loss(*views, partition=bad)
    with pytest.raises(ValueError, match="not both"):
        cw_rgp_loss(*views, partition=(samples, channels), generator=torch.Generator())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_newton_loss_matches_the_cpu_and_replays_in_a_cuda_graph():
    """On CUDA "auto" is Newton–Schulz: its loss and gradients equal the CPU's eigendecomposition's;
    and the loss's forward and backward, captured as one CUDA graph, replay to the same numbers."""
    cpu_views = [v.requires_grad_() for v in views_of(256, 512)]
    partition = random_group_partition(2, 256, 512, 4, 64, 1, torch.Generator().manual_seed(0))
    cpu_loss = cw_rgp_loss(*cpu_views, partition=partition)
    expected = [cpu_loss.detach(), *torch.autograd.grad(cpu_loss, cpu_views)]
    views = [v.detach().cuda().requires_grad_() for v in cpu_views]
    partition = [p.cuda() for p in partition]
    loss = cw_rgp_loss(*views, partition=partition)
    for got, want in zip([loss.detach(), *torch.autograd.grad(loss, views)], expected):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-6)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph requires
        cw_rgp_loss(*views, partition=partition).backward()
    torch.cuda.current_stream().wait_stream(side)
    for v in views:
        v.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = cw_rgp_loss(*views, partition=partition)
        captured.backward()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip([captured.detach(), *[v.grad for v in views]], expected):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 11. Every input: the right answer or a clear error

@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["batch", "channel"]),
       st.sampled_from(["zca-eigh", "zca-newton", "cholesky", "pca"]),
       st.sampled_from([torch.float32, torch.float64]), st.integers(-30, 30), st.booleans(), seeds)
@example("channel", "zca-eigh", torch.float32, -14, False, 0)
@example("batch", "zca-eigh", torch.float32, 14, False, 0)
@example("channel", "zca-eigh", torch.float64, -24, True, 0)
def test_whitening_and_its_gradient_are_scale_free(axis, method, dtype, power, far, seed):
    """Whitening is scale-invariant, so for z → αz the output is the same and the gradient is
    (1/α)·∂/∂z, to rounding, at every scale where the input and the gradient are representable:
    α = 10^±30 in float32, up to 10^±250 in float64 (`far`)."""
    method, _, solver = method.partition("-")
    alpha = 10.0 ** (power * (25 / 3 if far and dtype == torch.float64 else 1))
    b, d = (24, 8) if axis == "batch" else (6, 24)
    base = embedding(seed, b, d, torch.float64)
    weights = torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    results = []
    for scale in (1.0, alpha):
        z = (base * scale).to(dtype).requires_grad_()
        out = WHITEN[axis](z, groups=2, method=method, solver=solver or "auto")
        (grad,) = torch.autograd.grad((out * weights.to(dtype)).sum(), z)
        results.append((out.double(), grad.double() * scale))
    tol = 1e-8 if dtype == torch.float64 else 1e-3
    for got, expected in zip(results[1], results[0]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("eps", [1, 1.5, -0.1, float("nan"), float("inf"), "0.1", None])
def test_eps_outside_zero_to_one_is_refused_everywhere(eps):
    """eps is a shrinkage weight in [0, 1): every entry point refuses anything else, naming eps."""
    z = embedding(0, 8, 32, torch.float32)
    for call in (lambda: whitening_loss(z, z, eps=eps, sub_batch=8),
                 lambda: cw_rgp_loss(z, z, eps=eps, sub_batch=8),
                 lambda: channel_whiten(z, groups=4, eps=eps),
                 lambda: batch_whiten(z.T.contiguous(), eps=eps)):
        with pytest.raises(ValueError, match="eps"):
            call()


@pytest.mark.parametrize("name, value", [("sub_batch", 0), ("sub_batch", -1), ("sub_batch", 8.0),
                                         ("sub_batch", "8"), ("groups", 0), ("groups", 2.0),
                                         ("groups", -4), ("iters", 0), ("iters", -1),
                                         ("iters", 1.5)])
def test_integer_arguments_are_integers(name, value):
    """groups, sub_batch and iters must be positive integers: others are refused with a ValueError
    that names the argument, in the loss and in random_group_partition alike."""
    views = views_of(16, 32)
    kw = {"groups": 2, "sub_batch": 8, "iters": 1, name: value}
    with pytest.raises(ValueError, match=name):
        whitening_loss(*views, **kw)
    with pytest.raises(ValueError, match=name):
        random_group_partition(2, 16, 32, **kw)


def test_integer_like_arguments_are_accepted():
    """numpy integers (and anything with __index__) work wherever ints do, with the same result."""
    views = views_of(16, 32)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    n = numpy.int64
    assert torch.equal(whitening_loss(*views, groups=n(2), sub_batch=n(8), iters=n(2),
                                      generator=gen()),
                       whitening_loss(*views, groups=2, sub_batch=8, iters=2, generator=gen()))
    assert torch.equal(channel_whiten(views[0], groups=n(2)), channel_whiten(views[0], groups=2))


def test_random_group_partition_refuses_what_the_loss_refuses():
    """random_group_partition checks its arguments as whitening_loss does: no sub-batches that
    leave samples out, no groups that do not divide the channels."""
    with pytest.raises(ValueError, match="cannot be split into sub-batches of 3"):
        random_group_partition(2, 10, 8, 2, sub_batch=3)
    with pytest.raises(ValueError, match="divisor"):
        random_group_partition(2, 10, 8, 3)
    with pytest.raises(ValueError, match="views"):
        random_group_partition(0, 10, 8, 2)


@pytest.mark.parametrize("call, message", [
    (lambda: cw_rgp_loss(torch.zeros(0, 512), torch.zeros(0, 512)), "empty"),
    (lambda: channel_whiten(torch.zeros(8, 0)), "empty"),
    (lambda: batch_whiten(torch.zeros(0, 4)), "empty"),
    (lambda: stable_rank(torch.zeros(0, 4)), "empty"),
    (lambda: channel_whiten(torch.randn(4, 16, dtype=torch.complex64), groups=2), "real"),
    (lambda: cw_rgp_loss(*[torch.randn(128, 512, dtype=torch.complex64)] * 2), "real"),
    (lambda: whitening_matrix(torch.eye(3, dtype=torch.complex128)), "real"),
    (lambda: whitening_matrix(torch.zeros(2, 0, 0)), "n ≥ 1"),
    (lambda: batch_whiten(embedding(0, 8, 4), perm=torch.tensor([0.0, 1.0, 2.0, 3.0])), "integer"),
    (lambda: batch_whiten(embedding(0, 8, 4), perm=torch.tensor([0, 1, 2])), "shape"),
    (lambda: whitening_matrix(torch.tensor([[2.0, 1.0], [-1.0, 2.0]])), "not symmetric"),
    (lambda: CWRGPLoss(sub_bach=64), "unknown"),
    (lambda: cw_rgp_loss(*views_of(128, 256), generator=0), "torch.Generator"),
    (lambda: stable_rank(torch.randn(1, 8)), "at least 2 samples"),
    (lambda: stable_rank(torch.tensor([[0.0, 1.0], [float("nan"), 2.0]])), "NaN or Inf"),
])
def test_odd_input_is_refused_with_a_clear_error(call, message):
    """Empty, complex, wrongly typed or non-symmetric input raises a ValueError that says what is
    wrong, not an error from deep inside torch, and never a silently wrong result."""
    with pytest.raises(ValueError, match=message):
        call()


def test_whitening_matrix_takes_integer_and_nearly_symmetric_covariances():
    """An integer covariance is whitened in float64; asymmetry at rounding level is symmetrised
    away, so W cov Wᵀ = I still holds for the symmetric part."""
    cov = torch.tensor([[4, 2], [2, 3]])
    W = whitening_matrix(cov)
    assert W.dtype == torch.float64
    torch.testing.assert_close(W @ cov.double() @ W.T, torch.eye(2, dtype=torch.float64))
    x = embedding(1, 5, 40)
    rounded = x @ x.T / 39
    nearly = rounded + torch.triu(torch.full_like(rounded, 1e-15), 1)
    torch.testing.assert_close(whitening_matrix(nearly), whitening_matrix(rounded))


def test_pca_gradient_at_coinciding_eigenvalues_is_refused():
    """PCA's W has no derivative where eigenvalues coincide: asking for one raises ValueError (the
    forward alone still works, and ZCA's gradient there is finite)."""
    cov = torch.diag(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    W = whitening_matrix(cov, "pca")
    torch.testing.assert_close(W @ cov @ W.T, torch.eye(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="coincide"):
        whitening_matrix(cov.clone().requires_grad_(), "pca")
    leaf = cov.clone().requires_grad_()
    whitening_matrix(leaf, "zca").sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_cw_rgp_loss_module_honours_its_generator():
    """CWRGPLoss(generator=g) draws each call's partition from g (the same losses as passing g to
    each call); a generator or partition given to the call wins."""
    views = views_of(128, 256)
    module = CWRGPLoss(generator=torch.Generator().manual_seed(5))
    reference = torch.Generator().manual_seed(5)
    for _ in range(2):
        assert torch.equal(module(*views), cw_rgp_loss(*views, generator=reference))
    assert torch.equal(module(*views, generator=torch.Generator().manual_seed(9)),
                       cw_rgp_loss(*views, generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stable_rank_is_never_nan(dtype):
    """At collapse to a point the stable rank is 0; it is scale-free at any representable scale."""
    assert stable_rank(torch.full((8, 4), 3.0, dtype=dtype)).item() == 0
    z = embedding(0, 40, 8, dtype)
    expected = stable_rank(z).item()
    for power in (-30, -19, 19, 30):
        assert stable_rank(z * 10.0 ** power).item() == pytest.approx(expected, rel=1e-4)


# ----------------------------------------------------------------------------------------------
# 12. Gradients with shrinkage (ε > 0)

@st.composite
def shrunk_problems(draw, singular=False):
    """(axis, method, solver, b, groups, c, eps), 0 < eps < 1. singular=False: the full-rank shapes
    of problems() (where autograd through the reference's eigh is defined); singular=True: shapes
    whose Σ is singular without ε (BW with b ≤ c, CW with c < b), where εI makes the zero
    eigenvalues coincide, so that only finite differences can check ZCA there, and PCA, which has
    no gradient at coinciding eigenvalues, is left out."""
    methods = ["zca-eigh", "zca-newton", "cholesky"] + ([] if singular else ["pca"])
    method, _, solver = draw(st.sampled_from(methods)).partition("-")
    eps = draw(st.sampled_from([0.1, 0.5, 0.9]) | st.floats(0.01, 0.95))
    if singular:
        axis, groups = draw(st.sampled_from(["batch", "channel"])), draw(st.integers(1, 2))
        small, large = draw(st.integers(2, 3)), draw(st.integers(4, 5))
        b, c = (small, large) if axis == "batch" else (large, small)
    else:
        axis, _, b, groups, c, _ = draw(problems(methods=(method,), dtype=torch.float64))
    return axis, method, solver or "auto", b, groups, c, eps


@settings(max_examples=60, deadline=None)
@given(shrunk_problems(), seeds, st.booleans())
@example(("channel", "zca", "eigh", 4, 2, 6, 0.1), 0, True)
@example(("batch", "zca", "eigh", 9, 2, 4, 0.5), 1, False)
def test_shrunk_whitening_and_its_gradient_match_autograd_through_the_reference(problem, seed,
                                                                                 permute):
    """With shrinkage Σ ← (1−ε)Σ + εI the output and its gradient equal the float64 reference and
    autograd through it, for every method and ZCA solver. The (1−ε) factor scales the data's part
    of the gradient: dropping it from the ZCA backward is 5 % wrong at ε = 0.1 and 25 % at
    ε = 0.5. Tolerances as the unshrunk test's (1e-6 relative): shrinkage only lowers cond(Σ)."""
    axis, method, solver, b, groups, c, eps = problem
    d = groups * c
    z = embedding(seed, b, d, requires_grad=True)
    perm = random_perm(seed, d) if permute else None
    weights = torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = WHITEN[axis](z, groups=groups, method=method, eps=eps, perm=perm, solver=solver)
    expected = reference_whiten(z, axis, groups, method, eps, perm)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad((out * weights).sum(), z)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), z)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-8)


@settings(max_examples=20, deadline=None)
@given(shrunk_problems(singular=True), seeds, st.booleans())
def test_shrunk_whitening_gradients_match_finite_differences_where_sigma_is_singular(problem, seed,
                                                                                      permute):
    """Where Σ is singular and only ε makes it invertible (its zero eigenvalues become ε, all
    equal), gradcheck (float64) of the ZCA (both solvers) and Cholesky gradients; the output still
    equals the reference. Σ's condition number is at most 1/ε-ish here, so finite differences
    hold at gradcheck's default tolerances."""
    axis, method, solver, b, groups, c, eps = problem
    d = groups * c
    z = embedding(seed, b, d, requires_grad=True)
    perm = random_perm(seed, d) if permute else None

    def whiten(x):
        return WHITEN[axis](x, groups=groups, method=method, eps=eps, perm=perm, solver=solver)
    torch.testing.assert_close(whiten(z), reference_whiten(z, axis, groups, method, eps, perm))
    assert torch.autograd.gradcheck(whiten, (z,))


# ----------------------------------------------------------------------------------------------
# 13. The stable rank against its definition

def embedding_with_spectrum(seed, b, d, singular_values, dtype=torch.float64):
    """A (b, d) embedding whose channel-centred matrix Z̄ has exactly these singular values (up to
    rounding): Z = Q diag(σ) Vᵀ + 1μᵀ with Q's orthonormal columns orthogonal to 1 (so centring
    removes only the offsets μ) and V's orthonormal; needs len(σ) ≤ min(b − 1, d)."""
    gen = torch.Generator().manual_seed(seed)
    rank = len(singular_values)
    # orthonormal columns orthogonal to 1: QR of [1, random], its first column dropped
    first_ones = torch.cat([torch.ones(b, 1, dtype=torch.float64),
                            torch.randn(b, rank, generator=gen, dtype=torch.float64)], 1)
    Q = torch.linalg.qr(first_ones).Q[:, 1:]
    V = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64)).Q
    sigma = torch.tensor(singular_values, dtype=torch.float64)
    offsets = torch.randn(d, generator=gen, dtype=torch.float64)
    return ((Q * sigma) @ V.T + offsets).to(dtype)


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 40), st.integers(2, 40), st.data(),
       st.sampled_from([torch.float64, torch.float32]), seeds)
@example(41, 8, None, torch.float64, 0)  # a decaying spectrum: Σσ²/σ₁² = 1.72, Σσ/σ₁ = 2.80
def test_stable_rank_matches_its_definition_on_uneven_spectra(b, d, data, dtype, seed):
    """stable_rank(Z) = Σσᵢ²/σ₁² for the singular values σ of the channel-centred Z̄, computed here
    from the σ the embedding was built with (no SVD), on spectra that are neither flat nor rank
    one (there Σσ²/σ₁² and the unsquared Σσ/σ₁ agree). Tolerance: float64 rounding (1e-10
    relative); in float32 the input's rounding, eps₃₂·‖Z‖/σ₁ relative to each σ² sum, with ‖Z‖
    (offsets included) a few σ₁: 1e-5 relative."""
    rank = min(b - 1, d)
    if data is None:  # the @example: a decaying spectrum of 8 directions
        sigma = [1.0, 0.6, 0.45, 0.3, 0.2, 0.12, 0.08, 0.05]
    else:
        tail = data.draw(st.lists(st.floats(1e-3, 0.9), min_size=1, max_size=rank - 1))
        sigma = [1.0] + sorted(tail, reverse=True)
    expected = sum(s * s for s in sigma) / sigma[0] ** 2
    got = stable_rank(embedding_with_spectrum(seed, b, d, sigma, dtype))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("b, d", [(5, 32), (16, 16), (64, 512), (40, 8), (17, 16), (2, 3)])
def test_stable_rank_reaches_its_cap_min_b_minus_1_d(b, d):
    """The stable rank is at most min(b − 1, d) (centring over b samples leaves rank b − 1), and
    equals it for a flat spectrum of that rank, offsets included: b − 1, not b, when b ≤ d (an
    uncentred Z would count its offsets' direction); d when b > d. A random Gaussian embedding
    stays strictly below the cap."""
    cap = min(b - 1, d)
    flat = embedding_with_spectrum(0, b, d, [2.0] * cap)
    assert stable_rank(flat).item() == pytest.approx(cap, rel=1e-12)
    gaussian = embedding(1, b, d)
    assert 1 <= stable_rank(gaussian).item() < cap or cap == 1


# ----------------------------------------------------------------------------------------------
# 14. The loss with several groups, and the random group partition's distribution

def hand_made_partition(seed, num_views, batch, d, groups, sub_batch, iters=1):
    """A partition built here by torch.randperm, not by random_group_partition: one sample order
    per repetition, one channel permutation per repetition, view and sub-batch; the identity for
    one group (the loss then ignores the channel order, and BW by Cholesky depends on it)."""
    gen = torch.Generator().manual_seed(seed)
    samples = torch.stack([torch.randperm(batch, generator=gen) for _ in range(iters)])
    shape = (iters, num_views, batch // sub_batch)
    if groups == 1:
        return samples, torch.arange(d).expand(*shape, d)
    channels = [torch.randperm(d, generator=gen) for _ in range(math.prod(shape))]
    return samples, torch.stack(channels).view(*shape, d)


@settings(max_examples=40, deadline=None)
@given(problems(dtype=torch.float64, methods=("zca", "cholesky"), margin=3), seeds,
       st.integers(2, 3), st.integers(1, 2), st.integers(1, 2), st.booleans(),
       st.sampled_from([0.0, 0.2]))
@example(("channel", "zca", 3, 4, 3, torch.float64), 0, 3, 2, 2, True, 0.2)
def test_loss_applies_a_given_partition_as_the_reference_does(problem, seed, num_views,
                                                               sub_batches, iters, normalize, eps):
    """whitening_loss(partition=P) for a partition P made here (not drawn by
    random_group_partition), any number of groups, views, sub-batches and repetitions, with and
    without shrinkage: its value equals the loop reference applying P, and its gradient equals
    autograd through that reference. Margin 3 keeps cond(Σ) near 10, where float64 gradients
    agree to 1e-6 relative (at cond 3e8 forming Σ alone costs cond·eps₆₄, and the gradient's
    1/s³ kernel makes both sides' rounding reach 1e-4)."""
    axis, method, b, groups, c, _ = problem
    d = groups * c
    views = [embedding(seed + v, b * sub_batches, d, requires_grad=True) for v in range(num_views)]
    partition = hand_made_partition(seed, num_views, b * sub_batches, d, groups, b, iters)
    loss = whitening_loss(*views, axis=axis, groups=groups, sub_batch=b, iters=iters, method=method,
                          eps=eps, normalize=normalize, partition=partition)
    expected = reference_loss(views, *partition, axis, groups, method, eps, normalize)
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, views)
    expected_grads = torch.autograd.grad(expected, views)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


@st.composite
def grouped_problems(draw):
    """(axis, method, b, groups, c) with g ≥ 2 groups of c ≥ 2 channels, d = g·c ≥ 12 and
    sub-batches of b ≥ 2 (one channel or one sample per group is standardised the same whatever
    the grouping). d ≥ 12 leaves at least 462 ways to split the channels into groups."""
    axis = draw(st.sampled_from(["batch", "channel"]))
    method = draw(st.sampled_from(["zca", "cholesky", "pca"]))
    groups = draw(st.integers(2, 4))
    c = draw(st.integers(max(2, -(-12 // groups)), 7))
    b = draw(st.integers(c + 1, c + 6)) if axis == "batch" else draw(st.integers(2, c))
    return axis, method, b, groups, c


@settings(max_examples=40, deadline=None)
@given(grouped_problems(), seeds, st.booleans(), st.sampled_from([0.0, 0.2]))
def test_identical_views_give_a_positive_loss_with_several_groups(problem, seed, normalize, eps):
    """The converse of the one-group property, and what the random partition is for: with g > 1
    the views' channels are grouped independently, so identical views are whitened differently
    and give a positive loss; given a partition in which both views share each sub-batch's
    permutation, the same views give zero. With 3 sub-batches the chance that the two views'
    draws split the channels into the same groups in all of them is below 1/462³ = 1e-8. Zero
    is float64 rounding (≤ 1e-12); different groups give 0.06 to 1 (smallest of 1600 draws:
    0.06), so 1e-6 separates them."""
    axis, method, b, groups, c = problem
    d = groups * c
    z = embedding(seed, 3 * b, d)
    kw = dict(axis=axis, groups=groups, sub_batch=b, method=method, eps=eps, normalize=normalize)
    drawn = whitening_loss(z, z.clone(), generator=torch.Generator().manual_seed(seed), **kw)
    assert drawn > 1e-6
    samples, channels = random_group_partition(2, 3 * b, d, groups, b, 1,
                                               torch.Generator().manual_seed(seed))
    shared = channels[:, :1].expand_as(channels)
    assert whitening_loss(z, z.clone(), partition=(samples, shared), **kw) < 1e-12


@settings(max_examples=40, deadline=None)
@given(problems(methods=("zca", "cholesky"), dtype=torch.float64), seeds, st.booleans())
def test_loss_with_any_groups_is_symmetric_bounded_and_averages_pairs(problem, seed, normalize):
    """With any number of groups, for a partition P of three views (P_v: view v's permutations):
    L(z1, z2; P_1, P_2) = L(z2, z1; P_2, P_1) (each view keeps its permutation), the normalised
    loss lies in [0, 4] (2 − 2·cos), and L(z1, z2, z3; P) is the mean of the three pairwise
    losses, each with its views' permutations and the shared sub-batches (float64 rounding)."""
    axis, method, b, groups, c, _ = problem
    d = groups * c
    views = [embedding(seed + k, 2 * b, d) for k in range(3)]
    samples, channels = random_group_partition(3, 2 * b, d, groups, b, 1,
                                               torch.Generator().manual_seed(seed))

    def loss(*which):
        partition = (samples, channels[:, list(which)])
        return whitening_loss(*[views[v] for v in which], axis=axis, groups=groups, sub_batch=b,
                              method=method, normalize=normalize, partition=partition)
    torch.testing.assert_close(loss(0, 1), loss(1, 0))
    if normalize:
        assert 0 <= loss(0, 1) <= 4 + 1e-12  # 4 exactly for opposite rows, up to rounding
    torch.testing.assert_close(loss(0, 1, 2), (loss(0, 1) + loss(0, 2) + loss(1, 2)) / 3)


def test_random_group_partition_puts_two_channels_together_as_theory_says():
    """The partition's distribution on its own. Within one (repetition, view, sub-batch) two given
    channels share a group with chance p = (c − 1)/(d − 1), for every pair of channels (a
    uniformly random partition, not e.g. a random rotation of fixed runs); and the permutations of
    two views, of two sub-batches and of two repetitions are independent: both put the pair
    together with chance p², never p (shared) or 0. Likewise two samples share a sub-batch with
    chance (b − 1)/(m − 1), independently between repetitions. Every chance is estimated from
    N = 4000 draws per pair and checked to 5 binomial σ (√(p(1−p)/N) ≤ 0.008)."""
    draws, views, d, groups, batch, sub_batch = 4000, 2, 8, 2, 8, 4
    c = d // groups
    samples, channels = random_group_partition(views, batch, d, groups, sub_batch, draws,
                                               torch.Generator().manual_seed(0))
    group_of = channels.argsort(-1) // c  # (draws, views, sub-batches, d): each channel's group
    together = (group_of.unsqueeze(-1) == group_of.unsqueeze(-2)).double()
    off_diagonal = ~torch.eye(d, dtype=torch.bool)

    def check(chances, p):
        sigma = math.sqrt(p * (1 - p) / draws)
        assert (chances[off_diagonal] - p).abs().max() < 5 * sigma, (chances, p)
    p = (c - 1) / (d - 1)
    check(together.mean((0, 1, 2)), p)
    check((together[:, 0] * together[:, 1]).mean((0, 1)), p * p)  # two views
    check((together[:, :, 0] * together[:, :, 1]).mean((0, 1)), p * p)  # two sub-batches
    check((together[0::2] * together[1::2]).mean((0, 1, 2)), p * p)  # two repetitions
    sub_batch_of = samples.argsort(-1) // sub_batch  # (draws, batch): each sample's sub-batch
    same_sub_batch = (sub_batch_of.unsqueeze(-1) == sub_batch_of.unsqueeze(-2)).double()
    q = (sub_batch - 1) / (batch - 1)
    check(same_sub_batch.mean(0), q)
    check((same_sub_batch[0::2] * same_sub_batch[1::2]).mean(0), q * q)


# ----------------------------------------------------------------------------------------------
# 15. The paper's shapes and the conditioning training reaches, in float32

EPS32 = torch.finfo(torch.float32).eps
REALISTIC_SHAPES = {  # name: (axis, sub-batch b, d, groups)
    "cw-rgp": ("channel", 64, 512, 4),  # the paper's CIFAR recipe: c = 128 channels per group
    "w-mse": ("batch", 128, 64, 1),  # W-MSE: embedding 64, sub-batch 128
    "bw-groups": ("batch", 128, 128, 2),  # BW with two groups of 64
}
SPECTRA = ("decaying", "collinear", "collapsing")


def conditioned_embedding(seed, axis, b, d, kind, log_cond):
    """A float32 (b, d) embedding whose whitened rows (samples for CW, channels for BW) have
    cond(Σ) of roughly 10^log_cond (a factor ~30 either way: measure it), of a kind training
    produces: "decaying" (a smoothly decaying spectrum), "collinear" (two rows nearly equal) or
    "collapsing" (one dominant direction plus a small spread). Offsets that centring removes
    (per sample for CW, per channel for BW) give centring work to do in float32."""
    gen = torch.Generator().manual_seed(seed)
    n, k = (b, d) if axis == "channel" else (d, b)  # x: n rows to whiten, over k entries
    x = torch.randn(n, k, generator=gen, dtype=torch.float64)
    delta = 10.0 ** (-log_cond / 2)  # cond(Σ) = cond(x)²
    if kind == "decaying":
        rotation = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
        decay = delta ** (torch.arange(n, dtype=torch.float64) / (n - 1))  # from 1 to δ
        x = rotation @ (decay.unsqueeze(1) * x)  # rows mixed, so no row is the small one
    elif kind == "collinear":
        x[1] = x[0] + delta * x[1]
    else:
        direction = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        x = direction * torch.randn(1, k, generator=gen, dtype=torch.float64) + delta * x
    offsets = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    z = x + offsets if axis == "channel" else (x + offsets).T
    return z.float()


def whitened_condition_number(z, axis, groups, perm):
    """The largest cond(Σ) over the groups, from the float32 input's exact values in float64."""
    blocks = centred_groups(z.double() if perm is None else z.double()[:, perm], axis, groups)
    singular_values = torch.linalg.svdvals(blocks)
    return (singular_values[:, 0] / singular_values[:, -1]).max().item() ** 2


def float32_output_tolerance(cond):
    """Relative (Frobenius) error allowed for a float32 whitened output at cond(Σ) = cond. Σ and
    its decomposition are float64 (their rounding, cond·eps₆₄, is negligible); the float32 step is
    the product with x: rounding x′ = Uᵀx costs eps₃₂·σ_max(x) in every coordinate, and dividing by
    σ_min makes that a relative cond(x)·eps₃₂ = √cond(Σ)·eps₃₂. Observed at these shapes, ZCA
    (both solvers) and Cholesky: at most 0.4 times that. Allowed: 10 times, at least 30·eps₃₂. A
    float32 Σ would be off by cond(Σ)·eps₃₂: 30 times this tolerance at cond 1e5."""
    return max(10 * math.sqrt(cond), 30) * EPS32


def float32_gradient_tolerance(cond, k, solver):
    """Relative (Frobenius) error allowed for a float32 gradient at cond(Σ) = cond, the rows
    whitened over k entries. ZCA by eigh and Cholesky: the backward's float32 products
    (x′ = Uᵀx, G′x′ᵀ) are sums of k terms (rounding √k·eps₃₂), and the kernel 1/s³ of the small
    directions turns that into √k·√cond(Σ)·eps₃₂ relative, where the two terms of ∂L/∂x (G′/s
    and 2a·H′x′) largely cancel, as they do for near-collinear rows; observed at most 1.6 times
    that: allowed 10 times. Newton–Schulz: autograd rounds ∂L/∂W = G xᵀ to float32 before the
    derivative of Σ^(-1/2), which amplifies a relative error by up to cond(Σ): observed at most
    0.3·cond·eps₃₂; allowed 2·cond(Σ)·eps₃₂."""
    if solver == "newton":
        return max(2 * cond, 30) * EPS32
    return max(10 * math.sqrt(k * cond), 30) * EPS32


@settings(max_examples=45, deadline=None)
@given(st.sampled_from(list(REALISTIC_SHAPES)),
       st.sampled_from(["zca-eigh", "zca-newton", "cholesky"]), st.sampled_from(SPECTRA),
       st.floats(1, 5), seeds)
@example("cw-rgp", "zca-eigh", "decaying", 4.5, 0)
@example("w-mse", "cholesky", "collapsing", 5, 0)
@example("cw-rgp", "zca-newton", "collinear", 5, 1)
@example("cw-rgp", "zca-eigh", "collinear", 4, 21780)  # the two gradient terms cancel most here
def test_float32_whitening_at_the_papers_shapes_matches_float64_reference(shape, method, kind,
                                                                          log_cond, seed):
    """At the paper's shapes (CW-RGP's 64 × 512 in 4 groups, W-MSE's 128 × 64, BW in 2 groups),
    on decaying, near-collinear and collapsing embeddings with cond(Σ) from about 10 to 1e6
    (training reaches 4e4), float32 whitening and its gradient equal the float64 reference and
    autograd through it, applied to the same float32 values, to float32_output_tolerance and
    float32_gradient_tolerance of cond(Σ), measured per draw. PCA is left out: its output also
    depends on the eigenvalue gaps (and it fails as a loss); float64 tests cover it."""
    axis, b, d, groups = REALISTIC_SHAPES[shape]
    method, _, solver = method.partition("-")
    z = conditioned_embedding(seed, axis, b, d, kind, log_cond)
    perm = random_perm(seed, d) if groups > 1 else None
    cond = whitened_condition_number(z, axis, groups, perm)
    weights = torch.randn(b, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z32, z64 = z.clone().requires_grad_(), z.double().requires_grad_()
    out = WHITEN[axis](z32, groups=groups, method=method, perm=perm, solver=solver or "eigh")
    expected = reference_whiten(z64, axis, groups, method, perm=perm)
    assert out.dtype == torch.float32
    assert relative(out.double(), expected.detach()) <= float32_output_tolerance(cond)
    (grad,) = torch.autograd.grad((out * weights.float()).sum(), z32)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), z64)
    k = d // groups if axis == "channel" else b
    assert relative(grad.double(), expected_grad) <= float32_gradient_tolerance(cond, k, solver)


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(["cw-rgp", "w-mse"]), st.sampled_from(SPECTRA), st.floats(1, 5), seeds)
@example("cw-rgp", "collapsing", 5, 0)
def test_float32_loss_at_the_papers_shapes_matches_float64_reference(recipe, kind, log_cond, seed):
    """cw_rgp_loss on two (256, 512) float32 views (4 sub-batches of 64, 4 groups) and w_mse_loss
    on two (256, 64) views (2 sub-batches of 128), the second view a noisy copy of the first,
    equal the float64 reference loss for the same partition, value and gradients, at the worst
    cond(Σ) among all sub-batches, views and groups. The rows are L2-normalised, so the loss
    moves by at most 8 times their relative error: 8·float32_output_tolerance, absolute."""
    loss_of = {"cw-rgp": cw_rgp_loss, "w-mse": w_mse_loss}[recipe]
    axis, sub_batch, d, groups = REALISTIC_SHAPES[recipe]
    batch = 256
    first = conditioned_embedding(seed, axis, batch, d, kind, log_cond)
    noise = torch.randn(batch, d, generator=torch.Generator().manual_seed(seed + 1))
    views = [first, first + 0.1 * first.std() * noise]
    samples, channels = random_group_partition(2, batch, d, groups, sub_batch, 1,
                                               torch.Generator().manual_seed(seed))
    sub_batches = samples[0].view(-1, sub_batch)
    cond = max(whitened_condition_number(view[rows], axis, groups, channels[0, v, k])
               for v, view in enumerate(views) for k, rows in enumerate(sub_batches))
    views32 = [v.clone().requires_grad_() for v in views]
    views64 = [v.double().requires_grad_() for v in views]
    loss = loss_of(*views32, partition=(samples, channels), solver="eigh")
    method = "zca" if recipe == "cw-rgp" else "cholesky"
    expected = reference_loss(views64, samples, channels, axis, groups, method)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= 8 * float32_output_tolerance(cond)
    k = d // groups if axis == "channel" else sub_batch
    gradients = torch.autograd.grad(loss, views32)
    for got, want in zip(gradients, torch.autograd.grad(expected, views64)):
        assert relative(got.double(), want) <= float32_gradient_tolerance(cond, k, "eigh")


# ----------------------------------------------------------------------------------------------
# 16. whitening_matrix exactly: Newton–Schulz at the rule's threshold, the gradient of every method

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [2, 8, 64])
def test_newton_reaches_the_exact_inverse_square_root_at_the_rules_threshold(n, dtype):
    """On a diagonal Σ every Newton–Schulz product is exact to one rounding per entry, so the
    answer W = diag(λ^(-1/2)) is known to eps, at any condition number: there the test can be
    exact where the eigh comparison at cond 1e15 (20·cond·eps₆₄: 5 at n = 2) cannot. With all
    eigenvalues but one at λ_max = 1 and the smallest just above the rule's threshold t = n·eps
    (the slowest start that is accepted), W is diag(λ^(-1/2)) to 64·eps₆₄ in every entry (about
    50 steps of a few roundings; observed ≤ 5e-16), exactly diagonal, and returned in Σ's dtype
    (float32: one rounding, eps₃₂). Iterating too little leaves the smallest eigenvalue's entry off
    by 3e-13 at n = 64 (one step fewer) and by O(1) when far from converged."""
    eps = torch.finfo(dtype).eps
    eigenvalues = torch.ones(n, dtype=torch.float64)
    eigenvalues[-1] = 1.01 * n * eps
    cov = torch.diag(eigenvalues).to(dtype)
    W = whitening_matrix(cov, solver="newton")
    assert W.dtype == dtype
    exact = cov.double().diagonal().rsqrt()
    assert torch.equal(W, torch.diag(W.diagonal()))
    tol = 64 * EPS64 if dtype == torch.float64 else eps
    assert ((W.diagonal().double() - exact).abs() / exact).max() <= tol


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 6), st.sampled_from(["zca-eigh", "zca-newton", "cholesky", "pca"]), seeds)
def test_whitening_matrix_gradient_matches_the_reference_on_the_symmetric_part(n, method, seed):
    """For every method and solver, ∂/∂Σ of whitening_matrix equals autograd through the reference
    applied to Σ's symmetric part (Σ + Σᵀ)/2: a covariance's gradient is symmetric (Cholesky reads
    only Σ's lower triangle, so without that symmetrisation its gradient would be lower
    triangular). Eigenvalues spread in [0.5, 3.5] (gaps for PCA, cond ≤ 7): float64 to 1e-8."""
    method, _, solver = method.partition("-")
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    eigenvalues = 0.5 + 3 * torch.arange(n, dtype=torch.float64) / (n - 1)
    cov = (U * eigenvalues) @ U.T
    cov = (cov + cov.T) / 2
    weights = torch.randn(n, n, generator=gen, dtype=torch.float64)
    ours, theirs = cov.clone().requires_grad_(), cov.clone().requires_grad_()
    (whitening_matrix(ours, method, solver or "auto") * weights).sum().backward()
    (reference_matrix((theirs + theirs.T) / 2, method) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-8, atol=1e-10)
