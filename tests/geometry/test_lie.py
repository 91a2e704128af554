"""Properties of v2d.geometry.lie: group laws, agreement with matrix_exp and pypose, gradients."""

import math

import pypose as pp
import pytest
import torch
from torch.autograd import gradcheck

from v2d.errors import ShapeError
from v2d.geometry import lie
from v2d.geometry.lie import (
    SE3,
    matrix_to_quat,
    quat_conj,
    quat_mul,
    quat_to_matrix,
    se3_act,
    se3_adjoint,
    se3_exp,
    se3_from_matrix,
    se3_identity,
    se3_inv,
    se3_log,
    se3_matrix,
    se3_mul,
    se3_random,
    skew,
    so3_exp,
    so3_log,
)

F64 = torch.float64
# Rotation angles that cover the Taylor branch (0 .. 0.1 rad), its boundary and the closed forms up to
# nearly pi.
ANGLES = [0.0, 1e-10, 1e-6, 1e-3, 0.0999, 0.1001, 0.5, 1.5, 3.0, 3.14]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tangent(n: int, angle: float, seed: int = 0) -> torch.Tensor:
    """n tangent vectors [tau, phi] with |phi| = angle."""
    g = _gen(seed)
    tau = torch.randn(n, 3, generator=g, dtype=F64)
    axis = torch.randn(n, 3, generator=g, dtype=F64)
    phi = axis / axis.norm(dim=-1, keepdim=True) * angle
    return torch.cat([tau, phi], dim=-1)


def _hat(xi: torch.Tensor) -> torch.Tensor:
    """4x4 Lie algebra matrix of an SE3 tangent vector."""
    M = torch.zeros(*xi.shape[:-1], 4, 4, dtype=xi.dtype)
    M[..., :3, :3] = skew(xi[..., 3:6])
    M[..., :3, 3] = xi[..., :3]
    return M


def _same_rotation(q1: torch.Tensor, q2: torch.Tensor) -> torch.Tensor:
    """Largest |q1 - q2| after resolving the q / -q ambiguity."""
    return torch.minimum((q1 - q2).abs().amax(-1), (q1 + q2).abs().amax(-1)).max()


# --------------------------------------------------------------------------------------------------
# exp / log


@pytest.mark.parametrize("angle", ANGLES)
def test_se3_log_inverts_exp(angle):
    xi = _tangent(64, angle)
    torch.testing.assert_close(se3_log(se3_exp(xi)), xi, atol=1e-12, rtol=0)




@pytest.mark.parametrize("angle", ANGLES)
def test_se3_exp_equals_matrix_exp(angle):
    xi = _tangent(32, angle)
    torch.testing.assert_close(se3_matrix(se3_exp(xi)), torch.linalg.matrix_exp(_hat(xi)), atol=1e-13, rtol=0)




def test_exp_inverts_log_on_random_elements():
    T = se3_random(256, trans_scale=3.0, generator=_gen(1), dtype=F64)
    T2 = se3_exp(se3_log(T))
    torch.testing.assert_close(T2[..., :3], T[..., :3], atol=1e-12, rtol=0)
    assert _same_rotation(T2[..., 3:], T[..., 3:]) < 1e-12


def test_log_of_half_turn_and_negative_qw():
    """Angles of exactly pi and quaternions with qw < 0 (the same rotation as -q) log to |phi| <= pi."""
    axis = torch.tensor([[0.0, 0.6, 0.8]], dtype=F64)
    T = se3_exp(torch.cat([torch.tensor([[1.0, 2.0, 3.0]], dtype=F64), math.pi * axis], dim=-1))
    phi = se3_log(T)[..., 3:]
    assert abs(phi.norm().item() - math.pi) < 1e-12
    torch.testing.assert_close(se3_matrix(se3_exp(se3_log(T))), se3_matrix(T), atol=1e-12, rtol=0)
    T_neg = torch.cat([T[..., :3], -T[..., 3:]], dim=-1)
    torch.testing.assert_close(se3_log(T_neg), se3_log(T), atol=1e-12, rtol=0)




def test_float32_jacobians_match_float64_near_branch_switches():
    """The Taylor thresholds keep float32 gradients at float32 accuracy on both sides of each switch."""
    for angle in [0.0, 1e-4, 0.099, 0.101, 0.49, 0.51]:
        xi = _tangent(8, angle)
        for fn, x in [(se3_exp, xi), (se3_log, se3_exp(xi))]:
            J64 = torch.autograd.functional.jacobian(lambda y, fn=fn: fn(y).sum(0), x)
            J32 = torch.autograd.functional.jacobian(lambda y, fn=fn: fn(y).sum(0), x.float()).double()
            err = ((J64 - J32).abs().max() / J64.abs().max()).item()
            assert err < 5e-6, (fn.__name__, angle, err)


def test_series_and_closed_form_coefficients_match_high_precision():
    """Every coefficient, on both sides of each Taylor/closed-form switch, to 1e-14..5e-14 relative (mpmath
    at 40 digits). The round-trip tests cannot see errors in high-order series terms; this can."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40
    thetas = [1e-8, 1e-3, 0.0999, 0.1001, 0.499, 0.501, 2.0, 3.1]

    def rel(got: torch.Tensor, want) -> float:
        return abs(float(got) - float(want)) / abs(float(want))

    for th in thetas:
        t = mp.mpf(th)
        b, c = lie._so3_coeffs(torch.tensor(th * th, dtype=F64))
        assert rel(b, (1 - mp.cos(t)) / t**2) < 1e-14
        assert rel(c, (t - mp.sin(t)) / t**3) < 1e-14
        d = lie._so3_vinv_coeff(torch.tensor(th * th, dtype=F64))
        assert rel(d, (1 - t / 2 * mp.cot(t / 2)) / t**2) < 5e-14


# --------------------------------------------------------------------------------------------------
# group operations against 4x4 matrices


def test_se3_inv_mul_act_match_matrices():
    A = se3_random(64, generator=_gen(3), dtype=F64)
    B = se3_random(64, generator=_gen(4), dtype=F64)
    p = torch.randn(64, 3, generator=_gen(5), dtype=F64)
    MA, MB = se3_matrix(A), se3_matrix(B)
    torch.testing.assert_close(se3_matrix(se3_mul(A, B)), MA @ MB, atol=1e-13, rtol=0)
    torch.testing.assert_close(se3_matrix(se3_inv(A)), torch.linalg.inv(MA), atol=1e-13, rtol=0)
    torch.testing.assert_close(se3_act(A, p), (MA[..., :3, :3] @ p[..., None])[..., 0] + MA[..., :3, 3])
    torch.testing.assert_close(se3_mul(A, se3_inv(A)), se3_identity(64, dtype=F64), atol=1e-13, rtol=0)




def test_from_matrix_round_trip():
    T = se3_random(64, generator=_gen(9), dtype=F64)
    T2 = se3_from_matrix(se3_matrix(T))
    torch.testing.assert_close(se3_matrix(T2), se3_matrix(T), atol=1e-13, rtol=0)
    assert (T2[..., 6] >= 0).all()
    torch.testing.assert_close(se3_from_matrix(se3_matrix(T)[..., :3, :]), T2)


def test_se3_adjoint_conjugates_exp():
    """T exp(xi) T^-1 = exp(Adj(T) xi)."""
    T = se3_random(32, trans_scale=2.0, generator=_gen(11), dtype=F64)
    xi = 0.5 * torch.randn(32, 6, generator=_gen(12), dtype=F64)
    lhs = se3_matrix(se3_mul(se3_mul(T, se3_exp(xi)), se3_inv(T)))
    rhs = se3_matrix(se3_exp((se3_adjoint(T) @ xi[..., None])[..., 0]))
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=0)




def test_binary_ops_broadcast_leading_dims():
    A = se3_random(5, 1, generator=_gen(15), dtype=F64)
    B = se3_random(1, 3, generator=_gen(16), dtype=F64)
    AB = se3_mul(A, B)
    assert AB.shape == (5, 3, 7)
    for i in range(5):
        for j in range(3):
            torch.testing.assert_close(AB[i, j], se3_mul(A[i, 0], B[0, j]))
    p = torch.randn(1, 3, 3, generator=_gen(17), dtype=F64)
    assert se3_act(A, p).shape == (5, 3, 3)
    assert quat_mul(A[..., 3:], B[..., 3:]).shape == (5, 3, 4)


def test_unbatched_and_empty_inputs():
    xi = torch.zeros(6, dtype=F64)
    torch.testing.assert_close(se3_exp(xi), se3_identity(dtype=F64))
    assert se3_exp(torch.zeros(0, 6)).shape == (0, 7)
    assert se3_log(se3_identity(2, 0)).shape == (2, 0, 6)
    assert se3_identity((2, 3)).shape == (2, 3, 7)


# --------------------------------------------------------------------------------------------------
# quaternions


def test_quaternion_matrix_round_trip_including_half_turns():
    g = _gen(20)
    axis = torch.randn(200, 3, generator=g, dtype=F64)
    axis = axis / axis.norm(dim=-1, keepdim=True)
    angles = torch.cat(
        [
            torch.rand(100, generator=g, dtype=F64) * math.pi,
            math.pi - torch.logspace(-12, -2, 50, dtype=F64),
            torch.full((50,), math.pi, dtype=F64),
        ]
    )
    # Half turns about the coordinate axes exercise each of Shepperd's pivots.
    axis[:3] = torch.eye(3, dtype=F64)
    angles[:3] = math.pi
    q = so3_exp(axis * angles[:, None])
    R = quat_to_matrix(q)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=F64).expand(200, 3, 3))
    q2 = matrix_to_quat(R)
    assert (q2[..., 3] >= 0).all()
    torch.testing.assert_close(q2.norm(dim=-1), torch.ones(200, dtype=F64))
    assert _same_rotation(q2, q) < 1e-12
    torch.testing.assert_close(quat_to_matrix(q2), R, atol=1e-13, rtol=0)


def test_quaternion_algebra_matches_matrices():
    a = so3_exp(torch.randn(32, 3, generator=_gen(21), dtype=F64))
    b = so3_exp(torch.randn(32, 3, generator=_gen(22), dtype=F64))
    torch.testing.assert_close(quat_to_matrix(quat_mul(a, b)), quat_to_matrix(a) @ quat_to_matrix(b))
    torch.testing.assert_close(quat_to_matrix(quat_conj(a)), quat_to_matrix(a).transpose(-1, -2))
    v = torch.randn(32, 3, generator=_gen(23), dtype=F64)
    p = torch.randn(32, 3, generator=_gen(24), dtype=F64)
    torch.testing.assert_close(skew(v) @ p[..., None], torch.linalg.cross(v, p)[..., None])
    phi = torch.randn(32, 3, generator=_gen(25), dtype=F64)
    phi = phi / phi.norm(dim=-1, keepdim=True) * torch.rand(32, 1, generator=_gen(26), dtype=F64) * 3.0
    torch.testing.assert_close(so3_log(so3_exp(phi)), phi, atol=1e-13, rtol=0)
    torch.testing.assert_close(quat_to_matrix(so3_exp(phi)), torch.linalg.matrix_exp(skew(phi)))


def test_matrix_to_quat_tolerates_slightly_non_orthonormal_input():
    R = quat_to_matrix(so3_exp(torch.randn(16, 3, generator=_gen(27), dtype=F64)))
    noisy = R + 1e-6 * torch.randn(16, 3, 3, generator=_gen(28), dtype=F64)
    q = matrix_to_quat(noisy)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(16, dtype=F64))
    assert (quat_to_matrix(q) - R).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------------
# gradients (float64 gradcheck, including exactly zero rotation)


def _points() -> list[torch.Tensor]:
    """Tangent points [tau, phi] for gradcheck: 0, all entries 1e-9, small, generic, near pi."""
    g = _gen(29)
    generic = torch.randn(2, 6, generator=g, dtype=F64)
    near_pi = torch.cat([torch.randn(1, 3, generator=g, dtype=F64), torch.tensor([[0.0, 0.0, 3.0]], dtype=F64)], -1)
    return [
        torch.zeros(2, 6, dtype=F64),
        torch.full((2, 6), 1e-9, dtype=F64),
        0.02 * generic,
        generic,
        near_pi,
    ]


POINT_IDS = ["zero", "1e-9", "small", "generic", "near_pi"]


def _gc(fn, *inputs) -> bool:
    inputs = tuple(x.detach().clone().requires_grad_() for x in inputs)
    return gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("x", _points(), ids=POINT_IDS)
def test_gradcheck_se3(x):
    xi = x
    T = se3_exp(xi)
    T2 = se3_exp(xi.flip(0) + 0.1)
    p = torch.randn(2, 3, generator=_gen(30), dtype=F64)
    assert _gc(se3_exp, xi)
    assert _gc(se3_log, T)
    assert _gc(se3_act, T, p)
    assert _gc(se3_mul, T, T2)
    assert _gc(se3_inv, T)
    assert _gc(se3_adjoint, T)
    assert _gc(se3_matrix, T)




@pytest.mark.parametrize("x", _points(), ids=POINT_IDS)
def test_gradcheck_so3_and_quaternions(x):
    phi = x[..., 3:6]
    assert _gc(so3_exp, phi)
    assert _gc(so3_log, so3_exp(phi))
    assert _gc(matrix_to_quat, quat_to_matrix(so3_exp(phi)))


def test_exp_gradient_at_zero_is_exact():
    """d exp(xi)/d xi at 0: translation part = I, quaternion vector part = I/2, qw 0."""
    J = torch.autograd.functional.jacobian(se3_exp, torch.zeros(6, dtype=F64))
    expected = torch.zeros(7, 6, dtype=F64)
    expected[:3, :3] = torch.eye(3)
    expected[3:6, 3:6] = 0.5 * torch.eye(3)
    torch.testing.assert_close(J, expected, atol=0, rtol=0)
    J_log = torch.autograd.functional.jacobian(se3_log, se3_identity(dtype=F64))
    expected_log = torch.zeros(6, 7, dtype=F64)
    expected_log[:3, :3] = torch.eye(3)
    expected_log[3:, 3:6] = 2.0 * torch.eye(3)
    torch.testing.assert_close(J_log, expected_log, atol=0, rtol=0)


# --------------------------------------------------------------------------------------------------
# pypose 0.9.5 cross-check (forward only: its SE3 gradients are known to be wrong)


def test_se3_forward_matches_pypose():
    xi = _tangent(32, 2.0)
    xi[:8] = _tangent(8, 1e-7)
    T = se3_exp(xi)
    A = se3_random(32, generator=_gen(32), dtype=F64)
    p = torch.randn(32, 3, generator=_gen(33), dtype=F64)
    torch.testing.assert_close(se3_exp(xi), pp.se3(xi).Exp().tensor())
    torch.testing.assert_close(se3_log(T), pp.SE3(T).Log().tensor())
    torch.testing.assert_close(se3_inv(T), pp.SE3(T).Inv().tensor())
    torch.testing.assert_close(se3_act(T, p), pp.SE3(T).Act(p))
    torch.testing.assert_close(se3_mul(A, T), (pp.SE3(A) * pp.SE3(T)).tensor())
    torch.testing.assert_close(se3_matrix(T), pp.SE3(T).matrix())




# --------------------------------------------------------------------------------------------------
# random, classes, errors


def test_random_respects_scales_and_generator():
    T = se3_random(1000, rot_scale=0.3, trans_scale=2.0, generator=_gen(36), dtype=F64)
    assert (se3_log(T)[..., 3:].norm(dim=-1) <= 0.3 + 1e-12).all()
    assert (T[..., :3].norm(dim=-1) <= 2.0 + 1e-12).all()
    torch.testing.assert_close(T[..., 3:].norm(dim=-1), torch.ones(1000, dtype=F64))
    torch.testing.assert_close(
        T, se3_random(1000, rot_scale=0.3, trans_scale=2.0, generator=_gen(36), dtype=F64)
    )
    assert se3_random(10, generator=_gen(37)).dtype == torch.get_default_dtype()


def test_class_facade_matches_functions():
    xi = _tangent(4, 1.0)
    T = SE3.exp(xi)
    U = SE3.random(4, generator=_gen(38), dtype=F64)
    p = torch.randn(4, 3, dtype=F64)
    assert T.shape == (4,)
    torch.testing.assert_close(T.log(), se3_log(T.data))
    torch.testing.assert_close((T * U).data, se3_mul(T.data, U.data))
    torch.testing.assert_close(T.inv().data, se3_inv(T.data))
    torch.testing.assert_close(T.act(p), se3_act(T.data, p))
    torch.testing.assert_close(T.adj(), se3_adjoint(T.data))
    torch.testing.assert_close(SE3.from_matrix(T.matrix()).matrix(), T.matrix())
    torch.testing.assert_close(T.translation(), T.data[..., :3])
    torch.testing.assert_close(T.quaternion(), T.data[..., 3:])
    assert T[1:3].shape == (2,)
    assert T[..., 0].shape == ()
    torch.testing.assert_close(T[2].data, T.data[2])
    assert SE3.identity(2, 3).shape == (2, 3)
    with pytest.raises(TypeError):
        T * p  # noqa: B018


@pytest.mark.parametrize(
    ("fn", "args", "name"),
    [
        (se3_exp, (torch.zeros(4, 5),), "xi"),
        (se3_log, (torch.zeros(8),), "T"),
        (se3_mul, (torch.zeros(7), torch.zeros(8)), "B"),
        (se3_act, (torch.zeros(7), torch.zeros(4)), "p"),
        (se3_adjoint, (torch.zeros(6),), "T"),
        (quat_to_matrix, (torch.zeros(3),), "q"),
        (matrix_to_quat, (torch.zeros(4, 4),), "R"),
        (se3_from_matrix, (torch.zeros(3, 3),), "M"),
        (so3_exp, (torch.zeros(2, 4),), "phi"),
        (SE3, (torch.zeros(8),), "data"),
    ],
)
def test_wrong_shapes_raise_shape_error_naming_the_argument(fn, args, name):
    with pytest.raises(ShapeError, match=rf"^{name}: expected \(\.\.\., [0-9, ]+\), got \("):
        fn(*args)


def test_non_broadcastable_and_non_float_inputs_raise_shape_error():
    with pytest.raises(ShapeError, match=r"A \(4, 7\) and B \(3, 7\)"):
        se3_mul(torch.zeros(4, 7), torch.zeros(3, 7))
    with pytest.raises(ShapeError, match="xi: expected a floating-point tensor"):
        se3_exp(torch.zeros(2, 6, dtype=torch.int64))
    with pytest.raises(ShapeError, match="xi: expected a torch.Tensor"):
        lie.se3_exp([0.0] * 6)
