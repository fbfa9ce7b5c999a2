"""The 'cuda' backend's NVFP4 W4A4 paths (INT8 tensor cores, csrc/w4a4_nvfp4.cuh; sm_120's block-scaled
FP4 MMA, csrc/w4a4_nvfp4_bs.cuh) against the spec.

* Layout and decoder (CPU): the packed words, decoded the way the kernel decodes them (a Python PRMT)
  and placed with the PTX m16n8k16 .s8 fragment definitions, give back 2 x the E2M1 values. sm_120:
  the packed codes and scale registers, fed to a model of the block-scaled MMA written from the PTX
  ISA, give the plain product of the decoded values (and a swapped register or scale does not).
* Kernel A (GPU): codes and scales EQUAL numerics.quantize_act_nvfp4(smooth_input(x)) bit for bit
  (same fp32 operations: IEEE division, RNE to E4M3, E2M1 ties to even), evaluated on the GPU;
  lora_act within 2^-16 · |x|·|D|ᵀ (fp32, another summation order).
* The linear (GPU): y within
      |y_cuda - y_ref| <= eps(dtype) · max(|y_cuda|, |y_ref|) + 2^-16 · S,
      S = |Q(xs)·sx| · |Q(W)·sw·alpha·wcscales|ᵀ + |x·Dᵀ| · |U|ᵀ + |bias|
  Both sides compute every 16-group's integer dot product exactly (codes x 2 are integers in
  [-12, 12]), scale it by the same two fp32 scales and sum in fp32, multiply by alpha = wtscale / 4
  and by wcscales[n] once, in the spec's order; only the order of fp32 additions differs (a few ulps of S; 2^-16 leaves ~128), then each
  rounds once to the output dtype (eps·|y|).
  sm_120 (block-scaled FP4 MMA, csrc/w4a4_nvfp4_bs.cuh) is not bit-identical: the tensor core adds
  each 64-k MMA (4 scaled 16-groups, exact products) into the fp32 accumulator with an internal
  rounding the PTX ISA does not specify. Assuming at most one fp32 ulp (2^-23, so truncation is
  covered) per MMA, recursive summation bounds its error by (K64/64)·2^-23·S and the spec's own by
  (K64/16)·2^-24·S, i.e. 3·K64·2^-29·S together (2^-13.5·S at K = 15360), added to the tolerance
  above on that path. Never run: no sm_120 GPU here; the first run there must record the margins.
* Outputs are NaN-poisoned (codes: every nibble 8 = E2M1 -0, which the quantizer never writes).
"""
import math

import pytest
import torch

from nunchaku_ext import cuda_build, numerics
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.layers import SVDQW4A4Linear
from nunchaku_ext.quantize import quantize_w4a4
from test_cuda_w4a4 import FLUX_NK, check_linear, ext, requires_cuda  # noqa: F401 (fixture)


# ------------------------------------------------------------------------------------------------
# CPU: decoder and layouts


def _byte_perm(a, b, sel):
    """CUDA __byte_perm (PRMT, default mode): result byte i = byte (sel >> 4i) & 7 of the 8 bytes (b:a)."""
    pool = (b << 32) | a
    return sum(((pool >> (8 * ((sel >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


def _e2m1x4_to_s8x4(sel):
    """csrc/w4a4_nvfp4.cuh e2m1x4_to_s8x4, step for step."""
    idx = sel & 0x7777
    pos = _byte_perm(0x03020100, 0x0C080604, idx)
    neg = _byte_perm(0xFDFEFF00, 0xF4F8FAFC, idx)
    return _byte_perm(neg, pos, 0x7654 - ((sel >> 1) & 0x4444))


def _s8(byte):
    return byte - 256 if byte >= 128 else byte


def test_e2m1_decoder_gives_twice_the_value():
    codes = torch.arange(16, dtype=torch.uint8)
    want = (2 * numerics.e2m1_to_float(codes)).long().tolist()
    for c0 in range(16):
        sel = c0 | (((c0 + 5) % 16) << 4) | (((c0 + 9) % 16) << 8) | (((c0 * 7) % 16) << 12)
        out = _e2m1x4_to_s8x4(sel | 0xABCD0000)  # bits above 15 must not matter
        got = [_s8((out >> (8 * b)) & 0xFF) for b in range(4)]
        assert got == [want[(sel >> (4 * b)) & 0xF] for b in range(4)], hex(sel)


def test_e2m1_weight_layout_matches_ptx_mapping():
    torch.manual_seed(0)
    N, K = 24, 80  # K a multiple of 16, not of 64: zero-padded to 128
    codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    wp = cuda_backend.pack_weight_fragments(numerics.pack_4bit(codes), 32, "e2m1")
    assert wp.shape == (2, 2, 32, 4)
    seen = torch.full((32, 128), 99)
    for p in range(2):
        for g in range(2):
            for lane in range(32):
                gid, tid = lane // 4, lane % 4
                for t in range(2):
                    for v in range(2):
                        word = int(wp[p, g, lane, 2 * t + v]) & 0xFFFFFFFF
                        for half in range(2):  # the B register (col gid, k tid*4 + b) of 16-group 2v + half
                            reg = _e2m1x4_to_s8x4(word >> (16 * half))
                            for b in range(4):
                                seen[16 * p + 8 * t + gid, 64 * g + 16 * (2 * v + half) + 4 * tid + b] = _s8((reg >> (8 * b)) & 0xFF)
    want = torch.zeros(32, 128, dtype=torch.long)
    want[:N, :K] = (2 * numerics.e2m1_to_float(codes)).long()
    assert torch.equal(seen, want)


def test_e2m1_act_layout_roundtrip():
    """Kernel A's packing (word j, nibble b of the low / high 16 bits = rows gid / gid+8 at
    k = 16j + 4tid + b), written here from that description, is what unpack_act_fragments reads, and
    what the m16n8k16 A registers of 16-group j hold."""
    torch.manual_seed(1)
    MT, G = 2, 3
    codes = torch.randint(0, 16, (MT * 16, G * 64), dtype=torch.uint8)
    words = torch.zeros(MT, G, 32, 4, dtype=torch.int64)
    for mt in range(MT):
        for g in range(G):
            for lane in range(32):
                gid, tid = lane // 4, lane % 4
                for j in range(4):
                    w = 0
                    for h in range(2):
                        for b in range(4):
                            w |= int(codes[16 * mt + gid + 8 * h, 64 * g + 16 * j + 4 * tid + b]) << (4 * b + 16 * h)
                    words[mt, g, lane, j] = w
                    for h in range(2):  # A register a_h: row gid + 8h, k tid*4 + b of group j
                        reg = _e2m1x4_to_s8x4(w >> (16 * h))
                        for b in range(4):
                            value = 2 * numerics.e2m1_to_float(codes[16 * mt + gid + 8 * h, 64 * g + 16 * j + 4 * tid + b])
                            assert _s8((reg >> (8 * b)) & 0xFF) == int(value)
    act = (words - (words >= 2 ** 31).long() * 2 ** 32).to(torch.int32)
    assert torch.equal(cuda_backend.unpack_act_fragments(act, MT * 16, False, "e2m1"), codes)


# sm_120: the block-scaled FP4 MMA (csrc/w4a4_nvfp4_bs.cuh). No GPU here has it (sm_90 lacks the
# instruction), so the operands the kernels pack are fed to a model of the instruction written from the
# PTX ISA ("Matrix Fragments for mma.m16n8k64", .e2m1 as .s4/.u4; "Block Scaling for mma.sync",
# scale_vec::4X with {byte-id, thread-id} = {0, 0}), which must give the plain matrix product.


def _e4m3_byte(v):
    return int(torch.tensor([v]).to(torch.float8_e4m3fn).view(torch.uint8))


def _e4m3_value(byte):
    return float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())


def _ptx_mma_m16n8k64_block_scaled(a, b, sfa, sfb):
    """mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3
    with C = 0, per the PTX ISA: a[lane][0..3], b[lane][0..1] .b32 registers of 8 E2M1 codes (element e
    in bits 4e), sfa[lane] / sfb[lane] .b32 of 4 UE4M3 scales. Returns d[lane][0..3] (float64)."""
    e2m1 = [float(v) for v in numerics.e2m1_to_float(torch.arange(16, dtype=torch.uint8))]

    def nibble(reg, e):
        return (reg >> (4 * e)) & 0xF

    A = [[0.0] * 64 for _ in range(16)]  # A[m][k]: a_i, i = 8 * reg + e: row gid (regs 0, 2) / gid+8 (1, 3),
    B = [[0.0] * 8 for _ in range(64)]   # col 8tid + e (+32 for regs 2, 3); B[k][n]: b_reg, col gid, same k
    for lane in range(32):
        gid, tid = lane // 4, lane % 4
        for reg in range(4):
            for e in range(8):
                A[gid + 8 * (reg % 2)][8 * tid + e + 32 * (reg // 2)] = e2m1[nibble(a[lane][reg], e)]
        for reg in range(2):
            for e in range(8):
                B[8 * tid + e + 32 * reg][gid] = e2m1[nibble(b[lane][reg], e)]
    # thread-id-a = 0: rows gid / gid+8 from the quad's threads 0 / 1; thread-id-b = 0: col gid from
    # thread 0; byte c of the register = 16-group c (byte-id 0 with scale_vec::4X: all four bytes).
    sf_a = [[_e4m3_value((sfa[4 * (m % 8) + m // 8] >> (8 * c)) & 0xFF) for c in range(4)] for m in range(16)]
    sf_b = [[_e4m3_value((sfb[4 * n] >> (8 * c)) & 0xFF) for c in range(4)] for n in range(8)]
    D = [[sum(A[m][k] * sf_a[m][k // 16] * B[k][n] * sf_b[n][k // 16] for k in range(64)) for n in range(8)]
         for m in range(16)]
    return [[D[lane // 4 + 8 * (e // 2)][2 * (lane % 4) + e % 2] for e in range(4)] for lane in range(32)]


def _block_scaled_gemm_model(act, act_scales, wgt, wgt_scales, M, N, mutate=None):
    """The block-scaled flavour's main loop (csrc/w4a4_int8.cu w4a4_block_acc, kBlockScaled branch) over
    the packed operands, each MMA evaluated by the PTX model: A registers = the uint4 of
    act_packed[mt, g, lane], B registers of n8 tile t = words 2t, 2t+1 of wgt_packed[p, g, lane], scale
    registers = MmaE2M1BlockScaledM16n8k64::scale_reg of row gid + 8(tid % 2) / col gid. `mutate` makes
    one deliberate mistake (for the test that this check can fail)."""
    u32 = lambda t: [[int(v) & 0xFFFFFFFF for v in row] for row in t]
    out = torch.zeros(act.shape[0] * 16, wgt.shape[0] * 16, dtype=torch.float64)
    for mt in range(act.shape[0]):
        for p in range(wgt.shape[0]):
            for t in range(2):
                for g in range(act.shape[1]):
                    a = u32(act[mt, g])
                    b = [row[2 * t:2 * t + 2] for row in u32(wgt[p, g])]
                    if mutate == "swap_a1_a2":
                        a = [[r[0], r[2], r[1], r[3]] for r in a]
                    sfa, sfb = [], []
                    for lane in range(32):
                        gid, tid = lane // 4, lane % 4
                        row = 16 * mt + gid + 8 * ((tid >> 1 if mutate == "sfa_lane" else tid) & 1)
                        col = 16 * p + 8 * t + gid
                        groups = [3, 2, 1, 0] if mutate == "sfb_byte_order" else [0, 1, 2, 3]
                        sfa.append(sum(_e4m3_byte(float(act_scales[4 * g + c, row])) << (8 * c) for c in range(4)))
                        sfb.append(sum(_e4m3_byte(float(wgt_scales[4 * g + groups[c], col])) << (8 * c)
                                       for c in range(4)))
                    d = _ptx_mma_m16n8k64_block_scaled(a, b, sfa, sfb)
                    for lane in range(32):  # d = the lane's accumulator acc[i][j][e] (GemmLane)
                        gid, tid = lane // 4, lane % 4
                        for e in range(4):
                            out[16 * mt + gid + 8 * (e // 2), 16 * p + 8 * t + 2 * tid + e % 2] += d[lane][e]
    return out[:M, :N]


def test_block_scaled_operands_match_ptx_mma():
    """Kernel A's E2M1NativeLayout packing (written here from its run_k / word / shift / scale_group, as
    kernel A uses them), the weight repack pack_weight_fragments(..., "e2m1_native") and the GEMM's
    scale registers, fed to the PTX model of the block-scaled MMA, give the plain matrix product of the
    decoded values (E2M1 x E4M3 group scales; exact in float64 here); a swapped A register, scale lane
    or scale byte order does not."""
    torch.manual_seed(5)
    M, N, K = 20, 24, 80  # K a multiple of 16, not of 64: zero-padded to 128
    MT, G, n_pad = 2, 2, 32
    x_codes = torch.randint(0, 16, (M, K), dtype=torch.uint8)
    w_codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    def e4m3_grid(*shape):  # E4M3 values in [1/8, 15]: the products below stay exact in float64
        return (2.0 ** torch.randint(-3, 4, shape) * (1 + torch.randint(0, 8, shape) / 8)).to(torch.float8_e4m3fn)

    sx, sw = e4m3_grid(M, K // 16), e4m3_grid(N, K // 16)  # numerics' layouts: [M, K/16], [N, K/16]
    # Kernel A: lane (gid, tid) packs, per row half h, runs j of 4 codes at k = run_k(j, tid) + b, code b
    # at bits shift(j, b, h) of word word(j, h). Step t codes the runs with quant_step(j) == t, which
    # lie in one 16-group shared by the lanes tid ^ 1; lane tid stores the scale of group tid, taken at
    # step step_of_group(tid) from lane owner_tid(tid).
    run_k = lambda j, tid: 32 * (j // 2) + 8 * tid + 4 * (j % 2)
    word = lambda j, h: 2 * (j // 2) + h
    shift = lambda j, b, h: 16 * (j % 2) + 4 * b
    quant_step, step_of_group, owner_tid = (lambda j: j // 2), (lambda s: s // 2), (lambda s: 2 * (s % 2))
    for tid in range(4):
        groups = {t: {(run_k(j, tid) + b) // 16 for j in range(4) if quant_step(j) == t for b in range(4)}
                  for t in range(2)}
        partner = {(run_k(j, tid ^ 1) + b) // 16 for j in range(4) if quant_step(j) == 0 for b in range(4)}
        assert len(groups[0]) == len(groups[1]) == 1 and partner == groups[0]
        owner = {(run_k(j, owner_tid(tid)) + b) // 16 for j in range(4) if quant_step(j) == step_of_group(tid)
                 for b in range(4)}
        assert owner == {tid}
    padded = torch.zeros(MT * 16, G * 64, dtype=torch.uint8)
    padded[:M, :K] = x_codes
    words = torch.zeros(MT, G, 32, 4, dtype=torch.int64)
    for mt in range(MT):
        for g in range(G):
            for lane in range(32):
                gid, tid = lane // 4, lane % 4
                for j in range(4):
                    for h in range(2):
                        for b in range(4):
                            code = int(padded[16 * mt + gid + 8 * h, 64 * g + run_k(j, tid) + b])
                            words[mt, g, lane, word(j, h)] |= code << shift(j, b, h)
    act = (words - (words >= 2 ** 31).long() * 2 ** 32).to(torch.int32)
    assert torch.equal(cuda_backend.unpack_act_fragments(act, M, False, "e2m1_native")[:, :K], x_codes)
    # Scales as kernel A writes them ([K64/16, M_pad], zero padding) and as prepare() repacks the
    # file's wscales ([K64/16, N_pad]).
    act_scales = torch.zeros(4 * G, MT * 16)
    act_scales[:K // 16, :M] = sx.float().T
    wgt_scales = torch.zeros(4 * G, n_pad)
    wgt_scales[:K // 16, :N] = sw.float().T
    wgt = cuda_backend.pack_weight_fragments(numerics.pack_4bit(w_codes), n_pad, "e2m1_native")
    assert wgt.shape == (n_pad // 16, G, 32, 4)

    want = ((numerics.e2m1_to_float(x_codes).double() * numerics.expand_groups(sx.double(), 16))
            @ (numerics.e2m1_to_float(w_codes).double() * numerics.expand_groups(sw.double(), 16)).T)
    assert torch.equal(_block_scaled_gemm_model(act, act_scales, wgt, wgt_scales, M, N), want)
    for mutate in ("swap_a1_a2", "sfa_lane", "sfb_byte_order"):
        assert not torch.equal(_block_scaled_gemm_model(act, act_scales, wgt, wgt_scales, M, N, mutate), want), mutate


def test_nvfp4_path_selection(monkeypatch):
    """sm_120: the block-scaled FP4 MMA for NVFP4 layers, INT4 layers stay on the INT8 path; other
    GPUs from sm_80: the INT8 NVFP4 path; below: refused."""
    assert cuda_backend.nvfp4_mma_path((12, 0)).name == "e2m1_bs_m16n8k64"
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0)):
        assert cuda_backend.nvfp4_mma_path(capability).name == "e2m1_s8_m16n8k16"
    with pytest.raises(NotImplementedError, match="sm_80 or newer.*sm_75"):
        cuda_backend.nvfp4_mma_path((7, 5))
    monkeypatch.delenv(cuda_backend.PATH_ENV, raising=False)
    monkeypatch.setattr(cuda_build, "device_arch", lambda device=None: "12.0")
    nvfp4 = SVDQW4A4Linear(64, 16, 0, precision="nvfp4")
    int4 = SVDQW4A4Linear(64, 16, 0, precision="int4")
    assert cuda_backend.layer_mma_path(nvfp4, "cuda:0").layout == "e2m1_native"
    assert cuda_backend.layer_mma_path(int4, "cuda:0").name == "s8_m16n8k32"


# ------------------------------------------------------------------------------------------------
# GPU


def make_layer(N, K, rank, *, dtype=torch.bfloat16, bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    layer = SVDQW4A4Linear(K, N, rank, bias=bias, precision="nvfp4", dtype=dtype, device="cuda")
    layer.qweight.copy_(numerics.pack_4bit(torch.randint(0, 16, (N, K), generator=g, device="cuda")))
    layer.wscales.copy_((torch.rand(K // 16, N, generator=g, device="cuda") * 8 + 0.05).to(torch.float8_e4m3fn))
    layer.wtscale.fill_(0.0037)
    layer.wcscales.copy_(torch.rand(N, generator=g, device="cuda") + 0.5)
    layer.smooth.copy_((torch.rand(K, generator=g, device="cuda") * 1.5 + 0.25).to(dtype))
    layer.lora_down.copy_((torch.randn(rank, K, generator=g, device="cuda") / math.sqrt(K)).to(dtype))
    layer.lora_up.copy_((torch.randn(N, rank, generator=g, device="cuda") * 0.1).to(dtype))
    if layer.bias is not None:
        layer.bias.copy_(torch.randn(N, generator=g, device="cuda").to(dtype))
    layer.backend = "cuda"
    return layer


def make_input(shape, K, dtype, seed=1):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, K, generator=g, device="cuda") * torch.exp(torch.randn(K, generator=g, device="cuda"))
    rows = x.view(-1, K)
    rows[::5, :16] = 0                 # all-zero groups: scale 0, codes 0
    if rows.shape[0] > 3:
        rows[1] = 0                    # an all-zero row
        rows[2] *= 2e-4                # tiny groups: subnormal E4M3 scales, or scales that round to 0
        rows[3] *= 400                 # large groups: absmax / 6 above 448, the scale clamps (codes saturate)
    return x.clamp(-6e4, 6e4).to(dtype)


def check_quantize(layer, x):
    K = layer.in_features
    x2 = x.reshape(-1, K)
    ref_codes, ref_scales = numerics.quantize_act_nvfp4(numerics.smooth_input(x2, layer.smooth, False))
    codes, scales, lora_act, (act_raw, scales_raw, lora_raw) = cuda_backend.quantize_act(layer, x, poison=True)
    M = x2.shape[0]
    assert torch.equal(scales, ref_scales.float()), f"scales differ at {(scales != ref_scales.float()).nonzero()[:5].tolist()}"
    assert torch.equal(codes, ref_codes), f"codes differ at {(codes != ref_codes).nonzero()[:5].tolist()}"
    # Padding (rows M .. M_pad, columns K .. K64) must be written too, as zeros: the GEMM reads it.
    assert not scales_raw.isnan().any() and not lora_raw.isnan().any()
    layout = cuda_backend.layer_mma_path(layer, x.device).layout  # "e2m1_native" on sm_120
    all_codes = cuda_backend.unpack_act_fragments(act_raw, act_raw.shape[0] * 16, False, layout)
    assert (all_codes[M:] == 0).all() and (all_codes[:, K:] == 0).all()
    assert (scales_raw[:, M:] == 0).all() and (scales_raw[K // 16:] == 0).all() and (lora_raw[M:] == 0).all()
    if layer.rank:
        ref = x2.double() @ layer.lora_down.double().T
        bound = x2.double().abs() @ layer.lora_down.double().abs().T
        assert ((lora_act.double() - ref).abs() <= 2 ** -16 * bound + 1e-30).all()


QUANT_CASES = [
    # M, K, rank, dtype
    (1, 3072, 32, torch.bfloat16),
    (3, 80, 0, torch.float16),          # K a multiple of 16, not 64
    (255, 3072, 7, torch.bfloat16),
    (256, 208, 16, torch.float16),
    (4096, 3072, 32, torch.bfloat16),
    (4608, 3072, 48, torch.float16),
    (77, 12288, 32, torch.bfloat16),
    (129, 15360, 16, torch.bfloat16),
    (33, 560, 130, torch.float16),
]


@requires_cuda
@pytest.mark.parametrize("M,K,rank,dtype", QUANT_CASES)
def test_quantize_act_exact(ext, M, K, rank, dtype):
    layer = make_layer(128, K, rank, dtype=dtype)
    check_quantize(layer, make_input((M,), K, dtype, seed=M))


@requires_cuda
@pytest.mark.parametrize("M,K,rank,dtype", QUANT_CASES[:4])
def test_quantize_act_exact_sm120_layout(ext, monkeypatch, M, K, rank, dtype):
    """Kernel A in sm_120's layout (E2M1NativeLayout) on any GPU: unlike that path's GEMM it uses no
    sm_120-only instruction, so its codes and scales are checked against the spec here too."""
    monkeypatch.setattr(cuda_backend, "nvfp4_mma_path", lambda capability: cuda_backend.NVFP4_BLOCK_SCALED_PATH)
    layer = make_layer(128, K, rank, dtype=dtype)
    check_quantize(layer, make_input((M,), K, dtype, seed=M))


LINEAR_CASES = [
    # M, N, K, rank, dtype
    *[(4096, n, k, 32, torch.bfloat16) for n, k in FLUX_NK],
    (4608, 12288, 3072, 32, torch.float16),
    (4608, 3072, 15360, 16, torch.bfloat16),
    (1, 3072, 3072, 32, torch.bfloat16),
    (3, 9216, 3072, 0, torch.float16),
    (255, 3072, 12288, 7, torch.bfloat16),
    (5, 128, 64, 16, torch.bfloat16),
    (130, 200, 208, 7, torch.float16),   # K % 64 != 0
    (17, 3, 16, 0, torch.bfloat16),      # one 16-group
    (64, 257, 336, 32, torch.bfloat16),
    (1000, 136, 256, 130, torch.float16),
]


@requires_cuda
@pytest.mark.parametrize("M,N,K,rank,dtype", LINEAR_CASES)
def test_linear_matches_reference(ext, M, N, K, rank, dtype):
    layer = make_layer(N, K, rank, dtype=dtype, seed=M + N)
    check_linear(layer, make_input((M,), K, dtype, seed=K))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batched_noncontiguous_and_dispatch(ext, dtype):
    K = 320
    layer = make_layer(256, K, 16, dtype=dtype, bias=False)
    x3 = make_input((3, 47), K, dtype)
    check_quantize(layer, x3)
    check_linear(layer, x3, via_module=True)
    row_strided = make_input((150,), K + 64, dtype)[:, 32:32 + K]
    check_quantize(layer, row_strided)
    check_linear(layer, row_strided)
    check_linear(layer, make_input((K,), 90, dtype).T)
    check_linear(layer, make_input((2, 40), K, dtype)[:, ::2])


@requires_cuda
def test_quantized_layers_and_prepared_copy(ext):
    """Layers made by the project's quantizer (SVD, smoothing, NVFP4 weights with alpha), then an
    in-place wtscale / wcscales change (re-prepares them) and a LoRA-style rank growth."""
    torch.manual_seed(3)
    w = torch.randn(320, 512, device="cuda") / 20
    layer = quantize_w4a4(w, torch.randn(320, device="cuda"), rank=32, smooth=torch.rand(512, device="cuda") + 0.5,
                          precision="nvfp4")
    layer.backend = "cuda"
    x = make_input((2, 100), 512, torch.bfloat16)
    check_linear(layer, x, via_module=True)
    layer.wtscale.mul_(3)
    check_linear(layer, x)
    layer.wcscales.copy_(torch.linspace(0.5, 2, 320, device="cuda"))
    check_linear(layer, x)
    with torch.no_grad():
        layer.lora_down = torch.cat([layer.lora_down, layer.lora_down[:3] * 0.5])
        layer.lora_up = torch.cat([layer.lora_up, layer.lora_up[:, :3]], dim=1)
    check_linear(layer, x)


@requires_cuda
def test_repeatable(ext):
    layer = make_layer(3072, 3072, 32)
    x = make_input((999,), 3072, torch.bfloat16)
    y0 = cuda_backend.forward(layer, x)
    for _ in range(3):
        assert torch.equal(cuda_backend.forward(layer, x), y0)
