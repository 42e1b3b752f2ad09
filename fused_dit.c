/* Fused elementwise kernels of the toy DiT step; built and loaded by fused_dit.py. */
#include <math.h>
#include <stdlib.h>
#include <omp.h>
typedef long i64;
/* Kernel arguments never overlap (in-place updates use one pointer), which lets loops vectorise. */
typedef float *restrict fp;
typedef const float *restrict cfp;
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

/* kind: 0 none, 1 layernorm, 2 rmsnorm, 3 dyt. out = norm(h) * (1 + scale) + shift */
void norm_mod_fwd(cfp h, i64 N, int T, int D, int kind, float eps, float alpha,
                  cfp shift, cfp scale, i64 ms, fp nrm, fp out, fp rstd) {
    #pragma omp parallel for schedule(static) num_threads(nth)
    for (i64 n = 0; n < N; n++) {
        const float *sh = shift + n * ms, *sc = scale + n * ms;
        for (int t = 0; t < T; t++) {
            i64 row = n * T + t;
            const float *x = h + row * D;
            float *o = out + row * D, *y = kind ? nrm + row * D : 0;
            if (kind == 1) {
                float mean = 0.f, var = 0.f;
                for (int c = 0; c < D; c++) mean += x[c];
                mean /= D;
                for (int c = 0; c < D; c++) { float u = x[c] - mean; var += u * u; }
                float r = rstd[row] = 1.f / sqrtf(var / D + eps);
                for (int c = 0; c < D; c++) y[c] = (x[c] - mean) * r;
            } else if (kind == 2) {
                float ss = 0.f;
                for (int c = 0; c < D; c++) ss += x[c] * x[c];
                float r = rstd[row] = 1.f / sqrtf(ss / D + eps);
                for (int c = 0; c < D; c++) y[c] = x[c] * r;
            } else if (kind == 3) {
                for (int c = 0; c < D; c++) y[c] = tanhf(alpha * x[c]);
            }
            const float *v = kind ? y : x;
            for (int c = 0; c < D; c++) o[c] = v[c] * (1.f + sc[c]) + sh[c];
        }
    }
}

/* Gradient of norm_mod_fwd. nrm: the normalised input (kind 0: the input itself); h: the input (dyt only).
   Writes dshift/dscale (stride ms), dx = dres + d(input); dalpha gets the dyt alpha gradient. */
void norm_mod_bwd(cfp dm, cfp nrm, cfp h, cfp rstd, i64 N, int T, int D,
                  int kind, float alpha, cfp scale, i64 ms, fp dshift, fp dscale,
                  cfp dres, fp dx, fp dalpha) {
    double *part = partials(1);
    #pragma omp parallel num_threads(nth)
    {
        double *acc = part + omp_get_thread_num();
        float dn[D], dsh[D], dsc[D];
        #pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            const float *sc = scale + n * ms;
            for (int c = 0; c < D; c++) { dsh[c] = 0.f; dsc[c] = 0.f; }
            for (int t = 0; t < T; t++) {
                i64 row = n * T + t;
                const float *g = dm + row * D, *y = nrm + row * D;
                float *o = dx + row * D;
                float s1 = 0.f, s2 = 0.f;
                for (int c = 0; c < D; c++) {
                    dsh[c] += g[c]; dsc[c] += g[c] * y[c];
                    dn[c] = g[c] * (1.f + sc[c]);
                    s1 += dn[c]; s2 += dn[c] * y[c];
                }
                float r = rstd ? rstd[row] : 1.f, m1 = s1 / D, m2 = s2 / D;
                if (kind == 3) {
                    const float *x = h + row * D;
                    double da = 0.0;
                    for (int c = 0; c < D; c++) {
                        float q = 1.f - y[c] * y[c];
                        da += dn[c] * x[c] * q;
                        dn[c] *= alpha * q;
                    }
                    *acc += da;
                } else if (kind == 1) {
                    for (int c = 0; c < D; c++) dn[c] = r * (dn[c] - m1 - y[c] * m2);
                } else if (kind == 2) {
                    for (int c = 0; c < D; c++) dn[c] = r * (dn[c] - y[c] * m2);
                }
                for (int c = 0; c < D; c++) o[c] = dres ? dres[row * D + c] + dn[c] : dn[c];
            }
            for (int c = 0; c < D; c++) { dshift[n * ms + c] = dsh[c]; dscale[n * ms + c] = dsc[c]; }
        }
    }
    if (dalpha) finish(part, 1, dalpha); else free(part);
}

/* x += bias (in place, x is the bias-free matmul output, kept for the backward); y = gelu(x) */
void gelu_fwd(fp x, cfp bias, fp y, i64 rows, i64 cols) {
    #pragma omp parallel for schedule(static) num_threads(nth)
    for (i64 r = 0; r < rows; r++) {
        float *xr = x + r * cols, *yr = y + r * cols;
        #pragma omp simd
        for (i64 c = 0; c < cols; c++) {
            /* 0.5 v (1 + tanh z) = v sigmoid(2 z): one exp, which vectorises well */
            float v = xr[c] + bias[c];
            xr[c] = v;
            yr[c] = v / (1.f + expf(GELU_EXP_ARG(v)));
        }
    }
}

/* a += bias (in place); out = h + gate * a, gate per sample (row stride gs) */
void gate_fwd(cfp h, fp a, cfp bias, cfp gate, i64 gs, fp out,
              i64 N, int T, int D) {
    #pragma omp parallel for schedule(static) num_threads(nth)
    for (i64 n = 0; n < N; n++) {
        const float *gt = gate + n * gs;
        for (int t = 0; t < T; t++) {
            i64 row = (n * T + t) * D;
            for (int c = 0; c < D; c++) {
                float v = a[row + c] + bias[c];
                a[row + c] = v;
                out[row + c] = h[row + c] + gt[c] * v;
            }
        }
    }
}

/* dx = g * gelu'(x); dbias = column sums of dx */
void gelu_bwd(cfp g, cfp x, fp dx, fp dbias, i64 rows, i64 cols) {
    double *part = partials(cols);
    #pragma omp parallel num_threads(nth)
    {
        double *acc = part + omp_get_thread_num() * cols;
        #pragma omp for schedule(static)
        for (i64 r = 0; r < rows; r++) {
            const float *gr = g + r * cols, *xr = x + r * cols;
            float *o = dx + r * cols;
            #pragma omp simd
            for (i64 c = 0; c < cols; c++) {
                float v = xr[c], s = 1.f / (1.f + expf(GELU_EXP_ARG(v)));
                float d = s + 2.f * v * s * (1.f - s) * GELU_C * (1.f + 3.f * GELU_A * v * v);
                o[c] = gr[c] * d;
            }
            for (i64 c = 0; c < cols; c++) acc[c] += o[c];
        }
    }
    finish(part, cols, dbias);
}

/* qkv (N, T, 3, H, d) += bias (in place) -> out (N, T, H, d), probs (N, H, T, T) */
void attn_fwd(fp qkv, cfp bias, fp out, fp probs, i64 N, int T, int H, int hd, float scale) {
    int D = H * hd, S = H * T * T;
    #pragma omp parallel for schedule(static) num_threads(nth)
    for (i64 n = 0; n < N; n++) {
        float *base = qkv + n * T * 3 * D, *p = probs + n * S;
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
        /* Row maxima first (no infinities: -ffast-math assumes there are none), then one vectorised exp
           over the sample's H T T scores. */
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
        for (int h = 0; h < H; h++)
            for (int i = 0; i < T; i++) {
                float *o = out + (n * T + i) * D + h * hd;
                const float *w = p + (h * T + i) * T;
                for (int e = 0; e < hd; e++) o[e] = 0.f;
                for (int j = 0; j < T; j++) {
                    const float *v = base + j * 3 * D + 2 * D + h * hd;
                    for (int e = 0; e < hd; e++) o[e] += w[j] * v[e];
                }
            }
    }
}

/* Gradient of attn_fwd: dqkv (N, T, 3, H, d) and its column sums dbias (3 D) */
void attn_bwd(cfp dout, cfp qkv, cfp probs, fp dqkv, fp dbias,
              i64 N, int T, int H, int hd, float scale) {
    int D = H * hd;
    double *part = partials(3 * D);
    #pragma omp parallel num_threads(nth)
    {
        double *acc = part + omp_get_thread_num() * 3 * D;
        float dp[T];
        #pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            const float *base = qkv + n * T * 3 * D;
            float *dbase = dqkv + n * T * 3 * D;
            for (int e = 0; e < T * 3 * D; e++) dbase[e] = 0.f;
            for (int h = 0; h < H; h++) {
                const float *p = probs + (n * H + h) * T * T;
                for (int i = 0; i < T; i++) {
                    const float *go = dout + (n * T + i) * D + h * hd, *q = base + i * 3 * D + h * hd;
                    float *dq = dbase + i * 3 * D + h * hd;
                    float s = 0.f;
                    for (int j = 0; j < T; j++) {
                        const float *v = base + j * 3 * D + 2 * D + h * hd;
                        float *dv = dbase + j * 3 * D + 2 * D + h * hd;
                        float w = p[i * T + j], t = 0.f;
                        for (int e = 0; e < hd; e++) { t += go[e] * v[e]; dv[e] += w * go[e]; }
                        dp[j] = t; s += w * t;
                    }
                    for (int j = 0; j < T; j++) {
                        float ds = p[i * T + j] * (dp[j] - s) * scale;
                        const float *k = base + j * 3 * D + D + h * hd;
                        float *dk = dbase + j * 3 * D + D + h * hd;
                        for (int e = 0; e < hd; e++) { dq[e] += ds * k[e]; dk[e] += ds * q[e]; }
                    }
                }
            }
            for (int t = 0; t < T; t++)
                for (int c = 0; c < 3 * D; c++) acc[c] += dbase[t * 3 * D + c];
        }
    }
    finish(part, 3 * D, dbias);
}

/* h_out = h + gate * a: da = dh * gate, dgate = sum over tokens of dh * a (stride gs),
   dbias = column sums of da */
void gate_bwd(cfp dh, cfp a, cfp gate, i64 gs, fp da, fp dgate,
              fp dbias, i64 N, int T, int D) {
    double *part = partials(D);
    #pragma omp parallel num_threads(nth)
    {
        double *acc = part + omp_get_thread_num() * D;
        float s[D];
        #pragma omp for schedule(static)
        for (i64 n = 0; n < N; n++) {
            const float *gt = gate + n * gs;
            for (int c = 0; c < D; c++) s[c] = 0.f;
            for (int t = 0; t < T; t++) {
                i64 row = (n * T + t) * D;
                for (int c = 0; c < D; c++) {
                    float g = dh[row + c];
                    s[c] += g * a[row + c];
                    da[row + c] = g * gt[c];
                    acc[c] += da[row + c];
                }
            }
            for (int c = 0; c < D; c++) dgate[n * gs + c] = s[c];
        }
    }
    finish(part, D, dbias);
}
