/* Integer kernels, loaded with ctypes (mnist_ann/kernels.py): exact squared distances
between uint8 pixel vectors, and the certified search's integer lower bounds
(mnist_ann/index/integer_bounds.py).

Every function has an AVX-512 VNNI version and a portable one with the same integer results;
the caller picks (mnist_ann_vnni_supported). ctypes releases the GIL while they run.

The bounds: training rows, quantized to int16, lie in blocks of 16 rows. A block holds G = D/2
groups of 64 bytes: group g is axes 2g and 2g+1 of its 16 rows (row r at bytes 4r..4r+3), so
that one AVX-512 VNNI instruction (vpdpwssd) adds two axes of a query's dot product with 16
rows. Beside each block, per 16-axis chunk c, `negn` holds 16 int32: -|x_c|² of each row (a
padding row: 0, and a large negative number in chunk 0). Queries come doubled, q2 = 2q (int16,
D per query).

Over the first m axes, acc = 2 x·q - |x|², so |q - x|² = |q|² - acc, exactly, in integers. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define GROUP_INT16 32 /* int16 values in one group: 16 rows x 2 axes */
#define CHUNK_GROUPS 8 /* groups in a 16-axis chunk */
#define MAXIMA_CHUNKS 2 /* list_maxima bounds the first 32 axes */
#define TILE 16 /* queries sharing a block's registers in list_maxima (8: twice the time) */
#define MAX_WIDTH 256 /* nearest_in_lists keeps at most this many rows a query */
#define PREFETCH_AHEAD 2 /* pixel_distances: candidates ahead whose bytes are prefetched */

/* ---------------------------------------------------------------- portable versions */

/* out[i, c] = |queries[i] - train[rows[i, c]]|² for queries [q0, q1), or -1 where the row is
   -1; d ≤ 33,000 keeps the int32 sums exact (d · 255² < 2³¹) */
void pixel_distances_portable(const uint8_t *train, int64_t d, const uint8_t *queries,
                              const int64_t *rows, int64_t width, int64_t q0, int64_t q1,
                              int64_t *out) {
  for (int64_t i = q0; i < q1; i++)
    for (int64_t c = 0; c < width; c++) {
      const int64_t r = rows[i * width + c];
      int32_t sum = 0;
      if (r >= 0)
        for (int64_t a = 0; a < d; a++) {
          const int32_t diff = (int32_t)queries[i * d + a] - (int32_t)train[r * d + a];
          sum += diff * diff;
        }
      out[i * width + c] = r >= 0 ? sum : -1;
    }
}

static void block_acc(const int16_t *rows, const int32_t *negn, int G, int64_t b,
                      const int16_t *q2, int chunk0, int chunk1, int32_t acc[16]) {
  const int C = G / CHUNK_GROUPS;
  for (int c = chunk0; c < chunk1; c++)
    for (int r = 0; r < 16; r++) acc[r] += negn[(b * C + c) * 16 + r];
  for (int g = chunk0 * CHUNK_GROUPS; g < chunk1 * CHUNK_GROUPS; g++) {
    const int16_t *v = rows + (b * G + g) * GROUP_INT16;
    const int32_t q0 = q2[2 * g], q1 = q2[2 * g + 1];
    for (int r = 0; r < 16; r++) acc[r] += v[2 * r] * q0 + v[2 * r + 1] * q1;
  }
}

void list_maxima_portable(const int16_t *rows, const int32_t *negn, int G, const int64_t *lstart,
                          int L, const int16_t *q2, int D, int n, int32_t *out, int q0, int q1) {
  for (int i = q0; i < q1; i++)
    for (int l = 0; l < L; l++) {
      int32_t best = INT32_MIN;
      for (int64_t b = lstart[l]; b < lstart[l + 1]; b++) {
        int32_t acc[16] = {0};
        block_acc(rows, negn, G, b, q2 + (int64_t)i * D, 0, MAXIMA_CHUNKS, acc);
        for (int r = 0; r < 16; r++) best = acc[r] > best ? acc[r] : best;
      }
      out[(int64_t)l * n + i] = best;
    }
}

/* keeps the `width` largest values seen (unordered); returns the new fill */
static int keep_largest(int32_t *vals, int32_t *pos, int filled, int width, int32_t v,
                        int32_t p) {
  if (filled < width) {
    vals[filled] = v;
    pos[filled] = p;
    return filled + 1;
  }
  int worst = 0;
  for (int w = 1; w < width; w++) worst = vals[w] < vals[worst] ? w : worst;
  if (v > vals[worst]) {
    vals[worst] = v;
    pos[worst] = p;
  }
  return filled;
}

void nearest_in_lists_portable(const int16_t *rows, const int32_t *negn, int G,
                               const int64_t *lstart, const int16_t *q2, int D, int chunks,
                               const int32_t *best, int F, int width, int32_t *out_pos, int q0,
                               int q1) {
  int32_t vals[MAX_WIDTH], pos[MAX_WIDTH];
  for (int i = q0; i < q1; i++) {
    int filled = 0;
    for (int f = 0; f < F; f++) {
      const int l = best[(int64_t)i * F + f];
      for (int64_t b = lstart[l]; b < lstart[l + 1]; b++) {
        int32_t acc[16] = {0};
        block_acc(rows, negn, G, b, q2 + (int64_t)i * D, 0, chunks, acc);
        for (int r = 0; r < 16; r++)
          filled = keep_largest(vals, pos, filled, width, acc[r], (int32_t)(b * 16 + r));
      }
    }
    for (int w = 0; w < width; w++) out_pos[(int64_t)i * width + w] = w < filled ? pos[w] : -1;
  }
}

int64_t cascade_portable(const int16_t *rows, const int32_t *negn, int G, int64_t b0, int64_t b1,
                         const int16_t *q2, int D, const int32_t *qs, int nq,
                         const int32_t *limits, const int32_t *stops, int nstops, int32_t *out_q,
                         int32_t *out_pos, int64_t cap) {
  int64_t count = 0;
  for (int j = 0; j < nq; j++) {
    const int i = qs[j];
    for (int64_t b = b0; b < b1; b++) {
      int32_t acc[16] = {0};
      int alive[16], any = 1, chunk = 0;
      for (int r = 0; r < 16; r++) alive[r] = 1;
      for (int s = 0; s < nstops && any; s++) {
        block_acc(rows, negn, G, b, q2 + (int64_t)i * D, chunk, stops[s], acc);
        chunk = stops[s];
        any = 0;
        for (int r = 0; r < 16; r++) {
          alive[r] = alive[r] && acc[r] >= limits[(int64_t)i * nstops + s];
          any |= alive[r];
        }
      }
      for (int r = 0; r < 16 && any; r++)
        if (alive[r]) {
          if (count < cap) {
            out_q[count] = i;
            out_pos[count] = (int32_t)(b * 16 + r);
          }
          count++;
        }
    }
  }
  return count;
}

/* ---------------------------------------------------------------- AVX-512 VNNI versions */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

int mnist_ann_vnni_supported(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

VNNI void pixel_distances_vnni(const uint8_t *train, int64_t d, const uint8_t *queries,
                               const int64_t *rows, int64_t width, int64_t q0, int64_t q1,
                               int64_t *out) {
  const __mmask32 tail = (__mmask32)((1ULL << (d % 32)) - 1);
  for (int64_t i = q0; i < q1; i++) {
    const uint8_t *q = queries + i * d;
    for (int64_t c = 0; c < width; c++) {
      const int64_t r = rows[i * width + c];
      if (r < 0) {
        out[i * width + c] = -1;
        continue;
      }
      const uint8_t *x = train + r * d;
      /* the rows are scattered: ask for a later one's bytes while this one is summed */
      const int64_t ahead = c + PREFETCH_AHEAD < width ? rows[i * width + c + PREFETCH_AHEAD] : -1;
      if (ahead >= 0)
        for (int64_t a = 0; a < d; a += 64)
          _mm_prefetch((const char *)(train + ahead * d + a), _MM_HINT_T0);
      __m512i acc = _mm512_setzero_si512();
      int64_t a = 0;
      for (; a + 32 <= d; a += 32) {  /* 32 pixels as int16, squared and summed in pairs */
        const __m512i diff =
            _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q + a))),
                             _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(x + a))));
        acc = _mm512_dpwssd_epi32(acc, diff, diff);
      }
      if (tail) {
        const __m512i diff =
            _mm512_sub_epi16(_mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(tail, q + a)),
                             _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(tail, x + a)));
        acc = _mm512_dpwssd_epi32(acc, diff, diff);
      }
      out[i * width + c] = _mm512_reduce_add_epi32(acc);
    }
  }
}

VNNI void list_maxima_vnni(const int16_t *rows, const int32_t *negn, int G, const int64_t *lstart,
                           int L, const int16_t *q2, int D, int n, int32_t *out, int q0, int q1) {
  const int C = G / CHUNK_GROUPS;
  for (int i0 = q0; i0 < q1; i0 += TILE) {
    const int nq = q1 - i0 < TILE ? q1 - i0 : TILE;
    const int32_t *qp[TILE];
    for (int t = 0; t < TILE; t++)  /* a short last tile repeats its first query */
      qp[t] = (const int32_t *)(q2 + (int64_t)(i0 + (t < nq ? t : 0)) * D);
    for (int l = 0; l < L; l++) {
      __m512i mx[TILE];
      for (int t = 0; t < TILE; t++) mx[t] = _mm512_set1_epi32(INT32_MIN);
      for (int64_t b = lstart[l]; b < lstart[l + 1]; b++) {
        const __m512i *r = (const __m512i *)(rows + b * G * GROUP_INT16);
        const __m512i *h = (const __m512i *)(negn + b * C * 16);
        const __m512i base = _mm512_add_epi32(_mm512_load_si512(h), _mm512_load_si512(h + 1));
        __m512i v[MAXIMA_CHUNKS * CHUNK_GROUPS];
        for (int g = 0; g < MAXIMA_CHUNKS * CHUNK_GROUPS; g++) v[g] = _mm512_load_si512(r + g);
        for (int t = 0; t < TILE; t++) {
          __m512i a0 = base, a1 = _mm512_setzero_si512();
          for (int g = 0; g < MAXIMA_CHUNKS * CHUNK_GROUPS; g += 2) {  /* two chains: latency */
            a0 = _mm512_dpwssd_epi32(a0, v[g], _mm512_set1_epi32(qp[t][g]));
            a1 = _mm512_dpwssd_epi32(a1, v[g + 1], _mm512_set1_epi32(qp[t][g + 1]));
          }
          mx[t] = _mm512_max_epi32(mx[t], _mm512_add_epi32(a0, a1));
        }
      }
      for (int t = 0; t < nq; t++) out[(int64_t)l * n + i0 + t] = _mm512_reduce_max_epi32(mx[t]);
    }
  }
}

VNNI static __m512i block_acc_vnni(const __m512i *r, const __m512i *h, const int32_t *qp,
                                   int chunk0, int chunk1, __m512i acc) {
  __m512i odd = _mm512_setzero_si512();
  for (int c = chunk0; c < chunk1; c++) {
    acc = _mm512_add_epi32(acc, _mm512_load_si512(h + c));
    for (int g = c * CHUNK_GROUPS; g < (c + 1) * CHUNK_GROUPS; g += 2) {
      acc = _mm512_dpwssd_epi32(acc, _mm512_load_si512(r + g), _mm512_set1_epi32(qp[g]));
      odd = _mm512_dpwssd_epi32(odd, _mm512_load_si512(r + g + 1), _mm512_set1_epi32(qp[g + 1]));
    }
  }
  return _mm512_add_epi32(acc, odd);
}

VNNI void nearest_in_lists_vnni(const int16_t *rows, const int32_t *negn, int G,
                                const int64_t *lstart, const int16_t *q2, int D, int chunks,
                                const int32_t *best, int F, int width, int32_t *out_pos, int q0,
                                int q1) {
  const int C = G / CHUNK_GROUPS;
  int32_t vals[MAX_WIDTH], pos[MAX_WIDTH], lanes[16];
  for (int i = q0; i < q1; i++) {
    const int32_t *qp = (const int32_t *)(q2 + (int64_t)i * D);
    int filled = 0;
    int32_t floor_value = INT32_MIN;  /* the smallest kept, once `width` are kept */
    for (int f = 0; f < F; f++) {
      const int l = best[(int64_t)i * F + f];
      for (int64_t b = lstart[l]; b < lstart[l + 1]; b++) {
        const __m512i acc = block_acc_vnni((const __m512i *)(rows + b * G * GROUP_INT16),
                                           (const __m512i *)(negn + b * C * 16), qp, 0, chunks,
                                           _mm512_setzero_si512());
        __mmask16 m = filled < width ? 0xFFFF
                                     : _mm512_cmpgt_epi32_mask(acc, _mm512_set1_epi32(floor_value));
        if (!m) continue;
        _mm512_storeu_si512(lanes, acc);
        for (; m; m &= m - 1) {
          const int r = __builtin_ctz(m);
          filled = keep_largest(vals, pos, filled, width, lanes[r], (int32_t)(b * 16 + r));
          if (filled == width) {
            floor_value = vals[0];
            for (int w = 1; w < width; w++)
              floor_value = vals[w] < floor_value ? vals[w] : floor_value;
          }
        }
      }
    }
    for (int w = 0; w < width; w++) out_pos[(int64_t)i * width + w] = w < filled ? pos[w] : -1;
  }
}

VNNI int64_t cascade_vnni(const int16_t *rows, const int32_t *negn, int G, int64_t b0, int64_t b1,
                          const int16_t *q2, int D, const int32_t *qs, int nq,
                          const int32_t *limits, const int32_t *stops, int nstops,
                          int32_t *out_q, int32_t *out_pos, int64_t cap) {
  const int C = G / CHUNK_GROUPS;
  int64_t count = 0;
  for (int j = 0; j < nq; j++) {  /* the query outer: the list's few blocks stay in cache */
    const int i = qs[j];
    const int32_t *qp = (const int32_t *)(q2 + (int64_t)i * D);
    const int32_t *lim = limits + (int64_t)i * nstops;
    for (int64_t b = b0; b < b1; b++) {
      const __m512i *r = (const __m512i *)(rows + b * G * GROUP_INT16);
      const __m512i *h = (const __m512i *)(negn + b * C * 16);
      __m512i acc = _mm512_setzero_si512();
      __mmask16 m = 0xFFFF;
      int chunk = 0;
      for (int s = 0; s < nstops && m; s++) {
        acc = block_acc_vnni(r, h, qp, chunk, stops[s], acc);
        chunk = stops[s];
        m = _mm512_mask_cmpge_epi32_mask(m, acc, _mm512_set1_epi32(lim[s]));
      }
      for (; m; m &= m - 1) {
        if (count < cap) {
          out_q[count] = i;
          out_pos[count] = (int32_t)(b * 16 + __builtin_ctz(m));
        }
        count++;
      }
    }
  }
  return count;
}

#else
int mnist_ann_vnni_supported(void) { return 0; }
#endif

/* importable as a module too (it has no Python functions: ctypes calls the ones above) */
static struct PyModuleDef kernels_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                            "integer kernels (called with ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&kernels_module); }
