/* SeT's Sinkhorn iterations in the scaling domain, each one a single pass over the kernel's rows
 * (mechanisms/set.py, ``_native_iterations``, gives the same iterates as its PyTorch loop).
 *
 * K is (b, n, m), row-major: b plans of n tokens (rows) and m references (columns). A pass reads
 * each row K_i once, while it sits in the L1 cache, and takes from it
 *     d_i = K_i · c,   s_i = a_i / d_i,   and its share s_i K_i of the column sums Kᵀ s,
 * for the column scaling c of the previous half-step and the row marginal a. An iteration of the
 * PyTorch loop, two matrix–vector products, reads K twice: these iterations are bound by memory
 * bandwidth, so this halves their time.
 *
 * Rows first: pass t (0-based) reads cols[t] = y_t and writes dots[t] = K y_t, scales[t] = x_{t+1},
 * sums[t] = Kᵀ x_{t+1} and cols[t + 1] = y_{t+1} = col_marg / sums[t]; cols[0] = y_0 is given.
 * Columns first (A = Kᵀ): a first half pass writes sums[0] = Kᵀ y_0 (y_0 (b, n) as row weights) and
 * cols[0] = x_1 = col_marg / sums[0]; pass t then reads cols[t] = x_{t+1} and writes dots[t] =
 * K x_{t+1}, scales[t] = y_{t+1} and, but for the last, sums[t + 1] and cols[t + 1] = x_{t+2}.
 * Shapes: dots, scales (iters, b, n); sums (iters, b, m); cols (iters + 1, b, m) rows first,
 * (iters, b, m) columns first. The row marginal a is one value for every row (a_len 0) or one per
 * row, (b, n); the column marginal one value (col_marg; cm null) or one per column, cm (b, m), 0 at
 * the columns a plan does not use. With ``fold`` the last pass also leaves
 * diag(u) K ⊙ M in K, once each row has been used (u: the row scalings it has just made; M:
 * ``post``, one (n, m) for every plan when post_heads is 0, else one per sequence of post_heads
 * plans, (B, n, m), or none): the read-out's kernel without passes of its own.
 *
 * Threads (OpenMP, the runtime torch itself uses) split the rows of every plan; each adds its rows'
 * shares into its own column sums in ``scratch`` (threads × b × m), and these are summed between
 * passes (taking the plans one at a time, all iterations of one before the next, measured
 * slower). Rows are taken four at a time, so that four dot products and their divisions are in
 * flight at once and the column sums are loaded and stored once per four rows.
 */
#include <omp.h>
#include <string.h>

#define SINKHORN(NAME, REAL)                                                                       \
    static inline REAL NAME##_scale(const REAL *row, const REAL *c, REAL a, long m, REAL *d) {      \
        REAL sum = 0;                                                                               \
        _Pragma("omp simd reduction(+:sum)")                                                        \
        for (long j = 0; j < m; j++) sum += row[j] * c[j];                                          \
        *d = sum;                                                                                   \
        return a / sum;                                                                             \
    }                                                                                               \
                                                                                                    \
    static inline void NAME##_fold(REAL *row, REAL s, const REAL *post, long m) {                  \
        if (post) {                                                                                 \
            _Pragma("omp simd")                                                                     \
            for (long j = 0; j < m; j++) row[j] *= s * post[j];                                     \
        } else {                                                                                    \
            _Pragma("omp simd")                                                                     \
            for (long j = 0; j < m; j++) row[j] *= s;                                               \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    /* rows lo..hi of plan p: d, s (or the given weights w), the column shares into col, and then, \
       with ``fold``, each row multiplied in place by its s and by ``post`` (the plan's prior, n × m) */ \
    static void NAME##_rows(REAL *K, long n, long m, long p, long lo, long hi, const REAL *c,       \
                            const REAL *a, long a_len, REAL a_value, const REAL *w, REAL *d,        \
                            REAL *s, REAL *col, int fold, const REAL *post) {                       \
        long i = lo;                                                                                \
        for (; i + 4 <= hi; i += 4) {                                                               \
            REAL *r0 = K + (p * n + i) * m, *r1 = r0 + m, *r2 = r1 + m, *r3 = r2 + m;               \
            long at = p * n + i;                                                                    \
            REAL s0, s1, s2, s3;                                                                    \
            if (c) {                                                                                \
                s0 = s[at] = NAME##_scale(r0, c, a_len ? a[at] : a_value, m, d + at);               \
                s1 = s[at + 1] = NAME##_scale(r1, c, a_len ? a[at + 1] : a_value, m, d + at + 1);   \
                s2 = s[at + 2] = NAME##_scale(r2, c, a_len ? a[at + 2] : a_value, m, d + at + 2);   \
                s3 = s[at + 3] = NAME##_scale(r3, c, a_len ? a[at + 3] : a_value, m, d + at + 3);   \
            } else {                                                                                \
                s0 = w[at], s1 = w[at + 1], s2 = w[at + 2], s3 = w[at + 3];                         \
            }                                                                                       \
            if (col) {                                                                              \
                _Pragma("omp simd")                                                                 \
                for (long j = 0; j < m; j++) col[j] += s0 * r0[j] + s1 * r1[j] + s2 * r2[j] + s3 * r3[j]; \
            }                                                                                       \
            if (fold) {                                                                             \
                NAME##_fold(r0, s0, post ? post + i * m : 0, m);                                    \
                NAME##_fold(r1, s1, post ? post + (i + 1) * m : 0, m);                              \
                NAME##_fold(r2, s2, post ? post + (i + 2) * m : 0, m);                              \
                NAME##_fold(r3, s3, post ? post + (i + 3) * m : 0, m);                              \
            }                                                                                       \
        }                                                                                           \
        for (; i < hi; i++) {                                                                       \
            REAL *row = K + (p * n + i) * m;                                                        \
            long at = p * n + i;                                                                    \
            REAL si = c ? (s[at] = NAME##_scale(row, c, a_len ? a[at] : a_value, m, d + at)) : w[at]; \
            if (col) {                                                                              \
                _Pragma("omp simd")                                                                 \
                for (long j = 0; j < m; j++) col[j] += si * row[j];                                 \
            }                                                                                       \
            if (fold) NAME##_fold(row, si, post ? post + i * m : 0, m);                             \
        }                                                                                           \
    }                                                                                               \
                                                                                                    \
    void NAME(REAL *K, long b, long n, long m, int rows_first, const REAL *a, long a_len,           \
              REAL a_value, REAL col_marg, const REAL *cm, const REAL *y0, long iters, REAL *dots,  \
              REAL *scales, REAL *sums, REAL *cols, int fold, const REAL *post, long post_heads,    \
              REAL *scratch, int threads) {                                                         \
        long bm = b * m, bn = b * n;                                                                \
        _Pragma("omp parallel num_threads(threads)")                                                \
        {                                                                                           \
            int t = omp_get_thread_num(), nt = omp_get_num_threads();                               \
            long lo = n * t / nt, hi = n * (t + 1) / nt;                                            \
            REAL *mine = scratch + (long)t * bm;                                                    \
            /* step −1 (columns first only): Kᵀ y_0, the weights y_0 given per row */               \
            for (long step = rows_first ? 0 : -1; step < iters; step++) {                           \
                const REAL *c = step < 0 ? 0 : cols + step * bm;                                    \
                long into = rows_first ? step : step + 1, at = step < 0 ? 0 : step;                 \
                REAL *sum = into < iters ? sums + into * bm : 0;                                    \
                if (sum) memset(mine, 0, sizeof(REAL) * bm);                                        \
                for (long p = 0; p < b; p++) {                                                      \
                    const REAL *mult = post ? post + (post_heads ? p / post_heads : 0) * n * m : 0; \
                    NAME##_rows(K, n, m, p, lo, hi, c ? c + p * m : 0, a, a_len, a_value, y0,       \
                                dots + at * bn, scales + at * bn, sum ? mine + p * m : 0,           \
                                fold && step == iters - 1, mult);                                   \
                }                                                                                   \
                _Pragma("omp barrier")                                                              \
                if (sum) { /* every thread's column sums, then the column scaling they give */      \
                    REAL *next = cols + (step + 1) * bm;                                            \
                    _Pragma("omp for")                                                              \
                    for (long k = 0; k < bm; k++) {                                                 \
                        REAL total = scratch[k];                                                    \
                        for (int u = 1; u < nt; u++) total += scratch[(long)u * bm + k];            \
                        sum[k] = total;                                                             \
                        next[k] = (cm ? cm[k] : col_marg) / total;                                  \
                    }                                                                               \
                }                                                                                   \
            }                                                                                       \
        }                                                                                           \
    }

SINKHORN(sinkhorn_f32, float)
SINKHORN(sinkhorn_f64, double)
