/* Fused kernels of the toy DiT step; built and loaded by fused_dit.py.

   Two layers:
   1. per-sample cores (static): one sample's tokens at a time, no threads;
   2. dit_fwd / dit_bwd, dit_train, dit_sample_step: the whole network, tile by tile. A tile of samples
      goes through every layer while its activations stay in the core's cache; its matmuls are a
      register-blocked micro-kernel (gemm). */
#include <math.h>
#include <stdlib.h>
#include <stddef.h>
#include <omp.h>
typedef long i64;
/* Kernel arguments never overlap (in-place updates use one pointer), which lets loops vectorise. */
typedef float *restrict fp;
typedef const float *restrict cfp;
/* Cores and tile functions are always inlined, so that the toy's shapes, passed as constants at the top
   (tile_fwd_toy / tile_bwd_toy), reach every inner loop: fixed trip counts unroll and vectorise fully. */
#define INLINE static inline __attribute__((always_inline))
#define GELU_A 0.044715f
#define GELU_C 0.7978845608028654f  /* sqrt(2 / pi) */
/* -2 z of tanh-GELU, capped: under -ffast-math 1 / (1 + inf) may become NaN, and exp(80) is already
   large enough that sigmoid(2 z) rounds to its limit (exploding activations of norm-free models reach
   this range, and must give what PyTorch gives). */
#define GELU_EXP_ARG(v) fminf(-2.f * GELU_C * ((v) + GELU_A * (v) * (v) * (v)), 80.f)

/* Thread count of every parallel region, set from torch.get_num_threads(): OpenMP's own default is per
   calling thread, and a team larger than torch's would spin against MKL's threads. */
static int nth = 1;
void set_num_threads(int n) { nth = n > 0 ? n : 1; }

static double *partials(i64 cols) { return calloc((size_t)nth * cols, sizeof(double)); }
static void finish(double *part, i64 cols, float *out) {
    for (i64 c = 0; c < cols; c++) {
        double s = 0;
        for (int t = 0; t < nth; t++) s += part[t * cols + c];
        out[c] = (float)s;
    }
    free(part);
}
INLINE void colsum_add(cfp x, i64 rows, int cols, double *restrict acc) {
    for (i64 r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[c] += x[r * cols + c];
}

/* ============================================================================ 1. per-sample cores */

/* One sample's T rows. kind: 0 none, 1 layernorm, 2 rmsnorm, 3 dyt. y = norm(x) (not written for kind 0),
   o = (kind ? y : x) * (1 + sc) + sh; rstd[t] for kinds 1 and 2. */
INLINE void norm_mod_sample(cfp x, int T, int D, int kind, float eps, float alpha, cfp sh, cfp sc,
                            fp y, fp o, fp rstd) {
    for (int t = 0; t < T; t++) {
        const float *xr = x + t * D;
        float *yr = y + t * D, *orow = o + t * D;
        if (kind == 1) {
            float mean = 0.f, var = 0.f;
            for (int c = 0; c < D; c++) mean += xr[c];
            mean /= D;
            for (int c = 0; c < D; c++) { float u = xr[c] - mean; var += u * u; }
            float r = rstd[t] = 1.f / sqrtf(var / D + eps);
            for (int c = 0; c < D; c++) yr[c] = (xr[c] - mean) * r;
        } else if (kind == 2) {
            float ss = 0.f;
            for (int c = 0; c < D; c++) ss += xr[c] * xr[c];
            float r = rstd[t] = 1.f / sqrtf(ss / D + eps);
            for (int c = 0; c < D; c++) yr[c] = xr[c] * r;
        } else if (kind == 3) {
            for (int c = 0; c < D; c++) yr[c] = tanhf(alpha * xr[c]);
        }
        const float *v = kind ? yr : xr;
        for (int c = 0; c < D; c++) orow[c] = v[c] * (1.f + sc[c]) + sh[c];
    }
}

/* Gradient of norm_mod_sample for one sample. nrm: the normalised input (kind 0: the input itself); h: the
   input (dyt only). Writes dsh/dsc (D each), dx = dres + d(input) (dres may be NULL); returns the dyt
   alpha gradient of this sample (0 for the other kinds). */
INLINE double norm_mod_bwd_sample(cfp dm, cfp nrm, cfp h, cfp rstd, int T, int D, int kind, float alpha,
                                  cfp sc, fp dsh, fp dsc, cfp dres, fp dx) {
    float dn[D];
    double da = 0.0;
    for (int c = 0; c < D; c++) { dsh[c] = 0.f; dsc[c] = 0.f; }
    for (int t = 0; t < T; t++) {
        const float *g = dm + t * D, *y = nrm + t * D;
        float *o = dx + t * D;
        float s1 = 0.f, s2 = 0.f;
        for (int c = 0; c < D; c++) {
            dsh[c] += g[c]; dsc[c] += g[c] * y[c];
            dn[c] = g[c] * (1.f + sc[c]);
            s1 += dn[c]; s2 += dn[c] * y[c];
        }
        float r = rstd ? rstd[t] : 1.f, m1 = s1 / D, m2 = s2 / D;
        if (kind == 3) {
            const float *x = h + t * D;
            for (int c = 0; c < D; c++) {
                float q = 1.f - y[c] * y[c];
                da += dn[c] * x[c] * q;
                dn[c] *= alpha * q;
            }
        } else if (kind == 1) {
            for (int c = 0; c < D; c++) dn[c] = r * (dn[c] - m1 - y[c] * m2);
        } else if (kind == 2) {
            for (int c = 0; c < D; c++) dn[c] = r * (dn[c] - y[c] * m2);
        }
        for (int c = 0; c < D; c++) o[c] = dres ? dres[t * D + c] + dn[c] : dn[c];
    }
    return da;
}

/* x += bias in place (skipped when bias is NULL: x already holds it); y = gelu(x); dy = gelu'(x) when dy is
   not NULL (the same exp serves both) */
INLINE void gelu_rows(fp x, cfp bias, fp y, fp dy, i64 rows, i64 cols) {
    for (i64 r = 0; r < rows; r++) {
        float *xr = x + r * cols, *yr = y + r * cols;
        #pragma omp simd
        for (i64 c = 0; c < cols; c++) {
            /* 0.5 v (1 + tanh z) = v sigmoid(2 z): one exp, which vectorises well. 1 - s is computed as
               e s: where s rounds to 1 - 1 ulp (AVX2's approximate reciprocal under -ffast-math), 1 - s
               would be 6e-8 instead of 0, times v^3 in the derivative (1e-2 off at v = 100). */
            float v = bias ? xr[c] + bias[c] : xr[c];
            if (bias) xr[c] = v;
            float e = expf(GELU_EXP_ARG(v)), s = 1.f / (1.f + e);
            yr[c] = v * s;
            if (dy) dy[r * cols + c] = s + 2.f * v * s * (e * s) * GELU_C * (1.f + 3.f * GELU_A * v * v);
        }
    }
}

/* a += bias (in place; skipped when bias is NULL); out = h + gate * a for one sample's T rows */
INLINE void gate_sample(cfp h, fp a, cfp bias, cfp gate, fp out, int T, int D) {
    for (int t = 0; t < T; t++)
        for (int c = 0; c < D; c++) {
            float v = bias ? a[t * D + c] + bias[c] : a[t * D + c];
            if (bias) a[t * D + c] = v;
            out[t * D + c] = h[t * D + c] + gate[c] * v;
        }
}

/* Gradient of gate_sample: da = dh * gate, dgate = sum over the tokens of dh * a */
INLINE void gate_bwd_sample(cfp dh, cfp a, cfp gate, fp da, fp dgate, int T, int D) {
    for (int c = 0; c < D; c++) dgate[c] = 0.f;
    for (int t = 0; t < T; t++)
        for (int c = 0; c < D; c++) {
            float g = dh[t * D + c];
            dgate[c] += g * a[t * D + c];
            da[t * D + c] = g * gate[c];
        }
}

/* One sample's qkv (T, 3, H, d) += bias (in place; skipped when NULL) -> probs p (H, T, T) */
INLINE void attn_probs(fp base, cfp bias, fp p, int T, int H, int hd, float scale) {
    int D = H * hd, S = H * T * T;
    if (bias)
        for (int t = 0; t < T; t++)
            for (int c = 0; c < 3 * D; c++) base[t * 3 * D + c] += bias[c];
    for (int h = 0; h < H; h++)
        for (int i = 0; i < T; i++) {
            const float *q = base + i * 3 * D + h * hd;
            for (int j = 0; j < T; j++) {
                const float *k = base + j * 3 * D + D + h * hd;
                float s = 0.f;
                for (int e = 0; e < hd; e++) s += q[e] * k[e];
                p[(h * T + i) * T + j] = s * scale;
            }
        }
    /* Row maxima first (no infinities: -ffast-math assumes there are none), then one vectorised exp over
       the sample's H T T scores. */
    for (int r = 0; r < H * T; r++) {
        float mx = p[r * T];
        for (int j = 1; j < T; j++) mx = p[r * T + j] > mx ? p[r * T + j] : mx;
        for (int j = 0; j < T; j++) p[r * T + j] -= mx;
    }
    for (int e = 0; e < S; e++) p[e] = expf(p[e]);
    for (int r = 0; r < H * T; r++) {
        float sum = 0.f;
        for (int j = 0; j < T; j++) sum += p[r * T + j];
        for (int j = 0; j < T; j++) p[r * T + j] /= sum;
    }
}

/* out (T, H, d) = probs applied to the sample's values */
INLINE void attn_apply(cfp base, cfp p, fp out, int T, int H, int hd) {
    int D = H * hd;
    for (int h = 0; h < H; h++)
        for (int i = 0; i < T; i++) {
            float *o = out + i * D + h * hd;
            const float *w = p + (h * T + i) * T;
            for (int e = 0; e < hd; e++) o[e] = 0.f;
            for (int j = 0; j < T; j++) {
                const float *v = base + j * 3 * D + 2 * D + h * hd;
                for (int e = 0; e < hd; e++) o[e] += w[j] * v[e];
            }
        }
}

/* Gradient of attention for one sample: dbase (T, 3, H, d). Each output vector is summed in registers and
   stored once (dq_i = sum_j ds_ij k_j, dk_i = sum_j ds_ji q_j, dv_i = sum_j p_ji do_j). */
INLINE void attn_bwd_sample(cfp dout, cfp base, cfp probs, fp dbase, int T, int H, int hd, float scale) {
    int D = H * hd;
    float ds[T * T];
    for (int h = 0; h < H; h++) {
        const float *p = probs + h * T * T;
        for (int i = 0; i < T; i++) {
            const float *go = dout + i * D + h * hd;
            float dp[T], s = 0.f;
            for (int j = 0; j < T; j++) {
                const float *v = base + j * 3 * D + 2 * D + h * hd;
                float t = 0.f;
                for (int e = 0; e < hd; e++) t += go[e] * v[e];
                dp[j] = t;
                s += p[i * T + j] * t;
            }
            for (int j = 0; j < T; j++) ds[i * T + j] = p[i * T + j] * (dp[j] - s) * scale;
        }
        for (int i = 0; i < T; i++) {
            float *dq = dbase + i * 3 * D + h * hd, *dk = dq + D, *dv = dq + 2 * D;
            for (int e = 0; e < hd; e++) {
                float aq = 0.f, ak = 0.f, av = 0.f;
                for (int j = 0; j < T; j++) {
                    aq += ds[i * T + j] * base[j * 3 * D + D + h * hd + e];
                    ak += ds[j * T + i] * base[j * 3 * D + h * hd + e];
                    av += p[j * T + i] * dout[j * D + h * hd + e];
                }
                dq[e] = aq;
                dk[e] = ak;
                dv[e] = av;
            }
        }
    }
}

/* ============================================================== 2. the whole network, tile by tile */

/* The tiles' matmuls: a register-blocked micro-kernel in GCC vector extensions, blocked for the registers
   the compiler targets (chosen at build time, fast/kernels.py: -march=native or an ISA named there).
   C[i, j] (+)= sum_p A[i asi + p asp] B[p ldb + j] for MR = 6 rows and NV vectors of VW floats.
   AVX-512 (32 registers of 16 floats): 6 x 4 vectors keep 24 accumulators, 4 B vectors and a broadcast
   in registers. In a development micro-benchmark on one core of the 2-core Xeon (tiles of 256 rows, K and
   N in {64, 192, 256}, data in cache) it ran at 165-191 GFLOP/s, as fast as MKL's sgemm called on the
   same tiles; inside the training step the two were equally fast too, so no BLAS is needed.
   Otherwise (AVX2: 16 registers of 8 floats): 6 x 2 vectors, 12 accumulators, 2 B vectors and a
   broadcast. The AVX-512 blocking compiled for AVX2 needs 48 accumulator registers of 16 and spills
   (issue 35: 6-9x slower than plain PyTorch on an AVX2-only AMD EPYC). */
#if defined(__AVX512F__)
#define VW 16
#define NV 4
#else
#define VW 8
#define NV 2
#endif
#define MR 6
typedef float vf __attribute__((vector_size(VW * sizeof(float)), aligned(4)));
#define KERNEL(R, V)                                                                                       \
    static void kern_##R##x##V(int K, const float *A, i64 asi, i64 asp, const float *B, i64 ldb,          \
                               float *C, i64 ldc, int acc) {                                               \
        vf c[R][V];                                                                                        \
        for (int i = 0; i < R; i++)                                                                        \
            for (int v = 0; v < V; v++) c[i][v] = (vf){0};                                                 \
        for (int p = 0; p < K; p++) {                                                                      \
            vf b[V];                                                                                       \
            for (int v = 0; v < V; v++) b[v] = *(const vf *)(B + p * ldb + VW * v);                        \
            for (int i = 0; i < R; i++) {                                                                  \
                float a = A[i * asi + p * asp];                                                            \
                for (int v = 0; v < V; v++) c[i][v] += a * b[v];                                           \
            }                                                                                              \
        }                                                                                                  \
        if (acc)                                                                                           \
            for (int i = 0; i < R; i++)                                                                    \
                for (int v = 0; v < V; v++) *(vf *)(C + i * ldc + VW * v) += c[i][v];                      \
        else                                                                                               \
            for (int i = 0; i < R; i++)                                                                    \
                for (int v = 0; v < V; v++) *(vf *)(C + i * ldc + VW * v) = c[i][v];                       \
    }
#define KERNEL_OF(R, V) KERNEL(R, V)  /* expands NV before pasting */
KERNEL_OF(1, NV) KERNEL_OF(2, NV) KERNEL_OF(3, NV) KERNEL_OF(4, NV) KERNEL_OF(5, NV) KERNEL_OF(6, NV)
KERNEL(1, 1) KERNEL(2, 1) KERNEL(3, 1) KERNEL(4, 1) KERNEL(5, 1) KERNEL(6, 1)
#undef KERNEL
typedef void (*kern_t)(int, const float *, i64, i64, const float *, i64, float *, i64, int);
#define KERN_ROW(V) {0, kern_1x##V, kern_2x##V, kern_3x##V, kern_4x##V, kern_5x##V, kern_6x##V}
#define KERN_ROW_OF(V) KERN_ROW(V)
static const kern_t KERNW[MR + 1] = KERN_ROW_OF(NV);
static const kern_t KERN1[MR + 1] = KERN_ROW(1);

/* The vector width the library was built for (fast/kernels.py checks it against the target it asked for) */
int vector_floats(void) { return VW; }

/* C (M, N; row stride ldc) = or += A' (M, K) B (K, N; row stride ldb), A'[i, p] = A[i asi + p asp] */
static void gemm(int M, int N, int K, const float *A, i64 asi, i64 asp, const float *B, i64 ldb, float *C,
                 i64 ldc, int acc) {
    int j = 0;
    for (; j + VW * NV <= N; j += VW * NV)
        for (int i = 0; i < M; i += MR)
            KERNW[M - i < MR ? M - i : MR](K, A + i * asi, asi, asp, B + j, ldb, C + i * ldc + j, ldc, acc);
    for (; j + VW <= N; j += VW)
        for (int i = 0; i < M; i += MR)
            KERN1[M - i < MR ? M - i : MR](K, A + i * asi, asi, asp, B + j, ldb, C + i * ldc + j, ldc, acc);
    for (; j < N; j++)
        for (int i = 0; i < M; i++) {
            float s = 0.f;
            for (int p = 0; p < K; p++) s += A[i * asi + p * asp] * B[p * ldb + j];
            C[i * ldc + j] = acc ? C[i * ldc + j] + s : s;
        }
}

/* Mirrored by fused_dit.NetArgs. Weights in DiTPlan.weights order: patch embedding (D, P) and bias, final
   linear (O, D) and bias, then per block qkv, proj, fc1, fc2 (each torch's (out, in) weight and bias).
   patch: the patch size, grid: patches per side (T = grid^2). The
   saved activations are NULL for inference; otherwise (depth + 1, M, D) block inputs, (depth, M, 3D) qkv
   with bias, (depth, M, D) attention projection with bias, (depth, M, D) fc2 with bias, (depth, N, H, T, T)
   attention probabilities. dit_bwd recomputes the rest of a tile in cache (the norms, h1, and fc1 with its
   GELU: writing fc1 out for the whole batch and reading it back measured no faster than recomputing it);
   dit_train keeps a tile's every activation in a per-thread arena instead (see Keep). */
typedef struct {
    int N, T, D, H, F, P, O, depth, kind, tile, patch, grid;
    float eps;
    const float *const *w;
    const float *const *wt;     /* the same list with every weight matrix transposed (in, out) */
    const float *alpha;         /* 2 depth + 1 dyt alphas (NULL for the other kinds) */
    const float *pos;           /* (T, D) */
    const float *mods;          /* (N or 1, K) adaLN vectors, K = 6 D depth + 2 D */
    i64 ms;                     /* row stride of mods; 0: one row for every sample */
    float *hs, *qkv, *a, *f2, *probs;
    /* backward only: silu(c) (N, D) and the stacked adaLN weight (K, D), whose gradient the backward folds
       in tile by tile (the (N, K) gradient of the modulation is never written out); dsilu: (N, D) output */
    const float *silu, *wmod;
    float *dsilu;
    /* dit_train only: the adaLN weight transposed (D, K) and bias (K), from which each tile computes its own
       adaLN vectors silu(c) wmod^T + bmod (mods is NULL there) */
    const float *wmodt, *bmod;
} Net;

/* mm_nt: C (R, n) = A (R, k) W^T, given Wt = W^T (k, n). mm_nn: C (R, k) = G (R, n) W with W (n, k).
   mm_tn: dW (n, k) += G^T A with G (R, n), A (R, k). */
static void mm_nt(int R, int k, int n, cfp A, cfp Wt, fp C) { gemm(R, n, k, A, k, 1, Wt, n, C, n, 0); }
static void mm_nn(int R, int n, int k, cfp G, cfp W, fp C) { gemm(R, k, n, G, n, 1, W, k, C, k, 0); }
static void mm_tn(int R, int k, int n, cfp A, cfp G, fp dW) { gemm(n, k, R, G, 1, n, A, k, dW, k, 1); }

/* Per-thread scratch for one tile of up to `tile` samples (R = tile T rows) */
typedef struct {
    float *n1, *m1, *n2, *m2, *o, *h1, *ha, *hb, *g, *r1, *r2;       /* forward, and recomputed in bwd */
    float *qkv, *a, *f1, *f2, *probs;                                 /* inference: nothing is saved */
    float *dh, *dh1, *dm, *d1, *d2, *dqkv, *dg, *df, *gd, *dms;       /* backward */
    float *out, *dout, *mods;              /* dit_train: the tile's output, d loss, adaLN vectors (tile, K) */
    float *block;
} Work;
_Static_assert(offsetof(Work, block) == 29 * sizeof(float *), "work_new fills the 29 pointers in order");

/* K, the adaLN vectors of a sample: 6 D per block and 2 D for the final layer */
static i64 mods_width(const Net *net) { return 6 * (i64)net->D * net->depth + 2 * (i64)net->D; }

static Work work_new(const Net *net) {
    i64 R = (i64)net->tile * net->T, D = net->D, F = net->F, pr = (i64)net->tile * net->H * net->T * net->T;
    i64 sizes[] = {R * D, R * D, R * D, R * D, R * D, R * D, R * D, R * D, R * F, R, R,
                   3 * R * D, R * D, R * F, R * D, pr,
                   R * D, R * D, R * D, R * D, R * D, 3 * R * D, R * F, R * F, R * F, (i64)net->tile * 6 * D,
                   R * net->O, R * net->O, (i64)net->tile * mods_width(net)};
    int count = sizeof sizes / sizeof *sizes;
    i64 total = 0;
    for (int i = 0; i < count; i++) total += (sizes[i] + 15) / 16 * 16;  /* 64-byte aligned pieces */
    Work w;
    float **slot = &w.n1;
    w.block = aligned_alloc(64, (size_t)total * sizeof(float));
    for (i64 i = 0, off = 0; i < count; i++) {
        slot[i] = w.block ? w.block + off : 0;
        off += (sizes[i] + 15) / 16 * 16;
    }
    return w;
}

/* Where the forward saves a tile's activations for the backward, and the backward reads them: layer i's
   rows of the tile start at row i M + r0 of hs (depth + 1 layers), qkv, a, f2 (depth layers), and its
   attention probabilities at sample i M / T + r0 / T of probs. dit_fwd/dit_bwd: the whole batch's arrays of
   Net (M = N T, r0 = n0 T); dit_train: a per-thread arena for one tile (M = tile T, r0 = 0), which also
   keeps the GELU outputs g and slopes gd (depth, M, F) and the norms, attention outputs and mid-block
   residuals (mid, see Mid), so that its backward recomputes nothing. hs == NULL: nothing is saved
   (inference); g, gd, mid == NULL: the backward recomputes those. mods: the tile's adaLN vectors, its sample
   s's at mods + s ms (see mods_of): rows of Net's mods, or in dit_train the tile's own, computed there. */
typedef struct { float *hs, *qkv, *a, *f2, *probs, *g, *gd, *mid; i64 M, r0; const float *mods; i64 ms; } Keep;

static Keep keep_global(const Net *net, i64 n0) {
    Keep k = {net->hs, net->qkv, net->a, net->f2, net->probs, 0, 0, 0, (i64)net->N * net->T, n0 * net->T,
              net->mods + n0 * net->ms, net->ms};
    return k;
}

/* A block's norms (normalised n, modulated m, 1 / rms r), attention output o and mid-block residual h1 (the
   final layer: n1, m1, r1). In the tile's Work scratch (recomputed by the backward), or, when Keep has mid
   (dit_train), kept for the backward in layer i's slice of it. */
typedef struct { float *n1, *m1, *r1, *o, *h1, *n2, *m2, *r2; } Mid;
#define MID_SIZE(R, D) (6 * (R) * (D) + 2 * (R))

static Mid mid_of(const Keep *k, Work *w, int i, i64 D) {
    if (!k->mid) {
        Mid m = {w->n1, w->m1, w->r1, w->o, w->h1, w->n2, w->m2, w->r2};
        return m;
    }
    i64 R = k->M;
    float *b = k->mid + i * MID_SIZE(R, D);
    Mid m = {b, b + R * D, b + 6 * R * D, b + 2 * R * D, b + 3 * R * D, b + 4 * R * D, b + 5 * R * D,
             b + 6 * R * D + R};
    return m;
}

/* The adaLN vectors of the tile's sample s: shift1, scale1, gate1, shift2, scale2, gate2 of block i at
   6 D i; the final layer's shift, scale at 6 D depth. */
static const float *mods_of(const Keep *k, int s) { return k->mods + s * k->ms; }

/* norm + modulation of S samples' rows with the adaLN vectors at column `col` (shift) and col + D (scale) */
INLINE void norm_mod_tile(const Net *net, const Keep *k, int T, int D, int S, int col, float alpha, cfp h, fp y,
                          fp o, fp rstd) {
    for (int s = 0; s < S; s++) {
        const float *m = mods_of(k, s) + col;
        norm_mod_sample(h + s * T * D, T, D, net->kind, net->eps, alpha, m, m + D, y + s * T * D, o + s * T * D,
                        rstd + s * T);
    }
}

static float alpha_of(const Net *net, int i) { return net->alpha ? net->alpha[i] : 0.f; }

/* Forward of samples n0 .. n0 + S - 1: xp (R, P) patches -> out (R, O) */
INLINE void tile_fwd(const Net *net, int T, int D, int H, int F, Work *w, const Keep *k, i64 n0, int S,
                     cfp xp, fp out) {
    int hd = D / H, R = S * T, PT = H * T * T;
    i64 M = k->M, r0 = k->r0;
    float scale = 1.f / sqrtf((float)hd);
    const float *const *W = net->w;
    int save = k->hs != 0;
    float *h = save ? k->hs + r0 * D : w->ha;
    mm_nt(R, net->P, D, xp, net->wt[0], h);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < D; c++) h[r * D + c] += W[1][c] + net->pos[(r % T) * D + c];
    for (int i = 0; i < net->depth; i++) {
        const float *const *Wi = W + 4 + 8 * i, *const *WTi = net->wt + 4 + 8 * i;
        float *qkv = save ? k->qkv + (i * M + r0) * 3 * D : w->qkv;
        float *pr = save ? k->probs + (i * M + r0) / T * PT : w->probs;
        float *a = save ? k->a + (i * M + r0) * D : w->a;
        float *f2 = save ? k->f2 + (i * M + r0) * D : w->f2;
        float *hn = save ? k->hs + ((i + 1) * M + r0) * D : (h == w->ha ? w->hb : w->ha);
        Mid md = mid_of(k, w, i, D);
        norm_mod_tile(net, k, T, D, S, 6 * D * i, alpha_of(net, 2 * i), h, md.n1, md.m1, md.r1);
        mm_nt(R, D, 3 * D, md.m1, WTi[0], qkv);
        for (int s = 0; s < S; s++) {
            attn_probs(qkv + s * T * 3 * D, Wi[1], pr + s * PT, T, H, hd, scale);
            attn_apply(qkv + s * T * 3 * D, pr + s * PT, md.o + s * T * D, T, H, hd);
        }
        mm_nt(R, D, D, md.o, WTi[2], a);
        for (int s = 0; s < S; s++)
            gate_sample(h + s * T * D, a + s * T * D, Wi[3], mods_of(k, s) + 6 * D * i + 2 * D,
                        md.h1 + s * T * D, T, D);
        norm_mod_tile(net, k, T, D, S, 6 * D * i + 3 * D, alpha_of(net, 2 * i + 1), md.h1, md.n2, md.m2, md.r2);
        mm_nt(R, D, F, md.m2, WTi[4], w->f1);
        float *g = k->g ? k->g + (i * M + r0) * F : w->g;
        gelu_rows(w->f1, Wi[5], g, k->gd ? k->gd + (i * M + r0) * F : 0, R, F);
        mm_nt(R, F, D, g, WTi[6], f2);
        for (int s = 0; s < S; s++)
            gate_sample(md.h1 + s * T * D, f2 + s * T * D, Wi[7], mods_of(k, s) + 6 * D * i + 5 * D,
                        hn + s * T * D, T, D);
        h = hn;
    }
    Mid mf = mid_of(k, w, net->depth, D);
    norm_mod_tile(net, k, T, D, S, 6 * D * net->depth, alpha_of(net, 2 * net->depth), h, mf.n1, mf.m1, mf.r1);
    mm_nt(R, D, net->O, mf.m1, net->wt[2], out);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < net->O; c++) out[r * net->O + c] += W[3][c];
}

/* tile_fwd with the toy's shapes as constants (ToyDiT/1: 4 tokens, hidden 64, 4 heads, MLP 256), else
   with the model's */
static void tile_fwd_any(const Net *net, Work *w, const Keep *k, i64 n0, int S, cfp xp, fp out) {
    if (net->T == 4 && net->D == 64 && net->H == 4 && net->F == 256)
        tile_fwd(net, 4, 64, 4, 256, w, k, n0, S, xp, out);
    else
        tile_fwd(net, net->T, net->D, net->H, net->F, w, k, n0, S, xp, out);
}

static int tiles_of(const Net *net) { return (net->N + net->tile - 1) / net->tile; }
/* samples in tile b (the last tile may be short) */
static int tile_samples(const Net *net, int b) {
    i64 left = net->N - (i64)b * net->tile;
    return left < net->tile ? (int)left : net->tile;
}

/* Gradient accumulators of one thread: weight matrices in float (gemm adds into them), biases and dyt
   alphas in double. Same order as the weights. */
typedef struct { float *all; double *bias, *alpha; i64 *off; float *wmod; double *bmod; } Acc;

/* The adaLN gradient of one tile's block (or final layer) from its (S, ncols) slice of d mods in w->dms
   (row stride 6 D), for the mods columns col .. col + ncols - 1: d wmod += dms^T silu, d bmod += column sums,
   dsilu (=, first; else +=) dms wmod[col ..]. */
static void fold_mod(const Net *net, Work *w, Acc *acc, i64 n0, int S, int col, int ncols, int first) {
    int D = net->D;
    const float *silu = net->silu + n0 * D;
    gemm(ncols, D, S, w->dms, 1, 6 * D, silu, D, acc->wmod + (i64)col * D, D, 1);
    for (int s = 0; s < S; s++)
        for (int c = 0; c < ncols; c++) acc->bmod[col + c] += w->dms[s * 6 * D + c];
    gemm(S, D, ncols, w->dms, 6 * D, 1, net->wmod + (i64)col * D, D, net->dsilu + n0 * D, D, !first);
}

/* Backward of samples n0 .. n0 + S - 1 from dout (R, O); writes their rows of dsilu */
INLINE void tile_bwd(const Net *net, int T, int D, int H, int F, Work *w, Acc *acc, const Keep *k, i64 n0,
                     int S, cfp xp, cfp dout) {
    int hd = D / H, R = S * T, PT = H * T * T;
    int depth = net->depth, O = net->O;
    i64 M = k->M, r0 = k->r0;
    float scale = 1.f / sqrtf((float)hd);
    const float *const *W = net->w;
    int norm = net->kind != 0, rs = net->kind == 1 || net->kind == 2;
#define GRAD(j) (acc->all + acc->off[j])
#define BIAS(j) (acc->bias + acc->off[j])

    /* final layer: out = modulate(norm(h)) Wl^T + bl */
    const float *hf = k->hs + (depth * M + r0) * D;
    Mid md = mid_of(k, w, depth, D);
    if (!k->mid)
        norm_mod_tile(net, k, T, D, S, 6 * D * depth, alpha_of(net, 2 * depth), hf, md.n1, md.m1, md.r1);
    mm_tn(R, D, O, md.m1, dout, GRAD(2));
    colsum_add(dout, R, O, BIAS(3));
    mm_nn(R, O, D, dout, W[2], w->dm);
    for (int s = 0; s < S; s++) {
        const float *m = mods_of(k, s) + 6 * D * depth;
        float *dmo = w->dms + s * 6 * D;
        i64 off = s * T * D;
        acc->alpha[2 * depth] += norm_mod_bwd_sample(
            w->dm + off, (norm ? md.n1 : hf) + off, hf + off, rs ? md.r1 + s * T : 0, T, D, net->kind,
            alpha_of(net, 2 * depth), m + D, dmo, dmo + D, 0, w->dh + off);
    }
    fold_mod(net, w, acc, n0, S, 6 * D * depth, 2 * D, 1);
    for (int i = depth - 1; i >= 0; i--) {
        const float *const *Wi = W + 4 + 8 * i, *const *WTi = net->wt + 4 + 8 * i;
        int j = 4 + 8 * i;
        const float *h = k->hs + (i * M + r0) * D, *qkv = k->qkv + (i * M + r0) * 3 * D;
        const float *pr = k->probs + (i * M + r0) / T * PT;
        float *a = k->a + (i * M + r0) * D, *f2 = k->f2 + (i * M + r0) * D;
        float a1 = alpha_of(net, 2 * i), a2 = alpha_of(net, 2 * i + 1);
        /* recompute what the forward did not keep (dit_bwd): both norms, the attention output, h1 */
        md = mid_of(k, w, i, D);
        if (!k->mid) {
            norm_mod_tile(net, k, T, D, S, 6 * D * i, a1, h, md.n1, md.m1, md.r1);
            for (int s = 0; s < S; s++) {
                attn_apply(qkv + s * T * 3 * D, pr + s * PT, md.o + s * T * D, T, H, hd);
                gate_sample(h + s * T * D, a + s * T * D, 0, mods_of(k, s) + 6 * D * i + 2 * D,
                            md.h1 + s * T * D, T, D);
            }
            norm_mod_tile(net, k, T, D, S, 6 * D * i + 3 * D, a2, md.h1, md.n2, md.m2, md.r2);
        }
        float *g = w->g, *gd = w->gd;
        if (k->g) {  /* kept by the forward */
            g = k->g + (i * M + r0) * F;
            gd = k->gd + (i * M + r0) * F;
        } else {
            mm_nt(R, D, F, md.m2, WTi[4], w->f1);
            gelu_rows(w->f1, Wi[5], g, gd, R, F);
        }
        /* MLP branch: h = h1 + gate2 * fc2(gelu(fc1(modulate(norm2(h1))))) */
        for (int s = 0; s < S; s++)
            gate_bwd_sample(w->dh + s * T * D, f2 + s * T * D, mods_of(k, s) + 6 * D * i + 5 * D,
                            w->d1 + s * T * D, w->dms + s * 6 * D + 5 * D, T, D);
        colsum_add(w->d1, R, D, BIAS(j + 7));
        mm_tn(R, F, D, g, w->d1, GRAD(j + 6));
        mm_nn(R, D, F, w->d1, Wi[6], w->dg);
        for (i64 e = 0; e < (i64)R * F; e++) w->df[e] = w->dg[e] * gd[e];
        colsum_add(w->df, R, F, BIAS(j + 5));
        mm_tn(R, D, F, md.m2, w->df, GRAD(j + 4));
        mm_nn(R, F, D, w->df, Wi[4], w->dm);
        for (int s = 0; s < S; s++) {
            const float *m = mods_of(k, s) + 6 * D * i + 3 * D;
            float *dmo = w->dms + s * 6 * D + 3 * D;
            i64 off = s * T * D;
            acc->alpha[2 * i + 1] += norm_mod_bwd_sample(
                w->dm + off, (norm ? md.n2 : md.h1) + off, md.h1 + off, rs ? md.r2 + s * T : 0, T, D,
                net->kind, a2, m + D, dmo, dmo + D, w->dh + off, w->dh1 + off);
        }
        /* attention branch: h1 = h + gate1 * proj(attn(qkv(modulate(norm1(h))))) */
        for (int s = 0; s < S; s++)
            gate_bwd_sample(w->dh1 + s * T * D, a + s * T * D, mods_of(k, s) + 6 * D * i + 2 * D,
                            w->d1 + s * T * D, w->dms + s * 6 * D + 2 * D, T, D);
        colsum_add(w->d1, R, D, BIAS(j + 3));
        mm_tn(R, D, D, md.o, w->d1, GRAD(j + 2));
        mm_nn(R, D, D, w->d1, Wi[2], w->d2);
        for (int s = 0; s < S; s++)
            attn_bwd_sample(w->d2 + s * T * D, qkv + s * T * 3 * D, pr + s * PT, w->dqkv + s * T * 3 * D,
                            T, H, hd, scale);
        colsum_add(w->dqkv, R, 3 * D, BIAS(j + 1));
        mm_tn(R, D, 3 * D, md.m1, w->dqkv, GRAD(j));
        mm_nn(R, 3 * D, D, w->dqkv, Wi[0], w->dm);
        for (int s = 0; s < S; s++) {
            const float *m = mods_of(k, s) + 6 * D * i;
            float *dmo = w->dms + s * 6 * D;
            i64 off = s * T * D;
            acc->alpha[2 * i] += norm_mod_bwd_sample(
                w->dm + off, (norm ? md.n1 : h) + off, h + off, rs ? md.r1 + s * T : 0, T, D, net->kind, a1,
                m + D, dmo, dmo + D, w->dh1 + off, w->dh + off);
        }
        fold_mod(net, w, acc, n0, S, 6 * D * i, 6 * D, 0);
    }
    /* patch embedding */
    mm_tn(R, net->P, D, xp, w->dh, GRAD(0));
    colsum_add(w->dh, R, D, BIAS(1));
#undef GRAD
#undef BIAS
}

/* tile_bwd with the toy's shapes as constants, else with the model's (as tile_fwd_any) */
static void tile_bwd_any(const Net *net, Work *w, Acc *acc, const Keep *k, i64 n0, int S, cfp xp, cfp dout) {
    if (net->T == 4 && net->D == 64 && net->H == 4 && net->F == 256)
        tile_bwd(net, 4, 64, 4, 256, w, acc, k, n0, S, xp, dout);
    else
        tile_bwd(net, net->T, net->D, net->H, net->F, w, acc, k, n0, S, xp, dout);
}

/* Every thread's gradient accumulators (weights, biases, dyt alphas, adaLN weight and bias), with the
   offsets of the weights in them; summed over threads in thread order by accs_finish. */
#define MAX_DEPTH 64  /* fused_dit.MAX_DEPTH: DiTPlan sends deeper models elsewhere */
typedef struct { i64 off[4 + 8 * MAX_DEPTH + 1], total, K; float *all, *wm; double *bias, *alpha, *bm; } Accs;

static int accs_new(const Net *net, Accs *a) {
    int nw = 4 + 8 * net->depth, na = 2 * net->depth + 1;
    i64 D = net->D, F = net->F, P = net->P, O = net->O;
    i64 sizes[4] = {D * P, D, O * D, O};
    i64 blk[8] = {3 * D * D, 3 * D, D * D, D, F * D, F, D * F, D};
    if (net->depth > MAX_DEPTH) return -1;
    a->K = mods_width(net);
    a->off[0] = 0;
    for (int j = 0; j < nw; j++) a->off[j + 1] = a->off[j] + (j < 4 ? sizes[j] : blk[(j - 4) % 8]);
    a->total = a->off[nw];
    a->all = calloc((size_t)nth * a->total, sizeof(float));
    a->wm = calloc((size_t)nth * a->K * D, sizeof(float));
    a->bias = calloc((size_t)nth * a->total, sizeof(double));
    a->alpha = partials(na);
    a->bm = partials(a->K);
    if (!a->all || !a->wm || !a->bias || !a->alpha || !a->bm) {
        free(a->all); free(a->wm); free(a->bias); free(a->alpha); free(a->bm);
        return -1;
    }
    return 0;
}

/* thread t's view of the accumulators */
static Acc acc_of(const Net *net, Accs *a, int t) {
    Acc acc = {a->all + t * a->total, a->bias + t * a->total, a->alpha + t * (2 * net->depth + 1), a->off,
               a->wm + t * a->K * net->D, a->bm + t * a->K};
    return acc;
}

/* the sums over threads into the caller's gradients (see dit_bwd); frees the accumulators */
static void accs_finish(const Net *net, Accs *a, float *const *grads, fp dalpha, fp dwmod, fp dbmod) {
    int nw = 4 + 8 * net->depth, na = 2 * net->depth + 1;
    i64 total = a->total, KD = a->K * net->D;
    for (int j = 0; j < nw; j++) {
        int is_bias = j == 1 || j == 3 || (j >= 4 && (j - 4) % 2 == 1);
        for (i64 e = 0; e < a->off[j + 1] - a->off[j]; e++) {
            double s = 0;
            for (int t = 0; t < nth; t++)
                s += is_bias ? a->bias[t * total + a->off[j] + e] : a->all[t * total + a->off[j] + e];
            grads[j][e] = (float)s;
        }
    }
    for (i64 e = 0; e < KD; e++) {
        float s = 0.f;
        for (int t = 0; t < nth; t++) s += a->wm[t * KD + e];
        dwmod[e] = s;
    }
    finish(a->bm, a->K, dbmod);
    if (dalpha) finish(a->alpha, na, dalpha); else free(a->alpha);
    free(a->all); free(a->wm); free(a->bias);
}

/* The tiles of the whole batch, their activations saved in (dit_fwd) or read from (dit_bwd) Net's arrays,
   on nth threads: with accs NULL the forward, xp (M, P) -> out (M, O); else the backward from dout (M, O)
   into each thread's accumulators. Returns 0, or -1 when scratch memory could not be allocated. */
static int over_tiles(const Net *net, cfp xp, fp out, cfp dout, Accs *accs) {
    int failed = 0;
    #pragma omp parallel num_threads(nth) reduction(|: failed)
    {
        Acc acc = accs ? acc_of(net, accs, omp_get_thread_num()) : (Acc){0};
        Work w = work_new(net);
        if (!w.block) failed = 1;
        #pragma omp for schedule(static)
        for (int b = 0; b < tiles_of(net); b++) {
            if (!w.block) continue;
            i64 n0 = (i64)b * net->tile, r0 = n0 * net->T;
            Keep k = keep_global(net, n0);
            if (accs)
                tile_bwd_any(net, &w, &acc, &k, n0, tile_samples(net, b), xp + r0 * net->P, dout + r0 * net->O);
            else
                tile_fwd_any(net, &w, &k, n0, tile_samples(net, b), xp + r0 * net->P, out + r0 * net->O);
        }
        free(w.block);
    }
    return failed ? -1 : 0;
}

/* Forward of every sample: xp (M, P) -> out (M, O); fills the saved activations when they are given.
   Returns 0, or -1 when scratch memory could not be allocated. */
int dit_fwd(const Net *net, cfp xp, fp out) { return over_tiles(net, xp, out, 0, 0); }

/* Gradients of dit_fwd (which must have run with the saved activations) from dout (M, O): net->dsilu
   (N, D), dwmod (K, D), dbmod (K), the gradient of every weight (grads[j] for net->w[j]) and of the dyt alphas
   (dalpha, or NULL), all overwritten. Per thread, then summed over threads in thread order. Returns 0, or
   -1 when out of memory. */
int dit_bwd(const Net *net, cfp xp, cfp dout, float *const *grads, fp dalpha, fp dwmod, fp dbmod) {
    Accs accs;
    if (accs_new(net, &accs)) return -1;
    int failed = over_tiles(net, xp, 0, dout, &accs);
    accs_finish(net, &accs, grads, dalpha, dwmod, dbmod);
    return failed;
}

/* ================================================================= training: forward, loss, backward a tile at a time */

/* Where pixel (y, u) of an image (patch p, G patches a side) sits among its sample's patch rows: the
   token, and the position inside the patch, in patchify's and the final linear's (p, p, channel) order. */
INLINE int pixel_token(int y, int u, int p, int G) { return (y / p) * G + u / p; }
INLINE int pixel_in_patch(int y, int u, int p) { return (y % p) * p + u % p; }

/* p(x_{t-1} | x_t) from the network's eps and variance outputs at pixel x_t (the diffusion's
   _p_from_output without clipping, learned-range variance): its mean, from the predicted x_0 =
   recip x_t - recipm1 eps, and its log-variance, interpolated between minlog (the clipped posterior log
   variance) and maxlog (log beta) by (v + 1) / 2. Shared by the training loss and the sampler. */
INLINE void p_mean_logvar(float xt, float eps, float v, float recip, float recipm1, float c1, float c2,
                          float minlog, float maxlog, float *mean, float *logvar) {
    float pred = recip * xt - recipm1 * eps;
    *mean = c1 * pred + c2 * xt;
    float frac = (v + 1.f) / 2.f;
    *logvar = frac * maxlog + (1.f - frac) * minlog;
}

/* The per-sample loss coefficients of dit_train, LC floats a sample (LOSS_COLUMNS in fused_dit.py).
   LC_DECODER: 1 for a sample at t = 0, whose vb is the decoder NLL, else 0. */
enum { LC_RECIP, LC_RECIPM1, LC_C1, LC_C2, LC_MINLOG, LC_MAXLOG, LC_VBW, LC_DECODER, LC };

#define LOG_SQRT_2PI 0.91893853320467274178
/* log Phi(z), the standard normal log-CDF (torch.special.log_ndtr), in double: erfc where it keeps its
   digits, the asymptotic series where erfc would underflow */
static double log_ndtr(double z) {
    if (z > 0) return log1p(-0.5 * erfc(z * M_SQRT1_2));
    if (z > -30) return log(0.5 * erfc(-z * M_SQRT1_2));
    double r = 1.0 / (z * z);
    return -0.5 * z * z - log(-z) - LOG_SQRT_2PI + log1p(-r * (1 - 3 * r * (1 - 5 * r)));
}
/* d log Phi(z) / dz = pdf(z) / Phi(z) */
static double dlog_ndtr(double z) { return exp(-0.5 * z * z - LOG_SQRT_2PI - log_ndtr(z)); }

/* The decoder's log-likelihood of pixel x (a bin centre in [-1, 1]) under N(mean, exp(logvar)) discretised
   to 256 bins, as diffusion_utils.discretized_gaussian_log_likelihood (open-ended outer bins, the bin's
   probability clamped at 1e-12), and in *dll its derivative in logvar; in double (t = 0 is ~1 sample in
   1000, so the cost is nothing, and the log-CDFs far in the tails need the range). */
static double decoder_ll(float x, float mean, float logvar, double *dll) {
    const double half_bin = 1.0 / 255.0;
    double inv_std = exp(-0.5 * (double)logvar), centred = (double)x - (double)mean;
    double up = inv_std * (centred + half_bin), lo = inv_std * (centred - half_bin);  /* d / d logvar: -z/2 */
    if (x < -0.999f) {
        *dll = dlog_ndtr(up) * (-0.5 * up);
        return log_ndtr(up);
    }
    if (x > 0.999f) {
        *dll = dlog_ndtr(-lo) * (0.5 * lo);
        return log_ndtr(-lo);
    }
    /* P(lo < z < up) from the tail on x's side of the mean: a difference of two CDFs near 1 would cancel */
    double p = lo > 0 ? 0.5 * (erfc(lo * M_SQRT1_2) - erfc(up * M_SQRT1_2))
                      : 0.5 * (erfc(-up * M_SQRT1_2) - erfc(-lo * M_SQRT1_2));
    if (p < 1e-12) {
        *dll = 0.0;
        return log(1e-12);
    }
    double pdf_up = exp(-0.5 * up * up - LOG_SQRT_2PI), pdf_lo = exp(-0.5 * lo * lo - LOG_SQRT_2PI);
    *dll = -0.5 * (up * pdf_up - lo * pdf_lo) / p;
    return log(p);
}

/* diffusion.training_losses' hybrid loss (eps prediction, learned-range variance) of the S samples of a tile
   from their output rows `out` (patch layout): loss[n] = mse + vb, and dout = d (sum of the batch's losses
   / N) / d out. mse = mean over the C H W pixels of (noise - eps)^2. vb = vbw * mean of KL(q(x_{t-1} | x_t,
   x_0) || p(x_{t-1} | x_t)) / ln 2, or at t = 0 (lc[LC_DECODER]) of the decoder NLL -log p(x_0 | x_1) / ln 2,
   where p's mean uses eps detached (so vb trains the variance channels only), as in Improved DDPM. The
   formulas and their order are diffusion.gaussian_diffusion's. */
static void tile_loss(const Net *net, i64 n0, int S, cfp out, cfp x0, cfp xt, cfp noise, cfp lc, fp loss,
                      fp dout) {
    int T = net->T, O = net->O, p = net->patch, G = net->grid, C = net->P / (p * p), W = G * p;
    int E = C * W * W;
    float inv_e = 1.f / (float)E, inv_n = 1.f / (float)net->N, inv_ln2 = 1.f / logf(2.f);
    for (int s = 0; s < S; s++) {
        i64 n = n0 + s;
        const float *c = lc + n * LC;
        int decoder = c[LC_DECODER] != 0.f;
        float mse = 0.f, kl = 0.f;
        double nll = 0.0;
        for (int ch = 0; ch < C; ch++)
            for (int y = 0; y < W; y++)
                for (int u = 0; u < W; u++) {
                    i64 row = (i64)s * T + pixel_token(y, u, p, G), col = pixel_in_patch(y, u, p) * 2 * C;
                    const float *o = out + row * O + col;
                    float *d = dout + row * O + col;
                    i64 e = ((n * C + ch) * W + y) * W + u;
                    float eps = o[ch], v = o[C + ch], diff = noise[e] - eps;
                    mse += diff * diff;
                    d[ch] = -2.f * diff * inv_e * inv_n;
                    float mean, logvar, dlogvar;
                    p_mean_logvar(xt[e], eps, v, c[LC_RECIP], c[LC_RECIPM1], c[LC_C1], c[LC_C2], c[LC_MINLOG],
                                  c[LC_MAXLOG], &mean, &logvar);
                    if (decoder) {
                        double dll;
                        nll -= decoder_ll(x0[e], mean, logvar, &dll);
                        dlogvar = (float)-dll;
                    } else {
                        float true_mean = c[LC_C1] * x0[e] + c[LC_C2] * xt[e];
                        float dm = true_mean - mean, e1 = expf(c[LC_MINLOG] - logvar), e2 = expf(-logvar);
                        kl += 0.5f * (-1.f + (logvar - c[LC_MINLOG]) + e1 + dm * dm * e2);
                        dlogvar = 0.5f * (1.f - e1 - dm * dm * e2);
                    }
                    d[C + ch] = c[LC_VBW] * inv_ln2 * inv_e * inv_n * dlogvar * 0.5f * (c[LC_MAXLOG] - c[LC_MINLOG]);
                }
        float vb = decoder ? (float)nll * inv_e : kl * inv_e;
        loss[n] = mse * inv_e + c[LC_VBW] * vb * inv_ln2;
    }
}

/* dit_train's per-thread arena for one tile (see Keep): lays its pieces out from `base` into *k (when base
   is not NULL) and returns its size in floats, so that the size and the layout cannot disagree. */
static i64 arena_layout(const Net *net, float *base, Keep *k) {
    i64 R = (i64)net->tile * net->T, D = net->D, depth = net->depth;
    i64 sizes[] = {(depth + 1) * R * D, depth * R * 3 * D, depth * R * D, depth * R * D,
                   depth * net->tile * net->H * net->T * net->T, depth * R * net->F, depth * R * net->F,
                   (depth + 1) * MID_SIZE(R, D)};
    float **piece[] = {&k->hs, &k->qkv, &k->a, &k->f2, &k->probs, &k->g, &k->gd, &k->mid};
    i64 total = 0;
    for (int i = 0; i < (int)(sizeof sizes / sizeof *sizes); i++) {
        if (base) *piece[i] = base + total;
        total += sizes[i];
    }
    k->M = R;
    return total;
}

/* One training step's forward, loss and backward, a tile at a time: each tile's forward saves its
   activations in a per-thread arena, its loss gives d loss / d out, and its backward runs at once, while
   the arena is still in cache. xp (M, P) patches of x_t; x0, xt, noise (N, C, H, W); lc (N, LC) (see
   tile_loss); loss (N) out; gradients as dit_bwd's, of sum(loss) / N. Returns 0, or -1 when out of memory. */
int dit_train(const Net *net, cfp xp, cfp x0, cfp xt, cfp noise, cfp lc, fp loss, float *const *grads,
              fp dalpha, fp dwmod, fp dbmod) {
    int failed = 0;
    i64 D = net->D, K = mods_width(net);
    Keep sizing = {0};
    i64 arena_size = arena_layout(net, 0, &sizing);
    Accs accs;
    if (accs_new(net, &accs)) return -1;
    #pragma omp parallel num_threads(nth) reduction(|: failed)
    {
        Acc acc = acc_of(net, &accs, omp_get_thread_num());
        Work w = work_new(net);
        float *arena = aligned_alloc(64, (size_t)((arena_size + 15) / 16 * 16) * sizeof(float));
        if (!w.block || !arena) failed = 1;
        Keep k = {0};
        if (arena) arena_layout(net, arena, &k);
        #pragma omp for schedule(static)
        for (int b = 0; b < tiles_of(net); b++) {
            if (!w.block || !arena) continue;
            i64 n0 = (i64)b * net->tile, r0 = n0 * net->T;
            int S = tile_samples(net, b);
            gemm(S, (int)K, D, net->silu + n0 * D, D, 1, net->wmodt, K, w.mods, K, 0);
            for (int s = 0; s < S; s++)
                for (i64 c = 0; c < K; c++) w.mods[s * K + c] += net->bmod[c];
            k.mods = w.mods;
            k.ms = K;
            tile_fwd_any(net, &w, &k, n0, S, xp + r0 * net->P, w.out);
            tile_loss(net, n0, S, w.out, x0, xt, noise, lc, loss, w.dout);
            tile_bwd_any(net, &w, &acc, &k, n0, S, xp + r0 * net->P, w.dout);
        }
        free(w.block);
        free(arena);
    }
    accs_finish(net, &accs, grads, dalpha, dwmod, dbmod);
    return failed ? -1 : 0;
}

/* ================================================================= ancestral sampling, one C call a step */

/* One step of the diffusion's p_sample for a DiT predicting epsilon and a learned-range variance, without
   clipping, on images x (N, C, H, W) in place: x <- mean + nonzero * exp(log_variance / 2) * z, with the
   network run on net->mods. coef: 1/sqrt(ab), sqrt(1/ab - 1), the two posterior mean coefficients,
   log beta, the clipped posterior log variance, nonzero. xp (M, P) and out (M, O) are scratch. The formulas
   and their order are toy_sampler's torch fallback's. Returns dit_fwd's status. */
int dit_sample_step(const Net *net, fp x, cfp z, cfp coef, fp xp, fp out) {
    int T = net->T, P = net->P, O = net->O, p = net->patch, G = net->grid, C = P / (p * p), W = G * p;
    i64 N = net->N;
    for (i64 n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int y = 0; y < W; y++)
                for (int u = 0; u < W; u++)
                    xp[(n * T + pixel_token(y, u, p, G)) * P + c * p * p + pixel_in_patch(y, u, p)] =
                        x[((n * C + c) * W + y) * W + u];
    int rc = dit_fwd(net, xp, out);
    if (rc) return rc;  /* x is left as it was */
    float recip = coef[0], recipm1 = coef[1], c1 = coef[2], c2 = coef[3], lb = coef[4], lp = coef[5];
    float nonzero = coef[6];
    for (i64 n = 0; n < N; n++)
        for (int c = 0; c < C; c++)
            for (int y = 0; y < W; y++)
                for (int u = 0; u < W; u++) {
                    const float *o = out + (n * T + pixel_token(y, u, p, G)) * O
                                     + pixel_in_patch(y, u, p) * 2 * C;
                    i64 e = ((n * C + c) * W + y) * W + u;
                    float mean, logvar;
                    p_mean_logvar(x[e], o[c], o[C + c], recip, recipm1, c1, c2, lp, lb, &mean, &logvar);
                    x[e] = mean + nonzero * expf(0.5f * logvar) * z[e];
                }
    return 0;
}
