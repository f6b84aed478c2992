"""Triton kernels for max-pooling with switches, max-unpooling and their backward passes.

The contract (geometry, NaN/tie rules, switch formats, winners on duplicates) is docs/switches.md.
Launchers take arguments already validated and normalised by deconvseg_fast/ops/pooling.py and run
on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

Design
------
* Every op is a gather, so no two programs ever write the same element and results do not depend
  on scheduling:
  - pool forward: one lane per pooled element scans its window (padding skipped);
  - unpool forward / pool backward: one lane per destination pixel visits the (at most kh*kw)
    windows that could contain it and asks each window's switch whether it points here. Windows
    are visited in increasing row-major order, so "last writer wins" (unpool) is a running select
    and the sum (pool backward) is accumulated in torch's order;
  - unpool backward: one lane per pooled element reads the pixel its switch points at.
* The gathers can only see a flat switch that lies inside its own window; torch lets a flat switch
  point anywhere in the plane. `_check_switches_kernel` classifies every switch first (error /
  legal-but-outside-its-window / fine) into one int32 flag with tl.atomic_max, which is
  order-independent and so deterministic. Outside-window switches route the call to a
  deterministic torch-op fallback (see `_unpool_fallback`, `_pool_backward_fallback`). Reading the
  flag costs one host synchronisation per call; it is what lets bad indices raise a RuntimeError on
  every device instead of a device-side assert.
* Iteration order follows the memory format: for contiguous NCHW consecutive lanes walk W, for
  channels_last they walk C, so loads and stores are coalesced in both layouts. All tensors are
  addressed through strides.
* Kernel geometry (kernel size, stride, padding, dilation) and the switch format are constexpr:
  the window loops unroll and the divisions by stride/dilation become multiply-shifts. Networks use
  a handful of pooling configurations, so the number of specialisations stays small.
* Index math runs in int32 unless some tensor has 2**31 elements or more (INDEX_64); program ids
  are cast to int64 before being multiplied either way.
"""
import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

__all__ = [
    "max_pool2d_switches",
    "max_unpool2d",
    "max_pool2d_switches_backward",
    "max_unpool2d_backward",
    "KERNELS",
]

# index_format -> constexpr FORMAT
FORMAT_FLAT = 0
FORMAT_WINDOW = 1
FORMAT_PACKED = 2
_FORMATS = {"flat": FORMAT_FLAT, "window": FORMAT_WINDOW, "packed": FORMAT_PACKED}

# Switch classification written by the check kernels; larger is worse so one atomic_max keeps the
# most severe finding.
ERR_OUTSIDE_WINDOW = 1  # flat switch in the plane but not in its own window: legal, needs fallback
ERR_PADDING = 2  # compact code decodes to padding / outside the plane
ERR_CODE = 3  # compact code >= kh*kw
ERR_RANGE = 4  # flat switch outside [0, H*W)

# Elements handled per program, always with 4 warps (Triton's default, which the AOT test compiles
# with). 512 lanes give each thread 4 independent window scans in flight, enough to cover HBM
# latency in these memory-bound kernels at 56-92 registers. The destination-side gather keeps two
# dependent loads per tap (switch, then value) live for every candidate window; at 4 lanes per
# thread it needs up to ~145 registers for 3x3 (about 12 resident warps per SM), at 2 lanes 64-78,
# so it runs 256 lanes per program.
_NUM_WARPS = 4
_BLOCK = 512
_GATHER_BLOCK = 256


# ---------------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _program_lanes(total, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    # This program's BLOCK flat element indices and which of them exist. The program id is widened
    # to int64 before the multiply; the indices drop back to int32 when every tensor allows it.
    pid = tl.program_id(0).to(tl.int64)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    emask = e < total
    if not INDEX_64:
        e = e.to(tl.int32)
    return e, emask


@triton.jit
def _split_index(e, C, H, W, CHANNELS_LAST: tl.constexpr):
    # Linear index -> (n, c, h, w) in the order the memory format stores them, so consecutive
    # lanes touch consecutive addresses (W fastest for NCHW, C fastest for channels_last).
    if CHANNELS_LAST:
        c = e % C
        r = e // C
        w = r % W
        r = r // W
        h = r % H
        n = r // H
    else:
        w = e % W
        r = e // W
        h = r % H
        r = r // H
        c = r % C
        n = r // C
    return n, c, h, w


@triton.jit
def _decode_switch(s, oh, ow, H, W, HW, FORMAT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
                   DH: tl.constexpr, DW: tl.constexpr):
    # s: flat switch (int64) or compact code (int32, already unpacked) of window (oh, ow).
    # HW = H * W, computed on the host: a scalar argument equal to 1 arrives as a constexpr, so
    # scalars are never cast inside the kernel.
    # Returns the (h, w) it points at in the H x W plane and an ERR_* class (0 = fine). (h, w) is
    # clamped into the plane when the class is an error so callers may form addresses freely.
    if FORMAT == 0:
        bad = (s < 0) | (s >= HW)
        # Narrow before dividing: in the int32 specialisation sc < HW < 2**31, and an int32
        # division is several times cheaper than the int64 one.
        sc = tl.where(bad, 0, s).to(oh.dtype)
        h = sc // W
        w = sc % W
        # Which tap of the window would (h, w) be? It is inside the window iff both offsets are
        # non-negative multiples of the dilation below kernel * dilation.
        di = h + PH - oh * SH
        dj = w + PW - ow * SW
        di_c = tl.maximum(di, 0)
        dj_c = tl.maximum(dj, 0)
        inside = (di >= 0) & (di_c % DH == 0) & (di_c // DH < KH) & \
                 (dj >= 0) & (dj_c % DW == 0) & (dj_c // DW < KW)
        err = tl.where(bad, 4, tl.where(inside, 0, 1))
    else:
        bad_code = s >= KH * KW
        code = tl.where(bad_code, 0, s)
        i = code // KW
        j = code % KW
        h = oh * SH - PH + i * DH
        w = ow * SW - PW + j * DW
        outside = (h < 0) | (h >= H) | (w < 0) | (w >= W)
        err = tl.where(bad_code, 3, tl.where(outside, 2, 0))
        h = tl.where(err == 0, h, 0)
        w = tl.where(err == 0, w, 0)
    return h, w, err


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _max_pool2d_switches_kernel(
    x_ptr,  # [N, C, H, W] input, float dtype
    val_ptr,  # [N, C, Ho, Wo] pooled values, dtype of x
    sw_ptr,  # [N, C, Ho, Wo] int64 (flat) / uint8 (window), or [N, C, Ho, Wq] uint8 (packed)
    total,  # N * C * Ho * Wq: lanes of the switch tensor
    C, H, W, Ho, Wo, Wq,
    sxn, sxc, sxh, sxw,  # strides of x
    svn, svc, svh, svw,  # strides of values
    ssn, ssc, ssh, ssw,  # strides of switches
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    FORMAT: tl.constexpr,  # 0 flat, 1 window, 2 packed
    PACK: tl.constexpr,  # pooled columns per switch element: 4 for packed, else 1
    CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    e, emask = _program_lanes(total, INDEX_64, BLOCK)
    # One lane row per switch element; PACK columns cover the pooled columns a packed byte holds,
    # so the byte is assembled in registers and written once.
    n, c, oh, q = _split_index(e, C, Ho, Wq, CHANNELS_LAST)
    t = tl.arange(0, PACK)
    ow = q[:, None] * PACK + t[None, :]  # [BLOCK, PACK]
    lane = emask[:, None] & (ow < Wo)
    h0 = oh * SH - PH  # [BLOCK]
    w0 = ow * SW - PW  # [BLOCK, PACK]
    x_row = n * sxn + c * sxc  # [BLOCK]

    if ACC_FP64:
        m = tl.full([BLOCK, PACK], float("-inf"), tl.float64)
    else:
        m = tl.full([BLOCK, PACK], float("-inf"), tl.float32)
    # -1 = "no in-bounds tap seen yet": the first in-bounds tap always takes the switch, even when
    # its value is -inf, so the switch is never a padding position.
    k = tl.full([BLOCK, PACK], -1, tl.int32)
    for i in tl.static_range(KH):
        h = h0 + i * DH
        h_ok = (h >= 0) & (h < H)
        x_h = x_row + h * sxh
        for j in tl.static_range(KW):
            w = w0 + j * DW
            inb = lane & h_ok[:, None] & (w >= 0) & (w < W)
            v = tl.load(x_ptr + x_h[:, None] + w * sxw, mask=inb, other=float("-inf"))
            if ACC_FP64:
                v = v.to(tl.float64)
            else:
                v = v.to(tl.float32)
            # strict > keeps the first of equal values; a NaN always takes over (last NaN wins)
            take = inb & ((v > m) | (v != v) | (k < 0))
            m = tl.where(take, v, m)
            k = tl.where(take, i * KW + j, k)
    # Validated geometry gives every window an in-bounds tap; clamp anyway so a switch is never
    # an out-of-range code.
    k = tl.maximum(k, 0)

    v_off = (n * svn + c * svc + oh * svh)[:, None] + ow * svw
    tl.store(val_ptr + v_off, m.to(val_ptr.dtype.element_ty), mask=lane)

    s_row = n * ssn + c * ssc + oh * ssh  # [BLOCK]
    if FORMAT == 0:
        hs = h0[:, None] + (k // KW) * DH
        ws = w0 + (k % KW) * DW
        flat = hs.to(tl.int64) * W + ws
        tl.store(sw_ptr + s_row[:, None] + ow * ssw, flat, mask=lane)
    elif FORMAT == 1:
        tl.store(sw_ptr + s_row[:, None] + ow * ssw, k.to(tl.uint8), mask=lane)
    else:
        # 2 bits per pooled column, column 4q+t in bits 2t..2t+1; columns past Wo stay 0.
        bits = tl.where(lane, k << (2 * t)[None, :], 0)
        byte = tl.sum(bits, axis=1)
        tl.store(sw_ptr + s_row + q * ssw, byte.to(tl.uint8), mask=emask)


@triton.jit
def _window_gather_kernel(
    src_ptr,  # [N, C, Hp, Wp] values carried by the switches (unpool input / pool grad_output)
    sw_ptr,  # [N, C, Hp, Wp] int64 (flat) / uint8 (window), or [N, C, Hp, Wq] uint8 (packed)
    out_ptr,  # [N, C, H, W] destination plane (unpool output / pool grad_input), dtype of src
    total,  # N * C * H * W
    C, H, W, Hp, Wp,
    ssn, ssc, ssh, ssw,  # strides of src
    swn, swc, swh, sww,  # strides of switches
    son, soc, soh, sow,  # strides of out
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    FORMAT: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # True: sum of matches (pool backward); False: last match (unpool)
    CHANNELS_LAST: tl.constexpr, ACC_FP64: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Only correct when every flat switch lies in its own window (checked by the launcher).
    e, emask = _program_lanes(total, INDEX_64, BLOCK)
    n, c, h, w = _split_index(e, C, H, W, CHANNELS_LAST)
    src_row = n * ssn + c * ssc
    sw_row = n * swn + c * swc
    if FORMAT == 0:
        here = h.to(tl.int64) * W + w

    if ACCUMULATE:
        if ACC_FP64:
            acc = tl.zeros([BLOCK], tl.float64)
        else:
            acc = tl.zeros([BLOCK], tl.float32)
    else:
        # selection never rounds: keep the source dtype so values are copied bit for bit
        acc = tl.zeros([BLOCK], src_ptr.dtype.element_ty)

    # Tap i of window oh covers row oh*SH - PH + i*DH, so larger i means a smaller oh: walking i
    # (and j) downwards visits the candidate windows in increasing row-major order.
    for ii in tl.static_range(KH):
        i = KH - 1 - ii
        a = h + PH - i * DH
        a_c = tl.maximum(a, 0)
        oh = a_c // SH
        h_ok = (a >= 0) & (a_c % SH == 0) & (oh < Hp)
        for jj in tl.static_range(KW):
            j = KW - 1 - jj
            b = w + PW - j * DW
            b_c = tl.maximum(b, 0)
            ow = b_c // SW
            ok = emask & h_ok & (b >= 0) & (b_c % SW == 0) & (ow < Wp)
            if FORMAT == 0:
                s = tl.load(sw_ptr + sw_row + oh * swh + ow * sww, mask=ok, other=-1)
                hit = ok & (s == here)
            elif FORMAT == 1:
                s = tl.load(sw_ptr + sw_row + oh * swh + ow * sww, mask=ok, other=0)
                hit = ok & (s.to(tl.int32) == i * KW + j)
            else:
                byte = tl.load(sw_ptr + sw_row + oh * swh + (ow // 4) * sww, mask=ok, other=0)
                code = (byte.to(tl.int32) >> ((ow % 4) * 2)) & 3
                hit = ok & (code == i * KW + j)
            v = tl.load(src_ptr + src_row + oh * ssh + ow * ssw, mask=hit, other=0)
            if ACCUMULATE:
                acc += v.to(acc.dtype)
            else:
                acc = tl.where(hit, v, acc)

    tl.store(out_ptr + n * son + c * soc + h * soh + w * sow, acc.to(out_ptr.dtype.element_ty),
             mask=emask)


@triton.jit
def _switch_lanes(sw_ptr, total, C, Hp, Wp, Wq, H, W, HW, swn, swc, swh, sww,
                  KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  FORMAT: tl.constexpr, PACK: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr):
    # This program's BLOCK switch elements as [BLOCK, PACK] pooled lanes (PACK columns share a
    # packed byte), each decoded to its (h, w) in the H x W plane and an ERR_* class.
    e, emask = _program_lanes(total, INDEX_64, BLOCK)
    n, c, oh, q = _split_index(e, C, Hp, Wq, CHANNELS_LAST)
    t = tl.arange(0, PACK)
    ow = q[:, None] * PACK + t[None, :]  # [BLOCK, PACK]
    lane = emask[:, None] & (ow < Wp)
    raw = tl.load(sw_ptr + n * swn + c * swc + oh * swh + q * sww, mask=emask, other=0)
    if FORMAT == 0:
        s = raw[:, None]
    elif FORMAT == 1:
        s = raw.to(tl.int32)[:, None]
    else:
        s = (raw.to(tl.int32)[:, None] >> (2 * t)[None, :]) & 3
    oh2 = oh[:, None] + tl.zeros([BLOCK, PACK], oh.dtype)
    h, w, err = _decode_switch(s, oh2, ow, H, W, HW, FORMAT, KH, KW, SH, SW, PH, PW, DH, DW)
    return n, c, oh, ow, lane, h, w, err


@triton.jit
def _check_switches_kernel(
    sw_ptr,  # [N, C, Hp, Wp] int64 (flat) / uint8 (window), or [N, C, Hp, Wq] uint8 (packed)
    flag_ptr,  # [1] int32, zero-initialised; receives the max ERR_* class
    total,  # N * C * Hp * Wq
    C, Hp, Wp, Wq, H, W, HW,  # (H, W): the plane the switches point into; HW = H * W
    swn, swc, swh, sww,  # strides of switches
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    FORMAT: tl.constexpr, PACK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr,
):
    n, c, oh, ow, lane, h, w, err = _switch_lanes(
        sw_ptr, total, C, Hp, Wp, Wq, H, W, HW, swn, swc, swh, sww, KH, KW, SH, SW, PH, PW, DH, DW,
        FORMAT, PACK, CHANNELS_LAST, INDEX_64, BLOCK)
    err = tl.where(lane, err, 0)
    worst = tl.max(tl.max(err, axis=1), axis=0)
    # one atomic per program, and only when something was found
    tl.atomic_max(flag_ptr, worst, mask=worst > 0)


@triton.jit
def _max_unpool2d_backward_kernel(
    go_ptr,  # [N, C, H, W] gradient of the unpool output
    sw_ptr,  # [N, C, Hp, Wp] int64 (flat) / uint8 (window), or [N, C, Hp, Wq] uint8 (packed)
    gi_ptr,  # [N, C, Hp, Wp] gradient of the unpool input, dtype of go
    flag_ptr,  # [1] int32, zero-initialised; receives the max error class (>= 2 only)
    total,  # N * C * Hp * Wq
    C, Hp, Wp, Wq, H, W, HW,  # (H, W): plane of go; HW = H * W
    sgn, sgc, sgh, sgw,  # strides of go
    swn, swc, swh, sww,  # strides of switches
    sin, sic, sih, siw,  # strides of gi
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    FORMAT: tl.constexpr, PACK: tl.constexpr,
    CHANNELS_LAST: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr,
):
    # A plain gather: the range check is fused in because every switch is read here anyway.
    n, c, oh, ow, lane, h, w, err = _switch_lanes(
        sw_ptr, total, C, Hp, Wp, Wq, H, W, HW, swn, swc, swh, sww, KH, KW, SH, SW, PH, PW, DH, DW,
        FORMAT, PACK, CHANNELS_LAST, INDEX_64, BLOCK)
    # a flat switch outside its own window is legal here: the gather reads wherever it points
    err = tl.where(lane & (err >= 2), err, 0)
    g_off = (n * sgn + c * sgc)[:, None] + h * sgh + w * sgw
    v = tl.load(go_ptr + g_off, mask=lane & (err == 0), other=0)
    tl.store(gi_ptr + (n * sin + c * sic + oh * sih)[:, None] + ow * siw, v, mask=lane)
    worst = tl.max(tl.max(err, axis=1), axis=0)
    tl.atomic_max(flag_ptr, worst, mask=worst > 0)


# ---------------------------------------------------------------------------------------------
# launcher helpers
# ---------------------------------------------------------------------------------------------
def _memory_format(t):
    if suggest_memory_format(t) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def _index_64(*tensors):
    # int32 index math is safe while every element offset (and pid * BLOCK) stays below 2**31.
    limit = 2**31 - 4 * _BLOCK
    return any(t.numel() >= limit for t in tensors)


def _geometry(kernel_size, stride, padding, dilation):
    return dict(KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1],
                PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1])


def _format_code(index_format, kernel_size):
    fmt = _FORMATS[index_format]
    if fmt == FORMAT_PACKED and tuple(kernel_size) != (2, 2):
        raise ValueError(f"index_format='packed' needs kernel_size 2x2, got {tuple(kernel_size)}")
    if fmt == FORMAT_WINDOW and kernel_size[0] * kernel_size[1] > 256:
        raise ValueError(f"index_format='window' holds at most 256 window positions, got "
                         f"kernel_size {tuple(kernel_size)}")
    return fmt


def _switch_width(fmt, wo):
    return (wo + 3) // 4 if fmt == FORMAT_PACKED else wo


def _empty_switches(n, c, ho, wo, fmt, device, memory_format):
    dtype = torch.int64 if fmt == FORMAT_FLAT else torch.uint8
    return torch.empty((n, c, ho, _switch_width(fmt, wo)), dtype=dtype, device=device,
                       memory_format=memory_format)


def _raise_for(flag, op, fmt, kernel_size, plane_hw, plane_name):
    h, w = plane_hw
    if flag == ERR_RANGE:
        raise RuntimeError(
            f"{op}: indices out of range: expected flat switch indices in [0, {h * w}) of the "
            f"{h}x{w} {plane_name} plane")
    if flag == ERR_CODE:
        kh, kw = kernel_size
        raise RuntimeError(
            f"{op}: indices invalid: expected {_fmt_name(fmt)} switch codes in [0, {kh * kw}) "
            f"for a {kh}x{kw} kernel")
    if flag == ERR_PADDING:
        raise RuntimeError(
            f"{op}: indices invalid: expected {_fmt_name(fmt)} switch codes that decode to a "
            f"position inside the {h}x{w} {plane_name} plane, got one that decodes to padding or "
            f"outside the plane")


def _fmt_name(fmt):
    return {FORMAT_FLAT: "flat", FORMAT_WINDOW: "window", FORMAT_PACKED: "packed"}[fmt]


def _check_switches(switches, pooled_hw, plane_hw, fmt, geo, channels_last):
    """Runs the check kernel; returns the worst ERR_* class (host sync)."""
    n, c = switches.shape[:2]
    hp, wp = pooled_hw
    wq = switches.shape[3]
    pack = 4 if fmt == FORMAT_PACKED else 1
    flag = torch.zeros(1, dtype=torch.int32, device=switches.device)
    total = n * c * hp * wq
    block = 2 * _BLOCK // pack
    _check_switches_kernel[(triton.cdiv(total, block),)](
        switches, flag, total, c, hp, wp, wq, plane_hw[0], plane_hw[1],
        plane_hw[0] * plane_hw[1], *switches.stride(),
        **geo, FORMAT=fmt, PACK=pack, CHANNELS_LAST=channels_last,
        INDEX_64=_index_64(switches), BLOCK=block, num_warps=_NUM_WARPS)
    return int(flag.item())


def _segments(keys):
    """Stable sort of int64 keys; returns (sorted_keys, order, is_first_of_run, is_last_of_run)."""
    sorted_keys, order = torch.sort(keys, stable=True)
    diff = sorted_keys[1:] != sorted_keys[:-1]
    first = torch.ones_like(sorted_keys, dtype=torch.bool)
    last = torch.ones_like(sorted_keys, dtype=torch.bool)
    first[1:] = diff
    last[:-1] = diff
    return sorted_keys, order, first, last


def _plane_keys(switches, plane_elems):
    # Global target of every pooled element, listed in NCHW order: per plane, that is increasing
    # row-major window order, the order the contract resolves duplicates in.
    n, c = switches.shape[:2]
    sw = switches.contiguous().view(n * c, -1)
    base = torch.arange(n * c, device=sw.device, dtype=torch.int64)[:, None] * plane_elems
    return (sw + base).view(-1)


def _unpool_fallback(x, switches, out_hw, memory_format):
    # Flat switches that leave their window: the last writer of each output pixel is the last
    # element of its run after a stable sort of the targets; the final write uses unique indices,
    # so it is deterministic. Cost: a stable radix sort of N*C*Hp*Wp int64 keys plus a few
    # elementwise passes -- several times the traffic of the gather kernel, and extra int64
    # buffers of that size.
    n, c = x.shape[:2]
    hu, wu = out_hw
    keys = _plane_keys(switches, hu * wu)
    sorted_keys, order, _first, last = _segments(keys)
    out = torch.zeros(n * c * hu * wu, dtype=x.dtype, device=x.device)
    out[sorted_keys[last]] = x.contiguous().view(-1)[order[last]]
    return out.view(n, c, hu, wu).contiguous(memory_format=memory_format)


def _pool_backward_fallback(grad_output, switches, input_hw, memory_format):
    # Flat switches that leave their window: sum each target's gradients in increasing window
    # order without atomics. After a stable sort by target, the r-th gradient of every target has
    # rank r in its run; adding rank 0, then rank 1, ... touches distinct targets per step (plain
    # indexed writes, deterministic) and keeps the order. Accumulation is in float32 (float64 for
    # float64), rounded once, like the gather kernel. Cost: a stable sort of N*C*Ho*Wo int64 keys,
    # a second sort of the ranks, one host sync, and as many small steps as the most-hit pixel
    # has windows (1-4 for real switches; Ho*Wo if every switch of a plane points at one pixel).
    n, c = grad_output.shape[:2]
    h, w = input_hw
    acc_dtype = torch.float64 if grad_output.dtype == torch.float64 else torch.float32
    keys = _plane_keys(switches, h * w)
    sorted_keys, order, first, _last = _segments(keys)
    pos = torch.arange(keys.numel(), device=keys.device)
    run_start = torch.where(first, pos, torch.zeros_like(pos)).cummax(0).values
    rank = pos - run_start
    rank_sorted, by_rank = torch.sort(rank, stable=True)
    counts = torch.bincount(rank_sorted).tolist()
    vals = grad_output.contiguous().view(-1)[order].to(acc_dtype)
    acc = torch.zeros(n * c * h * w, dtype=acc_dtype, device=grad_output.device)
    start = 0
    for cnt in counts:
        sel = by_rank[start:start + cnt]
        tgt = sorted_keys[sel]
        acc[tgt] = acc[tgt] + vals[sel]
        start += cnt
    out = acc.to(grad_output.dtype).view(n, c, h, w)
    return out.contiguous(memory_format=memory_format)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def max_pool2d_switches(x, kernel_size, stride, padding, dilation, out_hw, index_format):
    """Pooled values [N, C, Ho, Wo] and their switches in `index_format`."""
    fmt = _format_code(index_format, kernel_size)
    mf = _memory_format(x)
    x = x.contiguous(memory_format=mf)
    n, c, h, w = x.shape
    ho, wo = out_hw
    values = torch.empty((n, c, ho, wo), dtype=x.dtype, device=x.device, memory_format=mf)
    switches = _empty_switches(n, c, ho, wo, fmt, x.device, mf)
    if values.numel() == 0:
        return values, switches
    pack = 4 if fmt == FORMAT_PACKED else 1
    wq = switches.shape[3]
    total = n * c * ho * wq
    block = _BLOCK // pack
    _max_pool2d_switches_kernel[(triton.cdiv(total, block),)](
        x, values, switches, total, c, h, w, ho, wo, wq,
        *x.stride(), *values.stride(), *switches.stride(),
        **_geometry(kernel_size, stride, padding, dilation), FORMAT=fmt, PACK=pack,
        CHANNELS_LAST=mf == torch.channels_last, ACC_FP64=x.dtype == torch.float64,
        INDEX_64=_index_64(x, values), BLOCK=block, num_warps=_NUM_WARPS)
    return values, switches


def _scatter_through_windows(op, src, switches, plane_hw, kernel_size, stride, padding, dilation,
                             index_format, accumulate):
    """Shared body of max_unpool2d (select the last writer) and pool backward (sum)."""
    fmt = _format_code(index_format, kernel_size)
    mf = _memory_format(src)
    src = src.contiguous(memory_format=mf)
    switches = switches.contiguous(memory_format=mf)
    n, c, hp, wp = src.shape
    h, w = plane_hw
    out = torch.empty((n, c, h, w), dtype=src.dtype, device=src.device, memory_format=mf)
    if out.numel() == 0:
        return out
    if src.numel() == 0:
        return out.zero_()
    geo = _geometry(kernel_size, stride, padding, dilation)
    channels_last = mf == torch.channels_last
    plane_name = "output" if not accumulate else "input"
    # The check decodes flat switches in the actual destination plane. That also covers a user
    # output_size other than the default: a flat index then names a different (h, w) than at
    # pooling time, and whenever that lands outside its window the fallback runs, so the gather
    # only ever sees switches it can find.
    flag = _check_switches(switches, (hp, wp), (h, w), fmt, geo, channels_last)
    _raise_for(flag, op, fmt, kernel_size, (h, w), plane_name)
    if flag == ERR_OUTSIDE_WINDOW:
        if accumulate:
            return _pool_backward_fallback(src, switches, (h, w), mf)
        return _unpool_fallback(src, switches, (h, w), mf)
    total = out.numel()
    _window_gather_kernel[(triton.cdiv(total, _GATHER_BLOCK),)](
        src, switches, out, total, c, h, w, hp, wp,
        *src.stride(), *switches.stride(), *out.stride(),
        **geo, FORMAT=fmt, ACCUMULATE=accumulate, CHANNELS_LAST=channels_last,
        ACC_FP64=src.dtype == torch.float64, INDEX_64=_index_64(src, switches, out),
        BLOCK=_GATHER_BLOCK, num_warps=_NUM_WARPS)
    return out


def max_unpool2d(x, switches, kernel_size, stride, padding, dilation, out_hw, index_format):
    """[N, C, *out_hw]: every pooled value written back to its switch, zeros elsewhere."""
    return _scatter_through_windows("max_unpool2d", x, switches, out_hw, kernel_size, stride,
                                    padding, dilation, index_format, accumulate=False)


def max_pool2d_switches_backward(grad_output, switches, input_hw, kernel_size, stride, padding,
                                 dilation, index_format):
    """[N, C, *input_hw]: grad_output summed onto the switch of every window."""
    return _scatter_through_windows("max_pool2d_switches_backward", grad_output, switches,
                                    input_hw, kernel_size, stride, padding, dilation, index_format,
                                    accumulate=True)


def max_unpool2d_backward(grad_output, switches, pooled_hw, kernel_size, stride, padding,
                          dilation, index_format):
    """[N, C, *pooled_hw]: grad_output read at every switch."""
    fmt = _format_code(index_format, kernel_size)
    mf = _memory_format(grad_output)
    grad_output = grad_output.contiguous(memory_format=mf)
    switches = switches.contiguous(memory_format=mf)
    n, c, h, w = grad_output.shape
    hp, wp = pooled_hw
    grad_input = torch.empty((n, c, hp, wp), dtype=grad_output.dtype, device=grad_output.device,
                             memory_format=mf)
    if grad_input.numel() == 0:
        return grad_input
    pack = 4 if fmt == FORMAT_PACKED else 1
    wq = switches.shape[3]
    total = n * c * hp * wq
    block = _BLOCK // pack
    flag = torch.zeros(1, dtype=torch.int32, device=grad_output.device)
    _max_unpool2d_backward_kernel[(triton.cdiv(total, block),)](
        grad_output, switches, grad_input, flag, total, c, hp, wp, wq, h, w, h * w,
        *grad_output.stride(), *switches.stride(), *grad_input.stride(),
        **_geometry(kernel_size, stride, padding, dilation), FORMAT=fmt, PACK=pack,
        CHANNELS_LAST=mf == torch.channels_last,
        INDEX_64=_index_64(grad_output, switches, grad_input), BLOCK=block,
        num_warps=_NUM_WARPS)
    _raise_for(int(flag.item()), "max_unpool2d_backward", fmt, kernel_size, (h, w), "output")
    return grad_input


# ---------------------------------------------------------------------------------------------
# AOT compilation targets (tests/test_triton_compile.py)
# ---------------------------------------------------------------------------------------------
_TRITON_DTYPE = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16", "fp64": "*fp64"}
_SWITCH_PTR = {FORMAT_FLAT: "*i64", FORMAT_WINDOW: "*u8", FORMAT_PACKED: "*u8"}
# Representative geometries: SegNet/DeconvNet 2x2 s2 and DeepLab 3x3 s2 p1.
_GEO_2X2 = dict(KH=2, KW=2, SH=2, SW=2, PH=0, PW=0, DH=1, DW=1)
_GEO_3X3 = dict(KH=3, KW=3, SH=2, SW=2, PH=1, PW=1, DH=1, DW=1)


def _sig(names, types):
    return dict(zip(names, types))


def _kernel_entries():
    entries = []
    strides = ["i32"] * 12
    for fmt in (FORMAT_FLAT, FORMAT_WINDOW, FORMAT_PACKED):
        geo = _GEO_2X2 if fmt == FORMAT_PACKED else _GEO_3X3
        pack = 4 if fmt == FORMAT_PACKED else 1
        for dt in ("fp32", "fp16"):
            for cl in (False, True):
                const = dict(geo, FORMAT=fmt, PACK=pack, CHANNELS_LAST=cl, ACC_FP64=False,
                             INDEX_64=False, BLOCK=_BLOCK // pack)
                sig = _sig(_max_pool2d_switches_kernel.arg_names,
                           [_TRITON_DTYPE[dt], _TRITON_DTYPE[dt], _SWITCH_PTR[fmt]]
                           + ["i32"] * 7 + strides + ["constexpr"] * len(const))
                entries.append((_max_pool2d_switches_kernel, sig, const))
            for acc in (False, True):
                const = dict(geo, FORMAT=fmt, ACCUMULATE=acc, CHANNELS_LAST=False,
                             ACC_FP64=False, INDEX_64=False, BLOCK=_GATHER_BLOCK)
                sig = _sig(_window_gather_kernel.arg_names,
                           [_TRITON_DTYPE[dt], _SWITCH_PTR[fmt], _TRITON_DTYPE[dt]]
                           + ["i32"] * 6 + strides + ["constexpr"] * len(const))
                entries.append((_window_gather_kernel, sig, const))
            const = dict(geo, FORMAT=fmt, PACK=pack, CHANNELS_LAST=False, INDEX_64=False,
                         BLOCK=_BLOCK // pack)
            sig = _sig(_max_unpool2d_backward_kernel.arg_names,
                       [_TRITON_DTYPE[dt], _SWITCH_PTR[fmt], _TRITON_DTYPE[dt], "*i32"]
                       + ["i32"] * 8 + strides + ["constexpr"] * len(const))
            entries.append((_max_unpool2d_backward_kernel, sig, const))
        const = dict(geo, FORMAT=fmt, PACK=pack, CHANNELS_LAST=False, INDEX_64=False,
                     BLOCK=2 * _BLOCK // pack)
        sig = _sig(_check_switches_kernel.arg_names,
                   [_SWITCH_PTR[fmt], "*i32"] + ["i32"] * 8 + ["i32"] * 4
                   + ["constexpr"] * len(const))
        entries.append((_check_switches_kernel, sig, const))
    # the wide-index and float64 paths of the hot kernels
    const = dict(_GEO_3X3, FORMAT=FORMAT_FLAT, PACK=1, CHANNELS_LAST=False, ACC_FP64=True,
                 INDEX_64=True, BLOCK=_BLOCK)
    sig = _sig(_max_pool2d_switches_kernel.arg_names,
               ["*fp64", "*fp64", "*i64", "i64"] + ["i32"] * 6 + ["i64"] * 12
               + ["constexpr"] * len(const))
    entries.append((_max_pool2d_switches_kernel, sig, const))
    const = dict(_GEO_2X2, FORMAT=FORMAT_WINDOW, ACCUMULATE=True, CHANNELS_LAST=True,
                 ACC_FP64=False, INDEX_64=True, BLOCK=_GATHER_BLOCK)
    sig = _sig(_window_gather_kernel.arg_names,
               ["*bf16", "*u8", "*bf16", "i64"] + ["i32"] * 5 + ["i64"] * 12
               + ["constexpr"] * len(const))
    entries.append((_window_gather_kernel, sig, const))
    # Triton turns integer arguments equal to 1 into constexprs; compile that case once for a
    # kernel whose scalars feed the switch decoding (a 1x1 plane, one channel, contiguous W).
    ones = dict(C=1, Hp=1, Wp=1, Wq=1, H=1, W=1, HW=1, sgw=1, sww=1, siw=1)
    const = dict(_GEO_2X2, FORMAT=FORMAT_FLAT, PACK=1, CHANNELS_LAST=False, INDEX_64=False,
                 BLOCK=_BLOCK, **ones)
    names = _max_unpool2d_backward_kernel.arg_names
    sig = _sig(names, ["*fp32", "*i64", "*fp32", "*i32"] + ["i32"] * (len(names) - 4))
    sig.update({k: "constexpr" for k in const})
    entries.append((_max_unpool2d_backward_kernel, sig, const))
    return entries


KERNELS = _kernel_entries()
