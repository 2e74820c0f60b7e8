// Host-emulated checks of the CUDA kernels against plain references (quant.rs port).
#include <cuda_fp16.h>
#include <type_traits>
#include <cstdio>
#include <random>
#include <string>

#include "matmul.cu"
#include "embed.cu"
#include "elementwise.cu"
#include "attention.cu"

using u8 = unsigned char;
static std::mt19937 rng(1234);
static float frand(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }
static int fails = 0;
static void check(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tol_abs, double tol_rel) {
    double worst = 0; size_t wi = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        double e = std::fabs(got[i] - want[i]) / (tol_abs + tol_rel * std::fabs(want[i]));
        if (!(e <= worst)) { worst = e; wi = i; }
    }
    bool ok = worst <= 1.0;
    if (!ok) ++fails;
    printf("%-44s %s (worst at %zu: got %.7g want %.7g, ratio %.3g)\n", what, ok ? "ok" : "FAIL", wi, got[wi], want[wi], worst);
}
static float f16at(const u8* b, int i) { uint16_t u = b[i] | (b[i + 1] << 8); return __half2float(__ushort_as_half(u)); }
static void put_f16(u8* b, float x) { __half h = __float2half_rn(x); b[0] = h.bits & 0xff; b[1] = h.bits >> 8; }

struct TypeInfo { const char* name; int qk, bb; };
static const TypeInfo TYPES[10] = {{"q4_0", 32, 18}, {"q4_1", 32, 20}, {"q5_0", 32, 22}, {"q5_1", 32, 24}, {"q8_0", 32, 34},
                                   {"q4_k", 256, 144}, {"q5_k", 256, 176}, {"q6_k", 256, 210}, {"f16", 1, 2}, {"f32", 1, 4}};

static void kscalemin(int j, const u8* s, int& sc, int& m) {
    if (j < 4) { sc = s[j] & 63; m = s[j + 4] & 63; }
    else { sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4); m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
}
// Port of quant.rs dequantize_row.
static void deq_ref(const std::string& t, const u8* b0, int n, float* y0) {
    if (t == "f32") { memcpy(y0, b0, 4 * n); return; }
    if (t == "f16") { for (int i = 0; i < n; ++i) y0[i] = f16at(b0, 2 * i); return; }
    const TypeInfo* ti = nullptr; for (auto& x : TYPES) if (t == x.name) ti = &x;
    for (int blk = 0; blk < n / ti->qk; ++blk) {
        const u8* b = b0 + blk * ti->bb; float* y = y0 + blk * ti->qk;
        if (t == "q4_0") { float d = f16at(b, 0); for (int j = 0; j < 16; ++j) { y[j] = ((b[2 + j] & 0xF) - 8) * d; y[j + 16] = ((b[2 + j] >> 4) - 8) * d; } }
        else if (t == "q4_1") { float d = f16at(b, 0), m = f16at(b, 2); for (int j = 0; j < 16; ++j) { y[j] = (b[4 + j] & 0xF) * d + m; y[j + 16] = (b[4 + j] >> 4) * d + m; } }
        else if (t == "q5_0" || t == "q5_1") {
            bool mn = t == "q5_1"; float d = f16at(b, 0); float m = mn ? f16at(b, 2) : 0; int h = mn ? 4 : 2;
            uint32_t qh = b[h] | b[h + 1] << 8 | b[h + 2] << 16 | (uint32_t)b[h + 3] << 24; const u8* qs = b + h + 4;
            for (int j = 0; j < 16; ++j) {
                uint32_t lo = (qs[j] & 0xF) | ((qh >> j) & 1) << 4, hi = (qs[j] >> 4) | ((qh >> (j + 16)) & 1) << 4;
                if (mn) { y[j] = lo * d + m; y[j + 16] = hi * d + m; } else { y[j] = ((int)lo - 16) * d; y[j + 16] = ((int)hi - 16) * d; }
            }
        } else if (t == "q8_0") { float d = f16at(b, 0); for (int j = 0; j < 32; ++j) y[j] = (int8_t)b[2 + j] * d; }
        else if (t == "q4_k" || t == "q5_k") {
            bool five = t == "q5_k"; float d = f16at(b, 0), dmin = f16at(b, 2); const u8* sc = b + 4; const u8* qh = b + 16; const u8* qs = b + (five ? 48 : 16);
            for (int g = 0; g < 4; ++g) {
                const u8* q = qs + g * 32; int s1, m1, s2, m2; kscalemin(2 * g, sc, s1, m1); kscalemin(2 * g + 1, sc, s2, m2);
                for (int l = 0; l < 32; ++l) {
                    int h1 = five && (qh[l] & (1 << 2 * g)) ? 16 : 0, h2 = five && (qh[l] & (2 << 2 * g)) ? 16 : 0;
                    y[g * 64 + l] = d * s1 * ((q[l] & 0xF) + h1) - dmin * m1;
                    y[g * 64 + l + 32] = d * s2 * ((q[l] >> 4) + h2) - dmin * m2;
                }
            }
        } else if (t == "q6_k") {
            float d = f16at(b, 208);
            for (int h = 0; h < 2; ++h) {
                const u8* ql = b + h * 64; const u8* qh = b + 128 + h * 32; const u8* sc = b + 192 + h * 8; float* yh = y + h * 128;
                for (int l = 0; l < 32; ++l) {
                    int is = l / 16;
                    int q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32, q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32, q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    yh[l] = d * (int8_t)sc[is] * q1; yh[l + 32] = d * (int8_t)sc[is + 2] * q2;
                    yh[l + 64] = d * (int8_t)sc[is + 4] * q3; yh[l + 96] = d * (int8_t)sc[is + 6] * q4;
                }
            }
        }
    }
}
// Random row bytes: random codes, sane f16 scales.
static std::vector<u8> rand_rows(const TypeInfo& ti, int K, int N) {
    size_t rb = (size_t)K / ti.qk * ti.bb;
    std::vector<u8> w(rb * N + 64);
    for (auto& c : w) c = rng() & 0xff;
    std::string t = ti.name;
    for (int n = 0; n < N; ++n) {
        u8* r = w.data() + n * rb;
        if (t == "f32") { for (int k = 0; k < K; ++k) { float f = frand(-1, 1); memcpy(r + 4 * k, &f, 4); } continue; }
        if (t == "f16") { for (int k = 0; k < K; ++k) put_f16(r + 2 * k, frand(-1, 1)); continue; }
        for (int b = 0; b < K / ti.qk; ++b) {
            u8* blk = r + b * ti.bb;
            if (t == "q6_k") put_f16(blk + 208, frand(-0.02f, 0.02f));
            else {
                put_f16(blk, frand(-0.05f, 0.05f));
                if (t == "q4_1" || t == "q5_1" || t == "q4_k" || t == "q5_k") put_f16(blk + 2, frand(-0.05f, 0.05f));
            }
        }
    }
    return w;
}
static std::vector<float> rvec(size_t n, float a = 1) { std::vector<float> v(n); for (auto& x : v) x = frand(-a, a); return v; }

using MatFn = void (*)(const unsigned char*, const float*, float*, int, int, int);
using RowsFn = void (*)(const unsigned char*, const int*, float*, int, int, float);
static MatFn MMV[10] = {mmv_q4_0, mmv_q4_1, mmv_q5_0, mmv_q5_1, mmv_q8_0, mmv_q4_k, mmv_q5_k, mmv_q6_k, mmv_f16, mmv_f32};
static MatFn MMTC[10] = {mm_tc_q4_0, mm_tc_q4_1, mm_tc_q5_0, mm_tc_q5_1, mm_tc_q8_0, mm_tc_q4_k, mm_tc_q5_k, mm_tc_q6_k, mm_tc_f16, mm_tc_f32};
static MatFn MM[10] = {mm_q4_0, mm_q4_1, mm_q5_0, mm_q5_1, mm_q8_0, mm_q4_k, mm_q5_k, mm_q6_k, mm_f16, mm_f32};
static RowsFn GR[10] = {get_rows_q4_0, get_rows_q4_1, get_rows_q5_0, get_rows_q5_1, get_rows_q8_0, get_rows_q4_k, get_rows_q5_k, get_rows_q6_k, get_rows_f16, get_rows_f32};

static void test_matmul() {
    for (int ti = 0; ti < 10; ++ti) {
        const TypeInfo& T = TYPES[ti];
        std::vector<int> Ks = {512};
        if (T.qk == 1) { Ks.push_back(100); Ks.push_back(72); }
        for (int K : Ks) {
            int N = 70;
            auto w = rand_rows(T, K, N);
            size_t rb = (size_t)K / T.qk * T.bb;
            std::vector<float> W((size_t)N * K);
            for (int n = 0; n < N; ++n) deq_ref(T.name, w.data() + n * rb, K, &W[(size_t)n * K]);
            for (int B : {1, 3, 8, 67}) {
                auto x = rvec((size_t)B * K);
                std::vector<double> want((size_t)B * N);
                for (int b = 0; b < B; ++b) for (int n = 0; n < N; ++n) { double s = 0; for (int k = 0; k < K; ++k) s += (double)W[(size_t)n * K + k] * x[(size_t)b * K + k]; want[(size_t)b * N + n] = s; }
                double scale = 0; for (auto v : W) scale = std::max(scale, (double)std::fabs(v));
                double tol = 1e-5 * K * scale + 1e-6;
                char nm[96];
                if (B <= 8) {
                    std::vector<float> y((size_t)B * N, NAN);
                    emu::launch({(unsigned)(N + 3) / 4, 1, 1}, {128, 1, 1}, [&] { MMV[ti](w.data(), x.data(), y.data(), K, N, B); });
                    snprintf(nm, sizeof nm, "mmv_%s K=%d B=%d", T.name, K, B); check(nm, y, want, tol, 1e-5);
                }
                std::vector<float> y((size_t)B * N, NAN);
                emu::launch({(unsigned)(N + 63) / 64, (unsigned)(B + 63) / 64, 1}, {256, 1, 1}, [&] { MM[ti](w.data(), x.data(), y.data(), K, N, B); });
                snprintf(nm, sizeof nm, "mm_%s K=%d B=%d", T.name, K, B); check(nm, y, want, tol, 1e-5);
                // TF32: ~2^-11 relative per input, so bound by 2^-10 * sum |w x| per output.
                std::vector<double> tolv((size_t)B * N);
                double worst_abs = 0;
                for (int b = 0; b < B; ++b) for (int n = 0; n < N; ++n) { double s = 0; for (int k = 0; k < K; ++k) s += std::fabs((double)W[(size_t)n * K + k] * x[(size_t)b * K + k]); worst_abs = std::max(worst_abs, s); }
                std::fill(y.begin(), y.end(), NAN);
                emu::launch({(unsigned)(N + 63) / 64, (unsigned)(B + 63) / 64, 1}, {256, 1, 1}, [&] { MMTC[ti](w.data(), x.data(), y.data(), K, N, B); });
                snprintf(nm, sizeof nm, "mm_tc_%s K=%d B=%d", T.name, K, B); check(nm, y, want, worst_abs / 1024, 0);
            }
            // get_rows
            std::vector<int> ids = {3, 0, 69, 3};
            std::vector<float> out(ids.size() * K, NAN);
            emu::launch({(unsigned)ids.size(), 1, 1}, {256, 1, 1}, [&] { GR[ti](w.data(), ids.data(), out.data(), K, (int)ids.size(), 0.5f); });
            std::vector<double> want(ids.size() * K);
            for (size_t i = 0; i < ids.size(); ++i) for (int k = 0; k < K; ++k) want[i * K + k] = W[(size_t)ids[i] * K + k] * 0.5;
            char nm[96]; snprintf(nm, sizeof nm, "get_rows_%s K=%d", T.name, K); check(nm, out, want, 1e-7, 1e-6);
        }
    }
}

static void test_elementwise() {
    { // rms_norm, in place too
        int n = 300, rows = 3; auto x = rvec(n * rows, 3), w = rvec(n);
        std::vector<double> want(n * rows);
        for (int r = 0; r < rows; ++r) { double ss = 0; for (int i = 0; i < n; ++i) ss += (double)x[r * n + i] * x[r * n + i]; double inv = 1 / std::sqrt(ss / n + 1e-6); for (int i = 0; i < n; ++i) want[r * n + i] = x[r * n + i] * inv * w[i]; }
        std::vector<float> y(n * rows);
        emu::launch({(unsigned)rows, 1, 1}, {256, 1, 1}, [&] { rms_norm(x.data(), w.data(), y.data(), n, rows, 1e-6f); });
        check("rms_norm", y, want, 1e-6, 1e-5);
        emu::launch({(unsigned)rows, 1, 1}, {256, 1, 1}, [&] { rms_norm(x.data(), w.data(), x.data(), n, rows, 1e-6f); });
        check("rms_norm in place", x, want, 1e-6, 1e-5);
    }
    { int n = 1000; auto a = rvec(n, 8), b = rvec(n); std::vector<float> o(n); std::vector<double> ws(n), wg(n), wc(n);
      for (int i = 0; i < n; ++i) { double g = a[i]; ws[i] = g / (1 + std::exp(-g)) * b[i]; wg[i] = 0.5 * g * (1 + std::tanh(0.7978845608028654 * g * (1 + 0.044715 * g * g))) * b[i]; wc[i] = 5 * std::tanh(a[i] / 5.0); }
      emu::launch({4, 1, 1}, {256, 1, 1}, [&] { swiglu(a.data(), b.data(), o.data(), n); }); check("swiglu", o, ws, 1e-6, 1e-5);
      emu::launch({4, 1, 1}, {256, 1, 1}, [&] { geglu(a.data(), b.data(), o.data(), n); }); check("geglu", o, wg, 1e-6, 1e-5);
      auto c = a; emu::launch({4, 1, 1}, {256, 1, 1}, [&] { softcap(c.data(), n, 5.0f); }); check("softcap", c, wc, 1e-6, 1e-5);
      int rows = 3, m = 300; auto x = rvec(rows * m), bias = rvec(m); std::vector<double> wb(rows * m);
      for (int r = 0; r < rows; ++r) for (int i = 0; i < m; ++i) wb[r * m + i] = x[r * m + i] + bias[i];
      emu::launch({2, (unsigned)rows, 1}, {256, 1, 1}, [&] { add_bias(x.data(), bias.data(), rows, m); }); check("add_bias", x, wb, 1e-7, 1e-6);
      auto p = rvec(n), q = rvec(n); std::vector<double> wa(n); for (int i = 0; i < n; ++i) wa[i] = p[i] + q[i];
      emu::launch({4, 1, 1}, {256, 1, 1}, [&] { add(p.data(), q.data(), n); }); check("add", p, wa, 1e-7, 1e-6);
    }
    for (int neox = 0; neox < 2; ++neox) for (int ff = 0; ff < 2; ++ff) { // rope with partial rotation
        int T = 3, H = 2, hd = 64, rot = 48; float base = 10000, fs = 0.5f;
        auto x = rvec(T * H * hd); std::vector<int> pos = {0, 7, 4000}; auto fac = rvec(rot / 2); for (auto& f : fac) f = 1 + std::fabs(f);
        std::vector<double> want(x.begin(), x.end());
        for (int t = 0; t < T; ++t) for (int h = 0; h < H; ++h) for (int i = 0; i < rot / 2; ++i) {
            double th = pos[t] * std::pow((double)base, -2.0 * i / rot); if (ff) th /= fac[i]; th *= fs;
            int a = neox ? i : 2 * i, b = neox ? i + rot / 2 : 2 * i + 1; size_t o = (t * H + h) * hd;
            double x0 = x[o + a], x1 = x[o + b]; want[o + a] = x0 * std::cos(th) - x1 * std::sin(th); want[o + b] = x0 * std::sin(th) + x1 * std::cos(th);
        }
        emu::launch({(unsigned)T, (unsigned)H, 1}, {32, 1, 1}, [&] { rope(x.data(), pos.data(), T, H, hd, rot, base, fs, ff ? fac.data() : nullptr, neox); });
        char nm[64]; snprintf(nm, sizeof nm, "rope neox=%d factors=%d", neox, ff); check(nm, x, want, 1e-4, 1e-4);
    }
    { // argmax: ties -> first index
        int V = 5000, R = 3; auto l = rvec(V * R); l[1 * V + 10] = 7; l[1 * V + 4000] = 7; l[2 * V + 4999] = 9; l[0 * V + 2] = 8;
        std::vector<int> out(R, -5);
        emu::launch({(unsigned)R, 1, 1}, {1024, 1, 1}, [&] { argmax(l.data(), out.data(), V, R); });
        bool ok = out[0] == 2 && out[1] == 10 && out[2] == 4999; if (!ok) ++fails;
        printf("%-44s %s (%d %d %d)\n", "argmax", ok ? "ok" : "FAIL", out[0], out[1], out[2]);
    }
}

// Paged cache fixture: n_blocks pages, a table mapping logical -> physical pages.
struct Cache { int kv_dim; std::vector<__half> k, v; std::vector<float> kf, vf; };
static void test_attention() {
    for (int hd : {64, 256}) for (int window : {0, 10}) for (float cap : {0.0f, 20.0f}) {
        int H = 4, KVH = 2, kv_dim = KVH * hd, nblk = 12, maxb = 6;
        Cache c{kv_dim}; c.k.resize((size_t)nblk * 16 * kv_dim); c.v.resize(c.k.size()); c.kf.resize(c.k.size()); c.vf.resize(c.k.size());
        // kv_store fills the cache: every slot from random rows.
        int ntok = nblk * 16; auto kr = rvec((size_t)ntok * kv_dim), vr = rvec((size_t)ntok * kv_dim);
        std::vector<int> slots(ntok); for (int i = 0; i < ntok; ++i) slots[i] = i; slots[5] = -1;
        emu::launch({(unsigned)ntok, 1, 1}, {256, 1, 1}, [&] { kv_store(kr.data(), vr.data(), c.k.data(), c.v.data(), slots.data(), ntok, kv_dim); });
        { std::vector<float> g(c.k.size()); std::vector<double> want(c.k.size());
          for (size_t i = 0; i < g.size(); ++i) { g[i] = __half2float(c.k[i]); want[i] = (i / kv_dim == 5) ? g[i] : (double)__half2float(__float2half_rn(kr[i])); }
          check("kv_store", g, want, 1e-30, 0); }
        for (size_t i = 0; i < c.k.size(); ++i) { c.kf[i] = __half2float(c.k[i]); c.vf[i] = __half2float(c.v[i]); }
        std::vector<int> perm(nblk); for (int i = 0; i < nblk; ++i) perm[i] = i; std::shuffle(perm.begin(), perm.end(), rng);
        auto ref = [&](const float* q, const int* table, int lo, int hi /*exclusive*/, int h, double* o) {
            int kvh = h / (H / KVH); double scale = 1 / std::sqrt((double)hd);
            std::vector<double> s; double mx = -INFINITY;
            for (int p = lo; p < hi; ++p) { size_t row = (size_t)(table[p / 16] * 16 + p % 16) * kv_dim + kvh * hd; double d = 0;
                for (int e = 0; e < hd; ++e) d += (double)q[e] * c.kf[row + e]; d *= scale; if (cap) d = cap * std::tanh(d / cap); s.push_back(d); mx = std::max(mx, d); }
            double L = 0; for (auto& v : s) { v = std::exp(v - mx); L += v; }
            for (int e = 0; e < hd; ++e) { double a = 0; for (int p = lo; p < hi; ++p) a += s[p - lo] * c.vf[(size_t)(table[p / 16] * 16 + p % 16) * kv_dim + kvh * hd + e]; o[e] = hi > lo ? a / L : 0; }
        };
        // decode: 3 sequences
        int B = 3; std::vector<int> tables(B * maxb), ctx = {37, 5, 90};
        for (int s = 0; s < B; ++s) for (int i = 0; i < maxb; ++i) tables[s * maxb + i] = perm[(s * 4 + i) % nblk];
        auto q = rvec((size_t)B * H * hd); std::vector<float> out((size_t)B * H * hd, NAN); std::vector<double> want(out.size());
        for (int s = 0; s < B; ++s) for (int h = 0; h < H; ++h) {
            int lo = window ? std::max(0, ctx[s] - window) : 0;
            ref(&q[(s * H + h) * hd], &tables[s * maxb], lo, ctx[s], h, &want[(s * H + h) * hd]); }
        emu::launch({(unsigned)H, (unsigned)B, 1}, {128, 1, 1}, [&] { paged_attention_decode(q.data(), c.k.data(), c.v.data(), out.data(), tables.data(), ctx.data(), maxb, H, KVH, hd, 1 / std::sqrt((float)hd), window, cap); });
        char nm[96]; snprintf(nm, sizeof nm, "decode hd=%d window=%d cap=%g", hd, window, cap); check(nm, out, want, 1e-5, 1e-4);
        // prefill: positions start .. start + n_q - 1 of sequence 0's table
        for (int start : {0, 21}) {
            int nq = 37; if (start + nq > maxb * 16) nq = maxb * 16 - start;
            auto qp = rvec((size_t)nq * H * hd); std::vector<float> o((size_t)nq * H * hd, NAN); std::vector<double> w(o.size());
            for (int i = 0; i < nq; ++i) for (int h = 0; h < H; ++h) { int p = start + i; int lo = window ? std::max(0, p - window + 1) : 0; ref(&qp[(i * H + h) * hd], &tables[0], lo, p + 1, h, &w[(i * H + h) * hd]); }
            emu::launch({(unsigned)(nq + 15) / 16, (unsigned)H, 1}, {128, 1, 1}, [&] { paged_attention_prefill(qp.data(), c.k.data(), c.v.data(), o.data(), tables.data(), start, nq, H, KVH, hd, 1 / std::sqrt((float)hd), window, cap); });
            snprintf(nm, sizeof nm, "prefill hd=%d window=%d cap=%g start=%d", hd, window, cap, start); check(nm, o, w, 1e-5, 1e-4);
        }
    }
}

int main() {
    test_elementwise();
    test_attention();
    test_matmul();
    printf("%d failures\n", fails);
    return fails != 0;
}
