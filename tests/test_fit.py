import pytest
import torch

from lora_compile.calibrate import Moments, Projections
from lora_compile.errors import LoraCompileError
from lora_compile.fit import fit_axis, fit_error, fit_errors, fit_ridge, outlier_dimensions, pinnable

pytestmark = pytest.mark.numeric  # tolerances that depend on CPU kernels: run under two in CI


def _moments(x: torch.Tensor, pinned: torch.Tensor | None = None) -> Moments:
    m = Moments.zeros(x.shape[1])
    m.add_(x)
    if pinned is not None:
        m.pinned = pinned.double()
    return m


def _data(n=2000, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[:, 3] = 5.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)  # a near-constant "outlier" dim
    return x


def test_ridge_solves_the_regularised_normal_equations():
    x = _data()
    m = _moments(x)
    b = fit_ridge(m, ridge=1e-3, pin=False)
    lam = 1e-3 * torch.trace(m.gram) / m.dim
    expected = torch.linalg.solve(x.T @ x + lam * torch.eye(8, dtype=torch.float64), x.sum(0))
    torch.testing.assert_close(b, expected)


def test_pinned_positions_are_satisfied_exactly():
    x = _data()
    pinned = x[:2] * 1.5 + 0.3
    b = fit_ridge(_moments(x, pinned), ridge=1e-4)
    torch.testing.assert_close(pinned.double() @ b, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-10)
    assert pinnable(_moments(x, pinned)).shape[0] == 2


def test_tiny_pinned_inputs_are_not_pinned():
    x = _data()
    pinned = torch.stack([x[0], x[1] * 1e-3])
    m = _moments(x, pinned)
    assert pinnable(m).shape[0] == 1
    assert abs(float(pinned[0] @ fit_ridge(m)) - 1) < 1e-10


def test_axis_picks_the_near_constant_dimension_and_ridge_beats_it():
    x = _data()
    m = _moments(x)
    a = fit_axis(m)
    assert int(a.abs().argmax()) == 3 and int((a != 0).sum()) == 1
    assert outlier_dimensions(m)[0]["dim"] == 3
    err_axis = fit_error(x @ a, torch.arange(len(x))).rms
    err_ridge = fit_error(x @ fit_ridge(m), torch.arange(len(x))).rms
    assert err_ridge < err_axis


def test_fit_error_statistics():
    values = torch.tensor([1.5, 1.0, 0.5, 1.0])
    position = torch.tensor([0, 1, 2, 0])
    e = fit_error(values, position)
    assert e.tokens == 4 and e.max == 0.5 and e.bias == 0.0
    assert e.rms == pytest.approx((0.5 / 4) ** 0.5)
    assert e.rms_first == pytest.approx((0.25 / 2) ** 0.5)
    per = fit_errors(Projections(values[:, None], position, ["a", "a", "b", "b"]))
    assert set(per) == {"all", "a", "b"} and per["a"].tokens == 2


def test_empty_calibration_is_refused():
    with pytest.raises(LoraCompileError, match="no tokens"):
        fit_ridge(Moments.zeros(4))


def test_cross_validated_ridge_is_the_grid_value_with_least_fold_error():
    from lora_compile.fit import RIDGE_GRID, choose_ridge, squared_error

    x = _data(n=300, d=40, seed=1)
    whole, odd = _moments(x), _moments(x[1::2])
    whole.fold = odd
    even = _moments(x[0::2])
    cv = [squared_error(fit_ridge(even, lam), odd) + squared_error(fit_ridge(odd, lam), even) for lam in RIDGE_GRID]
    assert choose_ridge(whole) == RIDGE_GRID[cv.index(min(cv))]
    assert squared_error(fit_ridge(whole, 1e-3), whole) == pytest.approx(
        float(((x @ fit_ridge(whole, 1e-3)) - 1).pow(2).sum())
    )
