"""Triton helpers shared by the forward, backward and grouped kernels.

Geometry conventions (see ``ringflash.reference``): within one sequence of ``sq`` queries
and ``sk`` keys, query row ``i`` sees key ``j`` iff ``i + diag - left <= j <= i + diag + right``
and ``j < sk``, where ``diag = sk - sq`` (bottom-right alignment) unless the entry gives its
own (context parallelism). ``HAS_LEFT`` /
``HAS_RIGHT`` are compile-time flags for ``left >= 0`` / ``right >= 0``; causal is
``right = 0``. Key and query blocks start at multiples of the block size from the
sequence start.

Each attention loop is split into three phases over block-aligned ranges: masked blocks
on the left edge of the window, fully visible blocks in the middle (no mask computed,
no bounds checks), and masked blocks on the right (the causal diagonal, the window's
right edge, the ragged sequence end). The helpers below compute those ranges.
"""

import os

import torch
import triton
import triton.language as tl

from . import interpreter_compat

LOG2E: float = 1.4426950408889634


# Read once: Triton decides at ``@triton.jit`` time (this module's import) whether the
# kernels are interpreted, so a later change of the variable changes nothing anyway, and the
# launchers ask many times per call (an environment read each time was ~8% of a call's host
# time).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRETING


if interpreting():
    interpreter_compat.apply()


#: Most rows any kernel covers with one tile. Offsets inside a tile (row x token stride)
#: are 32-bit for speed; everything larger (batch, head and block starts) is 64-bit.
MAX_TILE_ROWS = 256
_INT32_LIMIT = 2**31


def cdiv(x: int, y: int) -> int:
    """Host-side ceil(x / y). ``triton.cdiv`` is a constexpr function, which costs about
    3 us a call on the host (a launch computes several grids)."""
    return -(-x // y)


def next_power_of_2(n: int) -> int:
    """Host-side smallest power of 2 >= n (1 for n <= 1), without ``triton.next_power_of_2``'s
    constexpr-function overhead."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def contiguous_strides(shape: tuple) -> tuple:
    """The strides ``torch.empty(shape)`` gives (launch plans work out the layouts of the
    buffers a call will allocate)."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def kernel_layout(x: torch.Tensor, token_dim: int) -> bool:
    """Whether the kernels can address ``x`` as it is: unit stride on the head dim, and a
    token stride small enough that ``MAX_TILE_ROWS`` rows of offsets fit in int32."""
    return x.stride(-1) == 1 and abs(x.stride(token_dim)) * MAX_TILE_ROWS < _INT32_LIMIT


def tma_readable(x: torch.Tensor) -> bool:
    """Whether a TMA descriptor can read ``x`` as it is: unit stride on the last dimension,
    the other strides (none 0: no broadcast dimension) and the base 16-byte aligned."""
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and \
        all(s > 0 and s * x.element_size() % 16 == 0 for s in x.stride()[:-1])


def kernel_operand(x, token_dim: int):
    """``x`` as the kernels read it: unit stride on the head dim, and a token stride small
    enough that ``MAX_TILE_ROWS`` rows of offsets fit in int32 (a huge-stride view, e.g. an
    sbhd buffer with batch x heads x headdim past 2**31 / 256, is copied instead of read
    with overflowing offsets). Under the interpreter, bf16 is computed in float32: its
    bf16 ``tl.dot`` gives wrong results, while float32 only rounds less than the GPU."""
    if not kernel_layout(x, token_dim):
        x = x.contiguous()
    if interpreting() and x.dtype == torch.bfloat16:
        x = x.float()
    return x


def interpreter_output(x):
    """The buffer a kernel should write for output ``x``: under the interpreter a bf16 output
    is written as float32 and rounded by ``finish_output`` (the interpreter's float32 ->
    bf16 cast truncates, an error of up to 1 ulp where the GPU rounds to nearest). Starts
    from ``x``'s values, so rows a launch leaves alone stay as they were."""
    return x.float() if interpreting() and x.dtype == torch.bfloat16 else x


def finish_output(x, written) -> None:
    """Copy a staged output back (round to nearest even); nothing if it was written in place."""
    if written is not x:
        x.copy_(written)


def grad_buffer(x: torch.Tensor, token_dim: int) -> torch.Tensor:
    """An uninitialized gradient for input ``x``, laid out as ``x`` where ``x`` is a dense
    permutation of its shape that the kernels can write (transformers hands over
    (batch, heads, tokens, d) tensors viewed as (batch, tokens, heads, d)), so that autograd
    keeps it as it is instead of copying a gradient whose strides differ from its leaf's
    (flash-attn's ``empty_like``); contiguous otherwise (a slice of a fused projection)."""
    if x.stride(-1) == 1:
        buf = torch.empty_like(x)
        if kernel_layout(buf, token_dim):
            return buf
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def check_output_buffer(x, name: str, token_dim: int) -> None:
    """A caller-given output buffer must already be in a layout the kernels can write."""
    if not kernel_layout(x, token_dim):
        raise ValueError(f"{name}: strides {tuple(x.stride())} are not writable by the kernels; expected unit stride "
                         f"on the last dim and a token stride below {_INT32_LIMIT // MAX_TILE_ROWS}")


def check_device(x, name: str = "q") -> None:
    """CPU tensors run only in Triton's interpreter, other devices (meta, mps) nowhere; say so
    instead of failing obscurely."""
    if x.device.type == "cpu" and not interpreting():
        raise ValueError(
            f"{name}: is on the CPU, where ringflash's Triton kernels run only in Triton's interpreter; "
            "expected a CUDA tensor, or TRITON_INTERPRET=1 set before triton is first imported"
        )
    if x.device.type not in ("cpu", "cuda"):  # meta, mps, xpu...: the launchers would fail obscurely
        raise ValueError(f"{name}: is on device {x.device.type!r}; expected a CUDA tensor (or a CPU one under "
                         "TRITON_INTERPRET=1)")


@triton.jit
def sequence_bounds(
    b, g, QStarts, QEnds, stride_qmeta_g, CuSeqlensK, SequsedK, Diag, stride_used_g,
    seqlen_q, seqlen_k, total_q, total_k,
    IS_VARLEN: tl.constexpr, HAS_SEQUSED: tl.constexpr, HAS_DIAG: tl.constexpr,
):
    """(q_start, sq, k_start, sk, sk_full, diag) of entry (group ``g``, sequence ``b``).

    Varlen entries read their query segment [QStarts[g, b], QEnds[g, b]) and their keys
    [CuSeqlensK[b], CuSeqlensK[b+1]), of which group g uses the first SequsedK[g, b]
    (``sk``; ``sk_full`` is the whole sequence). Plain varlen is one group with
    QStarts = cu_seqlens_q[:-1] and QEnds = cu_seqlens_q[1:]. Query row i sees key j iff
    j <= i + diag (then widened or narrowed by the window): diag = sk - sq aligns causal
    masks to the bottom right; an explicit Diag[g, b] places the query segment anywhere
    relative to its keys (context parallelism). Every value read is clamped into range so
    that bad metadata never reads out of bounds. Dense: starts are 0 (the batch stride does
    the offsetting).
    """
    if IS_VARLEN:
        q_start = tl.minimum(tl.maximum(tl.load(QStarts + g * stride_qmeta_g + b), 0), total_q)
        q_end = tl.minimum(tl.maximum(tl.load(QEnds + g * stride_qmeta_g + b), q_start), total_q)
        k_start = tl.minimum(tl.maximum(tl.load(CuSeqlensK + b), 0), total_k)
        k_end = tl.minimum(tl.maximum(tl.load(CuSeqlensK + b + 1), k_start), total_k)
        sq = q_end - q_start
        sk_full = k_end - k_start
    else:
        # Tensors, not literals: callers take .to(int64) of them, and Triton turns an
        # int argument equal to 1 into a compile-time constant.
        zero = b * 0
        q_start = zero
        k_start = zero
        sq = zero + seqlen_q
        sk_full = zero + seqlen_k
    sk = sk_full
    if HAS_SEQUSED:
        sk = tl.minimum(tl.maximum(tl.load(SequsedK + g * stride_used_g + b), 0), sk_full)
    if HAS_DIAG:
        # Clamped so that no later arithmetic overflows int32; beyond +-2**29 means "all"/"none".
        diag = tl.minimum(tl.maximum(tl.load(Diag + g * stride_used_g + b), -(1 << 29)), 1 << 29)
    else:
        diag = sk - sq
    return q_start, sq, k_start, sk, sk_full, diag


@triton.jit
def row_base(base, b, h, row0, stride_b, stride_h, stride_s):
    """Pointer to row ``row0`` of (batch b, head h) of a (batch, rows, heads, d) tensor, in
    64-bit arithmetic (totals beyond 2**31 elements); offsets within a tile stay 32-bit."""
    return base + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h + row0.to(tl.int64) * stride_s


@triton.jit
def in_elements(stride_b, stride_s, stride_h, UNIT: tl.constexpr):
    """(batch, token, head) strides passed in units of UNIT elements
    (``problem.stride_unit``), back in elements; the products by the constexpr tell the
    compiler that each row starts UNIT-aligned, so its loads and stores vectorize."""
    return stride_b * UNIT, stride_s * UNIT, stride_h * UNIT


@triton.jit
def tile_ptrs(base, b, h, row0, stride_b, stride_h, stride_s, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_R, BLOCK_D) pointers to rows [row0, row0 + BLOCK_R) of (batch b, head h)."""
    return (row_base(base, b, h, row0, stride_b, stride_h, stride_s)
            + tl.arange(0, BLOCK_R)[:, None] * stride_s + tl.arange(0, BLOCK_D)[None, :])


@triton.jit
def schedule(pid, pid_z, num_m_blocks, num_groups, GROUP_ORDER: tl.constexpr):
    """(group, query block, batch entry) of the program at (``pid``, ``pid_z``) on grid axes 0 and 2.

    Query blocks run heaviest first (last block first: under a causal mask it sees the most
    keys), for a shorter tail. The order of the groups (see ``configs.GROUP_ORDERS``):
    0, "global": axis 2 is (group, batch), last group first, so that every program of the
    last (under zigzag, the heaviest) group, over all heads and sequences, runs before the
    next group's, whose short programs then fill the launch's tail; 1, "head": axis 0 is
    (group, query block), last group first, so each head runs its groups one after the
    other; 2, "interleaved": axis 0 puts the groups of one query-block index side by side
    (the programs sharing K/V run together, for L2).
    """
    if GROUP_ORDER == 0:
        batch = tl.num_programs(2) // num_groups
        g = num_groups - 1 - pid_z // batch
        b = pid_z % batch
        m_block = num_m_blocks - 1 - pid
    elif GROUP_ORDER == 1:
        g = num_groups - 1 - pid // num_m_blocks
        m_block = num_m_blocks - 1 - pid % num_m_blocks
        b = pid_z
    else:
        g = pid % num_groups
        m_block = num_m_blocks - 1 - pid // num_groups
        b = pid_z
    return g, m_block, b


@triton.jit
def key_block_ranges(
    m0, sq, sk, diag, window_left, window_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """Key ranges for query rows [m0, min(m0 + BLOCK_M, sq)).

    Returns (n_lo, a_end, b_end, n_hi): masked [n_lo, a_end), fully visible
    [a_end, b_end) (every row sees every key, and the block lies inside [0, sk)),
    masked [b_end, n_hi). Empty phases have end <= start. Query row i sees key j iff
    i + diag - left <= j <= i + diag + right and j < sk.
    """
    last_row = tl.minimum(m0 + BLOCK_M, sq) - 1
    if HAS_RIGHT:
        n_hi = tl.maximum(tl.minimum(sk, last_row + diag + window_right + 1), 0)
        full_hi = tl.maximum(tl.minimum(sk, m0 + diag + window_right + 1), 0)
    else:
        n_hi = sk
        full_hi = sk
    full_hi = full_hi // BLOCK_N * BLOCK_N
    if HAS_LEFT:
        n_lo = tl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(last_row + diag - window_left, 0), BLOCK_N) * BLOCK_N
    else:
        n_lo = 0
        full_lo = 0
    a_end = tl.minimum(tl.maximum(full_lo, n_lo), n_hi)
    b_end = tl.minimum(tl.maximum(full_hi, a_end), n_hi)
    return n_lo, a_end, b_end, n_hi


@triton.jit
def query_block_ranges(
    n0, sq, sk, diag, window_left, window_right,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """Query ranges that see keys [n0, n0 + BLOCK_N), the transpose of key_block_ranges.

    Returns (m_lo, a_end, b_end, m_hi) with the same phase meaning; the fully visible
    phase also requires whole query blocks inside [0, sq) and the key block inside
    [0, sk) (groups of grouped attention see different prefixes of one key sequence).
    """
    last_key = n0 + BLOCK_N - 1
    if HAS_RIGHT:
        m_lo = tl.maximum(n0 - diag - window_right, 0) // BLOCK_M * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(last_key - diag - window_right, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        full_lo = 0
    if HAS_LEFT:
        m_hi = tl.maximum(tl.minimum(sq, last_key - diag + window_left + 1), 0)
        full_hi = tl.maximum(tl.minimum(sq, n0 - diag + window_left + 1), 0)
    else:
        m_hi = sq
        full_hi = sq
    full_hi = full_hi // BLOCK_M * BLOCK_M
    # No key of the block in this prefix: nothing to do. Straddling its end: mask every block.
    m_hi = tl.where(n0 >= sk, m_lo, m_hi)
    full_hi = tl.where(n0 + BLOCK_N > sk, 0, full_hi)
    a_end = tl.minimum(tl.maximum(full_lo, m_lo), m_hi)
    b_end = tl.minimum(tl.maximum(full_hi, a_end), m_hi)
    return m_lo, a_end, b_end, m_hi


@triton.jit
def visible(
    m_idx, n_idx, diag, sk, window_left, window_right,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """Mask: query row ``m_idx`` may see key ``n_idx`` (row i sees key j iff
    i + diag - left <= j <= i + diag + right and j < sk). The two index arrays are already
    shaped to broadcast ((M, 1) and (1, N), or transposed for a key-major tile). Rows past
    the query segment are not excluded here; callers drop them."""
    d = m_idx + diag
    mask = n_idx < sk
    if HAS_RIGHT:
        mask = mask & (n_idx <= d + window_right)
    if HAS_LEFT:
        mask = mask & (n_idx >= d - window_left)
    return mask


@triton.jit
def alibi_bias(m_idx, n_idx, diag, slope):
    """ALiBi: -slope * |i + diag - j| for query row ``m_idx`` and key ``n_idx`` (broadcast
    shapes, as in ``visible``), aligned like the causal mask (``diag`` is the entry's)."""
    return -slope * tl.abs(m_idx + diag - n_idx).to(tl.float32)


@triton.jit
def load_alibi_slope(Alibi, b, h, stride_b, stride_h, HAS_ALIBI: tl.constexpr, LOG2_UNITS: tl.constexpr):
    """The ALiBi slope of (sequence b, head h), in the scores' units; 0 without ALiBi."""
    if HAS_ALIBI:
        slope = tl.load(Alibi + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h)
        if LOG2_UNITS:
            slope = slope * 1.4426950408889634
    else:
        slope = 0.0
    return slope


@triton.jit
def _position_word(pos, key, MULTIPLIER: tl.constexpr):
    """A query pair's or key pair's 32-bit word for the dropout mixer: (pos * odd + key), then
    the high half folded into the low (an IMAD, a shift and an xor). A bijection of ``pos``;
    weak on its own, since the per-draw mixer of ``dropout_keep`` does the mixing."""
    x = pos.to(tl.uint32) * MULTIPLIER + key
    return x ^ (x >> 16)


@triton.jit
def _pair_positions(start, COUNT: tl.constexpr):
    """(COUNT // 16, 8): the pair index (i // 16) * 8 + i % 8 of positions start + 16 g + c,
    c < 8 (``start`` a multiple of 16); position i + 8 shares i's pair."""
    return (start // 16 + tl.arange(0, COUNT // 16))[:, None] * 8 + tl.arange(0, 8)[None, :]


@triton.jit
def dropout_keep(seed, b, h, m0, n0, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_MAJOR: tl.constexpr):
    """Dropout's keep mask, shape (BLOCK_M, BLOCK_N), for query rows m0 .. m0 + BLOCK_M - 1
    (positions within the sequence) and keys n0 .. n0 + BLOCK_N - 1 of sequence ``b``, query
    head ``h``; m0, n0, BLOCK_M and BLOCK_N are multiples of 16. KEY_MAJOR returns the
    transpose, (BLOCK_N, BLOCK_M), for the dK/dV kernel's tiles.

    One 32-bit draw serves four entries: queries 16 a + u and 16 a + 8 + u with keys
    16 g + c and 16 g + 8 + c (u, c < 8), x = mix(R[8 a + u] ^ C[8 g + c]). Byte
    2 s + t of x decides the entry with query half s and key half t (0 for the first of a
    pair, 1 for the one 8 further): kept when the byte is at least ``threshold``
    (round(p * 256), ``problem.dropout_threshold``: flash-attn's granularity). The four
    entries sit in one thread of both wgmma accumulator layouts (rows r and r + 8, columns
    j and j + 8 of the query-major tiles of the forward and dQ kernels, and of the key-major
    ones of the dK/dV kernel), so the Gluon kernels mix each draw once and compare its four
    bytes at once (``sm90._dropout_factor``). One Philox call on the seed and (sequence, head)
    gives the keys of the per-query-pair and per-key-pair words (``_position_word``:
    bijections, so two draws of a query pair or of a key pair never share a mixer input); mix is two
    multiply / xor-shift steps and a final xor-shift that folds the well-mixed high half
    into the low one. The words are cheap on purpose: every thread computes its own, and a
    strong word (Wellons' lowbias32, 8 instructions) made them half of the mask's cost. The
    mask's cost is integer throughput (docs/benchmarks.md, ``scripts/dropout_sass.py``): a
    draw per key pair cost ~8 added instructions per entry in the Gluon forward and made
    dropout 1.41x the attention on an H200 (run 39); a Philox call per entry made it 3x
    (run 29). The mask depends only on the entry and the seed, never on the tiling, so the
    forward, both backward kernels and the S_dmask kernel regenerate it. The statistical
    checks are in tests/test_dropout.py."""
    tl.static_assert(BLOCK_M % 16 == 0)
    tl.static_assert(BLOCK_N % 16 == 0)
    key_r, key_c, _, _ = tl.philox(seed, b, h, 0, 0)
    query_words = _position_word(_pair_positions(m0, BLOCK_M), key_r, 0x9E3779B1)  # (M // 16, 8)
    key_words = _position_word(_pair_positions(n0, BLOCK_N), key_c, 0x85EBCA6B)  # (N // 16, 8)
    x = query_words[:, :, None, None] ^ key_words[None, None, :, :]  # (M // 16, 8, N // 16, 8)
    x = x * 0x9E3779B1
    x = x ^ (x >> 15)
    x = x * 0x85EBCA77
    x = x ^ (x >> 16)
    t = tl.cast(threshold, tl.uint32)  # a threshold of 1 arrives as a constexpr (Triton specializes 1)
    first_query = tl.join((x & 0xFF) >= t, ((x >> 8) & 0xFF) >= t)  # [..., key half]
    second_query = tl.join(((x >> 16) & 0xFF) >= t, (x >> 24) >= t)
    keep = tl.join(first_query, second_query)  # (M // 16, 8, N // 16, 8, key half, query half)
    if KEY_MAJOR:  # -> (N // 16, key half, 8, M // 16, query half, 8)
        return tl.reshape(tl.permute(keep, (2, 4, 3, 0, 5, 1)), (BLOCK_N, BLOCK_M))
    else:  # -> (M // 16, query half, 8, N // 16, key half, 8)
        return tl.reshape(tl.permute(keep, (0, 5, 1, 2, 4, 3)), (BLOCK_M, BLOCK_N))


@triton.jit
def tanh(x):
    """tanh, portable to the interpreter, within ~6 float32 ulps everywhere. 1 - 2 / (e^{2x}
    + 1) through exp2 saturates correctly for large |x| but cancels near 0 (an absolute
    error of ~6e-8, which softcap multiplies: 3x PyTorch's float32 error at softcap 30, 0.07
    at 1e6, where s / softcap is tiny). Below |x| = 1/2, tanh's Taylor series to x^15
    instead (1.5 ulps; seven FMAs, where a second division cost more)."""
    x2 = x * x
    series = -929569.0 / 638512875.0
    series = series * x2 + 21844.0 / 6081075.0
    series = series * x2 - 1382.0 / 155925.0
    series = series * x2 + 62.0 / 2835.0
    series = series * x2 - 17.0 / 315.0
    series = series * x2 + 2.0 / 15.0
    series = series * x2 - 1.0 / 3.0
    series = (series * x2 + 1.0) * x
    saturating = 1.0 - 2.0 / (tl.math.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)
    return tl.where(tl.abs(x) < 0.5, series, saturating)


#: The GPU's tanh instruction as inline PTX (``tanh_approx``; the Gluon kernels' ``_capped`` too).
TANH_APPROX_PTX = tl.constexpr("tanh.approx.f32 $0, $1;")


@triton.jit
def tanh_approx(x):
    """The GPU's tanh instruction (``tanh.approx.f32``: one MUFU op, sm_75+), relative error
    about 2**-11: finer than a 16-bit input's own rounding (bf16 2**-9, fp16 2**-11 per
    entry, and the scores sum d of them), as flash-attn's softcap uses. Not in the interpreter."""
    return tl.inline_asm_elementwise(TANH_APPROX_PTX, "=r,r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


#: ``HAS_SOFTCAP`` values (``softcap_mode``): no softcap, the float32-exact ``tanh``, or
#: ``tanh_approx`` (constexprs: the kernels read them).
SOFTCAP_OFF, SOFTCAP_EXACT, SOFTCAP_APPROX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


def softcap_mode(softcap: float, dtype: torch.dtype) -> int:
    """The kernels' ``HAS_SOFTCAP`` for a call. 16-bit inputs take the GPU's tanh
    instruction: the exact one (a series, an exp2 and a division, both branches) made
    softcap cost 1.3-2.4x the time of the same portable call without it (run 43, H100, s=4k
    causal, d=256 to 64). float32 inputs, whose bar is float32 rounding, and the
    interpreter (no inline assembly) keep the exact one."""
    if not softcap > 0:
        return SOFTCAP_OFF.value
    # (PTX inline assembly: NVIDIA GPUs only; ROCm's torch also calls its devices "cuda".)
    approx = dtype in (torch.float16, torch.bfloat16) and not interpreting() and torch.version.hip is None
    return (SOFTCAP_APPROX if approx else SOFTCAP_EXACT).value


@triton.jit
def scaled_scores(qk, qk_scale, softcap_in, softcap_out, HAS_SOFTCAP: tl.constexpr):
    """Raw q.k -> scores: qk * qk_scale, or softcap * tanh(qk * scale / softcap) with the
    outer factor softcap_out. The host folds log2(e) into qk_scale / softcap_out when the
    kernel works in log2 units (exp2). ``HAS_SOFTCAP``: a ``softcap_mode``."""
    if HAS_SOFTCAP == SOFTCAP_APPROX:
        return tanh_approx(qk * softcap_in) * softcap_out
    elif HAS_SOFTCAP:
        return tanh(qk * softcap_in) * softcap_out
    else:
        return qk * qk_scale
