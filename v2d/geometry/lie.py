"""SE3 and Sim3 as plain tensors in lietorch's layout, with a thin lietorch-style class facade.

Layouts (all ops broadcast over leading dims; device and dtype come from the inputs):

- quaternion `(..., 4)` = [qx, qy, qz, qw] (Hamilton, unit norm, xyzw order as lietorch/scipy).
- SE3 `(..., 7)` = [tx, ty, tz, qx, qy, qz, qw]; action T * p = R p + t.
- SE3 tangent `(..., 6)` = [tau, phi]: tau the translation part, phi the rotation (lietorch order).
- Sim3 `(..., 8)` = [tx, ty, tz, qx, qy, qz, qw, s] with s > 0; action S * p = s R p + t.
- Sim3 tangent `(..., 7)` = [tau, phi, sigma] with s = exp(sigma).

The exponentials are the true group exponentials of the 4x4 hat matrices
[[phi^, tau], [0, 0]] (SE3) and [[phi^ + sigma I, tau], [0, 0]] (Sim3), so the translation is
V(phi) tau (SE3) or W(phi, sigma) tau (Sim3), not tau itself.

Numerics: every coefficient that is 0/0 at zero rotation (or zero sigma) has a Taylor branch chosen
with `torch.where`. The branch that is not used still runs and still receives a (zero) gradient, and
0 * inf = NaN, so each branch is fed inputs that are safe for it (the classic torch.where trap).
Thresholds are chosen where the Taylor truncation error and the cancellation error of the closed
form are both small; measured against 40-digit mpmath (float64), every coefficient is within 3e-14
relative except Sim3's C just above the switch (1.1e-13, a term that is then multiplied by
theta^2 ~ 1e-2). Exact zero rotation and exact zero sigma give exact first derivatives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from kernels.errors import ShapeError

__all__ = [
    "SE3",
    "Sim3",
    "matrix_to_quat",
    "quat_conj",
    "quat_mul",
    "quat_to_matrix",
    "se3_act",
    "se3_adjoint",
    "se3_exp",
    "se3_from_matrix",
    "se3_identity",
    "se3_inv",
    "se3_log",
    "se3_matrix",
    "se3_mul",
    "se3_random",
    "se3_to_sim3",
    "sim3_act",
    "sim3_adjoint",
    "sim3_exp",
    "sim3_from_matrix",
    "sim3_identity",
    "sim3_inv",
    "sim3_log",
    "sim3_matrix",
    "sim3_mul",
    "sim3_random",
    "sim3_to_se3",
    "skew",
    "so3_exp",
    "so3_log",
]

# Below this squared angle (rad^2) the rotation coefficients use their Taylor series. The series are
# kept to enough terms that truncation is < 1e-16 at the threshold, while the closed forms lose at
# most ~eps/theta^2 ~ 2e-14 (relative) to cancellation just above it.
_SMALL_THETA2 = 1e-2
# Below this |sigma| the Sim3 scale moments g_k(sigma) use their power series (18 terms: truncation
# < 1e-17 for |sigma| < 1); above it the closed-form recursion amplifies rounding by at most k!/|sigma|^k.
_SMALL_SIGMA = 1.0
# The Sim3 closed forms for B and C cancel more (relative error ~6 eps/theta^2 in C, ~eps/theta in
# its gradients), which float32 feels just above 1e-2; its series (to theta^6) stays < 1e-9 up to
# theta^2 = 0.25, so lower precisions switch there instead (measured: float32 Jacobian error vs
# float64 drops from 1.5e-5 to the float32 floor).
_SMALL_THETA2_SIM3_LOWP = 0.25
_MOMENT_TERMS = 18
_MAX_MOMENT = 8


# --------------------------------------------------------------------------------------------------
# validation helpers


def _check(name: str, x: object, *trailing: int) -> Tensor:
    """`x` must be a floating tensor whose trailing dims are `trailing`; returns it."""
    want = "(..., " + ", ".join(str(n) for n in trailing) + ")"
    if not isinstance(x, Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor {want}, got {type(x).__name__}")
    if x.dim() < len(trailing) or tuple(x.shape[-len(trailing) :]) != trailing:
        raise ShapeError(f"{name}: expected {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ShapeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def _check_broadcast(name_a: str, a: Tensor, name_b: str, b: Tensor, ndim: int = 1) -> None:
    """Leading dims (all but the last `ndim`) of `a` and `b` must broadcast."""
    try:
        torch.broadcast_shapes(a.shape[:-ndim], b.shape[:-ndim])
    except RuntimeError:
        raise ShapeError(
            f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)}: leading dims do not broadcast"
        ) from None


def _shape_arg(shape: tuple) -> tuple[int, ...]:
    """Accept both f(2, 3) and f((2, 3)) like torch.zeros."""
    if len(shape) == 1 and isinstance(shape[0], tuple | list):
        return tuple(shape[0])
    return tuple(shape)


# --------------------------------------------------------------------------------------------------
# small vector helpers


def _cross(a: Tensor, b: Tensor) -> Tensor:
    # Written out (not torch.linalg.cross) so leading dims broadcast freely and autograd stays simple.
    ax, ay, az = a.unbind(-1)
    bx, by, bz = b.unbind(-1)
    return torch.stack([ay * bz - az * by, az * bx - ax * bz, ax * by - ay * bx], dim=-1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _horner(x: Tensor, coeffs: Sequence[float]) -> Tensor:
    """sum_k coeffs[k] x^k."""
    out = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        out = out * x + c
    return out


def _quat_rotate(q: Tensor, p: Tensor) -> Tensor:
    """R(q) p for unit q without forming R: p + w u + v x u with u = 2 v x p."""
    v, w = q[..., :3], q[..., 3:]
    u = 2.0 * _cross(v, p)
    return p + w * u + _cross(v, u)


# --------------------------------------------------------------------------------------------------
# SO3 / quaternions


def skew(v: Tensor) -> Tensor:
    """Cross-product matrix: skew(v) @ p = v x p.

    Shapes:
        v: (..., 3) -> (..., 3, 3)
    """
    _check("v", v, 3)
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).unflatten(-1, (3, 3))


def quat_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrix of a unit quaternion [qx, qy, qz, qw].

    Shapes:
        q: (..., 4) -> (..., 3, 3)
    """
    _check("q", q, 4)
    x, y, z, w = q.unbind(-1)
    xx, yy, zz = x * x, y * y, z * z
    xy, xz, yz = x * y, x * z, y * z
    wx, wy, wz = w * x, w * y, w * z
    rows = [
        1 - 2 * (yy + zz), 2 * (xy - wz), 2 * (xz + wy),
        2 * (xy + wz), 1 - 2 * (xx + zz), 2 * (yz - wx),
        2 * (xz - wy), 2 * (yz + wx), 1 - 2 * (xx + yy),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).unflatten(-1, (3, 3))


def matrix_to_quat(R: Tensor) -> Tensor:
    """Unit quaternion [qx, qy, qz, qw] of a rotation matrix, with qw >= 0.

    Shepperd's method: of the four ways to read the quaternion off R, use the one whose pivot
    component is largest, so no rotation (including 180 degrees, where qw = 0) divides by a small
    number. The result is normalised, so slightly non-orthonormal input is tolerated.

    Shapes:
        R: (..., 3, 3) -> (..., 4)
    """
    _check("R", R, 3, 3)
    r00, r01, r02, r10, r11, r12, r20, r21, r22 = R.flatten(-2).unbind(-1)
    # d_k = 4 * (pivot component)^2 for the pivots w, x, y, z; they sum to 4, so the largest is >= 1.
    d = torch.stack(
        [1 + r00 + r11 + r22, 1 + r00 - r11 - r22, 1 - r00 + r11 - r22, 1 - r00 - r11 + r22], dim=-1
    )
    # Numerators of each candidate in xyzw order; candidate k = rows[k] / (2 sqrt(d_k)).
    rows = torch.stack(
        [
            torch.stack([r21 - r12, r02 - r20, r10 - r01, d[..., 0]], dim=-1),
            torch.stack([d[..., 1], r01 + r10, r02 + r20, r21 - r12], dim=-1),
            torch.stack([r01 + r10, d[..., 2], r12 + r21, r02 - r20], dim=-1),
            torch.stack([r02 + r20, r12 + r21, d[..., 3], r10 - r01], dim=-1),
        ],
        dim=-2,
    )
    # The clamp only touches candidates that are never selected (selected d_k >= 1); it keeps their
    # sqrt and division finite so their zero gradient does not turn into NaN.
    cand = rows / (2.0 * d.clamp(min=0.1).sqrt()).unsqueeze(-1)
    best = d.argmax(dim=-1, keepdim=True)
    q = torch.gather(cand, -2, best.unsqueeze(-1).expand(*best.shape, 4)).squeeze(-2)
    q = q / q.norm(dim=-1, keepdim=True)
    return torch.where(q[..., 3:] < 0, -q, q)


def quat_mul(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a * b (rotation by b, then by a).

    Shapes:
        a: (..., 4), b: (..., 4) -> (..., 4) (leading dims broadcast)
    """
    _check("a", a, 4)
    _check("b", b, 4)
    _check_broadcast("a", a, "b", b)
    ax, ay, az, aw = a.unbind(-1)
    bx, by, bz, bw = b.unbind(-1)
    return torch.stack(
        [
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
            aw * bw - ax * bx - ay * by - az * bz,
        ],
        dim=-1,
    )


def quat_conj(q: Tensor) -> Tensor:
    """Conjugate [-qx, -qy, -qz, qw] (the inverse of a unit quaternion).

    Shapes:
        q: (..., 4) -> (..., 4)
    """
    _check("q", q, 4)
    return torch.cat([-q[..., :3], q[..., 3:]], dim=-1)


def so3_exp(phi: Tensor) -> Tensor:
    """Unit quaternion of the rotation vector phi (angle |phi| about phi / |phi|).

    Shapes:
        phi: (..., 3) -> (..., 4)
    """
    _check("phi", phi, 3)
    theta2 = _dot(phi, phi)
    small = theta2 < _SMALL_THETA2
    t2 = torch.where(small, theta2, 0.0)
    # sin(theta/2)/theta and cos(theta/2) as series in theta^2 (next terms < 1e-17 at the threshold).
    k_small = _horner(t2, [1 / 2, -1 / 48, 1 / 3840, -1 / 645120, 1 / 185794560])
    w_small = _horner(t2, [1.0, -1 / 8, 1 / 384, -1 / 46080, 1 / 10321920])
    theta = torch.where(small, 1.0, theta2).sqrt()
    k_big = torch.sin(0.5 * theta) / theta
    w_big = torch.cos(0.5 * theta)
    k = torch.where(small, k_small, k_big)
    w = torch.where(small, w_small, w_big)
    return torch.cat([k.unsqueeze(-1) * phi, w.unsqueeze(-1)], dim=-1)


def so3_log(q: Tensor) -> Tensor:
    """Rotation vector of a quaternion, angle in [0, pi] (q and -q give the same result).

    Shapes:
        q: (..., 4) -> (..., 3)
    """
    _check("q", q, 4)
    q = torch.where(q[..., 3:] < 0, -q, q)
    v, w = q[..., :3], q[..., 3]
    n2 = _dot(v, v)
    # phi = 2 atan2(n, w) / n * v. With x = n / w small: 2/w * atan(x)/x, a series in x^2 (w > 0 there).
    small = n2 < _SMALL_THETA2 * w * w
    w_s = torch.where(small, w, 1.0)
    x2 = torch.where(small, n2, 0.0) / (w_s * w_s)
    k_small = 2.0 / w_s * _horner(x2, [(-1) ** i / (2 * i + 1) for i in range(9)])
    n = torch.where(small, 1.0, n2).sqrt()
    k_big = 2.0 * torch.atan2(n, w) / n
    k = torch.where(small, k_small, k_big)
    return k.unsqueeze(-1) * v


def _so3_coeffs(theta2: Tensor) -> tuple[Tensor, Tensor]:
    """B = (1 - cos t)/t^2 and C = (t - sin t)/t^3 of V = I + B phi^ + C phi^2 (t = |phi|)."""
    small = theta2 < _SMALL_THETA2
    t2 = torch.where(small, theta2, 0.0)
    b_small = _horner(t2, [1 / 2, -1 / 24, 1 / 720, -1 / 40320, 1 / 3628800])
    c_small = _horner(t2, [1 / 6, -1 / 120, 1 / 5040, -1 / 362880, 1 / 39916800])
    t2b = torch.where(small, 1.0, theta2)
    theta = t2b.sqrt()
    # 1 - cos t = 2 sin^2(t/2) avoids one cancellation; (t - sin t) keeps ~eps/t^2 relative error.
    b_big = 2.0 * torch.sin(0.5 * theta) ** 2 / t2b
    c_big = (theta - torch.sin(theta)) / (t2b * theta)
    return torch.where(small, b_small, b_big), torch.where(small, c_small, c_big)


def _so3_vinv_coeff(theta2: Tensor) -> Tensor:
    """D of V^-1 = I - phi^/2 + D phi^2: D = (1 - (t/2) cot(t/2)) / t^2."""
    small = theta2 < _SMALL_THETA2
    t2 = torch.where(small, theta2, 0.0)
    d_small = _horner(t2, [1 / 12, 1 / 720, 1 / 30240, 1 / 1209600, 1 / 47900160])
    t2b = torch.where(small, 1.0, theta2)
    half = 0.5 * t2b.sqrt()
    d_big = (1.0 - half * torch.cos(half) / torch.sin(half)) / t2b
    return torch.where(small, d_small, d_big)


# --------------------------------------------------------------------------------------------------
# SE3


def se3_identity(
    *shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Identity poses.

    Shapes:
        -> (*shape, 7)
    """
    out = torch.zeros(*_shape_arg(shape), 7, dtype=dtype, device=device)
    out[..., 6] = 1.0
    return out


def se3_exp(xi: Tensor) -> Tensor:
    """Group exponential: t = V(phi) tau, q = so3_exp(phi).

    Shapes:
        xi: (..., 6) = [tau, phi] -> (..., 7)
    """
    _check("xi", xi, 6)
    tau, phi = xi[..., :3], xi[..., 3:]
    b, c = _so3_coeffs(_dot(phi, phi))
    phi_tau = _cross(phi, tau)
    t = tau + b.unsqueeze(-1) * phi_tau + c.unsqueeze(-1) * _cross(phi, phi_tau)
    return torch.cat([t, so3_exp(phi)], dim=-1)


def se3_log(T: Tensor) -> Tensor:
    """Group logarithm (inverse of se3_exp for rotation angles in [0, pi]).

    Shapes:
        T: (..., 7) -> (..., 6) = [tau, phi]
    """
    _check("T", T, 7)
    t, q = T[..., :3], T[..., 3:]
    phi = so3_log(q)
    d = _so3_vinv_coeff(_dot(phi, phi))
    phi_t = _cross(phi, t)
    tau = t - 0.5 * phi_t + d.unsqueeze(-1) * _cross(phi, phi_t)
    return torch.cat([tau, phi], dim=-1)


def se3_inv(T: Tensor) -> Tensor:
    """Inverse pose: q^-1 and -R^T t.

    Shapes:
        T: (..., 7) -> (..., 7)
    """
    _check("T", T, 7)
    qi = quat_conj(T[..., 3:])
    return torch.cat([-_quat_rotate(qi, T[..., :3]), qi], dim=-1)


def se3_mul(A: Tensor, B: Tensor) -> Tensor:
    """Group product A * B (apply B, then A).

    Shapes:
        A: (..., 7), B: (..., 7) -> (..., 7) (leading dims broadcast)
    """
    _check("A", A, 7)
    _check("B", B, 7)
    _check_broadcast("A", A, "B", B)
    qa = A[..., 3:]
    t = _quat_rotate(qa, B[..., :3]) + A[..., :3]
    return torch.cat([t, quat_mul(qa, B[..., 3:])], dim=-1)


def se3_act(T: Tensor, p: Tensor) -> Tensor:
    """Transform points: R p + t.

    Shapes:
        T: (..., 7), p: (..., 3) -> (..., 3) (leading dims broadcast; for points (..., P, 3) pass
        T[..., None, :])
    """
    _check("T", T, 7)
    _check("p", p, 3)
    _check_broadcast("T", T, "p", p)
    return _quat_rotate(T[..., 3:], p) + T[..., :3]


def se3_adjoint(T: Tensor) -> Tensor:
    """Adjoint matrix: T exp(xi) T^-1 = exp(Adj(T) xi), Adj = [[R, t^ R], [0, R]] for xi = [tau, phi].

    Shapes:
        T: (..., 7) -> (..., 6, 6)
    """
    _check("T", T, 7)
    R = quat_to_matrix(T[..., 3:])
    tR = skew(T[..., :3]) @ R
    zero = torch.zeros_like(R)
    return torch.cat([torch.cat([R, tR], dim=-1), torch.cat([zero, R], dim=-1)], dim=-2)


def se3_matrix(T: Tensor) -> Tensor:
    """Homogeneous 4x4 matrix [[R, t], [0, 1]].

    Shapes:
        T: (..., 7) -> (..., 4, 4)
    """
    _check("T", T, 7)
    return _homogeneous(quat_to_matrix(T[..., 3:]), T[..., :3])


def se3_from_matrix(M: Tensor) -> Tensor:
    """Pose from a homogeneous matrix (the rotation block must be a rotation; it is not projected).

    Shapes:
        M: (..., 4, 4) or (..., 3, 4) -> (..., 7)
    """
    if isinstance(M, Tensor) and M.dim() >= 2 and tuple(M.shape[-2:]) == (3, 4):
        _check("M", M, 3, 4)
    else:
        _check("M", M, 4, 4)
    return torch.cat([M[..., :3, 3], matrix_to_quat(M[..., :3, :3])], dim=-1)


def _random_rotation_translation(
    shape: tuple[int, ...],
    rot_scale: float,
    trans_scale: float,
    generator: torch.Generator | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> tuple[Tensor, Tensor]:
    kw = {"generator": generator, "dtype": dtype, "device": device}
    axis = torch.randn(*shape, 3, **kw)
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    angle = torch.rand(*shape, 1, **kw) * rot_scale
    direction = torch.randn(*shape, 3, **kw)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    t = direction * torch.rand(*shape, 1, **kw) * trans_scale
    return t, so3_exp(axis * angle)


def se3_random(
    *shape: int,
    rot_scale: float = math.pi,
    trans_scale: float = 1.0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random poses for tests and synthetic data.

    Distribution: rotation axis uniform on the sphere, rotation angle uniform in [0, rot_scale] rad
    (so not Haar-uniform); translation direction uniform on the sphere, its norm uniform in
    [0, trans_scale].

    Shapes:
        -> (*shape, 7)
    """
    t, q = _random_rotation_translation(_shape_arg(shape), rot_scale, trans_scale, generator, dtype, device)
    return torch.cat([t, q], dim=-1)


def _homogeneous(A: Tensor, t: Tensor) -> Tensor:
    """[[A, t], [0, 0, 0, 1]] from A (..., 3, 3) and t (..., 3)."""
    top = torch.cat([A, t.unsqueeze(-1)], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


# --------------------------------------------------------------------------------------------------
# Sim3


def _exp_moments(sigma: Tensor) -> Tensor:
    """g_k(sigma) = int_0^1 t^k exp(sigma t) dt for k = 0.._MAX_MOMENT, stacked on the last dim.

    Power series sum_j sigma^j / (j! (k + j + 1)) for |sigma| < 1; else the stable-for-|sigma| >= 1
    recursion g_0 = expm1(sigma)/sigma, g_k = (e^sigma - k g_{k-1}) / sigma.
    """
    small = sigma.abs() < _SMALL_SIGMA
    s_small = torch.where(small, sigma, 0.0)
    powers = [torch.ones_like(sigma)]
    for j in range(1, _MOMENT_TERMS):
        powers.append(powers[-1] * s_small / j)
    j = torch.arange(_MOMENT_TERMS, dtype=sigma.dtype, device=sigma.device)
    k = torch.arange(_MAX_MOMENT + 1, dtype=sigma.dtype, device=sigma.device)
    weights = 1.0 / (j[:, None] + k[None, :] + 1.0)
    g_small = torch.stack(powers, dim=-1) @ weights

    s_big = torch.where(small, 2.0, sigma)
    e = torch.exp(s_big)
    g = [torch.expm1(s_big) / s_big]
    for kk in range(1, _MAX_MOMENT + 1):
        g.append((e - kk * g[-1]) / s_big)
    g_big = torch.stack(g, dim=-1)
    return torch.where(small.unsqueeze(-1), g_small, g_big)


def _sim3_coeffs(sigma: Tensor, theta2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A, B, C of W = A I + B phi^ + C phi^2 = int_0^1 exp(s (sigma I + phi^)) ds.

    A = g_0(sigma), B = int e^(sigma s) sin(theta s) / theta ds,
    C = int e^(sigma s) (1 - cos(theta s)) / theta^2 ds (integrals over s in [0, 1]).
    For small theta the sin/cos are expanded under the integral, giving series in theta^2 whose
    coefficients are the moments g_k(sigma) (next term < 1e-15 at the threshold). Otherwise closed
    forms, which have no singularity in sigma.
    """
    g = _exp_moments(sigma)
    g0, g1, g2, g3, g4, g5, g6, g7, g8 = g.unbind(-1)
    a = g0
    small = theta2 < (_SMALL_THETA2 if sigma.dtype == torch.float64 else _SMALL_THETA2_SIM3_LOWP)
    t2 = torch.where(small, theta2, 0.0)
    b_small = g1 - t2 * (g3 / 6 - t2 * (g5 / 120 - t2 * g7 / 5040))
    c_small = g2 / 2 - t2 * (g4 / 24 - t2 * (g6 / 720 - t2 * g8 / 40320))

    t2b = torch.where(small, 1.0, theta2)
    theta = t2b.sqrt()
    es, sn, cs = torch.exp(sigma), torch.sin(theta), torch.cos(theta)
    den = sigma * sigma + t2b
    b_big = (es * (sigma * sn - theta * cs) + theta) / (theta * den)
    int_cos = (es * (sigma * cs + theta * sn) - sigma) / den  # int_0^1 e^(sigma s) cos(theta s) ds
    c_big = (a - int_cos) / t2b
    return a, torch.where(small, b_small, b_big), torch.where(small, c_small, c_big)


def sim3_identity(
    *shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Tensor:
    """Identity similarities.

    Shapes:
        -> (*shape, 8)
    """
    out = torch.zeros(*_shape_arg(shape), 8, dtype=dtype, device=device)
    out[..., 6] = 1.0
    out[..., 7] = 1.0
    return out


def sim3_exp(xi: Tensor) -> Tensor:
    """Group exponential: t = W(phi, sigma) tau, q = so3_exp(phi), s = exp(sigma).

    Shapes:
        xi: (..., 7) = [tau, phi, sigma] -> (..., 8)
    """
    _check("xi", xi, 7)
    tau, phi, sigma = xi[..., :3], xi[..., 3:6], xi[..., 6]
    a, b, c = _sim3_coeffs(sigma, _dot(phi, phi))
    phi_tau = _cross(phi, tau)
    t = a.unsqueeze(-1) * tau + b.unsqueeze(-1) * phi_tau + c.unsqueeze(-1) * _cross(phi, phi_tau)
    return torch.cat([t, so3_exp(phi), torch.exp(sigma).unsqueeze(-1)], dim=-1)


def sim3_log(S: Tensor) -> Tensor:
    """Group logarithm (inverse of sim3_exp for rotation angles in [0, pi]).

    Shapes:
        S: (..., 8) -> (..., 7) = [tau, phi, sigma]
    """
    _check("S", S, 8)
    t, q, s = S[..., :3], S[..., 3:7], S[..., 7]
    phi = so3_log(q)
    sigma = torch.log(s)
    theta2 = _dot(phi, phi)
    a, b, c = _sim3_coeffs(sigma, theta2)
    # W^-1 = a' I + b' phi^ + c' phi^2 in closed form: W acts as A on the axis and as the complex
    # number w = (A - C theta^2) + i B theta in the plane orthogonal to it; |w| > 0 for theta < 2 pi.
    w2 = (a - c * theta2) ** 2 + b * b * theta2
    ai = 1.0 / a
    bi = -b / w2
    ci = (b * b - a * c + c * c * theta2) / (a * w2)
    phi_t = _cross(phi, t)
    tau = ai.unsqueeze(-1) * t + bi.unsqueeze(-1) * phi_t + ci.unsqueeze(-1) * _cross(phi, phi_t)
    return torch.cat([tau, phi, sigma.unsqueeze(-1)], dim=-1)


def sim3_inv(S: Tensor) -> Tensor:
    """Inverse similarity: q^-1, 1/s and -R^T t / s.

    Shapes:
        S: (..., 8) -> (..., 8)
    """
    _check("S", S, 8)
    qi = quat_conj(S[..., 3:7])
    si = 1.0 / S[..., 7:]
    return torch.cat([-si * _quat_rotate(qi, S[..., :3]), qi, si], dim=-1)


def sim3_mul(A: Tensor, B: Tensor) -> Tensor:
    """Group product A * B (apply B, then A).

    Shapes:
        A: (..., 8), B: (..., 8) -> (..., 8) (leading dims broadcast)
    """
    _check("A", A, 8)
    _check("B", B, 8)
    _check_broadcast("A", A, "B", B)
    qa, sa = A[..., 3:7], A[..., 7:]
    t = sa * _quat_rotate(qa, B[..., :3]) + A[..., :3]
    return torch.cat([t, quat_mul(qa, B[..., 3:7]), sa * B[..., 7:]], dim=-1)


def sim3_act(S: Tensor, p: Tensor) -> Tensor:
    """Transform points: s R p + t.

    Shapes:
        S: (..., 8), p: (..., 3) -> (..., 3) (leading dims broadcast)
    """
    _check("S", S, 8)
    _check("p", p, 3)
    _check_broadcast("S", S, "p", p)
    return S[..., 7:] * _quat_rotate(S[..., 3:7], p) + S[..., :3]


def sim3_adjoint(S: Tensor) -> Tensor:
    """Adjoint matrix: S exp(xi) S^-1 = exp(Adj(S) xi) for xi = [tau, phi, sigma].

    Adj = [[s R, t^ R, -t], [0, R, 0], [0, 0, 1]].

    Shapes:
        S: (..., 8) -> (..., 7, 7)
    """
    _check("S", S, 8)
    t, s = S[..., :3], S[..., 7:]
    R = quat_to_matrix(S[..., 3:7])
    top = torch.cat([s.unsqueeze(-1) * R, skew(t) @ R, -t.unsqueeze(-1)], dim=-1)
    zero3 = torch.zeros_like(R)
    zcol = torch.zeros_like(t).unsqueeze(-1)
    mid = torch.cat([zero3, R, zcol], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 6] = 1.0
    return torch.cat([top, mid, bottom], dim=-2)


def sim3_matrix(S: Tensor) -> Tensor:
    """Homogeneous 4x4 matrix [[s R, t], [0, 1]].

    Shapes:
        S: (..., 8) -> (..., 4, 4)
    """
    _check("S", S, 8)
    return _homogeneous(S[..., 7:].unsqueeze(-1) * quat_to_matrix(S[..., 3:7]), S[..., :3])


def sim3_from_matrix(M: Tensor) -> Tensor:
    """Similarity from a homogeneous matrix [[s R, t], [0, 1]]; s = |sR|_F / sqrt(3).

    Shapes:
        M: (..., 4, 4) or (..., 3, 4) -> (..., 8)
    """
    if isinstance(M, Tensor) and M.dim() >= 2 and tuple(M.shape[-2:]) == (3, 4):
        _check("M", M, 3, 4)
    else:
        _check("M", M, 4, 4)
    sR = M[..., :3, :3]
    s = sR.square().sum(dim=(-2, -1)).div(3.0).sqrt()
    q = matrix_to_quat(sR / s[..., None, None])
    return torch.cat([M[..., :3, 3], q, s.unsqueeze(-1)], dim=-1)


def sim3_random(
    *shape: int,
    rot_scale: float = math.pi,
    trans_scale: float = 1.0,
    sigma_scale: float = 0.5,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random similarities for tests and synthetic data.

    Distribution: rotation and translation as `se3_random`; log-scale sigma uniform in
    [-sigma_scale, sigma_scale], s = exp(sigma).

    Shapes:
        -> (*shape, 8)
    """
    shape_t = _shape_arg(shape)
    t, q = _random_rotation_translation(shape_t, rot_scale, trans_scale, generator, dtype, device)
    sigma = (
        2.0 * torch.rand(*shape_t, 1, generator=generator, dtype=dtype, device=device) - 1.0
    ) * sigma_scale
    return torch.cat([t, q, torch.exp(sigma)], dim=-1)


def se3_to_sim3(T: Tensor) -> Tensor:
    """Append scale 1.

    Shapes:
        T: (..., 7) -> (..., 8)
    """
    _check("T", T, 7)
    return torch.cat([T, torch.ones_like(T[..., :1])], dim=-1)


def sim3_to_se3(S: Tensor) -> Tensor:
    """Drop the scale (translation and rotation are kept as they are).

    Shapes:
        S: (..., 8) -> (..., 7)
    """
    _check("S", S, 8)
    return S[..., :7]


# --------------------------------------------------------------------------------------------------
# class facade (lietorch style); each method is one call into the functions above


def _index_leading(data: Tensor, index: object) -> Tensor:
    # Appending a full slice keeps the group dim whatever the index (ints, slices, Ellipsis, masks).
    idx = index if isinstance(index, tuple) else (index,)
    return data[(*idx, slice(None))]


class SE3:
    """Batch of SE3 elements stored as `data` (..., 7) = [t, q] (lietorch layout)."""

    __slots__ = ("data",)

    def __init__(self, data: Tensor) -> None:
        self.data = _check("data", data, 7)

    @classmethod
    def exp(cls, xi: Tensor) -> SE3:
        """Shapes: xi (..., 6) -> (...)."""
        return cls(se3_exp(xi))

    @classmethod
    def identity(
        cls, *shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> SE3:
        return cls(se3_identity(*shape, dtype=dtype, device=device))

    @classmethod
    def random(
        cls,
        *shape: int,
        rot_scale: float = math.pi,
        trans_scale: float = 1.0,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> SE3:
        """Distribution as `se3_random`."""
        return cls(
            se3_random(
                *shape,
                rot_scale=rot_scale,
                trans_scale=trans_scale,
                generator=generator,
                dtype=dtype,
                device=device,
            )
        )

    @classmethod
    def from_matrix(cls, M: Tensor) -> SE3:
        return cls(se3_from_matrix(M))

    @property
    def shape(self) -> torch.Size:
        """Leading (batch) shape."""
        return self.data.shape[:-1]

    def log(self) -> Tensor:
        """Shapes: -> (..., 6)."""
        return se3_log(self.data)

    def inv(self) -> SE3:
        return SE3(se3_inv(self.data))

    def __mul__(self, other: object) -> SE3:
        if not isinstance(other, SE3):
            return NotImplemented
        return SE3(se3_mul(self.data, other.data))

    def act(self, p: Tensor) -> Tensor:
        """Shapes: p (..., 3) -> (..., 3)."""
        return se3_act(self.data, p)

    def adj(self) -> Tensor:
        """Shapes: -> (..., 6, 6)."""
        return se3_adjoint(self.data)

    def matrix(self) -> Tensor:
        """Shapes: -> (..., 4, 4)."""
        return se3_matrix(self.data)

    def translation(self) -> Tensor:
        """Shapes: -> (..., 3)."""
        return self.data[..., :3]

    def quaternion(self) -> Tensor:
        """Shapes: -> (..., 4) xyzw."""
        return self.data[..., 3:]

    def __getitem__(self, index: object) -> SE3:
        return SE3(_index_leading(self.data, index))

    def __repr__(self) -> str:
        return f"SE3(shape={tuple(self.shape)}, data={self.data})"


class Sim3:
    """Batch of Sim3 elements stored as `data` (..., 8) = [t, q, s] (lietorch layout)."""

    __slots__ = ("data",)

    def __init__(self, data: Tensor) -> None:
        self.data = _check("data", data, 8)

    @classmethod
    def exp(cls, xi: Tensor) -> Sim3:
        """Shapes: xi (..., 7) -> (...)."""
        return cls(sim3_exp(xi))

    @classmethod
    def identity(
        cls, *shape: int, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> Sim3:
        return cls(sim3_identity(*shape, dtype=dtype, device=device))

    @classmethod
    def random(
        cls,
        *shape: int,
        rot_scale: float = math.pi,
        trans_scale: float = 1.0,
        sigma_scale: float = 0.5,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Sim3:
        """Distribution as `sim3_random`."""
        return cls(
            sim3_random(
                *shape,
                rot_scale=rot_scale,
                trans_scale=trans_scale,
                sigma_scale=sigma_scale,
                generator=generator,
                dtype=dtype,
                device=device,
            )
        )

    @classmethod
    def from_matrix(cls, M: Tensor) -> Sim3:
        return cls(sim3_from_matrix(M))

    @property
    def shape(self) -> torch.Size:
        """Leading (batch) shape."""
        return self.data.shape[:-1]

    def log(self) -> Tensor:
        """Shapes: -> (..., 7)."""
        return sim3_log(self.data)

    def inv(self) -> Sim3:
        return Sim3(sim3_inv(self.data))

    def __mul__(self, other: object) -> Sim3:
        if not isinstance(other, Sim3):
            return NotImplemented
        return Sim3(sim3_mul(self.data, other.data))

    def act(self, p: Tensor) -> Tensor:
        """Shapes: p (..., 3) -> (..., 3)."""
        return sim3_act(self.data, p)

    def adj(self) -> Tensor:
        """Shapes: -> (..., 7, 7)."""
        return sim3_adjoint(self.data)

    def matrix(self) -> Tensor:
        """Shapes: -> (..., 4, 4)."""
        return sim3_matrix(self.data)

    def translation(self) -> Tensor:
        """Shapes: -> (..., 3)."""
        return self.data[..., :3]

    def quaternion(self) -> Tensor:
        """Shapes: -> (..., 4) xyzw."""
        return self.data[..., 3:7]

    def scale(self) -> Tensor:
        """Shapes: -> (...)."""
        return self.data[..., 7]

    def __getitem__(self, index: object) -> Sim3:
        return Sim3(_index_leading(self.data, index))

    def __repr__(self) -> str:
        return f"Sim3(shape={tuple(self.shape)}, data={self.data})"
