"""Triton kernels for the atrous (dilated) convolution with a fused epilogue.

    y = act((conv(x, w) + bias) * scale + shift),   act = identity | relu,   groups = 1

Launchers take arguments already validated and normalised by deconvseg_fast/ops/conv.py and run on
CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1.

Design
------
* Implicit GEMM: the output pixels are the GEMM's M rows, the output channels its N columns and
  (tap, input channel) its K. Each program owns a BLOCK_M x BLOCK_N output tile; for every one of
  the KH*KW taps it walks C_in in BLOCK_K chunks, gathering the shifted input pixels straight from
  the input (padding = masked loads, nothing is materialised) and the matching weight slice, and
  accumulates with tl.dot in fp32 (fp64 for float64 inputs). No im2col buffer exists.
* The kernel reads its operands K-contiguous: the launcher hands it the input in channels_last
  (a no-op for NHWC callers, one transpose pass for NCHW ones -- what cuDNN does internally for
  tensor cores too) and the weight as [C_out, kH, kW, C_in] (cached per weight tensor and version,
  so a module pays the rearrangement once). Input-channel runs are then unit-stride, Triton
  vectorises the loads into cp.async copies to shared memory, and the A/B tiles of the pipeline
  stages stay out of registers (with NCHW operands every element is a separate scalar load and
  the 128x128 tiles spill). The output is written through its strides in torch's layout, NCHW
  or channels_last.
* The epilogue (bias, folded batch-norm scale/shift, ReLU) runs on the fp32 accumulator before the
  single rounding to the output dtype, so conv -> BN -> ReLU costs one write of the activation.
  torch rounds after the convolution and again after the batch norm; we round once (more accurate,
  hence tolerances rather than bit equality against torch in reduced precision).
* float32 follows torch.backends.cudnn.allow_tf32 (True by default, as for torch's own conv2d):
  TF32 tensor cores when allowed, exact fp32 products otherwise.
* Tile shapes are autotuned over a small list; BLOCK_K is the same in every config of a dtype
  (32 for fp16/bf16, 16 for fp32/fp64), so each
  output element's K reduction is chunked identically whatever tile wins and the bits do not
  depend on the autotuner's choice. Nothing is accumulated across programs: deterministic.

Two formulations (both tested, `algorithm=` picks one):
* "direct": the kernel above with the dilation in its tap offsets.
* "space_to_batch" (stride 1 only): the classic hole-algorithm rewrite. The zero-padded input is
  split into dh x dw phase images [N*dh*dw, C, Hs, Ws] (x_s[n, a, b][r, s] = x_pad[a + dh r,
  b + dw s]); on each phase the dilated conv is a dense (dilation 1) conv, so one output tile's
  taps overlap the neighbouring pixels' taps and reuse the same cache lines, instead of reading
  KH*KW separate regions dilation rows apart. The batch-to-space step is fused into the kernel's
  store (phase (a, b) row (i, j) lands at output (a + dh i, b + dw j)), so the only extra cost is
  one pad-and-permute pass over the input.
* Default ("auto", `choose_algorithm`): space_to_batch when the stride is 1 and both dilations are
  >= SPACE_TO_BATCH_MIN_DILATION (4) -- DeepLab's fc6 (dilation 12) -- else direct (conv5's
  dilation 2, dense convs). This is a reasoned default, not a measured one: no GPU has timed the
  two yet (the benchmark runs both with --device cuda). Small dilations gain little locality and
  would pay the extra input pass.
"""
import weakref

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format

__all__ = ["atrous_conv2d", "choose_algorithm", "output_memory_format", "ALGORITHMS", "KERNELS"]

ALGORITHMS = ("auto", "direct", "space_to_batch")
SPACE_TO_BATCH_MIN_DILATION = 4

# K chunk of every config of a dtype (see the module docstring: fixed so bits do not depend on the
# tile). 16-bit operands take 32 channels per step; fp32/fp64 take 16, so their A/B tiles occupy
# the same bytes and registers as the 16-bit ones (with 32, fp32's larger tiles spill on sm_90).
_BLOCK_K = {torch.float16: 32, torch.bfloat16: 32, torch.float32: 16, torch.float64: 16}

# The autotuned tile lists: big tiles for big maps (SegNet 360x480), narrower ones so a DeepLab
# 41x41 map (1681 rows) with 512-1024 channels still spreads over every SM. The list depends on
# the output layout: a channels_last output is stored in vectorised runs along C_out, but for an
# NCHW output Triton cannot prove the M offsets contiguous, so every element of the tile keeps its
# own offset and predicate through the store -- 128x128 and 128x64 tiles then exceed 255
# registers and spill (tests/test_triton_compile.py; 128x32 still spills in fp32 space_to_batch
# on sm_90), so NCHW outputs tune over tiles of at most 64x64.
_CONFIGS_NHWC_OUT = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
_CONFIGS_NCHW_OUT = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
# float64 (a correctness dtype on GPUs) and the interpreter run one fixed, small tile: an fp64
# 128x128 accumulator would not fit in registers, and the interpreter runs every program in numpy.
_FP64_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
_INTERPRET_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "GROUP_M": 4}


@triton.jit
def _atrous_conv2d_kernel(
    x_ptr,  # [NB, C_in, Hi, Wi] input (NB = N, or N*PA*PB phase images for space_to_batch)
    w_ptr,  # [C_out, C_in, KH, KW] weight, dtype of x
    b_ptr,  # [C_out] bias, dtype of x (unused unless HAS_BIAS)
    s_ptr,  # [C_out] folded batch-norm scale, any float dtype (unused unless HAS_SCALE)
    t_ptr,  # [C_out] folded batch-norm shift, any float dtype (unused unless HAS_SHIFT)
    y_ptr,  # [N, C_out, Ho, Wo] output, dtype of x
    M,  # NB * Hm * Wm: GEMM rows
    C_in, C_out,
    Hi, Wi,  # input plane (the padded phase plane for space_to_batch)
    Hm, Wm,  # the grid the GEMM rows walk per image: (Ho, Wo), or a phase's (ceil(Ho/PA), ceil(Wo/PB))
    Ho, Wo,  # output plane
    sxn, sxc, sxh, sxw,  # strides of x
    swo, swi, swh, sww,  # strides of w
    syn, syc, syh, syw,  # strides of y
    SH, SW, PH, PW, DH, DW,  # geometry on x (space_to_batch: 1, 1, 0, 0, 1, 1)
    PA, PB,  # output phases: row (i, j) of image nb = (n*PA + a)*PB + b lands at (a + PA i, b + PB j)
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    ACC_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share every column tile's weights in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(C_out, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    # Rows: widen the program id before multiplying; narrow back when every offset fits in int32.
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    if not INDEX_64:
        m = m.to(tl.int32)
    m_ok = m < M
    j = m % Wm
    r = m // Wm
    i = r % Hm
    nb = r // Hm
    ih0 = i * SH - PH
    iw0 = j * SW - PW
    x_row = nb * sxn + ih0 * sxh + iw0 * sxw  # [BLOCK_M], tap (0, 0), channel 0
    n_img = nb // (PA * PB)
    ph_ab = nb % (PA * PB)
    oh = ph_ab // PB + PA * i
    ow = ph_ab % PB + PB * j
    row_ok = m_ok & (oh < Ho) & (ow < Wo)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_out
    rk = tl.arange(0, BLOCK_K)

    if ACC_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel chunk), so Triton's pipeliner sees a single loop and keeps
    # its stages of A/B tiles in shared memory (cp.async) rather than registers.
    chunks = tl.cdiv(C_in, BLOCK_K)
    for kk in range(0, KH * KW * chunks):
        tap = kk // chunks
        c0 = (kk - tap * chunks) * BLOCK_K
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * DH
        iw = iw0 + kw * DW
        a_ok = row_ok & (ih >= 0) & (ih < Hi) & (iw >= 0) & (iw < Wi)
        ck = c0 + rk
        k_ok = ck < C_in
        a = tl.load(x_ptr + (x_row + kh * DH * sxh + kw * DW * sxw)[:, None] + ck[None, :] * sxc,
                    mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + (kh * swh + kw * sww) + ck[:, None] * swi + cols[None, :] * swo,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_DOT:
            a = a.to(acc.dtype)
            b = b.to(acc.dtype)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    # Epilogue on the accumulator: one rounding, one store.
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
    if HAS_SCALE:
        acc *= tl.load(s_ptr + cols, mask=col_ok, other=1.0).to(acc.dtype)[None, :]
    if HAS_SHIFT:
        acc += tl.load(t_ptr + cols, mask=col_ok, other=0.0).to(acc.dtype)[None, :]
    if RELU:
        acc = tl.where(acc < 0, 0.0, acc)  # NaN stays NaN, as torch.relu
    y_row = n_img * syn + oh * syh + ow * syw
    tl.store(y_ptr + y_row[:, None] + cols[None, :] * syc, acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


_TUNE_KEY = ["M", "C_in", "C_out", "KH", "KW", "DH", "DW", "PA", "PB"]
_tuned_nhwc_out = triton.autotune(configs=_CONFIGS_NHWC_OUT, key=_TUNE_KEY)(_atrous_conv2d_kernel)
_tuned_nchw_out = triton.autotune(configs=_CONFIGS_NCHW_OUT, key=_TUNE_KEY)(_atrous_conv2d_kernel)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------
def output_memory_format(x: torch.Tensor, w: torch.Tensor) -> torch.memory_format:
    """channels_last when the input or the weight suggests it (torch's rule for cuDNN and oneDNN)."""
    if suggest_memory_format(x) == torch.channels_last or suggest_memory_format(w) == torch.channels_last:
        return torch.channels_last
    return torch.contiguous_format


def choose_algorithm(stride, dilation, algorithm: str = "auto") -> str:
    """The formulation a call runs: see the module docstring for the "auto" rule."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "space_to_batch" and tuple(stride) != (1, 1):
        raise ValueError(f"algorithm='space_to_batch' needs stride (1, 1), got {tuple(stride)}")
    if algorithm != "auto":
        return algorithm
    if tuple(stride) == (1, 1) and min(dilation) >= SPACE_TO_BATCH_MIN_DILATION:
        return "space_to_batch"
    return "direct"


def _span(t: torch.Tensor) -> int:
    # one past the largest element offset the kernel may form from t's strides
    return 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()) if s > 0)


def _index_64(*tensors) -> bool:
    limit = 2**31 - 4096  # head-room for a tile's worth of out-of-range (masked) offsets
    return any(_span(t) >= limit for t in tensors)


def _space_to_batch(x: torch.Tensor, padding, dilation, kernel_size, out_hw):
    """x [N, C, H, W] -> phase images [N*dh*dw, C, Hs, Ws], zero padded, channels_last."""
    n, c, h, w = x.shape
    (ph, pw), (dh, dw), (kh, kw), (ho, wo) = padding, dilation, kernel_size, out_hw
    hm, wm = -(-ho // dh), -(-wo // dw)
    hs, ws = hm + kh - 1, wm + kw - 1
    # bottom/right padding >= the requested padding: the grid covers every output phase row
    xp = torch.nn.functional.pad(x, (pw, ws * dw - w - pw, ph, hs * dh - h - ph))
    grid = xp.view(n, c, hs, dh, ws, dw)
    xs = grid.permute(0, 3, 5, 2, 4, 1).reshape(n * dh * dw, hs, ws, c).permute(0, 3, 1, 2)
    return xs, (hm, wm)


# Weights rearranged to [C_out, kH, kW, C_in] (channels_last strides), keyed by the weight
# tensor itself: a module's weight is rearranged once and again only after it changes (its
# version counter moves). Weak references, so the cache never keeps a weight alive.
_WEIGHT_CACHE: dict = {}
_WEIGHT_CACHE_SIZE = 64


def _weight_k_contiguous(w: torch.Tensor) -> torch.Tensor:
    if w.is_contiguous(memory_format=torch.channels_last) or w.device.type == "meta":
        return w.contiguous(memory_format=torch.channels_last)
    try:
        version = w._version
    except RuntimeError:  # an inference tensor: no version counter, so no caching
        return w.contiguous(memory_format=torch.channels_last)
    hit = _WEIGHT_CACHE.get(id(w))
    if hit is not None and hit[0]() is w and hit[1] == version:
        return hit[2]
    wk = w.detach().contiguous(memory_format=torch.channels_last)
    if len(_WEIGHT_CACHE) >= _WEIGHT_CACHE_SIZE:
        _WEIGHT_CACHE.clear()
    _WEIGHT_CACHE[id(w)] = (weakref.ref(w), version, wk)
    return wk


def _launch_args(x, w, bias, scale, shift, y, stride, padding, dilation, relu, algorithm):
    """(kernel arguments, constexprs) of one launch: shared by the launcher and the AOT list."""
    n = x.shape[0]
    c_out, c_in, kh, kw = w.shape
    ho, wo = y.shape[-2:]
    if algorithm == "space_to_batch":
        xk, (hm, wm) = _space_to_batch(x, padding, dilation, (kh, kw), (ho, wo))
        geo = dict(SH=1, SW=1, PH=0, PW=0, DH=1, DW=1, PA=dilation[0], PB=dilation[1])
    else:
        xk, (hm, wm) = x.contiguous(memory_format=torch.channels_last), (ho, wo)
        geo = dict(SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0],
                   DW=dilation[1], PA=1, PB=1)
    w = _weight_k_contiguous(w)
    nb = xk.shape[0]
    fp32 = x.dtype == torch.float32
    allow_tf32 = torch.backends.cudnn.allow_tf32
    args = dict(
        x_ptr=xk, w_ptr=w, b_ptr=bias if bias is not None else y,
        s_ptr=scale if scale is not None else y, t_ptr=shift if shift is not None else y, y_ptr=y,
        M=nb * hm * wm, C_in=c_in, C_out=c_out, Hi=xk.shape[2], Wi=xk.shape[3], Hm=hm, Wm=wm,
        Ho=ho, Wo=wo,
        sxn=xk.stride(0), sxc=xk.stride(1), sxh=xk.stride(2), sxw=xk.stride(3),
        swo=w.stride(0), swi=w.stride(1), swh=w.stride(2), sww=w.stride(3),
        syn=y.stride(0), syc=y.stride(1), syh=y.stride(2), syw=y.stride(3),
        **geo)
    const = dict(KH=kh, KW=kw, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
                 HAS_SHIFT=shift is not None, RELU=bool(relu), ACC_FP64=x.dtype == torch.float64,
                 INPUT_PRECISION="tf32" if fp32 and allow_tf32 else "ieee",
                 # Triton's interpreter (3.8) multiplies the raw bit patterns of bfloat16 operands
                 # in tl.dot; on CPU tensors the operands are widened first (exact: products of
                 # bf16 values are exact in fp32). GPUs always run the native bf16 dot.
                 UPCAST_DOT=x.dtype == torch.bfloat16 and x.device.type == "cpu",
                 INDEX_64=_index_64(xk, w, y), BLOCK_K=_BLOCK_K[x.dtype])
    return args, const


def atrous_conv2d(x, w, bias, scale, shift, stride, padding, dilation, relu: bool,
                  algorithm: str = "auto") -> torch.Tensor:
    """y [N, C_out, Ho, Wo] = act((conv(x, w) + bias) * scale + shift), in output_memory_format.

    x [N, C_in, H, W] (C_in >= 1), w [C_out, C_in, kH, kW] of one float dtype; bias [C_out] of that dtype or
    None; scale, shift [C_out] of any float dtype or None. Arguments are validated by the caller.
    """
    algorithm = choose_algorithm(stride, dilation, algorithm)
    n, _, h, wd = x.shape
    c_out, _, kh, kw = w.shape
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = torch.empty((n, c_out, ho, wo), dtype=x.dtype, device=x.device,
                    memory_format=output_memory_format(x, w))
    if y.numel() == 0:
        return y
    args, const = _launch_args(x, w, bias, scale, shift, y, stride, padding, dilation, relu, algorithm)
    if const["ACC_FP64"] or not x.is_cuda:
        cfg = dict(_FP64_CONFIG) if x.is_cuda else dict(_INTERPRET_CONFIG)
        grid = (triton.cdiv(args["M"], cfg["BLOCK_M"]) * triton.cdiv(c_out, cfg["BLOCK_N"]),)
        _atrous_conv2d_kernel[grid](**args, **const, **cfg)
    else:
        def grid(meta):
            return (triton.cdiv(args["M"], meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]),)
        tuned = _tuned_nhwc_out if y.stride(1) == 1 else _tuned_nchw_out
        tuned[grid](**args, **const)
    return y


# ---------------------------------------------------------------------------------------------
# AOT compilation targets (tests/test_triton_compile.py)
# ---------------------------------------------------------------------------------------------
_PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def _aot_entry(args, const):
    """(kernel, signature, constexprs, attrs) as a launch with these arguments specialises them
    (Triton's own rules): integers equal to 1 become constexprs, tensors typed pointers, and
    pointers (fresh allocations are 16-byte aligned) and integers divisible by 16 carry
    tt.divisibility 16 -- which is what lets the K-contiguous loads vectorise into cp.async."""
    sig, const, attrs = {}, dict(const), {}
    for idx, name in enumerate(_atrous_conv2d_kernel.arg_names):
        if name in const:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, torch.Tensor):
            sig[name] = _PTR_TYPES[v.dtype]
            attrs[(idx,)] = [["tt.divisibility", 16]]
        elif isinstance(v, int) and not isinstance(v, bool) and v == 1:
            const[name] = v
            sig[name] = "constexpr"
        else:
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
    return _atrous_conv2d_kernel, sig, const, attrs


def _meta_entries(shape, c_out, k, dilation, dtype, channels_last, algorithm, configs, epilogue=True):
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(shape, **meta)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.empty((c_out, shape[1], k, k), **meta)
    vec = torch.empty((c_out,), device="meta", dtype=torch.float32)
    pad = (dilation * (k - 1) // 2,) * 2
    ho = shape[2] + 2 * pad[0] - dilation * (k - 1)
    wo = shape[3] + 2 * pad[1] - dilation * (k - 1)
    y = torch.empty((shape[0], c_out, ho, wo), **meta).contiguous(memory_format=output_memory_format(x, w))
    args, const = _launch_args(x, w, torch.empty((c_out,), **meta) if epilogue else None,
                               vec if epilogue else None, vec if epilogue else None, y, (1, 1), pad,
                               (dilation, dilation), epilogue, algorithm)
    out = []
    for cfg in configs:
        c = dict(const, **{k_: v for k_, v in cfg.items() if k_ not in ("num_warps", "num_stages")})
        fn, sig, c, attrs = _aot_entry(args, c)
        out.append((fn, sig, c, {"num_warps": cfg.get("num_warps", 4), "num_stages": cfg.get("num_stages", 3)},
                    attrs))
    return out


def _config_dicts(channels_last_out: bool):
    configs = _CONFIGS_NHWC_OUT if channels_last_out else _CONFIGS_NCHW_OUT
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]


def _kernel_entries():
    """(kernel, signature, constexprs, options, attrs) per compiled specialisation: every autotune config
    for DeepLab's fc6 (3x3 dilation 12, space_to_batch) and conv5 (dilation 2, direct) in the
    three GPU dtypes and both layouts, plus float64 and the dense/no-epilogue variants once."""
    entries = []
    fc6 = (1, 512, 41, 41)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for cl in (False, True):
            entries += _meta_entries(fc6, 1024, 3, 12, dtype, cl, "space_to_batch", _config_dicts(cl))
            entries += _meta_entries(fc6, 512, 3, 2, dtype, cl, "direct", _config_dicts(cl))
    entries += _meta_entries((1, 64, 360, 480), 64, 3, 1, torch.float16, True, "direct", _config_dicts(True)[:1],
                             epilogue=False)
    entries += _meta_entries(fc6, 1024, 3, 12, torch.float64, False, "direct", [_FP64_CONFIG])
    return entries


KERNELS = _kernel_entries()
