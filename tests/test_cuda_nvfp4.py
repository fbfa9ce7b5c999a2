"""The 'cuda' backend's NVFP4 W4A4 paths (INT8 tensor cores, csrc/w4a4_nvfp4.cuh; sm_120's block-scaled
FP4 MMA, csrc/w4a4_nvfp4_bs.cuh) against the spec.

* Layouts (CPU): the kernels read the layer's qweight [N, K/2] and kernel A's activations [M_pad, K64/2]
  row-major, two codes per byte (numerics.pack_4bit), each lane loading its runs (Layout::run_k, parsed
  from csrc/ so the model cannot drift from it) with the csrc access widths. A Python model of what the
  kernels do per lane - load_words, the flavour's fragments, its scale registers, the MMA's fragment
  definitions from the PTX ISA (m16n8k16 .s8 for E2M1S8; m16n8k64 .e2m1 with block scaling for sm_120),
  the rescale and the epilogue's alpha - gives exactly the directly computed scaled product (float64,
  exact on the chosen grids), reads no weight run or weight scale past K (the model's memory refuses
  it), and a deliberate mistake (a swapped register, scale lane, scale byte order, another layout on
  one operand, no K tail guard) does not. Kernel A's per-lane runs, quantization steps and lane
  shuffles, modelled the same way, write numerics.pack_4bit of the spec's codes and the spec's scales.
  The sm_120 path cannot run on any GPU here: this model is its only check before an sm_120 run.
  The lines of csrc/ that the model mirrors are checked to be there (test_model_mirrors_csrc).
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
* The layer's tensors are read in place: w4a4_gemm gets the layer's own buffers, a forward allocates
  nothing weight-sized and keeps nothing, in-place writes are seen by the next call, and with K not a
  multiple of 64 the GEMM reads no weight byte or weight scale past K.
* Outputs are NaN-poisoned (codes: every nibble 8 = E2M1 -0, which the quantizer never writes).
"""
import functools
import math
import re
from pathlib import Path

import pytest
import torch

from nunchaku_ext import cuda_build, numerics
from nunchaku_ext.backends import cuda as cuda_backend
from nunchaku_ext.layers import SVDQW4A4Linear
from nunchaku_ext.quantize import quantize_w4a4
from test_cuda_w4a4 import FLUX_NK, NVFP4_FLAVOURS, check_linear, ext, launched_kernels, requires_cuda  # noqa: F401 (fixture)
from test_cuda_w4a4 import make_input as make_int4_input
from test_cuda_w4a4 import make_layer as make_int4_layer

CSRC = Path(__file__).resolve().parent.parent / "csrc"
M32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------
# CPU: the csrc layouts, parsed


def _source(name):
    return (CSRC / name).read_text()


def _struct(text, name):
    """The text of `struct name ... { ... }` (braces matched)."""
    m = re.search(r"struct %s\b[^{;]*\{" % name, text)
    assert m, f"struct {name} not found"
    depth, i = 1, m.end()
    while depth:
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[m.start():i]


class CsrcLayout:
    """A Layout struct of csrc/ (the layout interface: w4a4_int8.cu, "Which k a lane owns"), its
    constants and one-line constexpr functions evaluated in Python, plus the generic helpers of
    w4a4_nvfp4.cuh (quant_steps / quant_step / group_lanes: 1 / 0 / 4 for INT4 layouts)."""

    def __init__(self, name, file):
        body = _struct(_source(file), name)
        self.name = name
        self.consts = {k: int(v) for k, v in re.findall(r"static constexpr int (\w+) = (\d+);", body)}
        self.funcs = {}
        for fname, params, expr in re.findall(r"constexpr int (\w+)\(([^)]*)\)\s*\{\s*return ([^;]+);\s*\}", body):
            assert re.fullmatch(r"[\w\s+*/%()-]+", expr), expr
            args = ", ".join(p.split()[-1] for p in params.split(","))
            # C integer arithmetic on non-negative values: / is floor division
            self.funcs[fname] = eval(f"lambda {args}: {expr.replace('/', '//')}", {})  # noqa: S307
        assert "run_k" in self.funcs and "kAdjacentRuns" in self.consts, name

    def run_k(self, j, tid):
        return self.funcs["run_k"](j, tid)

    @property
    def adjacent(self):
        return self.consts["kAdjacentRuns"]

    @property
    def e2m1(self):  # kE2M1Codes<Layout>
        return self.consts.get("kScaleGroups", 1) == 4

    def quant_steps(self):
        return self.consts["kQuantSteps"] if self.e2m1 else 1

    def quant_step(self, j):
        return self.funcs["quant_step"](j) if self.e2m1 else 0

    def group_lanes(self):
        return self.consts["kGroupLanes"] if self.e2m1 else 4

    def step_of_group(self, s):
        return self.funcs["step_of_group"](s)

    def owner_tid(self, s):
        return self.funcs["owner_tid"](s)


LANE16 = CsrcLayout("Lane16Layout", "w4a4_int8.cu")
E2M1 = CsrcLayout("E2M1Layout", "w4a4_nvfp4.cuh")
E2M1_NATIVE = CsrcLayout("E2M1NativeLayout", "w4a4_nvfp4_bs.cuh")
LAYOUTS = {layout.name: layout for layout in (LANE16, E2M1, E2M1_NATIVE)}


def _flavour_layouts():
    """mma_path name -> (flavour struct, its Layout struct), from the bindings' parse_mma_path, the
    launcher's with_mma_flavour and the flavour structs."""
    ops, kernels = _source("w4a4_ops.cpp"), _source("w4a4_int8.cu")
    enum = dict(re.findall(r'if \(name == "(\w+)"\) return svdq::MmaPath::(\w+);', ops))
    flavour = dict(re.findall(r"case MmaPath::(\w+): return launch\((\w+)\{\}\);", kernels))
    text = "".join(_source(f) for f in ("w4a4_int8.cu", "w4a4_s4.cuh", "w4a4_nvfp4.cuh", "w4a4_nvfp4_bs.cuh"))
    layout = dict(re.findall(r"struct (\w+)\s*:\s*NativeS4Fragments<(\w+)>", text))
    layout.update(re.findall(r"struct (\w+)\s*\{\s*using Layout = (\w+);", text))
    return {name: (flavour[e], layout[flavour[e]]) for name, e in enum.items()}


def test_mma_paths_name_the_layouts_of_their_flavours():
    """backends.cuda's MmaPath.layout is the Layout of the flavour its name selects in csrc/ (sm_90's wgmma
    path has bindings of its own, not an mma_path name: its kernel A's Layout is checked by name)."""
    assert f"struct {cuda_backend.WGMMA_PATH.layout} " in _source("w4a4_int8.cu")
    paths = {**{p.name: p for p in cuda_backend.MMA_PATHS.values() if p is not cuda_backend.WGMMA_PATH},
             cuda_backend.NVFP4_PATH.name: cuda_backend.NVFP4_PATH,
             cuda_backend.NVFP4_BLOCK_SCALED_PATH.name: cuda_backend.NVFP4_BLOCK_SCALED_PATH}
    flavours = _flavour_layouts()
    assert set(flavours) == set(paths)
    for name, path in paths.items():
        assert flavours[name][1] == path.layout, name
    assert flavours["e2m1_s8_m16n8k16"] == (NVFP4_FLAVOURS["e2m1_s8_m16n8k16"], "E2M1Layout")
    assert flavours["e2m1_bs_m16n8k64"] == (NVFP4_FLAVOURS["e2m1_bs_m16n8k64"], "E2M1NativeLayout")


# Lines of csrc/ that the models below mirror step for step (whitespace-insensitive). If one changes,
# the model must change with it.
MIRRORED = {
    "w4a4_int8.cu": [
        # load_words / store_words
        "auto in = [&](int j) { return !kTail || Layout::run_k(j, tid) < k_limit; };",
        "return in(0) ? __ldg(reinterpret_cast<const uint2*>(chunk + Layout::run_k(0, tid) / 2)) : make_uint2(0u, 0u);",
        "w[i] = in(2 * i) ? __ldg(reinterpret_cast<const uint32_t*>(chunk + Layout::run_k(2 * i, tid) / 2)) : 0u;",
        "r[j] = in(j) ? __ldg(reinterpret_cast<const unsigned short*>(chunk + Layout::run_k(j, tid) / 2)) : 0u;",
        "return make_uint2(r[0] | (r[1] << 16), r[2] | (r[3] << 16));",
        "*reinterpret_cast<uint2*>(chunk + Layout::run_k(0, tid) / 2) = make_uint2(w0, w1);",
        "*reinterpret_cast<uint32_t*>(chunk + Layout::run_k(0, tid) / 2) = w0;",
        "*reinterpret_cast<uint32_t*>(chunk + Layout::run_k(2, tid) / 2) = w1;",
        "const uint32_t r[4] = {w0 & 0xFFFFu, w0 >> 16, w1 & 0xFFFFu, w1 >> 16};",
        "*reinterpret_cast<unsigned short*>(chunk + Layout::run_k(j, tid) / 2) = static_cast<unsigned short>(r[j]);",
        # kernel A
        "const int k = g * kGroup + 2 * lane;",
        "if (k < K) b = Dtype<T>::to_float2(__ldg(reinterpret_cast<const uint32_t*>(smooth + k)));",
        "xs[h][j][b] = D::quotient(xf, bs[b], ys[b]);",
        "const int64_t act_row_bytes = static_cast<int64_t>(G) * (kGroup / 2);",
        "const int rows[2] = {row_base + gid, row_base + gid + 8};",
        "if (quant_step<Layout>(j) != t) continue;",
        "amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));",
        "if constexpr (group_lanes<Layout>() == 4) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));",
        "scale[h] = nvfp4_group_scale(amax);",
        "if (tid == t) my_scale[h] = scale[h];",
        "const float owner = __shfl_sync(0xffffffffu, scale[h], Layout::owner_tid(tid), 4);",
        "if (Layout::step_of_group(tid) == t) my_scale[h] = owner;",
        "nibble = e2m1_code(xs[h][j][b], scale[h]);",
        "words[h][j / 2] |= nibble << (16 * (j % 2) + 4 * b);",
        "store_words<Layout>(act_packed + rows[h] * act_row_bytes + g * (kGroup / 2), tid, words[h][0], words[h][1]);",
        "if (tid < kScaleGroups) act_scales[(static_cast<int64_t>(g) * kScaleGroups + tid) * M_pad + rows[h]] = my_scale[h];",
        # the GEMM's loads
        "const uint8_t* a_src = p.act_packed + (warp_row + gid) * act_row_bytes;",
        "b_row[j] = min(warp_col + 8 * j + gid, N - 1);",
        "a[i][h] = load_words<Layout>(a_src + (16 * i + 8 * h) * act_row_bytes + g * (kGroup / 2), tid);",
        "const int64_t w_row_bytes = p.K / 2;",
        "const uint8_t* chunk = p.qweight + b_row[j] * w_row_bytes + g * (kGroup / 2);",
        "b[j] = load_words<Layout, true>(chunk, tid, p.K - g * kGroup);",
        "const int scale_rows = p.K / (kGroup / kScaleGroups);",
        "a_frag[i] = Mma::template a_frag<kActUnsigned>(a_cur[i][0], a_cur[i][1]);",
        "b_frag[j] = Mma::b_frag(b_cur[j]);",
        # block-scaled main loop
        "const int64_t sg = static_cast<int64_t>(g) * kScaleGroups;",
        "sfa[i] = Mma::act_scale_reg(p.act_scales + sg * M_pad + warp_row + i * 16 + gid + 8 * (tid & 1), M_pad);",
        "sfb[j] = Mma::wgt_scale_reg(static_cast<const uint8_t*>(p.wscales) + sg * N + b_row[j], N, "
        "scale_rows - static_cast<int>(sg));",
        "Mma::mma(acc[i][j], a_frag[i], b_frag[j], sfa[i], sfb[j]);",
        # INT8 main loop
        "const int64_t sg = static_cast<int64_t>(g) * kScaleGroups + s;",
        "sx[i][h] = __ldg(p.act_scales + sg * M_pad + warp_row + i * 16 + gid + 8 * h);",
        "const int64_t sw_row = kE2M1Codes<Mma> ? min(sg, static_cast<int64_t>(scale_rows - 1)) : sg;",
        "const int col = min(warp_col + j * 8 + tid * 2, N - 2);",
        "sw[j] = load_wscale_pair<T, Mma>(p.wscales, sw_row * N + col);",
        "const __nv_fp8x2_storage_t raw = __ldg(reinterpret_cast<const unsigned short*>(wscales) + idx / 2);",
        "scale_group_dot<Mma, kActUnsigned>(sum, a_frag[i], b_frag[j], s);",
        "acc[i][j][0] = fmaf(static_cast<float>(sum[0]) * sx[i][0], sw[j].x, acc[i][j][0]);",
        "acc[i][j][1] = fmaf(static_cast<float>(sum[1]) * sx[i][0], sw[j].y, acc[i][j][1]);",
        "acc[i][j][2] = fmaf(static_cast<float>(sum[2]) * sx[i][1], sw[j].x, acc[i][j][2]);",
        "acc[i][j][3] = fmaf(static_cast<float>(sum[3]) * sx[i][1], sw[j].y, acc[i][j][3]);",
        # epilogue factors
        "float alpha = __ldg(p.wtscale) * 0.25f;",
        "if constexpr (kBlockScaled<Mma>) alpha *= 4.f;",
        "const float2 cs = __ldg(reinterpret_cast<const float2*>(p.wcscales + col));",
        "acc[i][j][0] = (acc[i][j][0] * alpha) * cs.x;",
        "acc[i][j][3] = (acc[i][j][3] * alpha) * cs.y;",
    ],
    "w4a4_nvfp4.cuh": [
        "const float s = fminf(__fdiv_rn(absmax, 6.f), 448.f);",
        "const float q = __fdiv_rn(v, scale);",
        "const uint32_t idx = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.f);",
        "return idx | ((q < 0.f && idx > 0) ? 8u : 0u);",
        "const uint32_t idx = sel & 0x7777u;",
        "const uint32_t pos = __byte_perm(0x03020100u, 0x0C080604u, idx);",
        "const uint32_t neg = __byte_perm(0xFDFEFF00u, 0xF4F8FAFCu, idx);",
        "return __byte_perm(neg, pos, 0x7654u - ((sel >> 1) & 0x4444u));",
        "mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};",
        "struct AFrag { uint2 row[2]; };",
        "return AFrag{{row0, row1}};",
        "return BFrag{col};",
        "return e2m1x4_to_s8x4((s < 2 ? w.x : w.y) >> (16 * (s % 2)));",
        "const uint32_t a_s[2] = {run_s8(a.row[0], s), run_s8(a.row[1], s)};",
        "mma_s8_m16n8k16(sum, a_s, run_s8(b.col, s));",
    ],
    "w4a4_s4.cuh": [
        "return AFrag{{row0.x, row1.x, row0.y, row1.y}};",
        "return BFrag{{col.x, col.y}};",
    ],
    "w4a4_nvfp4_bs.cuh": [
        "struct MmaE2M1BlockScaledM16n8k64 : NativeS4Fragments<E2M1NativeLayout>",
        "__nv_cvt_float2_to_fp8x2(make_float2(__ldg(p), __ldg(p + stride)), __NV_SATFINITE, __NV_E4M3);",
        "__nv_cvt_float2_to_fp8x2(make_float2(__ldg(p + 2 * stride), __ldg(p + 3 * stride)), __NV_SATFINITE, __NV_E4M3);",
        "return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);",
        "if (c < groups_left) r |= static_cast<uint32_t>(__ldg(p + c * stride)) << (8 * c);",
        "mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3}, %10, {0, 0}, %11, {0, 0};",
        ': "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]), "r"(sfa), "r"(sfb));',
    ],
}


def _norm(text):
    return " ".join(text.replace("\\n", " ").split())


def test_model_mirrors_csrc():
    for file, lines in MIRRORED.items():
        text = _norm(" ".join(part.strip().strip('"') for part in _source(file).splitlines()))
        missing = [line for line in lines if _norm(line) not in text]
        assert not missing, f"{file} no longer has (update the model in this test file): {missing}"


def test_layout_structs():
    """Per 64-chunk the four lanes of a gid own every k once, in runs of 4 starting at even k; an access
    unit (kAdjacentRuns runs) is contiguous in memory; E2M1 layouts: a unit lies inside one 16-group
    (so the GEMM's K tail guard takes or skips whole units) and a run inside one."""
    for layout in LAYOUTS.values():
        owned = sorted(layout.run_k(j, tid) + b for tid in range(4) for j in range(4) for b in range(4))
        assert owned == list(range(64)), layout.name
        for tid in range(4):
            for j in range(0, 4, layout.adjacent):
                unit = [layout.run_k(j + u, tid) for u in range(layout.adjacent)]
                assert unit == [unit[0] + 4 * u for u in range(layout.adjacent)], (layout.name, tid, j)
                if layout.e2m1:
                    assert len({(k + b) // 16 for k in unit for b in range(4)}) == 1, (layout.name, tid, j)
    assert E2M1.quant_steps() * 4 // E2M1.group_lanes() == E2M1.consts["kScaleGroups"]
    assert E2M1_NATIVE.quant_steps() * 4 // E2M1_NATIVE.group_lanes() == E2M1_NATIVE.consts["kScaleGroups"]


# ------------------------------------------------------------------------------------------------
# CPU: a model of the kernels, lane by lane


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


def _f32_div(a, b):
    """IEEE fp32 a / b (CPU torch divides; both operands fp32 values)."""
    return (torch.tensor([a], dtype=torch.float32) / torch.tensor([b], dtype=torch.float32)).item()


def _nvfp4_group_scale(absmax):
    """csrc nvfp4_group_scale: e4m3(min(absmax / 6, 448)) as fp32."""
    s = min(_f32_div(absmax, 6.0), 448.0)
    return torch.tensor([s], dtype=torch.float32).to(torch.float8_e4m3fn).float().item()


def _e2m1_code(v, scale):
    """csrc e2m1_code, step for step."""
    if not scale > 0:
        return 0
    q = _f32_div(v, scale)
    a = abs(q)
    idx = (a > 0.25) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0)
    return idx | (8 if q < 0 and idx > 0 else 0)


def test_e2m1_decoder_gives_twice_the_value():
    codes = torch.arange(16, dtype=torch.uint8)
    want = (2 * numerics.e2m1_to_float(codes)).long().tolist()
    for c0 in range(16):
        sel = c0 | (((c0 + 5) % 16) << 4) | (((c0 + 9) % 16) << 8) | (((c0 * 7) % 16) << 12)
        out = _e2m1x4_to_s8x4(sel | 0xABCD0000)  # bits above 15 must not matter
        got = [_s8((out >> (8 * b)) & 0xFF) for b in range(4)]
        assert got == [want[(sel >> (4 * b)) & 0xF] for b in range(4)], hex(sel)


def test_e2m1_code_matches_spec():
    """Kernel A's E2M1 rounding (thresholds, ties to even, no -0) against numerics.round_to_e2m1."""
    torch.manual_seed(7)
    values = [m / 8 for m in range(-60, 61)] + [v * 7.0 for v in torch.randn(300).tolist()]
    for scale in (1.0, 0.5, 0.375, 3.0):
        for v in values:
            v = torch.tensor(v, dtype=torch.float32).item()
            want = int(numerics.round_to_e2m1(torch.tensor([_f32_div(v, scale)]))[0])
            assert _e2m1_code(v, scale) == want, (v, scale)
    assert _e2m1_code(1.0, 0.0) == 0


class _Mem:
    """A tensor's bytes as a kernel reads them: little-endian loads of n bytes, n-byte aligned, that
    must lie inside [lo, hi) - the row (or tensor) the access belongs to; anything else is a bug."""

    def __init__(self, t):
        self.data = bytes(t.contiguous().view(torch.uint8).flatten().tolist())

    def load(self, addr, n, lo, hi):
        assert addr % n == 0, f"misaligned {n}-byte load at byte {addr}"
        assert lo <= addr and addr + n <= hi, f"read of bytes {addr}..{addr + n - 1} outside {lo}..{hi - 1}"
        return int.from_bytes(self.data[addr:addr + n], "little")


def _load_words(mem, row, g, layout, tid, k_limit=None):
    """csrc load_words: a lane's two words of 64-chunk g of a row = (first byte, end); k_limit (the
    kTail flavour): runs at k >= k_limit are not read and are zero."""
    lo, hi = row
    chunk = lo + 32 * g

    def take(j):
        return k_limit is None or layout.run_k(j, tid) < k_limit

    if layout.adjacent == 4:
        v = mem.load(chunk + layout.run_k(0, tid) // 2, 8, lo, hi) if take(0) else 0
        return v & M32, v >> 32
    if layout.adjacent == 2:
        return tuple(mem.load(chunk + layout.run_k(2 * i, tid) // 2, 4, lo, hi) if take(2 * i) else 0
                     for i in range(2))
    r = [mem.load(chunk + layout.run_k(j, tid) // 2, 2, lo, hi) if take(j) else 0 for j in range(4)]
    return r[0] | r[1] << 16, r[2] | r[3] << 16


def _store_words(buf, written, chunk, layout, tid, w0, w1):
    """csrc store_words into a bytearray, counting the writes of every byte."""
    def store(addr, n, v):
        assert addr % n == 0
        for i in range(n):
            buf[addr + i] = (v >> (8 * i)) & 0xFF
            written[addr + i] += 1

    if layout.adjacent == 4:
        store(chunk + layout.run_k(0, tid) // 2, 8, w0 | w1 << 32)
    elif layout.adjacent == 2:
        store(chunk + layout.run_k(0, tid) // 2, 4, w0)
        store(chunk + layout.run_k(2, tid) // 2, 4, w1)
    else:
        r = [w0 & 0xFFFF, w0 >> 16, w1 & 0xFFFF, w1 >> 16]
        for j in range(4):
            store(chunk + layout.run_k(j, tid) // 2, 2, r[j])


def test_load_words_are_the_runs():
    """Whatever the access width, word w of a lane = run 2w | run 2w+1 << 16, run j = the 16 bits at
    byte run_k(j, tid) / 2 of the chunk; store_words writes them back there."""
    torch.manual_seed(2)
    row = torch.randint(0, 256, (64,), dtype=torch.uint8)  # two 64-chunks
    mem = _Mem(row)
    for layout in LAYOUTS.values():
        buf, written = bytearray(64), [0] * 64
        for g in range(2):
            for tid in range(4):
                runs = [int.from_bytes(bytes(row[32 * g + layout.run_k(j, tid) // 2:][:2].tolist()), "little")
                        for j in range(4)]
                words = _load_words(mem, (0, 64), g, layout, tid)
                assert words == (runs[0] | runs[1] << 16, runs[2] | runs[3] << 16), (layout.name, g, tid)
                _store_words(buf, written, 32 * g, layout, tid, *words)
        assert bytes(buf) == bytes(row.tolist()) and written == [1] * 64, layout.name


def _kernel_a_model(xs, layout, m_pad):
    """csrc quantize_act_lora_down_kernel, phase 1 (the codes and scales) for an NVFP4 layout, lane by
    lane: xs = the smoothed fp32 input [M, K]. Returns (act uint8 [m_pad, K64/2], act_scales fp32
    [K64/16, m_pad], per-byte write counts, per-scale write counts)."""
    M, K = xs.shape
    G = -(-K // 64)
    row_bytes = 32 * G
    act, written = bytearray(m_pad * row_bytes), [0] * (m_pad * row_bytes)
    scales = torch.full((4 * G, m_pad), float("nan"))
    scale_writes = torch.zeros(4 * G, m_pad, dtype=torch.long)
    vals = torch.zeros(m_pad, 64 * G)
    vals[:M, :K] = xs  # rows past M and k past K: kernel A's xs are 0
    vals = vals.tolist()
    for mt in range(m_pad // 16):
        for g in range(G):
            for gid in range(8):
                rows = [16 * mt + gid, 16 * mt + gid + 8]
                # xs[tid][h][j][b] at k = 64g + run_k(j, tid) + b, as the lane loads them
                X = [[[[vals[rows[h]][64 * g + layout.run_k(j, tid) + b] for b in range(4)] for j in range(4)]
                      for h in range(2)] for tid in range(4)]
                words = [[[0, 0], [0, 0]] for _ in range(4)]
                my_scale = [[0.0, 0.0] for _ in range(4)]
                for t in range(layout.quant_steps()):
                    mine = [[j for j in range(4) if layout.quant_step(j) == t] for tid in range(4)]
                    scale = [[0.0, 0.0] for _ in range(4)]
                    for h in range(2):
                        amax = [max([abs(X[tid][h][j][b]) for j in mine[tid] for b in range(4)], default=0.0)
                                for tid in range(4)]
                        amax = [max(amax[tid], amax[tid ^ 1]) for tid in range(4)]  # __shfl_xor_sync(.., 1)
                        if layout.group_lanes() == 4:
                            amax = [max(amax[tid], amax[tid ^ 2]) for tid in range(4)]
                        for tid in range(4):  # the shuffles gave every lane the absmax of its step's 16-group
                            group = {(layout.run_k(j, tid) + b) // 16 for j in mine[tid] for b in range(4)}
                            assert len(group) == 1, (layout.name, tid, t)
                            s = group.pop()
                            true_max = max(abs(v) for v in vals[rows[h]][64 * g + 16 * s:64 * g + 16 * s + 16])
                            assert amax[tid] == true_max, (layout.name, tid, t)
                            scale[tid][h] = _nvfp4_group_scale(amax[tid])
                        for tid in range(4):  # the scale this lane stores: group tid
                            if layout.group_lanes() == 4:
                                if tid == t:
                                    my_scale[tid][h] = scale[tid][h]
                            else:
                                owner = scale[layout.owner_tid(tid)][h]  # __shfl_sync(.., owner_tid(tid), 4)
                                if layout.step_of_group(tid) == t:
                                    my_scale[tid][h] = owner
                    for tid in range(4):
                        for j in mine[tid]:
                            for h in range(2):
                                for b in range(4):
                                    nibble = _e2m1_code(X[tid][h][j][b], scale[tid][h])
                                    words[tid][h][j // 2] |= nibble << (16 * (j % 2) + 4 * b)
                for tid in range(4):
                    for h in range(2):
                        _store_words(act, written, rows[h] * row_bytes + 32 * g, layout, tid, *words[tid][h])
                        if tid < layout.consts["kScaleGroups"]:
                            scales[4 * g + tid, rows[h]] = my_scale[tid][h]
                            scale_writes[4 * g + tid, rows[h]] += 1
    return (torch.tensor(list(act), dtype=torch.uint8).view(m_pad, row_bytes), scales, written, scale_writes)


@pytest.mark.parametrize("layout", ["E2M1Layout", "E2M1NativeLayout"])
@pytest.mark.parametrize("M,K", [(21, 80), (5, 144)])
def test_kernel_a_writes_what_the_gemm_reads(layout, M, K):
    """Kernel A's lanes (their runs, quantization steps, absmax and scale shuffles, word packing and
    stores) write every byte and scale once: the bytes are numerics.pack_4bit of the spec's codes (the
    layout the GEMM reads, as qweight's), the scales the spec's, zeros past M and K."""
    torch.manual_seed(M + K)
    xs = torch.randn(M, K) * torch.exp(torch.randn(K))
    xs[::4, :16] = 0        # all-zero groups: scale 0, codes 0
    xs[1] *= 2e-4           # tiny: subnormal E4M3 scales, or 0
    xs[2] *= 1e4            # large: the scale clamps at 448, codes saturate
    codes, sx = numerics.quantize_act_nvfp4(xs)
    m_pad, G = 32, -(-K // 64)
    act, scales, written, scale_writes = _kernel_a_model(xs, LAYOUTS[layout], m_pad)
    assert written == [1] * len(written) and (scale_writes == 1).all()
    padded = torch.zeros(m_pad, 64 * G, dtype=torch.uint8)
    padded[:M, :K] = codes
    assert torch.equal(act, numerics.pack_4bit(padded))
    want = torch.zeros(4 * G, m_pad)
    want[:K // 16, :M] = sx.float().T
    assert torch.equal(scales, want)


def _ptx_mma_m16n8k16_s8(a, b):
    """mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 with C = 0, per the PTX ISA ("Matrix Fragments
    for mma.m16n8k16 with integer type"): a[lane] = its two A .b32 registers, b[lane] its B register,
    element i of a register in byte i (signed). A (16x16): a_i (i = 4 * reg + byte) at row gid (reg 0)
    / gid + 8 (reg 1), col 4tid + byte. B (16x8): b_i at row 4tid + i, col gid. D: d_i at row gid
    (i < 2) / gid + 8, col 2tid + i % 2. Returns d[lane][0..3]."""
    A = [[None] * 16 for _ in range(16)]
    B = [[None] * 8 for _ in range(16)]
    for lane in range(32):
        gid, tid = lane // 4, lane % 4
        for reg in range(2):
            for i in range(4):
                A[gid + 8 * reg][4 * tid + i] = _s8((a[lane][reg] >> (8 * i)) & 0xFF)
        for i in range(4):
            B[4 * tid + i][gid] = _s8((b[lane] >> (8 * i)) & 0xFF)
    D = [[sum(A[m][k] * B[k][n] for k in range(16)) for n in range(8)] for m in range(16)]
    return [[D[lane // 4 + 8 * (e // 2)][2 * (lane % 4) + e % 2] for e in range(4)] for lane in range(32)]


_E2M1_VALUES = [float(v) for v in numerics.e2m1_to_float(torch.arange(16, dtype=torch.uint8))]


_E4M3_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().tolist()


def _e4m3_value(byte):
    return _E4M3_VALUES[byte]


@functools.lru_cache(maxsize=None)
def _e4m3_byte(v):
    """fp32 -> E4M3 byte, round to nearest even, saturating (__nv_cvt_float2_to_fp8x2, __NV_SATFINITE)."""
    v = max(min(v, 448.0), -448.0)
    return int(torch.tensor([v], dtype=torch.float32).to(torch.float8_e4m3fn).view(torch.uint8))


def _ptx_mma_m16n8k64_block_scaled(a, b, sfa, sfb):
    """mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3
    with C = 0, per the PTX ISA: a[lane][0..3], b[lane][0..1] .b32 registers of 8 E2M1 codes (element e
    in bits 4e; "Matrix Fragments for mma.m16n8k64", .e2m1 as .s4/.u4), sfa[lane] / sfb[lane] .b32 of 4
    UE4M3 scales ("Block Scaling for mma.sync"). Returns d[lane][0..3] (float64)."""
    def nibble(reg, e):
        return (reg >> (4 * e)) & 0xF

    A = [[None] * 64 for _ in range(16)]  # A[m][k]: a_i, i = 8 * reg + e: row gid (regs 0, 2) / gid+8 (1, 3),
    B = [[None] * 8 for _ in range(64)]   # col 8tid + e (+32 for regs 2, 3); B[k][n]: b_reg, col gid, same k
    for lane in range(32):
        gid, tid = lane // 4, lane % 4
        for reg in range(4):
            for e in range(8):
                A[gid + 8 * (reg % 2)][8 * tid + e + 32 * (reg // 2)] = _E2M1_VALUES[nibble(a[lane][reg], e)]
        for reg in range(2):
            for e in range(8):
                B[8 * tid + e + 32 * reg][gid] = _E2M1_VALUES[nibble(b[lane][reg], e)]
    # {byte-id, thread-id} = {0, 0}: scale_A of row gid from the quad's thread 0, of row gid+8 from thread
    # 1; scale_B of col gid from thread 0; byte c of the register = 16-group c (scale_vec::4X).
    sf_a = [[_e4m3_value((sfa[4 * (m % 8) + m // 8] >> (8 * c)) & 0xFF) for c in range(4)] for m in range(16)]
    sf_b = [[_e4m3_value((sfb[4 * n] >> (8 * c)) & 0xFF) for c in range(4)] for n in range(8)]
    D = [[sum(A[m][k] * sf_a[m][k // 16] * B[k][n] * sf_b[n][k // 16] for k in range(64)) for n in range(8)]
         for m in range(16)]
    return [[D[lane // 4 + 8 * (e // 2)][2 * (lane % 4) + e % 2] for e in range(4)] for lane in range(32)]


def _gemm_model(flavour, act, act_scales, qweight, wscales, wtscale, wcscales, M, mutate=None):
    """csrc w4a4_block_acc's quantized branch and NVFP4 factors for one NVFP4 flavour ("s8":
    MmaE2M1S8m16n8k16, "bs": MmaE2M1BlockScaledM16n8k64), lane by lane, one 16x8 tile at a time, each
    MMA evaluated by its PTX model. act uint8 [M_pad, K64/2], act_scales fp32 [K64/16, M_pad] (kernel
    A's), qweight uint8 [N, K/2], wscales float8_e4m3fn [K/16, N], wcscales fp32 [N] (the layer's).
    Returns y [M, N] float64 (before the low-rank branch and the bias). `mutate` makes one deliberate
    mistake (for the tests that the check can fail)."""
    layout = E2M1 if flavour == "s8" else E2M1_NATIVE
    w_layout = {"s8": E2M1_NATIVE, "bs": E2M1}[flavour] if mutate == "weight_layout" else layout
    m_pad, act_row = act.shape
    N, w_row = qweight.shape
    K, G = 2 * w_row, act_row // 32
    scale_rows = K // 16
    amem, wmem, smem = _Mem(act), _Mem(qweight), _Mem(wscales)
    sx_flat = act_scales.flatten().tolist()
    wcs = wcscales.tolist()
    alpha = wtscale * 0.25 * (4 if flavour == "bs" else 1)
    out = torch.zeros(m_pad, -(-N // 8) * 8, dtype=torch.float64)
    for mt in range(m_pad // 16):
        for nt in range(-(-N // 8)):
            acc = [[0.0] * 4 for _ in range(32)]
            for g in range(G):
                a, b, b_row = [], [], []
                for lane in range(32):
                    gid, tid = lane // 4, lane % 4
                    rows = [16 * mt + gid, 16 * mt + gid + 8]
                    a.append([_load_words(amem, (r * act_row, (r + 1) * act_row), g, layout, tid) for r in rows])
                    b_row.append(min(8 * nt + gid, N - 1))
                    k_limit = None if mutate == "no_tail" else K - 64 * g
                    b.append(_load_words(wmem, (b_row[-1] * w_row, (b_row[-1] + 1) * w_row), g, w_layout, tid,
                                         k_limit))
                if mutate == "swap_rows":
                    a = [[r1, r0] for r0, r1 in a]
                if flavour == "s8":
                    for s in range(4):
                        t = (s + 1) % 4 if mutate == "run_group" else s

                        def run_s8(w):
                            return _e2m1x4_to_s8x4((w[0] if t < 2 else w[1]) >> (16 * (t % 2)))

                        d = _ptx_mma_m16n8k16_s8([(run_s8(a[l][0]), run_s8(a[l][1])) for l in range(32)],
                                                 [run_s8(b[l]) for l in range(32)])
                        sg = 4 * g + s
                        sw_row = min(sg, scale_rows - 1)
                        for lane in range(32):
                            gid, tid = lane // 4, lane % 4
                            idx = 16 * mt + gid
                            sx = [sx_flat[sg * m_pad + idx + 8 * h] for h in range(2)]
                            col = min(8 * nt + 2 * tid, N - 2)
                            pair = smem.load(sw_row * N + col, 2, 0, scale_rows * N)  # fp8x2: .x = col
                            sw = [_e4m3_value(pair & 0xFF), _e4m3_value(pair >> 8)]
                            for e in range(4):
                                acc[lane][e] += d[lane][e] * sx[e // 2] * sw[e % 2]
                else:
                    a_frag = [(r0[0], r1[0], r0[1], r1[1]) for r0, r1 in a]  # NativeS4Fragments
                    b_frag = [(w[0], w[1]) for w in b]
                    if mutate == "swap_a1_a2":
                        a_frag = [(r[0], r[2], r[1], r[3]) for r in a_frag]
                    sg = 4 * g
                    sfa, sfb = [], []
                    for lane in range(32):
                        gid, tid = lane // 4, lane % 4
                        half = (tid >> 1 if mutate == "sfa_lane" else tid) & 1
                        p = sg * m_pad + 16 * mt + gid + 8 * half  # act_scale_reg
                        sfa.append(sum(_e4m3_byte(sx_flat[p + c * m_pad]) << (8 * c) for c in range(4)))
                        p = sg * N + b_row[lane]  # wgt_scale_reg
                        order = [3, 2, 1, 0] if mutate == "sfb_byte_order" else [0, 1, 2, 3]
                        sfb.append(sum(smem.load(p + order[c] * N, 1, 0, scale_rows * N) << (8 * c)
                                       for c in range(4) if order[c] < scale_rows - sg))
                    d = _ptx_mma_m16n8k64_block_scaled(a_frag, b_frag, sfa, sfb)
                    for lane in range(32):
                        for e in range(4):
                            acc[lane][e] += d[lane][e]
            for lane in range(32):
                gid, tid = lane // 4, lane % 4
                col = min(8 * nt + 2 * tid, N - 2)
                for e in range(4):
                    out[16 * mt + gid + 8 * (e // 2), 8 * nt + 2 * tid + e % 2] = \
                        acc[lane][e] * alpha * wcs[col + e % 2]
    return out[:M, :N]


def _e4m3_grid(*shape):
    """E4M3 values in [1/8, 15]: every product below stays exact in float64."""
    return (2.0 ** torch.randint(-3, 4, shape) * (1 + torch.randint(0, 8, shape) / 8)).to(torch.float8_e4m3fn)


def _gemm_operands(M, N, K, seed):
    """Random codes and grid scales, as kernel A writes activations (row-major, K padded to 64) and the
    file holds the weights; the activation padding (rows >= M, k >= K) holds garbage codes and scales:
    the products there must vanish through the weight side alone."""
    torch.manual_seed(seed)
    m_pad, G = -(-M // 16) * 16, -(-K // 64)
    x_codes = torch.randint(0, 16, (m_pad, 64 * G), dtype=torch.uint8)
    w_codes = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    act_scales = _e4m3_grid(4 * G, m_pad).float()
    wscales = _e4m3_grid(K // 16, N)
    wtscale = 0.75
    wcscales = 0.5 + torch.randint(0, 13, (N,)) / 8
    want = ((numerics.e2m1_to_float(x_codes[:M, :K]).double()
             * numerics.expand_groups(act_scales[:K // 16, :M].T.double(), 16))
            @ (numerics.e2m1_to_float(w_codes).double() * numerics.expand_groups(wscales.double().T, 16)).T)
    want = want * wtscale * wcscales.double()
    return (numerics.pack_4bit(x_codes), act_scales, numerics.pack_4bit(w_codes), wscales, wtscale, wcscales), want


GEMM_MODEL_CASES = [(20, 20, 80), (17, 24, 128), (9, 12, 176), (11, 8, 16)]  # M, N, K: K % 64 = 16, 0, 48; one group


@pytest.mark.parametrize("M,N,K", GEMM_MODEL_CASES)
def test_int8_nvfp4_gemm_model(M, N, K):
    """MmaE2M1S8m16n8k16 (sm_80..sm_90): each lane's four 2-byte runs of a row and chunk, decoded per
    16-group by the PRMT decoder into m16n8k16 .s8 registers (group s of both operands = run s), exact
    int32 group sums rescaled by sx * sw, then alpha = wtscale / 4 and wcscales: the scaled product,
    exactly; nothing read past a weight row's K or past the K/16 scale rows."""
    ops, want = _gemm_operands(M, N, K, seed=M + N + K)
    assert torch.equal(_gemm_model("s8", *ops, M), want)
    mutations = ["swap_rows", "weight_layout", "run_group"]
    for mutate in mutations:
        assert not torch.equal(_gemm_model("s8", *ops, M, mutate), want), mutate
    if K % 64:
        with pytest.raises(AssertionError, match="outside"):
            _gemm_model("s8", *ops, M, "no_tail")


@pytest.mark.parametrize("M,N,K", GEMM_MODEL_CASES)
def test_block_scaled_gemm_model(M, N, K):
    """MmaE2M1BlockScaledM16n8k64 (sm_120; never run on a GPU here): each lane's two 4-byte units of a
    row and chunk ARE the m16n8k64 .e2m1 registers (NativeS4Fragments), the scale registers come from
    act_scale_reg (kernel A's fp32 scales -> E4M3 bytes) and wgt_scale_reg (the file's E4M3 bytes, zero
    past K) of the lanes the ISA reads them from, the MMA applies them; times 4 and alpha = wtscale / 4
    and wcscales: the scaled product, exactly; nothing read past K. A swapped A register, scale lane or
    scale byte order, or the other layout on the weights, does not give it."""
    ops, want = _gemm_operands(M, N, K, seed=M + N + K)
    assert torch.equal(_gemm_model("bs", *ops, M), want)
    for mutate in ("swap_a1_a2", "sfa_lane", "sfb_byte_order", "weight_layout", "swap_rows"):
        assert not torch.equal(_gemm_model("bs", *ops, M, mutate), want), mutate
    if K % 64:
        with pytest.raises(AssertionError, match="outside"):
            _gemm_model("bs", *ops, M, "no_tail")


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
    assert cuda_backend.layer_mma_path(nvfp4, "cuda:0").layout == "E2M1NativeLayout"
    assert cuda_backend.layer_mma_path(int4, "cuda:0").name == "s8_m16n8k32"
    monkeypatch.setattr(cuda_build, "device_arch", lambda device=None: "9.0")
    assert cuda_backend.layer_mma_path(nvfp4, "cuda:0").layout == "E2M1Layout"


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
    M, m_pad, k64 = x2.shape[0], scales_raw.shape[1], -(-K // 64) * 64
    assert act_raw.dtype == torch.uint8 and act_raw.shape == (m_pad, k64 // 2)
    assert scales_raw.shape == (k64 // 16, m_pad) and m_pad % cuda_backend.BLOCK_M == 0
    assert torch.equal(scales, ref_scales.float()), f"scales differ at {(scales != ref_scales.float()).nonzero()[:5].tolist()}"
    assert torch.equal(codes, ref_codes), f"codes differ at {(codes != ref_codes).nonzero()[:5].tolist()}"
    # Padding (rows M .. M_pad, columns K .. K64) must be written too, as zeros: the GEMM reads it.
    assert not scales_raw.isnan().any() and not lora_raw.isnan().any()
    all_codes = numerics.unpack_4bit(act_raw, signed=False)
    assert (all_codes[M:] == 0).all() and (all_codes[:, K:] == 0).all()
    assert (scales_raw[:, M:] == 0).all() and (scales_raw[K // 16:] == 0).all() and (lora_raw[M:] == 0).all()
    if layer.rank:
        ref = x2.double() @ layer.lora_down.double().T
        bound = x2.double().abs() @ layer.lora_down.double().abs().T
        assert ((lora_act.double() - ref).abs() <= 2 ** -16 * bound + 1e-30).all()
    return act_raw, scales_raw


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
    (40, 144, 16, torch.bfloat16),
]


@requires_cuda
@pytest.mark.parametrize("M,K,rank,dtype", QUANT_CASES)
def test_quantize_act_exact(ext, M, K, rank, dtype):
    layer = make_layer(128, K, rank, dtype=dtype)
    check_quantize(layer, make_input((M,), K, dtype, seed=M))


@requires_cuda
@pytest.mark.parametrize("M,K,rank,dtype", QUANT_CASES[:4] + QUANT_CASES[-1:])
def test_quantize_act_exact_sm120_layout(ext, monkeypatch, M, K, rank, dtype):
    """Kernel A in sm_120's layout (E2M1NativeLayout) on any GPU: unlike that path's GEMM it uses no
    sm_120-only instruction, so its codes and scales are checked against the spec here too. Both
    layouts write the same row-major bytes (only which lane writes which byte differs)."""
    layer = make_layer(128, K, rank, dtype=dtype)
    x = make_input((M,), K, dtype, seed=M)
    default = cuda_backend.quantize_act(layer, x)[3]
    monkeypatch.setattr(cuda_backend, "nvfp4_mma_path", lambda capability: cuda_backend.NVFP4_BLOCK_SCALED_PATH)
    act_raw, scales_raw = check_quantize(layer, x)
    assert torch.equal(act_raw, default[0]) and torch.equal(scales_raw, default[1])


LINEAR_CASES = [
    # M, N, K, rank, dtype
    *[(4096, n, k, 32, torch.bfloat16) for n, k in FLUX_NK],
    (4608, 12288, 3072, 32, torch.float16),
    (4608, 3072, 15360, 16, torch.bfloat16),
    (1, 3072, 3072, 32, torch.bfloat16),
    (3, 9216, 3072, 0, torch.float16),
    (255, 3072, 12288, 7, torch.bfloat16),
    (5, 128, 64, 16, torch.bfloat16),
    (130, 200, 208, 7, torch.float16),   # K % 64 = 16
    (17, 4, 16, 0, torch.bfloat16),      # one 16-group
    (37, 136, 80, 16, torch.bfloat16),   # K % 64 = 16, two column blocks
    (200, 258, 144, 3, torch.float16),   # K % 64 = 16, N not a multiple of 8
    (61, 130, 176, 32, torch.bfloat16),  # K % 64 = 48
    (64, 258, 336, 32, torch.bfloat16),
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
@pytest.mark.parametrize("K", [16, 48, 80, 144, 176])
def test_gemm_reads_no_weight_past_k(ext, K):
    """NVFP4 K need only be a multiple of 16, so a weight row may end inside the GEMM's last 64-chunk:
    the GEMM must take the runs and scales past K as zero without reading them. Here qweight and
    wscales are views whose storage goes on past the tensor (garbage: E2M1 6.0 codes, E4M3 1.0
    scales), and the activations past K hold non-zero codes and scales (kernel A writes zeros there):
    the output must not change. Reading row n's bytes past K would read row n+1's codes (past the
    last row: the garbage); reading wscales rows past K/16, the garbage scales."""
    N, M = 136, 37
    dev = torch.device("cuda", torch.cuda.current_device())
    layer = make_layer(N, K, 16, seed=K)
    x = make_input((M,), K, torch.bfloat16, seed=K)
    check_linear(layer, x)
    path = cuda_backend.layer_mma_path(layer, dev)
    act, scales, lora_act = ext.quantize_act_lora_down(x, *cuda_backend._act_operands(layer, dev), False, path.name)
    ops = cuda_backend.layer_operands(layer, dev)
    y0 = ext.w4a4_gemm(act, scales, lora_act, M=M, act_unsigned=False, mma_path=path.name, **ops)
    nq, ns = N * K // 2, K // 16 * N
    qbuf = torch.full((nq + 256,), 0x77, dtype=torch.uint8, device=dev)
    qbuf[:nq] = layer.qweight.flatten()
    sbuf = torch.full((ns + 4 * N,), 0x38, dtype=torch.uint8, device=dev)  # 0x38 = E4M3 1.0
    sbuf[:ns] = layer.wscales.view(torch.uint8).flatten()
    poked = dict(ops, qweight=qbuf[:nq].view(N, K // 2), wscales=sbuf[:ns].view(torch.float8_e4m3fn).view(K // 16, N))
    act2, scales2 = act.clone(), scales.clone()
    act2[:, K // 2:] = 0x77
    scales2[K // 16:] = 1.0
    y1 = ext.w4a4_gemm(act2, scales2, lora_act, M=M, act_unsigned=False, mma_path=path.name, **poked)
    assert torch.equal(y0, y1)


def _spy_extension(monkeypatch):
    """Records the storage (data_ptr) of every tensor the backend passes to the kernels (not the
    tensors: keeping them would keep their memory)."""
    real = cuda_backend.extension()
    calls = []

    def ptr(v):
        return v.data_ptr() if isinstance(v, torch.Tensor) else v

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if not callable(fn):
                return fn

            def call(*args, **kwargs):
                calls.append((name, [ptr(a) for a in args], {k: ptr(v) for k, v in kwargs.items()}))
                return fn(*args, **kwargs)
            return call

    monkeypatch.setattr(cuda_backend, "extension", lambda: Spy())
    return calls


@requires_cuda
@pytest.mark.parametrize("precision", ["nvfp4", "int4"])
def test_layer_tensors_are_read_in_place(ext, monkeypatch, precision):
    """The kernels get the layer's own buffers (same storage, no per-call or cached copy), and a
    forward allocates only the activation buffers and the output - nothing weight-sized - and keeps
    nothing once its output is freed."""
    N, K, M, rank = 8192, 4096, 16, 32
    if precision == "nvfp4":
        small, layer = make_layer(256, 128, 4), make_layer(N, K, rank)
        x = make_input((M,), K, torch.bfloat16)
    else:
        small, layer = make_int4_layer(256, 128, 4), make_int4_layer(N, K, rank)
        x = make_int4_input((M,), K, unsigned=False, dtype=torch.bfloat16)
    cuda_backend.forward(small, make_input((3,), 128, torch.bfloat16))  # any one-time allocation
    calls = _spy_extension(monkeypatch)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = cuda_backend.forward(layer, x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    m_pad, R16 = cuda_backend.BLOCK_M, 32
    # sm_90's wgmma path (INT4; this shape is one it takes) has its own bindings and one code byte per value.
    wgmma = cuda_backend.layer_mma_path(layer, x.device) is cuda_backend.WGMMA_PATH
    code_bytes = K if wgmma else K // 2
    scratch = m_pad * code_bytes + (K // layer.group_size) * m_pad * 4 + m_pad * R16 * 4 + M * N * 2
    weight = layer.qweight.numel()  # 16 MiB
    assert peak <= scratch + (64 << 10) and peak < weight // 8, (peak, scratch, weight)
    del y
    assert torch.cuda.memory_allocated() == base  # nothing kept (no cache)

    kernels = {name: (args, kwargs) for name, args, kwargs in calls}
    args, _ = kernels["quantize_act_sm90a" if wgmma else "quantize_act_lora_down"]
    assert args[1] == layer.smooth.data_ptr() and args[2] == layer.lora_down.data_ptr()
    _, kwargs = kernels["w4a4_gemm_sm90a" if wgmma else "w4a4_gemm"]
    names = ["qweight", "wscales", "lora_up", "bias"] + (["wtscale", "wcscales"] if precision == "nvfp4" else [])
    for name in names:
        assert kwargs[name] == getattr(layer, name).data_ptr(), name


@requires_cuda
@pytest.mark.parametrize("inference", [False, True])
def test_quantized_layers_and_in_place_changes(ext, inference):
    """Layers made by the project's quantizer (SVD, smoothing, NVFP4 weights with alpha), then in-place
    writes of every tensor the kernels read (wtscale, wcscales, the low-rank factors, bias, smooth,
    wscales, qweight) and a LoRA-style rank growth (replaced tensors): each is seen by the next call
    (there is no cache to go stale). inference=True: all under torch.inference_mode, as ComfyUI samples."""
    with torch.inference_mode() if inference else torch.no_grad():
        torch.manual_seed(3)
        w = torch.randn(320, 512, device="cuda") / 20
        layer = quantize_w4a4(w, torch.randn(320, device="cuda"), rank=32,
                              smooth=torch.rand(512, device="cuda") + 0.5, precision="nvfp4")
        layer.backend = "cuda"
        x = make_input((2, 100), 512, torch.bfloat16)
        check_linear(layer, x, via_module=True)
        edits = [
            lambda: layer.wtscale.mul_(3),
            lambda: layer.wcscales.copy_(torch.linspace(0.5, 2, 320, device="cuda")),
            lambda: layer.lora_up.mul_(-2),
            lambda: layer.lora_down[:, :64].zero_(),
            lambda: layer.bias.add_(1),
            lambda: layer.smooth.mul_(1.25),
            lambda: layer.wscales.copy_((layer.wscales.float() * 0.5).to(torch.float8_e4m3fn)),
            lambda: layer.qweight[:40].copy_(layer.qweight[40:80]),
        ]
        for edit in edits:
            before = cuda_backend.forward(layer, x)
            edit()
            check_linear(layer, x)
            assert not torch.equal(cuda_backend.forward(layer, x), before)
        layer.lora_down = torch.cat([layer.lora_down, layer.lora_down[:3] * 0.5])
        layer.lora_up = torch.cat([layer.lora_up, layer.lora_up[:, :3]], dim=1)
        check_linear(layer, x, via_module=True)


@requires_cuda
def test_launches_the_nvfp4_kernels(ext):
    """The NVFP4 layer runs its path's GEMM flavour and kernel A in that flavour's layout."""
    layer = make_layer(256, 208, 16)
    x = make_input((64,), 208, torch.bfloat16)
    path = cuda_backend.layer_mma_path(layer, x.device)
    names = launched_kernels(lambda: cuda_backend.forward(layer, x))
    gemm = [n for n in names if "w4a4_gemm_kernel" in n]
    quant = [n for n in names if "quantize_act_lora_down_kernel" in n]
    assert gemm and all(NVFP4_FLAVOURS[path.name] in n for n in gemm), names
    assert quant and all(path.layout in n for n in quant), names


@requires_cuda
def test_repeatable(ext):
    layer = make_layer(3072, 3072, 32)
    x = make_input((999,), 3072, torch.bfloat16)
    y0 = cuda_backend.forward(layer, x)
    for _ in range(3):
        assert torch.equal(cuda_backend.forward(layer, x), y0)
