"""The truncated SVD ``low_rank_decomposition`` (losparse.decomposition)."""
import math

import pytest
import torch

import utils


@pytest.mark.parametrize("shape,ratio,rank", [((768, 768), 0.05, 20), ((3072, 768), 0.05, 31),
                                              ((768, 3072), 0.05, 31), ((64, 32), 0.1, 3),
                                              ((8, 4), 1.0, 3), ((8, 4), 5.0, 4), ((8, 4), 1e-6, 1)])
def test_rank_formula_and_clamp(shape, ratio, rank):
    w = torch.randn(*shape)
    out = utils.low_rank_decomposition(w, parameter_ratio=ratio, return_dict=True)
    assert out["reduced_rank"] == rank
    assert out["L"].shape == (shape[0], rank) and out["R"].shape == (rank, shape[1])
    assert set(out) == {"L", "R", "U", "S", "Vh", "reduced_rank"}


def test_decomposition_is_truncated_svd_with_sqrt_split():
    torch.manual_seed(0)
    w = torch.randn(30, 20, dtype=torch.float64).to(torch.bfloat16)
    L, R = utils.low_rank_decomposition(w, parameter_ratio=0.2)
    assert L.dtype == torch.float32 and R.dtype == torch.float32
    U, S, Vh = torch.linalg.svd(w.float(), full_matrices=False)
    r = math.ceil(0.2 * 600 / 50)
    torch.testing.assert_close(L @ R, (U[:, :r] * S[:r]) @ Vh[:r], atol=1e-5, rtol=1e-5)
    # sqrt split: column norms of L equal row norms of R (= sqrt of the singular values)
    torch.testing.assert_close(L.norm(dim=0), R.norm(dim=1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(L.norm(dim=0), S[:r].sqrt(), atol=1e-5, rtol=1e-5)
    Lmin, Rmin = utils.low_rank_decomposition(w, parameter_ratio=0.2, remove_criteria="min_eigenvalue")
    torch.testing.assert_close(Lmin.norm(dim=0), S[-r:].sqrt(), atol=1e-5, rtol=1e-5)
    Lr, Rr = utils.low_rank_decomposition(w, parameter_ratio=0.2, remove_criteria="random")
    chosen = sorted(Lr.norm(dim=0).pow(2).tolist())
    assert len(set(round(c, 4) for c in chosen)) == r  # r distinct singular values
    assert all(any(abs(c - s) < 1e-3 for s in S.tolist()) for c in chosen)


def test_decomposition_rank_ratio_and_errors():
    w = torch.randn(10, 6)
    assert utils.low_rank_decomposition(w, rank_ratio=0.5, parameter_ratio=None, return_dict=True)["reduced_rank"] == 3
    with pytest.raises(ValueError, match="2-D"):
        utils.low_rank_decomposition(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="remove_criteria"):
        utils.low_rank_decomposition(w, remove_criteria="largest")
    with pytest.raises(ValueError, match="svd"):
        utils.low_rank_decomposition(w, svd="fast")


def test_randomized_svd_close_to_exact():
    torch.manual_seed(0)
    # a matrix with a decaying spectrum, like trained weights
    U, _ = torch.linalg.qr(torch.randn(256, 256))
    V, _ = torch.linalg.qr(torch.randn(128, 128))
    s = torch.logspace(0, -2, 128)
    w = (U[:, :128] * s) @ V.T
    exact = utils.low_rank_decomposition(w, parameter_ratio=0.1)
    approx = utils.low_rank_decomposition(w, parameter_ratio=0.1, svd="randomized")
    auto = utils.low_rank_decomposition(w, parameter_ratio=0.1, svd="auto", return_dict=True)
    e_exact = (w - exact[0] @ exact[1]).norm()
    e_approx = (w - approx[0] @ approx[1]).norm()
    assert e_approx <= e_exact * 1.01
    assert auto["U"].shape[1] < 128  # auto picked the randomized SVD (rank 9 << 128)
