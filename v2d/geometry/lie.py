"""SE3 as plain tensors in lietorch's layout, with a thin lietorch-style class facade.

Layouts (all ops broadcast over leading dims; device and dtype come from the inputs):

- quaternion `(..., 4)` = [qx, qy, qz, qw] (Hamilton, unit norm, xyzw order as lietorch/scipy).
- SE3 `(..., 7)` = [tx, ty, tz, qx, qy, qz, qw]; action T * p = R p + t.
- SE3 tangent `(..., 6)` = [tau, phi]: tau the translation part, phi the rotation (lietorch order).

The exponential is the true group exponential of the 4x4 hat matrix [[phi^, tau], [0, 0]], so the
translation is V(phi) tau, not tau itself.

Numerics: every coefficient that is 0/0 at zero rotation has a Taylor branch chosen with
`torch.where`. The branch that is not used still runs and still receives a (zero) gradient, and
0 * inf = NaN, so each branch is fed inputs that are safe for it (the classic torch.where trap).
Thresholds are chosen where the Taylor truncation error and the cancellation error of the closed
form are both small; measured against 40-digit mpmath (float64), every coefficient is within 5e-14
relative. Exact zero rotation gives exact first derivatives.

Similarity transforms (Sim3) are not here: trajectory alignment uses evo's Umeyama, and nothing
else in the project composes similarities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from v2d.geometry.checks import check_broadcast, check_trailing

__all__ = [
    "SE3",
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
    "skew",
    "so3_exp",
    "so3_log",
]

# Below this squared angle (rad^2) the rotation coefficients use their Taylor series. The series are
# kept to enough terms that truncation is < 1e-16 at the threshold, while the closed forms lose at
# most ~eps/theta^2 ~ 2e-14 (relative) to cancellation just above it.
_SMALL_THETA2 = 1e-2


# --------------------------------------------------------------------------------------------------
# argument helpers


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
    check_trailing("v", v, 3)
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], dim=-1).unflatten(-1, (3, 3))


def quat_to_matrix(q: Tensor) -> Tensor:
    """Rotation matrix of a unit quaternion [qx, qy, qz, qw].

    Shapes:
        q: (..., 4) -> (..., 3, 3)
    """
    check_trailing("q", q, 4)
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
    check_trailing("R", R, 3, 3)
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
    check_trailing("a", a, 4)
    check_trailing("b", b, 4)
    check_broadcast("a", a, "b", b)
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
    check_trailing("q", q, 4)
    return torch.cat([-q[..., :3], q[..., 3:]], dim=-1)


def so3_exp(phi: Tensor) -> Tensor:
    """Unit quaternion of the rotation vector phi (angle |phi| about phi / |phi|).

    Shapes:
        phi: (..., 3) -> (..., 4)
    """
    check_trailing("phi", phi, 3)
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
    check_trailing("q", q, 4)
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
    check_trailing("xi", xi, 6)
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
    check_trailing("T", T, 7)
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
    check_trailing("T", T, 7)
    qi = quat_conj(T[..., 3:])
    return torch.cat([-_quat_rotate(qi, T[..., :3]), qi], dim=-1)


def se3_mul(A: Tensor, B: Tensor) -> Tensor:
    """Group product A * B (apply B, then A).

    Shapes:
        A: (..., 7), B: (..., 7) -> (..., 7) (leading dims broadcast)
    """
    check_trailing("A", A, 7)
    check_trailing("B", B, 7)
    check_broadcast("A", A, "B", B)
    qa = A[..., 3:]
    t = _quat_rotate(qa, B[..., :3]) + A[..., :3]
    return torch.cat([t, quat_mul(qa, B[..., 3:])], dim=-1)


def se3_act(T: Tensor, p: Tensor) -> Tensor:
    """Transform points: R p + t.

    Shapes:
        T: (..., 7), p: (..., 3) -> (..., 3) (leading dims broadcast; for points (..., P, 3) pass
        T[..., None, :])
    """
    check_trailing("T", T, 7)
    check_trailing("p", p, 3)
    check_broadcast("T", T, "p", p)
    return _quat_rotate(T[..., 3:], p) + T[..., :3]


def se3_adjoint(T: Tensor) -> Tensor:
    """Adjoint matrix: T exp(xi) T^-1 = exp(Adj(T) xi), Adj = [[R, t^ R], [0, R]] for xi = [tau, phi].

    Shapes:
        T: (..., 7) -> (..., 6, 6)
    """
    check_trailing("T", T, 7)
    R = quat_to_matrix(T[..., 3:])
    tR = skew(T[..., :3]) @ R
    zero = torch.zeros_like(R)
    return torch.cat([torch.cat([R, tR], dim=-1), torch.cat([zero, R], dim=-1)], dim=-2)


def se3_matrix(T: Tensor) -> Tensor:
    """Homogeneous 4x4 matrix [[R, t], [0, 1]].

    Shapes:
        T: (..., 7) -> (..., 4, 4)
    """
    check_trailing("T", T, 7)
    top = torch.cat([quat_to_matrix(T[..., 3:]), T[..., :3].unsqueeze(-1)], dim=-1)
    bottom = torch.zeros_like(top[..., :1, :])
    bottom[..., 0, 3] = 1.0
    return torch.cat([top, bottom], dim=-2)


def se3_from_matrix(M: Tensor) -> Tensor:
    """Pose from a homogeneous matrix (the rotation block must be a rotation; it is not projected).

    Shapes:
        M: (..., 4, 4) or (..., 3, 4) -> (..., 7)
    """
    if isinstance(M, Tensor) and M.dim() >= 2 and tuple(M.shape[-2:]) == (3, 4):
        check_trailing("M", M, 3, 4)
    else:
        check_trailing("M", M, 4, 4)
    return torch.cat([M[..., :3, 3], matrix_to_quat(M[..., :3, :3])], dim=-1)


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
    shape = _shape_arg(shape)
    kw = {"generator": generator, "dtype": dtype, "device": device}
    axis = torch.randn(*shape, 3, **kw)
    axis = axis / axis.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    angle = torch.rand(*shape, 1, **kw) * rot_scale
    direction = torch.randn(*shape, 3, **kw)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    t = direction * torch.rand(*shape, 1, **kw) * trans_scale
    return torch.cat([t, so3_exp(axis * angle)], dim=-1)


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
        self.data = check_trailing("data", data, 7)

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

