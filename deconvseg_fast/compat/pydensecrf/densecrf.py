"""``pydensecrf.densecrf`` with the same classes, arguments and numbers, on deconvseg_fast's lattice.

    import deconvseg_fast.compat.pydensecrf.densecrf as dcrf

    d = dcrf.DenseCRF2D(W, H, L)                 # note: width first, as in pydensecrf
    d.setUnaryEnergy(U)                          # float32, C-contiguous, shape (L, H*W)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)   # img: (H, W, 3) uint8
    Q = np.array(d.inference(10))                # (L, H*W) float32 marginals

What is reproduced from Krähenbühl's densecrf (the C++ library under pydensecrf), step for step:

- the features: ``DenseCRF2D.addPairwiseGaussian`` uses (x / sx, y / sy) and ``addPairwiseBilateral``
  (x / sx, y / sy, r / sr, g / sg, b / sb), x the column and y the row, pixel n = y * W + x, each
  divided in float32 like the C++ code;
- one permutohedral lattice per pairwise term, built when the term is added (``DenseKernel``'s
  constructor), including the up to three zero-feature "phantom" points densecrf's x86 (SSE)
  build adds when the number of variables is not a multiple of 4 (see ``_SSE_BLOCK``), and its
  normalisation: ``norm = lattice.filter(1)``, then ``1 / sqrt(norm + 1e-20)``
  (NORMALIZE_SYMMETRIC, applied before and after filtering), ``1 / (norm + 1e-20)`` applied before
  (NORMALIZE_BEFORE) or after (NORMALIZE_AFTER) filtering, and no scaling at all for
  NO_NORMALIZATION (densecrf computes a mean-normalised constant there but ``DenseKernel::filter``
  never applies it; the constant is only used by its learning code);
- the label compatibility: a number is Potts (``apply(x) = -w * x``), a 1-D float32 array is
  diagonal (``w[l] * x[l]``), an (L, L) float32 array is a matrix symmetrised as ``(M + M.T) / 2``;
- mean field: ``Q = softmax(-U)``; per iteration ``tmp = -U - sum_k compat_k(kernel_k(Q))``,
  ``Q = softmax(tmp)`` over labels;
- ``klDivergence(Q) = sum Q log max(Q, 1e-20) + sum U Q + sum_k sum Q * compat_k(kernel_k(Q))``
  (densecrf's formula, including its lack of a 1/2 on the pairwise term), accumulated in float64.

The kernel type (CONST_KERNEL, DIAG_KERNEL, FULL_KERNEL) only selects which kernel parameters
densecrf's learning code would optimise; inference is the same for all three, and pydensecrf wraps
no learning method, so it is validated and otherwise ignored here.

Differences from pydensecrf, all of them places where pydensecrf crashes, corrupts memory or
silently computes garbage:

- ``inference`` and ``startInference`` return the (L, N) float32 marginals as a column-major numpy
  array (the same layout and values ``np.array`` gives for pydensecrf's ``eigen.MatrixXf``; it also
  has ``.shape``). ``stepInference`` updates that array in place, like pydensecrf updates its
  MatrixXf; its ``tmp1``/``tmp2`` are scratch that pydensecrf never exposes (their buffers keep
  shape (0, 0)), so they are accepted and left alone. ``stepInference``/``klDivergence`` accept any
  (L, N) array, not only the objects ``startInference`` returned.
- Sizes must be non-negative integers (integral floats are accepted, as pydensecrf truncates them;
  4.5 is refused rather than truncated). Extra constructor arguments are refused (pydensecrf
  swallows them).
- ``kernel``/``normalization`` outside their enums, standard deviations that are not positive and
  finite, compatibility vectors/matrices whose size is not the number of labels, and logistic
  unary features of the wrong shape raise ``ValueError`` (pydensecrf passes them on to C++).
- Every error message starts with the name of the argument; the rest is pydensecrf's message, with
  the same exception type, so code matching pydensecrf's messages keeps working.
- CPU ``torch.Tensor`` arguments are accepted wherever pydensecrf takes a numpy array.
"""
from __future__ import annotations

import enum
import math
import operator
from numbers import Number

import numpy as np
import torch

from deconvseg_fast.ops import crf as _crf_ops
from deconvseg_fast.ops.crf import Lattice

__all__ = [
    "DenseCRF", "DenseCRF2D", "Unary", "ConstUnary", "LogisticUnary", "KernelType",
    "NormalizationType", "CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL", "NO_NORMALIZATION",
    "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC",
]


class KernelType(enum.IntEnum):
    """densecrf's ``KernelType`` (pairwise.h); pydensecrf exposes it as an IntEnum too."""
    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


class NormalizationType(enum.IntEnum):
    """densecrf's ``NormalizationType`` (pairwise.h)."""
    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


CONST_KERNEL = KernelType.CONST_KERNEL
DIAG_KERNEL = KernelType.DIAG_KERNEL
FULL_KERNEL = KernelType.FULL_KERNEL
NO_NORMALIZATION = NormalizationType.NO_NORMALIZATION
NORMALIZE_BEFORE = NormalizationType.NORMALIZE_BEFORE
NORMALIZE_AFTER = NormalizationType.NORMALIZE_AFTER
NORMALIZE_SYMMETRIC = NormalizationType.NORMALIZE_SYMMETRIC


# ---- argument checking with pydensecrf's (Cython's) exception types and messages -----------------
# struct-module format characters -> the C type names Cython's "Buffer dtype mismatch" uses.
_C_TYPE_NAMES = {
    "f": "float", "d": "double", "e": "half", "g": "long double", "b": "signed char",
    "B": "unsigned char", "h": "short", "H": "unsigned short", "i": "int", "I": "unsigned int",
    "l": "long", "L": "unsigned long", "q": "long long", "Q": "unsigned long long", "?": "bool",
}


def _c_type_name(fmt: str) -> str:
    return _C_TYPE_NAMES.get(fmt.lstrip("@=<>!"), fmt)


def _typed_buffer(obj, name: str, ndim: int, fmt: str, *, allow_none: bool = False):
    """Check `obj` like Cython's ``<type>[:, ::1] name not None`` and return it as a numpy array.

    fmt is the struct format character of the element type ("f": float32, "B": uint8). The
    returned array is a view of the caller's data, not a copy.
    """
    if obj is None:
        if allow_none:
            return None
        raise TypeError(f"{name}: Argument '{name}' must not be None")
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise TypeError(f"{name}: expected a CPU tensor or numpy array, got a tensor on "
                            f"{obj.device}")
        obj = obj.detach().numpy()
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(f"{name}: a bytes-like object is required, not "
                        f"'{type(obj).__name__}'") from None
    with view:
        if view.readonly:
            raise ValueError(f"{name}: buffer source array is read-only")
        if view.ndim != ndim:
            raise ValueError(f"{name}: Buffer has wrong number of dimensions (expected {ndim}, "
                             f"got {view.ndim})")
        got = view.format.lstrip("@=")
        if got != fmt:
            raise ValueError(f"{name}: Buffer dtype mismatch, expected '{_c_type_name(fmt)}' but "
                             f"got '{_c_type_name(got)}'")
        if not view.c_contiguous:
            raise ValueError(f"{name}: ndarray is not C-contiguous")
    return np.asarray(obj).view(np.dtype(fmt))


def _as_int(value, name: str) -> int:
    """A C ``int`` argument: integers, or floats holding an integer (pydensecrf truncates floats)."""
    if isinstance(value, (float, np.floating)):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise TypeError(f"{name}: expected an integer, got {value!r}")
        value = int(value)
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: an integer is required, got {type(value).__name__}") from None


def _as_size(value, name: str) -> int:
    value = _as_int(value, name)
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value}")
    return value


def _as_enum(value, name: str, enum_type):
    value = _as_int(value, name)
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(f"{m.name} ({m.value})" for m in enum_type)
        raise ValueError(f"{name}: expected one of {choices}, got {value}") from None


def _as_std(value, name: str) -> float:
    """A C ``float`` standard deviation, rounded to float32 as the C++ code receives it."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name}: must be real number, not {type(value).__name__}")
    v = float(np.float32(float(value)))
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: standard deviations must be positive and finite, got {value!r}")
    return v


def _stds(value, name: str, count: int) -> list[float]:
    """pydensecrf's ``sxy``/``srgb``: one number for every axis, or a sequence indexed 0..count-1."""
    if isinstance(value, Number):
        value = (value,) * count
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name}: must be real number, not {type(value).__name__}")
    try:
        items = [value[i] for i in range(count)]
    except IndexError as e:
        raise IndexError(f"{name}: expected a number or {count} numbers, got {value!r} ({e})") from None
    except TypeError:
        raise TypeError(f"{name}: expected a number or a sequence of {count} numbers, got "
                        f"{type(value).__name__}") from None
    return [_as_std(v, f"{name}[{i}]") for i, v in enumerate(items)]


# ---- label compatibility --------------------------------------------------------------------------
class _Compatibility:
    """densecrf's Potts / Diagonal / Matrix compatibility; ``apply`` overwrites and returns `x`."""

    def __init__(self, compat, num_labels: int):
        if isinstance(compat, Number):
            self.kind, self.weight = "potts", float(np.float32(compat))
            return
        if isinstance(compat, torch.Tensor):
            compat = compat.detach().cpu().numpy()
        try:
            ndim = memoryview(compat).ndim
        except TypeError:
            raise TypeError(f"compat: memoryview: a bytes-like object is required, not "
                            f"'{type(compat).__name__}'") from None
        if ndim == 1:
            w = _typed_buffer(compat, "compat", 1, "f")
            if w.shape[0] != num_labels:
                raise ValueError(f"compat: a diagonal compatibility needs one weight per label "
                                 f"(Need ({num_labels},), got {w.shape})")
            self.kind, self.weight = "diagonal", torch.tensor(w).reshape(1, -1)
        elif ndim == 2:
            m = _typed_buffer(compat, "compat", 2, "f")
            if m.shape != (num_labels, num_labels):
                raise ValueError(f"compat: a compatibility matrix must be (labels, labels) "
                                 f"(Need {(num_labels, num_labels)}, got {m.shape})")
            m = torch.tensor(m)
            # MatrixCompatibility keeps W = 0.5 * (m + m^T) (in float32, as Eigen does); on
            # point-major [N, L] values W @ x becomes x @ W^T.
            self.kind, self.weight = "matrix", (0.5 * (m + m.t())).t().contiguous()
        else:
            raise ValueError("compat: LabelCompatibility of dimension >2 not meaningful.")

    def apply_(self, x: torch.Tensor) -> torch.Tensor:  # x [N, L]
        if self.kind == "potts":
            return x.mul_(-self.weight)
        if self.kind == "diagonal":
            return x.mul_(self.weight)
        return torch.mm(x, self.weight)

    def matrix(self, num_labels: int) -> torch.Tensor:
        """The [L, L] matrix C with apply(x) = C x per variable (the fused op subtracts C f)."""
        if self.kind == "potts":
            return torch.eye(num_labels, dtype=torch.float32) * -self.weight
        if self.kind == "diagonal":
            return torch.diag(self.weight.reshape(-1))
        return self.weight.t().contiguous()  # stored transposed for x @ W^T

    def subtract_applied_(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out -= apply(x), without a temporary for Potts (the common case)."""
        if self.kind == "potts":
            out.add_(x, alpha=self.weight)  # -(-w * x)
        elif self.kind == "diagonal":
            out.addcmul_(self.weight, x, value=-1.0)
        else:
            out.addmm_(x, self.weight, alpha=-1.0)


# ---- pairwise term: lattice + normalisation + compatibility ---------------------------------------
# densecrf's x86 build (SSE, i.e. every pydensecrf wheel or build on x86-64) elevates the points
# four at a time and inserts the lanes past the last point, whose features are zero, into the
# lattice's hash table too. Those phantom points splat nothing, but the vertices they create relay
# values during the blur, which changes the result near the origin of feature space (up to a few
# percent of the filter response on photographs) whenever N is not a multiple of 4. We reproduce
# them: the lattice gets the same zero-feature points, and the values zero rows for them.
_SSE_BLOCK = 4


_GRID_PAIRWISE: dict = {}  # (H, W, sx, sy, normalization) -> a _Pairwise whose lattice is shared


def _padded_points(n: int, d: int) -> torch.Tensor:
    """Zeros [N + phantoms, d] float32: the lattice op's point-major layout, phantom rows included."""
    return torch.zeros(n + (-n) % _SSE_BLOCK, d, dtype=torch.float32)


def _points_of(features: np.ndarray) -> torch.Tensor:
    """(d, N) features -> padded point-major points (a copy: densecrf copies the features too, and
    the caller may reuse its array)."""
    d, n = features.shape
    points = _padded_points(n, d)
    points[:n] = torch.from_numpy(features).t()
    return points


class _Pairwise:
    def __init__(self, points: torch.Tensor | None, num_points: int, compat: _Compatibility, kernel: KernelType,
                 normalization: NormalizationType, like: "_Pairwise | None" = None):
        """points: the padded point-major features (``_padded_points``), or None when `like` (a term
        with the same features and normalisation) gives the lattice and the norms."""
        self.compat, self.kernel, self.normalization = compat, kernel, normalization
        if like is not None:  # the same features and normalisation: share the lattice and the norms
            self.num_points, self.lattice, self.phantoms = like.num_points, like.lattice, like.phantoms
            self.pre, self.post, self._buffer = like.pre, like.post, None
            return
        n = self.num_points = num_points
        self.lattice = None
        self.pre = self.post = None
        if n == 0:
            return
        self.phantoms = points.shape[0] - n
        self.lattice = Lattice.from_points(points)
        self._buffer: torch.Tensor | None = None  # [N + phantoms, L], phantom rows kept zero
        raw = self._filter(torch.ones(n, 1, dtype=torch.float32)).double()  # [N, 1]
        # float64 arithmetic then float32 storage, as `norm_[i] = 1.0 / sqrt(norm_[i] + 1e-20)`.
        if normalization == NORMALIZE_SYMMETRIC:
            norm = (1.0 / torch.sqrt(raw + 1e-20)).float()
            self.pre = self.post = norm
        elif normalization == NORMALIZE_BEFORE:
            self.pre = (1.0 / (raw + 1e-20)).float()
        elif normalization == NORMALIZE_AFTER:
            self.post = (1.0 / (raw + 1e-20)).float()
        # NO_NORMALIZATION: DenseKernel::filter applies no scaling (see the module docstring).

    def fused_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """pre, post [N + phantoms] for the fused mean-field op: ones where densecrf does not
        scale, and pre = 0 on the phantom rows so that they splat nothing. Computed once: the
        norms never change after construction."""
        if getattr(self, "_fused", None) is not None:
            return self._fused
        n = self.num_points
        pre = torch.ones(n + self.phantoms, dtype=torch.float32)
        post = torch.ones(n + self.phantoms, dtype=torch.float32)
        if self.pre is not None:
            pre[:n] = self.pre.reshape(-1)
        if self.post is not None:
            post[:n] = self.post.reshape(-1)
        pre[n:] = 0.0
        self._fused = (pre, post)
        return self._fused

    def _filter(self, values: torch.Tensor, pre: torch.Tensor | None = None) -> torch.Tensor:
        """Lattice filter of (values * pre) [N, C] -> [N, C], with the phantom points' zero rows."""
        n, c = values.shape
        if self.phantoms == 0:
            return self.lattice.filter_points(values * pre if pre is not None else values)
        if self._buffer is None or self._buffer.shape[1] != c:
            self._buffer = torch.zeros(n + self.phantoms, c, dtype=torch.float32)
        head = self._buffer[:n]
        if pre is not None:
            torch.mul(values, pre, out=head)
        else:
            head.copy_(values)
        return self.lattice.filter_points(self._buffer)[:n]

    def filtered(self, Q: torch.Tensor) -> torch.Tensor:
        """The kernel's message before the compatibility: the normalised lattice filter of Q [N, L]."""
        if self.lattice is None or Q.shape[1] == 0:
            return torch.zeros_like(Q)
        out = self._filter(Q, self.pre)
        if self.post is not None:
            out.mul_(self.post)
        return out

    def apply(self, Q: torch.Tensor) -> torch.Tensor:
        return self.compat.apply_(self.filtered(Q))


# ---- unaries --------------------------------------------------------------------------------------
class Unary:
    """Base class of the unary objects ``DenseCRF.setUnary`` takes (as in pydensecrf)."""

    def get(self) -> torch.Tensor:  # [N, L] float32: transposed, point-major
        raise NotImplementedError("Unary is abstract; use ConstUnary or LogisticUnary")


class ConstUnary(Unary):
    """A fixed (L, N) float32 unary energy (negative log-probabilities)."""

    def __init__(self, u):
        # Always a copy (order="C" of the transposed view), made by numpy: torch's transposing
        # copy took three times as long (6.2 against 2.2 ms for a VOC unary).
        self._u = torch.from_numpy(np.array(_typed_buffer(u, "u", 2, "f").T, order="C"))

    def get(self) -> torch.Tensor:
        return self._u


class LogisticUnary(Unary):
    """densecrf's LogisticUnaryEnergy: the unary is the matrix product ``L @ f``."""

    def __init__(self, L, f):  # noqa: N803 (pydensecrf's argument names)
        L = _typed_buffer(L, "L", 2, "f")
        f = _typed_buffer(f, "f", 2, "f")
        if f.shape[0] != L.shape[1]:
            raise ValueError(f"f: LogisticUnary needs f.shape[0] == L.shape[1] (the unary is L @ f); "
                             f"got L {L.shape} and f {f.shape}")
        self._L, self._f = torch.tensor(L), torch.tensor(f)

    def get(self) -> torch.Tensor:
        return torch.mm(self._f.t(), self._L.t())  # (L @ f)^T


# ---- the CRF --------------------------------------------------------------------------------------
def _softmax_labels(energy: torch.Tensor) -> torch.Tensor:
    """densecrf's expAndNormalize on [N, L]: per variable, exp(x - max) / sum over labels."""
    if energy.numel() == 0:
        return energy.clone()
    return torch.softmax(energy, dim=1)


def _to_eigen_layout(Q: torch.Tensor) -> np.ndarray:
    """Point-major [N, L] tensor -> (L, N) float32 numpy array, column-major like Eigen's MatrixXf
    (the same memory, so no copy)."""
    return Q.contiguous().numpy().T


class DenseCRF:
    """A fully connected CRF over `nvar` variables with `nlabels` labels (pydensecrf's DenseCRF)."""

    def __init__(self, nvar, nlabels):
        self._nvar = _as_size(nvar, "nvar")
        self._nlabel = _as_size(nlabels, "nlabels")
        self._unary: Unary | None = None
        self._pairwise: list[_Pairwise] = []

    # -- set-up ---------------------------------------------------------------------------------
    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL,  # noqa: N802
                          normalization=NORMALIZE_SYMMETRIC):
        """Add a Gaussian pairwise term on `features` (float32, C-contiguous, (d, nvar)), already
        divided by their standard deviations; `compat` a number (Potts), a float32 vector (one
        weight per label) or a float32 (L, L) matrix."""
        features = _typed_buffer(features, "features", 2, "f")
        if features.shape[1] != self._nvar:
            raise ValueError(f"features: Bad shape for pairwise energy (Need (?, {self._nvar}), got "
                             f"{(features.shape[0], features.shape[1])})")
        if features.shape[0] == 0:
            raise ValueError("features: need at least one feature row, got shape "
                             f"{(features.shape[0], features.shape[1])}")
        if not np.isfinite(features).all():
            raise ValueError("features: must be finite (found NaN or Inf)")
        self._add(lambda: _points_of(features), compat, kernel, normalization)

    def _add(self, points, compat, kernel, normalization, grid_key=None) -> None:
        """points() gives the term's padded point-major features; it is not called when a cached
        appearance-free term (`grid_key`) provides the lattice."""
        kernel = _as_enum(kernel, "kernel", KernelType)
        normalization = _as_enum(normalization, "normalization", NormalizationType)
        comp = _Compatibility(compat, self._nlabel)
        # The appearance-free (x, y) kernel depends only on the image size and sxy: its lattice and
        # norms are reused from the last CRFs of the same size (the lattice is never modified).
        key = None if grid_key is None else grid_key + (normalization,)
        like = _GRID_PAIRWISE.get(key) if key is not None else None
        self._pairwise.append(_Pairwise(None if like is not None else points(), self._nvar, comp, kernel,
                                        normalization, like=like))
        if key is not None and like is None and self._pairwise[-1].lattice is not None:
            _GRID_PAIRWISE[key] = self._pairwise[-1]
            while len(_GRID_PAIRWISE) > 2:
                _GRID_PAIRWISE.pop(next(iter(_GRID_PAIRWISE)))

    def setUnaryEnergy(self, u, f=None):  # noqa: N802
        """Set the unary energy: float32, C-contiguous, shape (nlabels, nvar), the negative log
        probability of each label at each variable (``utils.unary_from_softmax``). With `f`,
        the unary is the logistic ``u @ f`` (densecrf's LogisticUnaryEnergy)."""
        u_arr = _typed_buffer(u, "u", 2, "f")
        if u_arr.shape[0] != self._nlabel or u_arr.shape[1] != self._nvar:
            raise ValueError(f"u: Bad shape for unary energy (Need {(self._nlabel, self._nvar)}, got "
                             f"{(u_arr.shape[0], u_arr.shape[1])})")
        f_arr = _typed_buffer(f, "f", 2, "f", allow_none=True)
        if f_arr is None:
            self._unary = ConstUnary(u_arr)
        else:
            if f_arr.shape != (self._nvar, self._nvar):
                # pydensecrf checks u against (nlabels, nvar), so u @ f is (nlabels, nvar) only
                # when f is (nvar, nvar); anything else corrupts memory there.
                raise ValueError(f"f: Bad shape for the logistic unary's features (Need "
                                 f"{(self._nvar, self._nvar)}, got {f_arr.shape})")
            self._unary = LogisticUnary(u_arr, f_arr)

    def setUnary(self, u):  # noqa: N802
        """Set the unary from a ``ConstUnary`` or ``LogisticUnary`` object."""
        if not isinstance(u, Unary):
            raise TypeError(f"u: Argument 'u' has incorrect type (expected Unary, got "
                            f"{type(u).__name__})")
        U = u.get()
        if tuple(U.shape) != (self._nvar, self._nlabel):
            raise ValueError(f"u: Bad shape for unary energy (Need {(self._nlabel, self._nvar)}, "
                             f"got {tuple(U.shape[::-1])})")
        self._unary = u

    # -- inference ------------------------------------------------------------------------------
    def _unary_energy(self) -> torch.Tensor:
        if self._unary is None:
            return torch.zeros(self._nvar, self._nlabel, dtype=torch.float32)
        return self._unary.get()

    def _step(self, Q: torch.Tensor, neg_unary: torch.Tensor) -> torch.Tensor:
        tmp = neg_unary.clone()
        for p in self._pairwise:
            p.compat.subtract_applied_(tmp, p.filtered(Q))
        return _softmax_labels(tmp)

    def inference(self, niter):
        """Run `niter` mean-field iterations; returns Q, the (nlabels, nvar) float32 marginals
        (``np.array(Q)``, ``np.argmax(Q, axis=0)`` work as with pydensecrf)."""
        niter = _as_int(niter, "niter")  # < 1 runs no iteration, as in densecrf
        neg_unary = -self._unary_energy()
        if niter > 0 and self._nlabel > 0 and self._pairwise and all(
                p.lattice is not None for p in self._pairwise):
            return _to_eigen_layout(self._fused_inference(neg_unary, niter))
        Q = _softmax_labels(neg_unary)
        for _ in range(niter):
            Q = self._step(Q, neg_unary)
        return _to_eigen_layout(Q)

    def _fused_inference(self, neg_unary: torch.Tensor, niter: int) -> torch.Tensor:
        """All iterations in one call of the fused C++ mean-field op: the same update as `_step`
        (tmp = -U - sum_k C_k (post_k * filter_k(pre_k * Q)), Q = softmax(tmp)) without
        materialising the messages. Returns Q [N, L]."""
        n, phantoms = self._nvar, self._pairwise[0].phantoms
        logits = neg_unary
        if phantoms:
            logits = torch.cat([neg_unary, neg_unary.new_zeros(phantoms, self._nlabel)])
        scales = [p.fused_scales() for p in self._pairwise]
        pre = torch.stack([s[0] for s in scales])
        post = torch.stack([s[1] for s in scales])
        compat = torch.stack([p.compat.matrix(self._nlabel) for p in self._pairwise])
        q = _crf_ops.mean_field(logits.t(), [p.lattice for p in self._pairwise], pre, post, compat, niter).t()
        return q[:n] if phantoms else q

    def startInference(self):  # noqa: N802
        """Returns (Q, tmp1, tmp2): Q = softmax(-unary), and two scratch matrices for stepInference."""
        Q = _softmax_labels(-self._unary_energy())
        empty = np.empty((0, 0), dtype=np.float32, order="F")
        return _to_eigen_layout(Q), empty, empty.copy(order="F")

    def _check_Q(self, arr: np.ndarray) -> None:  # noqa: N802
        if arr.shape != (self._nlabel, self._nvar):
            raise ValueError(f"Q: Bad shape for marginals (Need {(self._nlabel, self._nvar)}, got "
                             f"{arr.shape})")

    def stepInference(self, Q, tmp1, tmp2):  # noqa: N802
        """One mean-field iteration, updating Q in place (tmp1/tmp2 are unused scratch)."""
        if not isinstance(Q, np.ndarray):
            raise TypeError(f"Q: Argument 'Q' has incorrect type (expected the numpy array "
                            f"startInference returned, got {type(Q).__name__})")
        self._check_Q(Q)
        if Q.dtype != np.float32 or not Q.flags.writeable:
            raise ValueError(f"Q: stepInference updates Q in place, so it must be a writeable float32 "
                             f"array, got {Q.dtype}{'' if Q.flags.writeable else ' (read-only)'}")
        arr = Q
        newQ = self._step(torch.from_numpy(np.ascontiguousarray(arr.T)), -self._unary_energy())
        arr[...] = newQ.numpy().T

    def klDivergence(self, Q):  # noqa: N802
        """densecrf's KL divergence of the marginals Q (up to the constant log Z)."""
        if isinstance(Q, torch.Tensor):
            Q = Q.detach().cpu().numpy()
        arr = np.asarray(Q)
        self._check_Q(arr)
        q = torch.from_numpy(np.ascontiguousarray(arr.T, dtype=np.float32))  # [N, L]
        qd = q.double()
        kl = (qd * torch.log(torch.clamp(q, min=1e-20).double())).sum()
        if self._unary is not None:
            kl += (self._unary.get().double() * qd).sum()
        for p in self._pairwise:
            kl += (qd * p.apply(q).double()).sum()
        return float(kl)


class DenseCRF2D(DenseCRF):
    """A dense CRF over a W x H image (``DenseCRF2D(W, H, L)``: width first, as in pydensecrf).

    Variable n is pixel (row y, column x) with n = y * W + x, so a unary computed on an (L, H, W)
    array is passed as ``U.reshape(L, -1)`` and the image is an (H, W, 3) array.
    """

    def __init__(self, w, h, nlabels):
        w, h = _as_size(w, "w"), _as_size(h, "h")
        super().__init__(w * h, nlabels)
        self._w, self._h = w, h

    def _image_points(self, sx: float, sy: float, image: np.ndarray | None = None,
                      srgb: list[float] | None = None) -> torch.Tensor:
        """The padded point-major features (x / sx, y / sy[, r / sr, g / sg, b / sb]) of pixel
        n = y W + x, written column by column (numpy's (d, N) features and a transposing copy took
        3.8 against 0.6 ms on a VOC photo). Each value is densecrf's float32 division."""
        h, w, d = self._h, self._w, 2 if image is None else 5
        points = _padded_points(h * w, d)
        grid = points[:h * w].view(h, w, d)
        # float32 division of the integer coordinate, as `feature(0, j*W+i) = i / sx`.
        grid[:, :, 0] = torch.from_numpy(np.arange(w, dtype=np.float32) / np.float32(sx))
        grid[:, :, 1] = torch.from_numpy(np.arange(h, dtype=np.float32) / np.float32(sy))[:, None]
        if image is not None:  # uint8 / float32 in float32, as numpy's astype(float32) / float32
            torch.div(torch.from_numpy(image).view(h * w, 3), torch.tensor(srgb, dtype=torch.float32),
                      out=points[:h * w, 2:])
        return points

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL,  # noqa: N802
                            normalization=NORMALIZE_SYMMETRIC):
        """Smoothness term on the features (x / sx, y / sy); `sxy` a number or (sx, sy)."""
        sx, sy = _stds(sxy, "sxy", 2)
        self._add(lambda: self._image_points(sx, sy), compat, kernel, normalization,
                  grid_key=(self._h, self._w, float(sx), float(sy)))

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL,  # noqa: N802
                             normalization=NORMALIZE_SYMMETRIC):
        """Appearance term on (x / sx, y / sy, r / sr, g / sg, b / sb); `rgbim` an (H, W, 3)
        uint8 C-contiguous image; `sxy` a number or (sx, sy); `srgb` a number or (sr, sg, sb)."""
        sx, sy = _stds(sxy, "sxy", 2)
        srgb = _stds(srgb, "srgb", 3)
        im = _typed_buffer(rgbim, "rgbim", 3, "B")
        if im.shape[0] != self._h or im.shape[1] != self._w:
            raise ValueError(f"rgbim: Bad shape for pairwise bilateral (Need {(self._h, self._w, 3)}, "
                             f"got {im.shape}; DenseCRF2D was created with W={self._w}, "
                             f"H={self._h})")
        if im.shape[2] != 3:
            raise ValueError("rgbim: addPairwiseBilateral only works for RGB images. For other "
                             "types, use `utils.create_pairwise_bilateral` to construct your own "
                             "pairwise energy and add it through `addPairwiseEnergy`.")
        self._add(lambda: self._image_points(sx, sy, im, srgb), compat, kernel, normalization)
