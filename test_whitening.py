"""
Property tests of cwrgp.py. First against an independent float64 reference written here from the
formulas (loops, plain torch.linalg), then the properties the paper relies on: whitened outputs,
ZCA as the nearest whitening, random group partition, full-rank behaviour, gradients, the loss,
and the refusals. Shapes are drawn valid by construction: g and c first, then d = g·c.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cwrgp
from cwrgp import (CWRGPLoss, batch_whiten, channel_whiten, cw_rgp_loss, random_group_partition,
                   stable_rank, w_mse_loss, whitening_loss, whitening_matrix)

TOL = {torch.float64: 1e-8, torch.float32: 1e-3}  # float32 outputs carry cond(Σ)·eps of rounding
WHITEN = {"batch": batch_whiten, "channel": channel_whiten}
seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------------------------
# Drawing valid problems

@st.composite
def problems(draw, axes=("batch", "channel"), methods=("zca", "cholesky", "pca"), max_groups=4, dtype=None):
    """(axis, method, b, groups, c, dtype). float32 draws keep Σ well conditioned (margin 3)."""
    axis = draw(st.sampled_from(axes))
    method = draw(st.sampled_from(methods))
    dtype = dtype or draw(st.sampled_from([torch.float64, torch.float32]))
    margin = 3 if dtype == torch.float32 else 1
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
    z = z * torch.exp(0.3 * torch.randn(d, generator=gen, dtype=torch.float64)) + torch.randn(d, generator=gen, dtype=torch.float64)
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
                whitened[v][rows] = reference_whiten(z[rows], axis, groups, method, eps, channels[i, v, k])
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
    with or without a channel permutation (the permutation's groups, not contiguous ones)."""
    axis, method, b, groups, c, dtype = problem
    d = groups * c
    z = embedding(seed, b, d, dtype)
    perm = random_perm(seed, d) if permute else None
    out = WHITEN[axis](z, groups=groups, method=method, perm=perm)
    assert out.dtype == dtype and out.shape == (b, d)
    grouped_order = out if perm is None else out[:, perm]
    eye = torch.eye(c if axis == "batch" else b, dtype=dtype).expand(groups, -1, -1)
    torch.testing.assert_close(group_covariances(grouped_order, axis, groups), eye, rtol=0, atol=TOL[dtype])


@settings(max_examples=150, deadline=None)
@given(problems(dtype=torch.float64), seeds, st.booleans(), st.sampled_from([0.0, 0.1]))
def test_whitening_matches_float64_reference(problem, seed, permute, eps):
    """batch_whiten/channel_whiten equal the loop-per-group reference for every method, with and
    without a permutation and shrinkage."""
    axis, method, b, groups, c, dtype = problem
    z = embedding(seed, b, groups * c)
    perm = random_perm(seed + 1, groups * c) if permute else None
    expected = reference_whiten(z, axis, groups, method, eps, perm)
    torch.testing.assert_close(WHITEN[axis](z, groups=groups, method=method, eps=eps, perm=perm), expected)


@settings(max_examples=60, deadline=None)
@given(problems(dtype=torch.float64, methods=("zca", "cholesky")), seeds, st.integers(2, 4),
       st.integers(1, 3), st.integers(1, 3), st.booleans())
def test_loss_matches_float64_reference(problem, seed, num_views, sub_batches, iters, normalize):
    """whitening_loss equals the reference loss computed from the partitions that
    random_group_partition draws from the same generator seed (any views, sub-batches, repetitions)."""
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
    torch.testing.assert_close(whitening_matrix(cov, "cholesky"), whitening_matrix(cov, "cholesky").tril())


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
    distance = {m: (WHITEN[axis](z, groups=groups, method=m).view(b, groups, c).transpose(0, 1) - blocks).norm()
                for m in ("zca", "cholesky", "pca")}
    assert distance["zca"] <= distance["cholesky"] + 1e-9 and distance["zca"] <= distance["pca"] + 1e-9


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
    z = white_embedding("batch", b, 2, seed) * torch.tensor([math.sqrt(1 + 1e-10), 1.0], dtype=torch.float64)
    mixed = z @ torch.tensor([[1.0, delta], [delta, 1.0]], dtype=torch.float64)

    def change(method):
        before = batch_whiten(z, method=method)
        return ((batch_whiten(mixed, method=method) - before).norm() / before.norm()).item()
    assert change("pca") > 0.5
    assert change("zca") < 10 * delta and change("cholesky") < 10 * delta


# ----------------------------------------------------------------------------------------------
# 4. Random group partition

@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), seeds)
def test_random_group_partition_is_a_partition(views, groups, c, sub_batches, iters, seed):
    """Every draw is a permutation: each sample in exactly one sub-batch, each channel in exactly one
    group of c channels; groups=1 keeps the channel order; the same seed draws the same partition."""
    d, sub_batch = groups * c, 3
    batch = sub_batch * sub_batches
    samples, channels = random_group_partition(views, batch, d, groups, sub_batch, iters, torch.Generator().manual_seed(seed))
    assert samples.shape == (iters, batch) and channels.shape == (iters, views, sub_batches, d)
    assert torch.equal(samples.sort(-1).values, torch.arange(batch).expand(iters, batch))
    grouped = channels.view(iters, views, sub_batches, groups, c)
    assert torch.equal(grouped.flatten(-2).sort(-1).values, torch.arange(d).expand_as(channels))
    if groups == 1:
        assert torch.equal(channels, torch.arange(d).expand_as(channels))
    again = random_group_partition(views, batch, d, groups, sub_batch, iters, torch.Generator().manual_seed(seed))
    assert torch.equal(again[0], samples) and torch.equal(again[1], channels)


def test_random_group_partition_draws_independently_per_view_and_sub_batch():
    """Partitions differ between views, sub-batches and repetitions, and each channel lands in each
    group about equally often (a uniform partition)."""
    samples, channels = random_group_partition(2, 8, 64, 4, 4, 200, torch.Generator().manual_seed(0))
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
                               whiten(z[:, p], groups=groups, method=method), rtol=0, atol=TOL[dtype])


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
    A = torch.block_diag(*[torch.randn(c, c, generator=gen, dtype=torch.float64) + 3 * torch.eye(c, dtype=torch.float64)
                           for _ in range(groups)])
    white, mixed = batch_whiten(z, groups, method), batch_whiten(z @ A, groups, method)
    Q = torch.block_diag(*[wk.T @ mk / (b - 1) for wk, mk in zip(white.split(c, 1), mixed.split(c, 1))])
    torch.testing.assert_close(white @ Q, mixed)
    torch.testing.assert_close(Q.T @ Q, torch.eye(groups * c, dtype=torch.float64))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(["batch", "channel"]), st.sampled_from(["zca", "cholesky", "pca"]), st.integers(1, 4),
       st.sampled_from([torch.float64, torch.float32]), seeds)
def test_rank_deficient_input_is_refused_or_shrunk_to_its_rank(axis, method, rank, dtype, seed):
    """A rank-deficient embedding (a product of thin factors, rounded to its dtype) is refused
    without shrinkage; with ε > 0 the output is finite and has the centred input's rank."""
    gen = torch.Generator().manual_seed(seed)
    b, d = (12, 8) if axis == "batch" else (8, 12)
    z = torch.randn(b, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, d, generator=gen, dtype=torch.float64)
    z = z.to(dtype)
    with pytest.raises(ValueError, match="singular"):
        WHITEN[axis](z, method=method)
    out = WHITEN[axis](z, method=method, eps=0.1).double()
    z = z.double()
    centred = z - (z.mean(1, keepdim=True) if axis == "channel" else z.mean(0))
    assert torch.isfinite(out).all()
    rtol = 1e-5 if dtype == torch.float32 else None  # float32 rounding is rank noise at ~1e-7
    assert torch.linalg.matrix_rank(out, rtol=rtol) == torch.linalg.matrix_rank(centred, rtol=rtol) <= rank


# ----------------------------------------------------------------------------------------------
# 6. Gradients

@settings(max_examples=40, deadline=None)
@given(problems(dtype=torch.float64), seeds, st.booleans())
def test_whitening_gradients_match_finite_differences(problem, seed, permute):
    """gradcheck (float64) of batch_whiten and channel_whiten for every method and partition."""
    axis, method, b, groups, c, _ = problem
    z = embedding(seed, b, groups * c, requires_grad=True)
    perm = random_perm(seed, groups * c) if permute else None
    assert torch.autograd.gradcheck(lambda x: WHITEN[axis](x, groups=groups, method=method, perm=perm), (z,))


@settings(max_examples=25, deadline=None)
@given(problems(dtype=torch.float64, methods=("zca", "cholesky"), max_groups=2), seeds, st.booleans())
def test_loss_gradients_match_finite_differences(problem, seed, normalize):
    """gradcheck (float64) of the whitening loss for two views with two sub-batches: gradients flow
    through the whitening, nothing is detached."""
    axis, method, b, groups, c, _ = problem
    views = [embedding(seed + v, 2 * b, groups * c, requires_grad=True) for v in range(2)]

    def loss(*vs):
        return whitening_loss(*vs, axis=axis, groups=groups, sub_batch=b, method=method,
                              normalize=normalize, generator=torch.Generator().manual_seed(seed))
    # Near c = sub_batch Σ is ill-conditioned, and rounding in the loss's value puts gradcheck's
    # default differences (eps 1e-6) off by up to 1e-4; with eps 1e-5 they agree to about 1e-5.
    assert torch.autograd.gradcheck(loss, views, eps=1e-5, atol=1e-4)


@settings(max_examples=100, deadline=None)
@given(problems(methods=("zca", "cholesky"), dtype=torch.float64), seeds)
def test_gradient_respects_the_whitening_invariances(problem, seed):
    """BW is unchanged by a per-channel shift and a per-group scale, so any gradient through it sums
    to zero over the batch and is orthogonal to each group of Z̄. CW is unchanged by a per-sample
    shift and a global scale: the gradient sums to zero over each sample's channels and is
    orthogonal to Z̄."""
    axis, method, b, groups, c, _ = problem
    z = embedding(seed, b, groups * c, requires_grad=True)
    projection = torch.randn(b, groups * c, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (WHITEN[axis](z, groups=groups, method=method) * projection).sum().backward()
    grad, zc = z.grad, z.detach() - (z.detach().mean(0) if axis == "batch" else z.detach().mean(1, keepdim=True))
    scale = grad.abs().max() * zc.abs().max() * z.numel() + 1e-3  # the gradient can be exactly 0
    if axis == "batch":
        torch.testing.assert_close(grad.sum(0), torch.zeros(groups * c, dtype=torch.float64), rtol=0, atol=1e-10 * scale)
        per_group = (grad * zc).view(b, groups, c).sum((0, 2))
        torch.testing.assert_close(per_group, torch.zeros(groups, dtype=torch.float64), rtol=0, atol=1e-10 * scale)
    else:
        torch.testing.assert_close(grad.sum(1), torch.zeros(b, dtype=torch.float64), rtol=0, atol=1e-10 * scale)
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
    torch.testing.assert_close(out, z.detach() - (z.detach().mean(0) if axis == "batch" else z.detach().mean(1, keepdim=True)))
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
@given(problems(methods=("zca", "cholesky"), max_groups=1, dtype=torch.float64), seeds, st.booleans())
def test_loss_of_identical_views_is_zero_with_one_group(problem, seed, normalize):
    """With one group every view is whitened the same way, so identical views give zero loss."""
    axis, method, b, groups, c, _ = problem
    z = embedding(seed, 2 * b, c)
    loss = whitening_loss(z, z.clone(), axis=axis, groups=groups, sub_batch=b, method=method, normalize=normalize)
    assert loss.abs() < 1e-12


@settings(max_examples=60, deadline=None)
@given(problems(methods=("zca", "cholesky"), max_groups=1, dtype=torch.float64), seeds)
def test_loss_is_symmetric_bounded_and_averages_pairs(problem, seed):
    """L(z1, z2) = L(z2, z1); the normalised loss lies in [0, 4] (2 − 2·cos); for three views it is
    the mean of the three pairwise losses (same generator seed: same sub-batches)."""
    axis, method, b, groups, c, _ = problem
    z1, z2, z3 = (embedding(seed + k, 2 * b, c) for k in range(3))

    def loss(*views):
        return whitening_loss(*views, axis=axis, groups=groups, sub_batch=b, method=method,
                              generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(loss(z1, z2), loss(z2, z1))
    assert 0 <= loss(z1, z2) <= 4 + 1e-12  # 4 exactly for opposite rows, up to rounding
    torch.testing.assert_close(loss(z1, z2, z3), (loss(z1, z2) + loss(z1, z3) + loss(z2, z3)) / 3)


@settings(max_examples=40, deadline=None)
@given(problems(methods=("zca", "cholesky"), dtype=torch.float64), seeds)
def test_symmetric_loss_has_the_gradient_of_two_stop_gradient_losses(problem, seed):
    """The paper's decomposition: L = ‖Ẑ₁ − Ẑ₂‖² and L′ = ‖Ẑ₁ − sg(Ẑ₂)‖² + ‖sg(Ẑ₁) − Ẑ₂‖² have the
    same gradient: each view is pulled toward the other's whitened output as a fixed target."""
    axis, method, b, groups, c, _ = problem
    z1, z2 = (embedding(seed + k, b, groups * c, requires_grad=True) for k in range(2))

    def gradients(loss_of):
        w1, w2 = (WHITEN[axis](z, groups=groups, method=method) for z in (z1, z2))
        return torch.autograd.grad(loss_of(w1, w2), (z1, z2))
    symmetric = gradients(lambda w1, w2: (w1 - w2).pow(2).sum())
    asymmetric = gradients(lambda w1, w2: (w1 - w2.detach()).pow(2).sum() + (w1.detach() - w2).pow(2).sum())
    for a, e in zip(symmetric, asymmetric):
        torch.testing.assert_close(a, e)


def test_recipe_defaults_and_module():
    """cw_rgp_loss is CW/ZCA/g=4/sub_batch=64, w_mse_loss is BW/Cholesky/g=1/sub_batch=128, and
    CWRGPLoss computes cw_rgp_loss; arguments override the defaults."""
    views = [embedding(v, 256, 512, torch.float32) for v in range(4)]
    kw = dict(axis="channel", method="zca", groups=4, sub_batch=64)
    torch.testing.assert_close(cw_rgp_loss(*views, generator=torch.Generator().manual_seed(1)),
                               whitening_loss(*views, generator=torch.Generator().manual_seed(1), **kw))
    torch.testing.assert_close(CWRGPLoss(groups=2)(*views[:2], generator=torch.Generator().manual_seed(2)),
                               whitening_loss(*views[:2], generator=torch.Generator().manual_seed(2), **{**kw, "groups": 2}))
    small = [v[:, :64] for v in views[:2]]
    torch.testing.assert_close(w_mse_loss(*small, generator=torch.Generator().manual_seed(3)),
                               whitening_loss(*small, axis="batch", method="cholesky", groups=1, sub_batch=128,
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
    (lambda: whitening_loss(*views_of(12, 8), sub_batch=5), "cannot be split into sub-batches of 5"),
    (lambda: whitening_loss(*views_of(8, 16), axis="batch", groups=2, sub_batch=8), r"sub_batch > c"),
    (lambda: whitening_loss(*views_of(16, 16), axis="channel", groups=2, sub_batch=16), r"c >= sub_batch"),
    (lambda: whitening_loss(*views_of(8, 8), axis="channel", groups=1, sub_batch=8), r"c > sub_batch \(with groups=1"),
    (lambda: whitening_loss(*views_of(8, 16, count=1)), "at least two views"),
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
    assert torch.isfinite(whitening_loss(*views_of(32, 16), axis="channel", groups=2, sub_batch=32, eps=0.1))


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
    assert abs(loss - cw_rgp_loss(*views, generator=gen())) < 1e-2  # bf16 rounding of the inputs only
    assert cw_rgp_loss(*[v.half() for v in views], generator=gen()).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = cw_rgp_loss(*views, generator=gen())
        assert channel_whiten(rounded[0][:64], groups=4).dtype == torch.float32
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, cw_rgp_loss(*views, generator=gen()))
    assert cw_rgp_loss(*[v.double() for v in views], generator=gen()).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_host_and_device_decompositions_agree(monkeypatch):
    """On CUDA, channel whitening of one sub-batch (64×64 covariances, decomposed on the host) and its
    gradient equal the CPU's; and the loss and its gradients are the same whether the covariances
    are decomposed on the host or by cuSOLVER on the device."""
    views = [v.detach() for v in views_of(256, 512)]
    weights = torch.randn(64, 512, generator=torch.Generator().manual_seed(1))

    def whiten_and_grad(device):
        leaf = views[0][:64].to(device).requires_grad_()
        out = channel_whiten(leaf, groups=4)
        (out * weights.to(device)).sum().backward()
        return [out.cpu(), leaf.grad.cpu()]

    def loss_and_grads():
        leaves = [v.cuda().requires_grad_() for v in views]
        loss = cw_rgp_loss(*leaves, generator=torch.Generator("cuda").manual_seed(0))
        loss.backward()
        return [loss.cpu()] + [v.grad.cpu() for v in leaves]

    assert 64 in cwrgp._HOST_EIGH_SIZES
    for got, expected in zip(whiten_and_grad("cuda"), whiten_and_grad("cpu")):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)
    on_host = loss_and_grads()
    monkeypatch.setattr(cwrgp, "_HOST_EIGH_SIZES", range(0))
    for got, expected in zip(loss_and_grads(), on_host):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)
