"""Triton kernels for the dense CRF's mean-field update (slice, compatibility, softmax, fused).

One mean-field iteration on the GPU is, per Gaussian kernel k, a splat and blur of pre_k * Q onto
lattice k (the op ``permutohedral_splat_blur``, CUDA C++), followed by this module's fused update:
for a block of pixels it slices every kernel's blurred buffer (the d+1 vertex rows of each pixel's
simplex, weighted, times alpha_k and post_k), applies each kernel's compatibility, subtracts the
result from the logits and writes Q = softmax over labels. The semantics are those of
``mean_field_update`` in csrc/cpu/crf.cpp. Launchers take arguments already validated by
deconvseg_fast/ops/crf.py and run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

Design
------
* Every program owns a [BLOCK_N pixels, BLOCK_L labels] tile and writes only it: no atomics, and
  the result does not depend on scheduling. Each slice sums its simplex corners in order r = 0..d
  and a general compat sums its input labels in increasing order, as the CPU kernel does; the
  kernels' terms are added up (k = 0, 1) and subtracted from the logits once, at the end, where
  the CPU kernel subtracts them one by one -- a rounding-level difference that keeps the logits
  tile from being live (and spilled) across the slice loops.
* Kernels per launch: a launch takes up to two kernels (constexpr NUM_K in 0..2, one set of
  pointer arguments per slot), which covers the common case -- a spatial (d = 2) and a bilateral
  (d = 5) kernel -- in one launch; NUM_K = 0 is the plain softmax that gives Q0. Any other K runs
  as ceil(K / 2) launches chained through a float32 energy buffer [N, L]: every launch but the last
  reads the energy so far (the logits for the first), subtracts its kernels' terms and writes the
  energy back (FINAL = False); the last one also takes the softmax and writes Q. A constexpr K with
  K pointer slots would need one specialisation per K and an argument list that grows with it; two
  slots keep one code path, and K > 2 is rare (it costs one [N, L] write and read per extra
  launch).
* Compatibility: a kernel whose compat is diagonal (Potts, -w * I, the default) multiplies the
  message by the diagonal (constexpr DIAG_k). A general [L, L] compat is applied one input label at
  a time (`_compat_product`): the label's message column is pulled out of the register tile with a
  masked row sum and multiplies that column of compat, in IEEE float32. tl.dot was tried and
  rejected: in IEEE float32 it lowers to an FMA dot that holds whole operand rows per thread
  (200-255 registers and spills on sm_80/sm_90 at 32-64 labels), and TF32 / 3xTF32 would change
  the rounding in a way the interpreter tests cannot see.
* Label axis, L <= _MAX_TILE_L (64): the labels, padded to BLOCK_L = next power of two, form one
  register tile, and the softmax is a row reduction in the same launch.
* Label axis, L > 64 (L has no upper limit): the same kernel runs on a 2-D grid, pixel blocks x
  label chunks of _CHUNK_L (32), and writes the energy (FINAL = False); `_softmax_rows_kernel`
  then normalises each pixel's row in place, in chunks, with an online max and sum (a second pass
  rescales). That costs one more write and two reads of [N, L] than the fused path. A general
  compat there needs the message of every input label for each output chunk: it is re-sliced per
  (output chunk, input chunk) pair rather than stored, L / 32 times the gathers of the tile path
  -- acceptable for a fallback that only wide, non-Potts label sets take.
* Block sizes (see _TILE_ELEMS): a tile has 512 elements, 4 float32 per thread at 4 warps; the
  lanes of a warp run along the labels, so per-pixel values (corner indices, weights, pointers)
  are held once per pixel per thread and their number, not the tiles, drives register use. Loops
  over corners, input labels and label chunks are runtime loops without pipelining
  (num_stages=1): unrolled, the compiler hoists every corner's gather and needs 230-255 registers
  on sm_90.
* Addresses: program ids are widened to int64 before multiplying; pixel and label indices stay in
  int64 only when some element offset may reach 2**31 (INDEX_64, chosen by the launcher), and
  every offset is formed per pixel and per label, then broadcast. All tensors are passed with
  strides: the logits are read in the op's [L, N] layout and Q is written in whatever layout
  `out` has (the point-major [N, L] that the next splat reads, or [L, N] for the result).
"""
import torch
import triton
import triton.language as tl

__all__ = ["mean_field_update", "slice_alpha", "KERNELS"]

_NUM_WARPS = 4
# Elements of one [BLOCK_N, BLOCK_L] tile. Ahead-of-time builds of the two-kernel update (sm_80 /
# sm_90): 2048 elements needed 160-255 registers (spills on sm_90), 1024 needed 80-150 with a few
# bytes of spills in some specialisations, 512 needs 48-96 and no spills. Each thread still has 4
# independent gathers in flight per corner, and more resident warps make up the rest.
_TILE_ELEMS = 512
_MAX_TILE_L = 64  # widest label axis kept in one register tile
_MAX_BLOCK_N = 256  # few labels: cap the pixels per program (per-pixel pointers are per thread)
_CHUNK_L = 32  # label chunk when L > _MAX_TILE_L (L = 70 pads to 96 labels, L = 150 to 160)
_KERNELS_PER_LAUNCH = 2


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pixel_rows(N, INDEX_64: tl.constexpr, BLOCK_N: tl.constexpr):
    # This program's BLOCK_N pixel indices and which of them exist. The program id is widened to
    # int64 before the multiply; the indices drop back to int32 when every offset allows it, and
    # every offset computed from them inherits their type.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = rows < N
    if not INDEX_64:
        rows = rows.to(tl.int32)
    return rows, pmask


@triton.jit
def _label_cols(c0, INDEX_64: tl.constexpr, BLOCK_L: tl.constexpr):
    # Labels c0 .. c0 + BLOCK_L - 1, in the index type of _pixel_rows.
    cols = c0 + tl.arange(0, BLOCK_L)
    if INDEX_64:
        cols = cols.to(tl.int64)
    else:
        cols = cols.to(tl.int32)
    return cols


@triton.jit
def _message(rows, pmask, cols, cmask, off_ptr, w_ptr, buf_ptr, post_ptr, alpha,
             s_off_n, s_off_r, s_w_n, s_w_r, s_buf_m, s_buf_l, s_post,
             D1: tl.constexpr):
    # [BLOCK_N, BLOCK_L] message of one kernel for labels `cols`:
    #   post[i] * alpha * sum_r w[i, r] * buf[off[i, r] + 1, cols].
    # Masked pixels read vertex -1, i.e. the zero row 0, with weight 0.
    m2 = pmask[:, None] & cmask[None, :]
    col_off = cols[None, :] * s_buf_l
    acc = tl.zeros(m2.shape, tl.float32)
    for r in tl.range(0, D1, num_stages=1):
        v = tl.load(off_ptr + rows * s_off_n + r * s_off_r, mask=pmask, other=-1)
        wr = tl.load(w_ptr + rows * s_w_n + r * s_w_r, mask=pmask, other=0.0)
        row = (v + 1).to(rows.dtype) * s_buf_m
        x = tl.load(buf_ptr + row[:, None] + col_off, mask=m2, other=0.0)
        acc += wr[:, None] * x
    post = tl.load(post_ptr + rows * s_post, mask=pmask, other=0.0)
    return acc * (post * alpha)[:, None]


@triton.jit
def _compat_product(msg, m_cols, m_lo, m_hi, c_ptrs, s_cmp_m, l_mask, acc):
    # acc[:, l] + sum_{m in [m_lo, m_hi)} compat[l, m] * msg[:, m] for this tile's output labels
    # l; msg holds the input labels m_cols; c_ptrs [BLOCK_L] points at compat[l, m_lo] and is
    # returned advanced to compat[l, m_hi]. The column of label m is a masked row sum (exact: one
    # non-zero term), so every product and sum is the CPU kernel's, in its order.
    for m in tl.range(m_lo, m_hi, num_stages=1):
        col = tl.sum(tl.where(m_cols[None, :] == m, msg, 0.0), axis=1)  # [BLOCK_N] msg[:, m]
        c = tl.load(c_ptrs, mask=l_mask, other=0.0)
        acc += col[:, None] * c[None, :]
        c_ptrs += s_cmp_m
    return acc, c_ptrs


@triton.jit
def _apply_kernel(acc, rows, pmask, cols, cmask, L,
                  off_ptr, w_ptr, buf_ptr, post_ptr, cmp_ptr, alpha,
                  s_off_n, s_off_r, s_w_n, s_w_r, s_buf_m, s_buf_l, s_post, s_cmp_l, s_cmp_m,
                  D1: tl.constexpr, DIAG: tl.constexpr, ALL_LABELS: tl.constexpr,
                  BLOCK_L: tl.constexpr):
    # acc + (compat @ message)[:, cols] for one kernel.
    if DIAG:
        msg = _message(rows, pmask, cols, cmask, off_ptr, w_ptr, buf_ptr, post_ptr, alpha,
                       s_off_n, s_off_r, s_w_n, s_w_r, s_buf_m, s_buf_l, s_post, D1)
        dg = tl.load(cmp_ptr + cols * (s_cmp_l + s_cmp_m), mask=cmask, other=0.0)
        acc += msg * dg[None, :]
    elif ALL_LABELS:
        # the tile holds every label: its message is the whole input of the product
        msg = _message(rows, pmask, cols, cmask, off_ptr, w_ptr, buf_ptr, post_ptr, alpha,
                       s_off_n, s_off_r, s_w_n, s_w_r, s_buf_m, s_buf_l, s_post, D1)
        acc, c_ptrs = _compat_product(msg, cols, 0, L, cmp_ptr + cols * s_cmp_l, s_cmp_m, cmask,
                                      acc)
    else:
        # Input labels in chunks too, in increasing order; each chunk's message is re-sliced.
        c_ptrs = cmp_ptr + cols * s_cmp_l  # compat[cols, 0]
        for m0 in tl.range(0, L, BLOCK_L, num_stages=1):
            m_cols = (m0 + tl.arange(0, BLOCK_L)).to(cols.dtype)
            msg = _message(rows, pmask, m_cols, m_cols < L, off_ptr, w_ptr, buf_ptr, post_ptr,
                           alpha, s_off_n, s_off_r, s_w_n, s_w_r, s_buf_m, s_buf_l, s_post, D1)
            m_hi = tl.minimum(m0 + BLOCK_L, L)
            acc, c_ptrs = _compat_product(msg, m_cols, m0, m_hi, c_ptrs, s_cmp_m, cmask, acc)
    return acc


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _mean_field_update_kernel(
    base_ptr,  # [N, L] float32 (through strides): the logits ([L, N] in memory) or energy so far
    out_ptr,  # [N, L] float32 (through strides): Q when FINAL, else the energy; may alias base_ptr
    N, L,  # pixels, labels
    s_base_n, s_base_l,  # strides of base (pixel, label)
    s_out_n, s_out_l,  # strides of out (pixel, label)
    off0_ptr,  # [N, D1_0] int32: lattice vertex of each simplex corner of each pixel (kernel 0)
    w0_ptr,  # [N, D1_0] float32: barycentric weight of each corner
    buf0_ptr,  # [M_0 + 1, L] float32: blurred vertex values, row 0 zero, vertex v in row v + 1
    post0_ptr,  # [N] float32: post-normalisation of kernel 0
    cmp0_ptr,  # [L, L] float32: compatibility of kernel 0 (subtracted)
    alpha0,  # float32: slice constant 1 / (1 + 2^-d_0)
    s_off0_n, s_off0_r, s_w0_n, s_w0_r,  # strides of off0 / w0 (pixel, corner)
    s_buf0_m, s_buf0_l,  # strides of buf0 (vertex row, label)
    s_post0,  # stride of post0
    s_cmp0_l, s_cmp0_m,  # strides of cmp0 (output label, input label)
    off1_ptr,  # [N, D1_1] int32, kernel 1 (as kernel 0); None when NUM_K < 2
    w1_ptr,  # [N, D1_1] float32
    buf1_ptr,  # [M_1 + 1, L] float32
    post1_ptr,  # [N] float32
    cmp1_ptr,  # [L, L] float32
    alpha1,  # float32
    s_off1_n, s_off1_r, s_w1_n, s_w1_r, s_buf1_m, s_buf1_l, s_post1, s_cmp1_l, s_cmp1_m,
    NUM_K: tl.constexpr,  # kernels applied by this launch: 0 (plain softmax), 1 or 2
    D1_0: tl.constexpr, DIAG_0: tl.constexpr,  # d_0 + 1 corners; compat 0 is diagonal
    D1_1: tl.constexpr, DIAG_1: tl.constexpr,
    FINAL: tl.constexpr,  # softmax and write Q (needs ALL_LABELS); else write the energy
    ALL_LABELS: tl.constexpr,  # BLOCK_L >= L: one program holds every label of its pixels
    INDEX_64: tl.constexpr,  # some element offset may reach 2**31: index in int64
    BLOCK_N: tl.constexpr,  # pixels per program (grid axis 0)
    BLOCK_L: tl.constexpr,  # labels per program, a power of two (grid axis 1: label chunks)
):
    rows, pmask = _pixel_rows(N, INDEX_64, BLOCK_N)
    cols = _label_cols(tl.program_id(1).to(tl.int64) * BLOCK_L, INDEX_64, BLOCK_L)
    cmask = cols < L
    m2 = pmask[:, None] & cmask[None, :]
    # Every kernel's term is summed first and subtracted from the base once, at the end: loaded
    # first, the base tile would stay live across all the slice loops (ptxas spilled it).
    acc = tl.zeros([BLOCK_N, BLOCK_L], tl.float32)
    if NUM_K >= 1:
        acc = _apply_kernel(acc, rows, pmask, cols, cmask, L,
                            off0_ptr, w0_ptr, buf0_ptr, post0_ptr, cmp0_ptr, alpha0,
                            s_off0_n, s_off0_r, s_w0_n, s_w0_r, s_buf0_m, s_buf0_l, s_post0,
                            s_cmp0_l, s_cmp0_m, D1_0, DIAG_0, ALL_LABELS, BLOCK_L)
    if NUM_K >= 2:
        acc = _apply_kernel(acc, rows, pmask, cols, cmask, L,
                            off1_ptr, w1_ptr, buf1_ptr, post1_ptr, cmp1_ptr, alpha1,
                            s_off1_n, s_off1_r, s_w1_n, s_w1_r, s_buf1_m, s_buf1_l, s_post1,
                            s_cmp1_l, s_cmp1_m, D1_1, DIAG_1, ALL_LABELS, BLOCK_L)
    t = tl.load(base_ptr + rows[:, None] * s_base_n + cols[None, :] * s_base_l, mask=m2, other=0.0)
    t = t - acc
    if FINAL:
        # Padding labels are -inf, so they neither win the max nor add to the sum; L >= 1 keeps
        # every row's max finite (masked pixels hold zeros).
        t = tl.where(cmask[None, :], t, float("-inf"))
        mx = tl.max(t, axis=1)
        e = tl.exp(t - mx[:, None])
        t = e / tl.sum(e, axis=1)[:, None]
    tl.store(out_ptr + rows[:, None] * s_out_n + cols[None, :] * s_out_l, t, mask=m2)


@triton.jit
def _softmax_rows_kernel(
    x_ptr,  # [N, L] float32 (through strides): energies
    out_ptr,  # [N, L] float32 (through strides): softmax of each row; may alias x_ptr
    N, L,  # rows (pixels), labels
    s_x_n, s_x_l,  # strides of x (pixel, label)
    s_out_n, s_out_l,  # strides of out (pixel, label)
    INDEX_64: tl.constexpr,  # some element offset may reach 2**31: index in int64
    BLOCK_N: tl.constexpr,  # pixels per program
    BLOCK_L: tl.constexpr,  # labels per chunk, a power of two
):
    # For label axes too wide for one tile. Pass 1 only reads, pass 2 reads each element and
    # then writes it, so running in place is safe without a barrier.
    rows, pmask = _pixel_rows(N, INDEX_64, BLOCK_N)
    row_x = rows[:, None] * s_x_n
    run_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_N], tl.float32)
    for c0 in tl.range(0, L, BLOCK_L, num_stages=1):
        cols = _label_cols(c0, INDEX_64, BLOCK_L)
        m2 = pmask[:, None] & (cols < L)[None, :]
        t = tl.load(x_ptr + row_x + cols[None, :] * s_x_l, mask=m2, other=float("-inf"))
        new_max = tl.maximum(run_max, tl.max(t, axis=1))
        # Masked pixels stay at -inf: keep their exponent arguments finite (they are not stored).
        new_max = tl.where(pmask, new_max, 0.0)
        # The first chunk holds at least one label, so new_max is finite and exp(-inf) = 0
        # clears the empty running sum.
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(t - new_max[:, None]), axis=1)
        run_max = new_max
    inv = 1.0 / tl.where(pmask, run_sum, 1.0)
    row_o = rows[:, None] * s_out_n
    for c0 in tl.range(0, L, BLOCK_L, num_stages=1):
        cols = _label_cols(c0, INDEX_64, BLOCK_L)
        m2 = pmask[:, None] & (cols < L)[None, :]
        t = tl.load(x_ptr + row_x + cols[None, :] * s_x_l, mask=m2, other=0.0)
        tl.store(out_ptr + row_o + cols[None, :] * s_out_l,
                 tl.exp(t - run_max[:, None]) * inv[:, None], mask=m2)


# ---------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------
def slice_alpha(d):
    """csrc/include/permutohedral.h slice_alpha: 1 / (1 + 2^-d), rounded to float32."""
    one = torch.tensor(1.0, dtype=torch.float32)
    return float(one / (one + torch.tensor(2.0 ** -d, dtype=torch.float32)))


def _blocks(L):
    """(all_labels, BLOCK_N, BLOCK_L) for L labels: one tile per pixel block, or label chunks."""
    bl = triton.next_power_of_2(L)
    if bl <= _MAX_TILE_L:
        return True, min(_MAX_BLOCK_N, _TILE_ELEMS // bl), bl
    return False, _TILE_ELEMS // _CHUNK_L, _CHUNK_L


_NO_SLOT = dict(off=None, w=None, buf=None, post=None, cmp=None, alpha=0.0,
                s_off_n=0, s_off_r=0, s_w_n=0, s_w_r=0, s_buf_m=0, s_buf_l=0, s_post=0,
                s_cmp_l=0, s_cmp_m=0, D1=2, DIAG=True)


def _slot(kernel):
    off, w, buf, post, cmp, diag = kernel
    return dict(off=off, w=w, buf=buf, post=post, cmp=cmp, alpha=slice_alpha(off.shape[1] - 1),
                s_off_n=off.stride(0), s_off_r=off.stride(1), s_w_n=w.stride(0), s_w_r=w.stride(1),
                s_buf_m=buf.stride(0), s_buf_l=buf.stride(1), s_post=post.stride(0),
                s_cmp_l=cmp.stride(0), s_cmp_m=cmp.stride(1), D1=off.shape[1], DIAG=bool(diag))


def _index_64(*tensors):
    """Whether some element offset a kernel forms may reach 2**31: each dimension is counted with
    the padding a program may add past its end (masked, but its address is still computed)."""
    pad = max(_MAX_BLOCK_N, _MAX_TILE_L)
    for t in tensors:
        if t is not None and sum((n + pad) * abs(st)
                                 for n, st in zip(t.shape, t.stride())) >= 2**31:
            return True
    return False


def _update_launch(base, out, kernels, final):
    """(kernel, grid, runtime arguments, constexprs) of one update launch: base and out are [N, L]
    views, kernels at most _KERNELS_PER_LAUNCH (offsets, weights, blurred, post_k, compat_k,
    diagonal) tuples."""
    N, L = out.shape
    all_labels, block_n, block_l = _blocks(L)
    slots = [_slot(k) for k in kernels] + [_NO_SLOT] * (_KERNELS_PER_LAUNCH - len(kernels))
    args = dict(base_ptr=base, out_ptr=out, N=N, L=L, s_base_n=base.stride(0),
                s_base_l=base.stride(1), s_out_n=out.stride(0), s_out_l=out.stride(1))
    const = dict(NUM_K=len(kernels))
    for i, s in enumerate(slots):
        for key in ("off", "w", "buf", "post", "cmp"):
            args[f"{key}{i}_ptr"] = s[key]
        args[f"alpha{i}"] = s["alpha"]
        for key, axis in (("off", "n"), ("off", "r"), ("w", "n"), ("w", "r"), ("buf", "m"),
                          ("buf", "l"), ("cmp", "l"), ("cmp", "m")):
            args[f"s_{key}{i}_{axis}"] = s[f"s_{key}_{axis}"]
        args[f"s_post{i}"] = s["s_post"]
        const[f"D1_{i}"] = s["D1"]
        const[f"DIAG_{i}"] = s["DIAG"]
    tensors = [base, out] + [t for k in kernels for t in k[:5]]
    const.update(FINAL=bool(final), ALL_LABELS=all_labels, INDEX_64=_index_64(*tensors),
                 BLOCK_N=block_n, BLOCK_L=block_l)
    grid = (triton.cdiv(N, block_n), triton.cdiv(L, block_l))
    return _mean_field_update_kernel, grid, args, const


def _softmax_launch(x, out):
    N, L = out.shape
    block_n = _TILE_ELEMS // _CHUNK_L
    args = dict(x_ptr=x, out_ptr=out, N=N, L=L, s_x_n=x.stride(0), s_x_l=x.stride(1),
                s_out_n=out.stride(0), s_out_l=out.stride(1))
    const = dict(INDEX_64=_index_64(x, out), BLOCK_N=block_n, BLOCK_L=_CHUNK_L)
    return _softmax_rows_kernel, (triton.cdiv(N, block_n),), args, const


def _launches(logits, out, kernels, energy):
    """Every launch of one update, in order, as (kernel, grid, arguments, constexprs)."""
    all_labels = _blocks(out.shape[1])[0]
    if not kernels and not all_labels:
        return [_softmax_launch(logits, out)]
    groups = [kernels[i:i + _KERNELS_PER_LAUNCH]
              for i in range(0, len(kernels), _KERNELS_PER_LAUNCH)] or [[]]
    launches = []
    base = logits
    for g, group in enumerate(groups):
        last = g == len(groups) - 1
        launches.append(_update_launch(base, out if last else energy, group, last and all_labels))
        base = energy
    if not all_labels:
        launches.append(_softmax_launch(out, out))
    return launches


def mean_field_update(logits, out, kernels):
    """out [N, L] (any strides) <- softmax(logits - sum_k compat_k (post_k * alpha_k * slice_k)).

    logits: [N, L] float32 view (the op's [L, N] logits transposed); kernels: a list of
    (offsets [N, d+1] int32, weights [N, d+1] float32, blurred [M+1, L] float32, post_k [N] float32,
    compat_k [L, L] float32, diagonal: bool), with every vertex index already checked to be in
    range; an empty list gives softmax(logits). `out` must not overlap the other inputs. Returns
    out.
    """
    N, L = out.shape
    if N == 0 or L == 0:
        return out
    energy = None
    if len(kernels) > _KERNELS_PER_LAUNCH:
        energy = torch.empty((N, L), dtype=torch.float32, device=out.device)
    for kernel, grid, args, const in _launches(logits, out, kernels, energy):
        kernel[grid](**args, **const, num_warps=_NUM_WARPS)
    return out


# ---------------------------------------------------------------------------------------------
# AOT compilation targets (tests/test_triton_compile.py)
# ---------------------------------------------------------------------------------------------
_PTR_TYPES = {torch.float32: "*fp32", torch.int32: "*i32"}


def _aot_entry(kernel, args, const):
    """(kernel, signature, constexprs) as a launch with these arguments specialises them: integers
    equal to 1 and None become constexprs (Triton's own rule), tensors become typed pointers."""
    sig, const = {}, dict(const)
    for name in kernel.arg_names:
        if name in const:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            const[name] = v
            sig[name] = "constexpr"
        elif isinstance(v, torch.Tensor):
            sig[name] = _PTR_TYPES[v.dtype]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
    return kernel, sig, const


def _meta_update(N, L, dims, diag, out_layout="NL"):
    """The launches of one update on meta tensors shaped as a real image makes them."""
    meta = dict(device="meta", dtype=torch.float32)
    logits = torch.empty((L, N), **meta).t()
    out = torch.empty((N, L), **meta) if out_layout == "NL" else torch.empty((L, N), **meta).t()
    post = torch.empty((len(dims), N), **meta)
    compat = torch.empty((len(dims), L, L), **meta)
    kernels = []
    for k, (d, dg) in enumerate(zip(dims, diag)):
        m = N * (d + 1) // 4  # vertex count: it changes no stride, so any plausible value does
        kernels.append((torch.empty((N, d + 1), device="meta", dtype=torch.int32),
                        torch.empty((N, d + 1), **meta), torch.empty((m + 1, L), **meta),
                        post[k], compat[k], dg))
    energy = torch.empty((N, L), **meta) if len(kernels) > _KERNELS_PER_LAUNCH else None
    return [_aot_entry(kernel, args, const)
            for kernel, _grid, args, const in _launches(logits, out, kernels, energy)]


def _kernel_entries():
    n = 500 * 375  # a VOC image
    entries = []
    for L in (1, 2, 21, 64, 150):
        entries += _meta_update(n, L, (), ())  # Q0 = softmax(logits)
    for L, diag in ((2, (True, True)), (11, (True, True)), (21, (True, True)),
                    (21, (False, False)), (21, (True, False)), (64, (True, True)),
                    (64, (False, False)), (150, (True, True)), (150, (False, False))):
        entries += _meta_update(n, L, (2, 5), diag)  # the spatial and the bilateral kernel
    # the last iteration writes the [L, N] result directly
    entries += _meta_update(n, 21, (2, 5), (True, True), out_layout="LN")
    entries += _meta_update(n, 150, (2, 5), (True, True), out_layout="LN")
    # one kernel, and three (two launches chained through the energy buffer)
    entries += _meta_update(n, 21, (5,), (True,))
    entries += _meta_update(n, 21, (2, 5, 3), (True, True, False))
    entries += _meta_update(n, 150, (2, 5, 3), (True, True, False))
    # 64-bit indexing: 150 labels of a 16-megapixel image exceed 2**31 elements
    entries += _meta_update(4096 * 4096, 150, (2, 5), (True, True), out_layout="LN")
    entries += _meta_update(4096 * 4096, 150, (), ())
    # dedupe identical specialisations (same kernel, signature and constexprs)
    seen, unique = set(), []
    for fn, sig, const in entries:
        key = (fn.__name__, tuple(sig.items()), tuple(sorted(const.items(), key=lambda kv: kv[0])))
        if key not in seen:
            seen.add(key)
            unique.append((fn, sig, const))
    return unique


KERNELS = _kernel_entries()
