// Paged decode attention for the CPU: one query token per sequence, K/V read in
// place through the block table (no gather copy, no padding).
//
// q:            [B, H, D]                  (contiguous)
// k/v cache:    [N, block_size, KVH, D]    (contiguous)
// block_tables: [B, max_blocks] int64      (rows padded with any valid id)
// context_lens: [B] int64                  (keys each query attends to)
// starts:       [B] int64, optional        (first key each query attends to: a sliding
//                                           window reads only keys [start, length))
// softcap:      > 0: scores become softcap * tanh(score / softcap) (Gemma 2)
// returns:      [B, H, D]
//
// Work is split over sequences (or, for small batches, sequence x KV head, and for a
// few long sequences their keys too, in parts merged after); the query heads that share
// a KV head read the same rows, so each is loaded once.
// Scores are accumulated in float32 whatever the cache dtype.
#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/record_function.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SEMLINE_AVX2 1
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Widening loads the compiler vectorises: bfloat16 is the top half of a float32.
template <typename scalar_t>
inline float widen(scalar_t x) {
  return static_cast<float>(x);
}

template <>
inline float widen<c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Narrowing float32 to the model's dtype, rounded as PyTorch rounds it.
template <typename scalar_t>
inline scalar_t narrow(float x) {
  return static_cast<scalar_t>(x);
}

// bfloat16 rounding as c10 does it (to nearest even, NaN to 0x7FC0), without a branch, so
// that the loops around it vectorise.
template <>
inline c10::BFloat16 narrow<c10::BFloat16>(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <typename scalar_t>
inline float dot(const float* q, const scalar_t* k, int64_t dim) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t d = 0; d < dim; ++d) sum += q[d] * widen(k[d]);
  return sum;
}

// The float ops of exp_nonpositive and the softmax loops over a lane type: one float here,
// 8 (AVX2) or 16 (AVX-512) below, so that one template serves the vector loops and their
// scalar tails, and both give the same floats.
struct Lanes1 {
  using V = float;
  static V set1(float x) { return x; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V max(V a, V b) { return std::max(a, b); }
  static V floor(V a) { return std::floor(a); }
  static V pow2(V n) {  // 2^n for integral n in [-126, 127]
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
  }
};

// exp(x) for x <= 0 (softmax after subtracting the maximum; std::exp is a scalar libm call
// per score): Cephes' expf polynomial on [-ln2/2, ln2/2] after range reduction, within 2 ulp
// of std::exp.
template <typename L>
inline typename L::V exp_nonpositive(typename L::V x) {
  x = L::max(x, L::set1(-87.0f));
  const typename L::V n = L::floor(L::add(L::mul(x, L::set1(1.44269504088896341f)), L::set1(0.5f)));
  const typename L::V r = L::sub(L::sub(x, L::mul(n, L::set1(0.693359375f))), L::mul(n, L::set1(-2.12194440e-4f)));
  typename L::V p = L::set1(1.9875691500e-4f);
  p = L::add(L::mul(p, r), L::set1(1.3981999507e-3f));
  p = L::add(L::mul(p, r), L::set1(8.3334519073e-3f));
  p = L::add(L::mul(p, r), L::set1(4.1665795894e-2f));
  p = L::add(L::mul(p, r), L::set1(1.6666665459e-1f));
  p = L::add(L::mul(p, r), L::set1(5.0000001201e-1f));
  const typename L::V y = L::add(L::add(L::mul(L::mul(p, r), r), r), L::set1(1.0f));
  return L::mul(y, L::pow2(n));
}

template <typename scalar_t>
inline void axpy(float* acc, float w, const scalar_t* v, int64_t dim) {
#pragma omp simd
  for (int64_t d = 0; d < dim; ++d) acc[d] += w * widen(v[d]);
}

#ifdef SEMLINE_AVX2
// Eight consecutive elements widened to float32 (the dtypes SEMLINE_DISPATCH runs).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The horizontal sums of eight vectors, as one vector: lane j = sum of a[j]'s lanes.
inline __m256 sum8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// Scores of one query head against eight keys (rows[j]: key j's row for this head's KV
// head), dim a multiple of 8: eight dot products with one horizontal reduction between them.
template <typename scalar_t>
inline __m256 dot8(const float* q, const scalar_t* const* rows, int64_t dim) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(rows[j] + d), acc[j]);
  }
  return sum8(acc);
}
#endif

#if defined(SEMLINE_AVX2) && defined(__AVX512F__)
#define SEMLINE_AVX512 1
// Sixteen consecutive elements widened to float32 (the dtypes SEMLINE_DISPATCH runs).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The two 256-bit halves of a vector added: eight lanes whose sum is the vector's.
inline __m256 fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// dot8 with sixteen lanes (dim a multiple of 16): half the instructions per key.
template <typename scalar_t>
inline __m256 dot8_512(const float* q, const scalar_t* const* rows, int64_t dim) {
  __m512 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < dim; d += 16) {
    const __m512 qv = _mm512_loadu_ps(q + d);
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_fmadd_ps(qv, load16(rows[j] + d), acc[j]);
  }
  __m256 halves[8];
  for (int j = 0; j < 8; ++j) halves[j] = fold(acc[j]);
  return sum8(halves);
}
#endif

#ifdef SEMLINE_AVX2
// Lanes1's ops at 8 (AVX2) and 16 (AVX-512) lanes, with the loads and reductions
// row_softmax needs.
struct Lanes8 {
  using V = __m256;
  static constexpr int64_t n = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V floor(V a) { return _mm256_floor_ps(a); }
  static V pow2(V n) {  // 2^n for integral n in [-126, 127]
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
  }
  static float reduce_max(V v) {
    float lanes[n];
    store(lanes, v);
    return *std::max_element(lanes, lanes + n);
  }
  static float reduce_add(V v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
  }
};

#ifdef SEMLINE_AVX512
struct Lanes16 {
  using V = __m512;
  static constexpr int64_t n = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V floor(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static V pow2(V n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23));
  }
  static float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
  static float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
};
using Lanes = Lanes16;
#else
using Lanes = Lanes8;
#endif
#endif

// One row of scores: s[t] = exp(s[t] - max) in place; returns (max, sum of the exps).
inline std::pair<float, float> row_softmax(float* s, int64_t length) {
  int64_t t = 0;
  float max_score = s[0];
#ifdef SEMLINE_AVX2
  using L = Lanes;
  if (length >= L::n) {
    typename L::V m = L::load(s);
    for (t = L::n; t + L::n <= length; t += L::n) m = L::max(m, L::load(s + t));
    max_score = L::reduce_max(m);
  }
#endif
  for (; t < length; ++t) max_score = std::max(max_score, s[t]);
  t = 0;
  float total = 0.f;
#ifdef SEMLINE_AVX2
  typename L::V sum = L::set1(0.f);
  const typename L::V top = L::set1(max_score);
  for (; t + L::n <= length; t += L::n) {
    const typename L::V e = exp_nonpositive<L>(L::sub(L::load(s + t), top));
    L::store(s + t, e);
    sum = L::add(sum, e);
  }
  total = L::reduce_add(sum);
#endif
  for (; t < length; ++t) {
    s[t] = exp_nonpositive<Lanes1>(s[t] - max_score);
    total += s[t];
  }
  return {max_score, total};
}

// offsets[t]: where key start + t's row begins in the cache (elements), through the block table.
inline void key_offsets(const int64_t* table, int64_t start, int64_t length, int64_t block_size,
                        int64_t token_stride, std::vector<int64_t>& offsets) {
  offsets.resize(length);
  int64_t block = start / block_size, within = start % block_size;
  for (int64_t t = 0; t < length; ++t) {
    offsets[t] = (table[block] * block_size + within) * token_stride;
    if (++within == block_size) within = 0, ++block;
  }
}

// Software prefetch of the K/V rows a work item reads. A sequence's rows lie block by block
// wherever the block manager put its blocks, and the hardware prefetchers lose their stream
// at every block; the item knows each key's offset, so it asks for rows kAhead keys before
// it reads them: its keys during the score pass and, when its values fit kValuesEarly, its
// values then too (so they are in L2 when the value pass starts; larger items' values are
// asked for by the value pass itself, as they would be evicted before it). On a 2-core EPYC
// VM, 30 layers of K/V in scattered blocks on 2 MiB pages: bf16 batch 32 x 200 keys 18.7 ->
// 25.7 GB/s, one stream of 2000 keys 21.5 -> 30.9; float32 20.4 -> 22.5 and 19.9 -> 23.0.
constexpr int64_t kAhead = 16;
constexpr int64_t kValuesEarly = 512 * 1024;

// The cache lines of [start, start + bytes) on their way into L1.
inline void prefetch_span(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start);
  const char* end = p + bytes;
  for (p -= reinterpret_cast<uintptr_t>(p) % 64; p < end; p += 64) __builtin_prefetch(p, 0, 3);
}

// How many KV heads query heads [head_begin, head_end) read (consecutive ones).
inline int64_t kv_heads_read(int64_t head_begin, int64_t head_end, int64_t group) {
  return (head_end - 1) / group - head_begin / group + 1;
}

// Keys [from, to) (clipped to `length`): `bytes` of each one's K row from `offset` on, and
// of its V row too when `values`. Always inlined: the same loop as a lambda in the score
// pass took all of the gain away (measured, not explained).
template <typename scalar_t>
__attribute__((always_inline)) inline void prefetch_keys(const scalar_t* k_cache, const scalar_t* v_cache,
                                                         const int64_t* offsets, int64_t from, int64_t to,
                                                         int64_t length, int64_t offset, int64_t bytes, bool values) {
  for (int64_t t = from; t < std::min(to, length); ++t) {
    prefetch_span(k_cache + offsets[t] + offset, bytes);
    if (values) prefetch_span(v_cache + offsets[t] + offset, bytes);
  }
}

// Where a work item that covers only some of a sequence's keys leaves its result (merged
// afterwards, flash-decoding's split-K), per query head of the sequence: the largest score,
// the sum of exp(score - largest), and the values weighted by those exps, unnormalised.
struct Partial {
  float* max;  // [H]
  float* sum;  // [H]
  float* acc;  // [H, D]
};

// Soft-capping (softcap > 0), then softmax of each of `heads` rows of `length` scores in
// place (max-subtracted, float32, left unnormalised); inv_totals[h]: 1 / the row's sum.
// With `partial`, also each row's largest score and sum, at head `head_begin + h`.
inline void softmax_rows(float* scores, int64_t heads, int64_t length, float softcap, float* inv_totals,
                         const Partial* partial = nullptr, int64_t head_begin = 0) {
  if (softcap > 0.f)
    for (int64_t i = 0; i < heads * length; ++i) scores[i] = softcap * std::tanh(scores[i] / softcap);
  for (int64_t h = 0; h < heads; ++h) {
    const auto [max_score, total] = row_softmax(scores + h * length, length);
    inv_totals[h] = 1.f / total;
    if (partial != nullptr) {
      partial->max[head_begin + h] = max_score;
      partial->sum[head_begin + h] = total;
    }
  }
}

// One work item: heads [head_begin, head_end) of sequence b. Keys and values are
// walked token by token in slot order, so each item streams its rows once.
template <typename scalar_t>
void attend(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* table,
            int64_t start, int64_t end, scalar_t* out, int64_t head_begin, int64_t head_end, int64_t group,
            int64_t num_kv_heads, int64_t dim, int64_t block_size, float scale, float softcap,
            std::vector<float>& queries, std::vector<float>& scores, std::vector<float>& acc,
            std::vector<int64_t>& offsets, const Partial* partial) {
  const int64_t heads = head_end - head_begin;
  const int64_t length = end - start;  // keys read: [start, end)
  const int64_t token_stride = num_kv_heads * dim;  // between consecutive slots
  key_offsets(table, start, length, block_size, token_stride, offsets);
  queries.resize(heads * dim);
  scores.resize(heads * length);
  acc.assign(heads * dim, 0.f);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t d = 0; d < dim; ++d) queries[h * dim + d] = static_cast<float>(q[(head_begin + h) * dim + d]) * scale;
  // The item's KV heads: one span of each key's row (prefetch_span).
  const int64_t kv_first = head_begin / group * dim;
  const int64_t kv_bytes = kv_heads_read(head_begin, head_end, group) * dim * static_cast<int64_t>(sizeof(scalar_t));
  const bool values_early = length * kv_bytes <= kValuesEarly;
  prefetch_keys(k_cache, v_cache, offsets.data(), 0, kAhead, length, kv_first, kv_bytes, values_early);
  // Pass 1: every head's score for every key (eight keys at a time where the CPU has AVX2).
  int64_t t0 = 0;
#ifdef SEMLINE_AVX2
  if (dim % 8 == 0) {
    const scalar_t* rows[8];
    for (; t0 + 8 <= length; t0 += 8) {
      prefetch_keys(k_cache, v_cache, offsets.data(), t0 + kAhead, t0 + kAhead + 8, length, kv_first, kv_bytes,
                    values_early);
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t kv_offset = ((head_begin + h) / group) * dim;
        if (h == 0 || (head_begin + h) % group == 0)
          for (int j = 0; j < 8; ++j) {
            rows[j] = k_cache + offsets[t0 + j] + kv_offset;
          }
#ifdef SEMLINE_AVX512
        if (dim % 16 == 0) {
          _mm256_storeu_ps(&scores[h * length + t0], dot8_512(&queries[h * dim], rows, dim));
          continue;
        }
#endif
        _mm256_storeu_ps(&scores[h * length + t0], dot8(&queries[h * dim], rows, dim));
      }
    }
  }
#endif
  for (int64_t t = t0; t < length; ++t) {
    const scalar_t* row = k_cache + offsets[t];
    for (int64_t h = 0; h < heads; ++h)
      scores[h * length + t] = dot(&queries[h * dim], row + ((head_begin + h) / group) * dim, dim);
  }
  std::vector<float> inv_totals(heads);
  softmax_rows(scores.data(), heads, length, softcap, inv_totals.data(), partial, head_begin);
  // Pass 3: weighted sum of the values. With AVX2 and head_dim <= 128: tiles of keys, each
  // tile's value rows read from memory once and reused from L1 by every head of their KV
  // head, whose accumulator stays in registers across the tile.
#ifdef SEMLINE_AVX2
  if (dim % 8 == 0 && dim <= 128) {
    constexpr int64_t kTile = 32;
    const int64_t chunks = dim / 8;
    const scalar_t* rows[kTile];
    for (int64_t t0 = 0; t0 < length; t0 += kTile) {
      const int64_t tile = std::min(kTile, length - t0);
      if (!values_early)  // the next tile's value rows
        for (int64_t t = t0 + kTile; t < std::min(t0 + 2 * kTile, length); ++t)
          prefetch_span(v_cache + offsets[t] + kv_first, kv_bytes);
      int64_t rows_kv = -1;  // the KV head `rows` point into
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t kv = (head_begin + h) / group;
        if (kv != rows_kv) {
          for (int64_t j = 0; j < tile; ++j) {
            rows[j] = v_cache + offsets[t0 + j] + kv * dim;
          }
          rows_kv = kv;
        }
        const float* weights = &scores[h * length + t0];
        float* acc_h = &acc[h * dim];
#ifdef SEMLINE_AVX512
        if (dim % 16 == 0) {
          const int64_t wide = dim / 16;
          __m512 acc_w[8];
          for (int64_t c = 0; c < wide; ++c) acc_w[c] = _mm512_loadu_ps(acc_h + 16 * c);
          for (int64_t j = 0; j < tile; ++j) {
            const __m512 w = _mm512_set1_ps(weights[j]);
            for (int64_t c = 0; c < wide; ++c) acc_w[c] = _mm512_fmadd_ps(w, load16(rows[j] + 16 * c), acc_w[c]);
          }
          for (int64_t c = 0; c < wide; ++c) _mm512_storeu_ps(acc_h + 16 * c, acc_w[c]);
          continue;
        }
#endif
        __m256 acc_v[16];
        for (int64_t c = 0; c < chunks; ++c) acc_v[c] = _mm256_loadu_ps(acc_h + 8 * c);
        for (int64_t j = 0; j < tile; ++j) {
          const __m256 w = _mm256_set1_ps(weights[j]);
          for (int64_t c = 0; c < chunks; ++c) acc_v[c] = _mm256_fmadd_ps(w, load8(rows[j] + 8 * c), acc_v[c]);
        }
        for (int64_t c = 0; c < chunks; ++c) _mm256_storeu_ps(acc_h + 8 * c, acc_v[c]);
      }
    }
  } else
#endif
  {
    for (int64_t t = 0; t < length; ++t) {
      const scalar_t* row = v_cache + offsets[t];
      for (int64_t h = 0; h < heads; ++h)
        axpy(&acc[h * dim], scores[h * length + t], row + ((head_begin + h) / group) * dim, dim);
    }
  }
  if (partial != nullptr) {
    std::memcpy(partial->acc + head_begin * dim, acc.data(), heads * dim * sizeof(float));
    return;
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t d = 0; d < dim; ++d)
      out[(head_begin + h) * dim + d] = static_cast<scalar_t>(acc[h * dim + d] * inv_totals[h]);
}


#if defined(SEMLINE_AVX512) && defined(__AVX512BF16__) && defined(__AVX512BW__)
#define SEMLINE_AVX512_BF16 1
// bfloat16 caches with AVX512-BF16: vdpbf16ps multiplies bf16 pairs exactly and adds them
// in float32, 32 elements per instruction, where widening every element to float32 first
// cost three times the instructions (the kernel is bound by them, not by memory). Scores:
// the bf16 query against each key, scaled after the dot. Values: two keys' rows interleaved
// (their pairs along the key axis) against the two probabilities rounded to bf16 (as PyTorch's
// bf16 attention rounds them before multiplying by V). head_dim: a multiple of 32, <= 128.
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

inline uint32_t bf16_bits(float x) { return narrow<c10::BFloat16>(x).x; }

// Pass 3 for N heads of one KV head (probabilities: N rows of bf16 pairs, `stride` apart;
// column: the KV head's first feature in slot 0): out rows head .. head + N - 1, each scaled
// by its 1 / sum, or unnormalised into `partial`. unpacklo/hi_epi16 interleave the two rows
// within each 128-bit lane, so accumulator lo's float lane 4L + j holds feature 8L + j (of
// its 32) and hi's holds 8L + 4 + j; the permutes at the end restore the order.
template <int C, int N>
void values_bf16(const c10::BFloat16* column, const int64_t* offsets, int64_t length, const uint16_t* probs,
                 int64_t stride, const float* inv_totals, const Partial* partial, int64_t head,
                 c10::BFloat16* out, bool prefetch) {
  constexpr int64_t dim = 32 * C;
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  const uint32_t* pairs[N];
  for (int i = 0; i < N; ++i) pairs[i] = reinterpret_cast<const uint32_t*>(probs + i * stride);
  for (int c = 0; c < C; ++c) {  // 32 features at a time: 2N accumulators in registers
    const c10::BFloat16* chunk = column + 32 * c;
    __m512 lo[N], hi[N];
    for (int i = 0; i < N; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
    for (int64_t t = 0; t < length; t += 2) {
      if (prefetch && t + kAhead + 1 < length) {  // this chunk's line of the rows ahead
        __builtin_prefetch(chunk + offsets[t + kAhead], 0, 3);
        __builtin_prefetch(chunk + offsets[t + kAhead + 1], 0, 3);
      }
      const __m512i a = _mm512_loadu_si512(chunk + offsets[t]), b = _mm512_loadu_si512(chunk + offsets[t + 1]);
      const __m512bh even = as_bh(_mm512_unpacklo_epi16(a, b)), odd = as_bh(_mm512_unpackhi_epi16(a, b));
      for (int i = 0; i < N; ++i) {
        const __m512bh weights = as_bh(_mm512_set1_epi32(static_cast<int32_t>(pairs[i][t / 2])));
        lo[i] = _mm512_dpbf16_ps(lo[i], even, weights);
        hi[i] = _mm512_dpbf16_ps(hi[i], odd, weights);
      }
    }
    for (int i = 0; i < N; ++i) {
      const __m512 norm = _mm512_set1_ps(partial != nullptr ? 1.f : inv_totals[i]);
      float values[32];
      _mm512_storeu_ps(values, _mm512_mul_ps(_mm512_permutex2var_ps(lo[i], first, hi[i]), norm));
      _mm512_storeu_ps(values + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo[i], second, hi[i]), norm));
      if (partial != nullptr) {  // unnormalised, in float32, for the merge
        std::memcpy(partial->acc + (head + i) * dim + 32 * c, values, sizeof values);
      } else {
        c10::BFloat16* dst = out + (head + i) * dim + 32 * c;
        for (int d = 0; d < 32; ++d) dst[d] = narrow<c10::BFloat16>(values[d]);
      }
    }
  }
}

template <int C>  // C = head_dim / 32
void attend_bf16(const c10::BFloat16* q, const c10::BFloat16* k_cache, const c10::BFloat16* v_cache,
                 const int64_t* table, int64_t start, int64_t end, c10::BFloat16* out, int64_t head_begin,
                 int64_t head_end, int64_t group, int64_t num_kv_heads, int64_t block_size, float scale,
                 float softcap, std::vector<float>& scores, std::vector<int64_t>& offsets, const Partial* partial) {
  constexpr int64_t dim = 32 * C;
  const int64_t heads = head_end - head_begin;
  const int64_t length = end - start;
  scores.resize(heads * length);
  key_offsets(table, start, length, block_size, num_kv_heads * dim, offsets);
  // Pass 1: scores, eight keys at a time (one horizontal reduction for the eight), head by
  // head. The first head of each KV head asks for that KV head's keys ahead (the others
  // find them in L1/L2), and for its values too where the item's fit kValuesEarly.
  const bool values_early = length * kv_heads_read(head_begin, head_end, group) * dim * 2 <= kValuesEarly;
  const c10::BFloat16* rows[8];
  for (int64_t h = 0; h < heads; ++h) {
    const int64_t kv_offset = ((head_begin + h) / group) * dim;
    const bool lead = h == 0 || (head_begin + h) % group == 0;
    if (lead) prefetch_keys(k_cache, v_cache, offsets.data(), 0, kAhead, length, kv_offset, dim * 2, values_early);
    __m512i qv[C];
    for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_si512(q + (head_begin + h) * dim + 32 * c);
    float* row_scores = &scores[h * length];
    int64_t t0 = 0;
    for (; t0 + 8 <= length; t0 += 8) {
      if (lead)
        prefetch_keys(k_cache, v_cache, offsets.data(), t0 + kAhead, t0 + kAhead + 8, length, kv_offset, dim * 2,
                      values_early);
      for (int j = 0; j < 8; ++j) rows[j] = k_cache + offsets[t0 + j] + kv_offset;
      __m256 halves[8];
      for (int j = 0; j < 8; ++j) {
        __m512 acc = _mm512_setzero_ps();
        for (int c = 0; c < C; ++c) acc = _mm512_dpbf16_ps(acc, as_bh(qv[c]), as_bh(_mm512_loadu_si512(rows[j] + 32 * c)));
        halves[j] = fold(acc);
      }
      _mm256_storeu_ps(row_scores + t0, _mm256_mul_ps(sum8(halves), _mm256_set1_ps(scale)));
    }
    for (int64_t t = t0; t < length; ++t) {
      const c10::BFloat16* row = k_cache + offsets[t] + kv_offset;
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) acc = _mm512_dpbf16_ps(acc, as_bh(qv[c]), as_bh(_mm512_loadu_si512(row + 32 * c)));
      row_scores[t] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  std::vector<float> inv_totals(heads);
  softmax_rows(scores.data(), heads, length, softcap, inv_totals.data(), partial, head_begin);
  // Pass 3 (values_bf16): keys in pairs. The probabilities rounded to bf16 once, in key
  // order, each row padded to an even length with a zero: word t / 2 of a row is key t's and
  // key t + 1's weight, as one broadcast.
  thread_local std::vector<uint16_t> probs;
  const int64_t padded = length + (length & 1);
  probs.resize(heads * padded);
  for (int64_t h = 0; h < heads; ++h) {
    const float* p = &scores[h * length];
    uint16_t* dst = probs.data() + h * padded;
    int64_t t = 0;
    for (; t + 32 <= length; t += 32)
      _mm512_storeu_si512(dst + t, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(p + t + 16),
                                                                                   _mm512_loadu_ps(p + t))));
    for (; t < length; ++t) dst[t] = static_cast<uint16_t>(bf16_bits(p[t]));
    if (length & 1) dst[length] = 0;
  }
  if (length & 1) offsets.push_back(offsets[length - 1]);  // the padding key: any row, weight 0
  // Heads that share a KV head go together, up to 4 at a time: each pair of value rows is
  // loaded and interleaved once for all of them.
  for (int64_t h = 0; h < heads;) {
    const int64_t kv = (head_begin + h) / group;
    int64_t n = 1;
    while (n < 4 && h + n < heads && (head_begin + h + n) / group == kv) ++n;
    auto run = n == 4 ? values_bf16<C, 4> : n == 3 ? values_bf16<C, 3> : n == 2 ? values_bf16<C, 2> : values_bf16<C, 1>;
    run(v_cache + kv * dim, offsets.data(), length, probs.data() + h * padded, padded, inv_totals.data() + h,
        partial, head_begin + h, out, !values_early);
    h += n;
  }
}
#endif

// How a decode attention call's work is cut into items (decode_attention): whole sequences,
// or sequences by KV head, and long ones' keys in parts merged after (split-K).
struct AttentionPlan {
  int64_t splits = 1, parts = 1, num_items = 0, num_heads = 0, dim = 0;
  bool split_keys = false;
  std::vector<int64_t> seq_parts;  // per sequence: its key parts (1: not split)
  std::vector<float> partials;     // per sequence and part: a Partial over every head

  int64_t state() const { return num_heads * (dim + 2); }  // one part's Partial: max, sum, acc

  Partial partial_of(int64_t b, int64_t kp) {
    float* base = partials.data() + (b * parts + kp) * state();
    return Partial{base, base + num_heads, base + 2 * num_heads};
  }
};

void plan_attention(AttentionPlan& plan, const int64_t* context_lens, const int64_t* starts, int64_t batch,
                    int64_t num_heads, int64_t num_kv_heads, int64_t dim, int64_t threads) {
  // Whole sequences per item when there are enough to keep every thread busy (each
  // K/V row is then read once); otherwise split sequences by KV head.
  plan.splits = batch >= 2 * threads ? 1 : num_kv_heads;
  // Still too few items for the threads (one long stream, 3 KV heads on 2 threads: one thread
  // would read two thirds of the cache): the keys are split too, in parts of at least
  // kMinKeys, each part's softmax state merged after. 64: one stream at 250-450 keys (3
  // items on 2 threads unsplit, one thread doing two) decoded ~10 % faster split than with
  // parts of at least 256.
  constexpr int64_t kMinKeys = 64;
  const int64_t items = batch * plan.splits;
  plan.parts = items >= 2 * threads ? 1 : (2 * threads + items - 1) / items;
  plan.seq_parts.assign(batch, 1);
  plan.split_keys = false;
  for (int64_t b = 0; b < batch && plan.parts > 1; ++b) {
    const int64_t keys = context_lens[b] - (starts == nullptr ? 0 : starts[b]);
    plan.seq_parts[b] = std::max<int64_t>(1, std::min(plan.parts, keys / kMinKeys));
    plan.split_keys = plan.split_keys || plan.seq_parts[b] > 1;
  }
  plan.num_heads = num_heads;
  plan.dim = dim;
  plan.partials.resize(plan.split_keys ? batch * plan.parts * plan.state() : 0);
  plan.num_items = batch * plan.splits * plan.parts;
}

// A planned decode attention call's items, run by every thread of the enclosing OpenMP
// parallel region (decode_attention's own, or DecodeStack's); its worksharing loops end in
// barriers, so every output is in place when it returns.
template <typename scalar_t>
void attention_items(AttentionPlan& plan, const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                     const int64_t* block_tables, const int64_t* context_lens, const int64_t* starts, scalar_t* out,
                     int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t dim, int64_t block_size,
                     int64_t max_blocks, float scale, float softcap, int64_t q_stride) {
  const int64_t group = num_heads / num_kv_heads;
  const int64_t splits = plan.splits, parts = plan.parts;
  std::vector<float> queries, scores, acc;
  std::vector<int64_t> offsets;
  // Dynamic scheduling: sequence lengths differ, so static halves would leave a thread idle.
#pragma omp for schedule(dynamic, 1)
  for (int64_t item = 0; item < plan.num_items; ++item) {
    const int64_t b = item / (splits * parts), part = item / parts % splits, kp = item % parts;
    if (kp >= plan.seq_parts[b]) continue;
    const int64_t head_begin = part * num_heads / splits, head_end = (part + 1) * num_heads / splits;
    const int64_t first_key = starts == nullptr ? 0 : starts[b], keys = context_lens[b] - first_key;
    const int64_t begin = first_key + keys * kp / plan.seq_parts[b];
    const int64_t end = first_key + keys * (kp + 1) / plan.seq_parts[b];
    const Partial partial = plan.seq_parts[b] > 1 ? plan.partial_of(b, kp) : Partial{};
    const Partial* into = plan.seq_parts[b] > 1 ? &partial : nullptr;
#ifdef SEMLINE_AVX512_BF16
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (dim == 64 || dim == 128) {
        auto run = dim == 64 ? attend_bf16<2> : attend_bf16<4>;
        run(q + b * q_stride, k_cache, v_cache, block_tables + b * max_blocks, begin, end,
            out + b * num_heads * dim, head_begin, head_end, group, num_kv_heads, block_size, scale, softcap,
            scores, offsets, into);
        continue;
      }
    }
#endif
    attend(q + b * q_stride, k_cache, v_cache, block_tables + b * max_blocks, begin, end,
           out + b * num_heads * dim, head_begin, head_end, group, num_kv_heads, dim, block_size, scale,
           softcap, queries, scores, acc, offsets, into);
  }
  if (plan.split_keys) {
    // (the loop above ends with a barrier: every part is in place)
#pragma omp for schedule(static)
    for (int64_t item = 0; item < batch * num_heads; ++item) {
      const int64_t b = item / num_heads, h = item % num_heads;
      if (plan.seq_parts[b] == 1) continue;
      float largest = -std::numeric_limits<float>::infinity();
      for (int64_t kp = 0; kp < plan.seq_parts[b]; ++kp)
        largest = std::max(largest, plan.partial_of(b, kp).max[h]);
      float total = 0.f;
      acc.assign(dim, 0.f);
      for (int64_t kp = 0; kp < plan.seq_parts[b]; ++kp) {
        const Partial p = plan.partial_of(b, kp);
        const float weight = std::exp(p.max[h] - largest);
        total += weight * p.sum[h];
        for (int64_t d = 0; d < dim; ++d) acc[d] += weight * p.acc[h * dim + d];
      }
      scalar_t* dst = out + (b * num_heads + h) * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<scalar_t>(acc[d] / total);
    }
  }
}

template <typename scalar_t>
void decode_attention(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache,
                      const int64_t* block_tables, const int64_t* context_lens, const int64_t* starts,
                      scalar_t* out, int64_t batch, int64_t num_heads, int64_t num_kv_heads, int64_t dim,
                      int64_t block_size, int64_t max_blocks, float scale, float softcap,
                      int64_t q_stride) {  // q_stride: elements between sequences' queries
  const int64_t threads = at::get_num_threads();
  AttentionPlan plan;
  plan_attention(plan, context_lens, starts, batch, num_heads, num_kv_heads, dim, threads);
#pragma omp parallel num_threads(threads)
  attention_items<scalar_t>(plan, q, k_cache, v_cache, block_tables, context_lens, starts, out, batch, num_heads,
                            num_kv_heads, dim, block_size, max_blocks, scale, softcap, q_stride);
}

}  // namespace

torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor context_lens,
                                     double scale, c10::optional<torch::Tensor> starts, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "not contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_tables and context_lens must be int64");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  auto tables = block_tables.contiguous();
  auto lens = context_lens.contiguous();
  const int64_t batch = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && num_heads % num_kv_heads == 0, "head shapes disagree");
  TORCH_CHECK(tables.size(0) == batch && lens.size(0) == batch, "one table and length per sequence");
  torch::Tensor first_keys;
  if (starts.has_value()) {
    first_keys = starts->contiguous();
    TORCH_CHECK(first_keys.scalar_type() == at::kLong && first_keys.size(0) == batch,
                "starts must be int64, one per sequence");
    TORCH_CHECK(at::all(first_keys.ge(0).logical_and(first_keys.lt(lens))).item<bool>(),
                "every start must lie in [0, context_len)");
  }
  auto out = torch::empty_like(q);
  SEMLINE_DISPATCH(q.scalar_type(), "paged_decode_attention", [&] {
    decode_attention<scalar_t>(q.data_ptr<scalar_t>(), k_cache.data_ptr<scalar_t>(),
                               v_cache.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(),
                               lens.data_ptr<int64_t>(),
                               first_keys.defined() ? first_keys.data_ptr<int64_t>() : nullptr,
                               out.data_ptr<scalar_t>(), batch, num_heads, num_kv_heads, dim, block_size,
                               tables.size(1), static_cast<float>(scale), static_cast<float>(softcap),
                               num_heads * dim);
  });
  return out;
}


// --- greedy sampling ---

namespace {

// The index of the largest of x[0..n), the first where several tie, and the first NaN if
// there is one: what torch.argmax returns. AVX-512: 16 lanes of (largest, its first index).
int64_t argmax_row(const float* x, int64_t n) {
  int64_t t = 0, at = 0;
  float best = x[0];
#ifdef SEMLINE_AVX512
  if (n >= 16) {
    __m512i index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512i best_index = index;
    __m512 best_value = _mm512_loadu_ps(x);
    __mmask16 nan = _mm512_cmp_ps_mask(best_value, best_value, _CMP_UNORD_Q);
    for (t = 16; t + 16 <= n; t += 16) {
      index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
      const __m512 v = _mm512_loadu_ps(x + t);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 greater = _mm512_cmp_ps_mask(v, best_value, _CMP_GT_OQ);
      best_value = _mm512_mask_mov_ps(best_value, greater, v);
      best_index = _mm512_mask_mov_epi32(best_index, greater, index);
    }
    if (nan != 0) {
      t = 0;  // the scalar loop finds the first NaN
    } else {
      best = _mm512_reduce_max_ps(best_value);
      at = _mm512_mask_reduce_min_epi32(_mm512_cmp_ps_mask(best_value, _mm512_set1_ps(best), _CMP_EQ_OQ),
                                        best_index);
    }
  }
#endif
  for (; t < n; ++t) {
    if (x[t] != x[t]) return t;
    if (x[t] > best) best = x[t], at = t;
  }
  return at;
}

}  // namespace

torch::Tensor argmax_rows(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "logits: float32 [N, V], V > 0");
  auto x = logits.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  auto out = torch::empty({rows}, torch::dtype(at::kLong));
  const float* data = x.data_ptr<float>();
  int64_t* ids = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) ids[r] = argmax_row(data + r * n, n);
  });
  return out;
}

// --- the small per-layer ops of a decode step, fused (one call instead of 4-14 PyTorch ops) ---

namespace {

// Llama's RMSNorm as Hugging Face computes it: in float32, x * rsqrt(mean(x^2) + eps), cast
// back to the model's dtype, then scaled by the weight in that dtype (each product rounded
// as PyTorch rounds it).
template <typename scalar_t>
void rms_norm_rows(const scalar_t* x, const scalar_t* weight, scalar_t* out, int64_t rows, int64_t dim,
                   int64_t x_stride, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row = x + r * x_stride;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < dim; ++d) sum += widen(row[d]) * widen(row[d]);
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
      scalar_t* o = out + r * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d)
        o[d] = narrow<scalar_t>(widen(weight[d]) * widen(narrow<scalar_t>(widen(row[d]) * inv)));
    }
  });
}

// x * cos + rotate_half(x) * sin over each head's first 2 * half features, in place, each
// product and the sum rounded to the dtype as PyTorch's three ops round them.
template <typename scalar_t>
void rotate_heads(scalar_t* x, int64_t tokens, int64_t heads, int64_t token_stride, int64_t head_stride,
                  const scalar_t* cos, const scalar_t* sin, int64_t half) {
  at::parallel_for(0, tokens, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* c = cos + t * 2 * half;
      const scalar_t* s = sin + t * 2 * half;
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* v = x + t * token_stride + h * head_stride;
#pragma omp simd
        for (int64_t d = 0; d < half; ++d) {
          const float lo = widen(v[d]), hi = widen(v[d + half]);
          const float a_lo = widen(narrow<scalar_t>(lo * widen(c[d])));
          const float b_lo = widen(narrow<scalar_t>(-hi * widen(s[d])));
          const float a_hi = widen(narrow<scalar_t>(hi * widen(c[d + half])));
          const float b_hi = widen(narrow<scalar_t>(lo * widen(s[d + half])));
          v[d] = narrow<scalar_t>(a_lo + b_lo);
          v[d + half] = narrow<scalar_t>(a_hi + b_hi);
        }
      }
    }
  });
}

#ifdef SEMLINE_AVX2
// PyTorch's own vectorised exp (libtorch_cpu exports its Sleef): what its SiLU kernel calls.
extern "C" __m256 Sleef_expf8_u10(__m256);
#ifdef SEMLINE_AVX512
extern "C" __m512 Sleef_expf16_u10(__m512);
#endif
#endif

// One block of a row: out[d] = narrow(narrow(silu[d]) * up[d]) (vectorised by the compiler).
template <typename scalar_t>
inline void times_up(const float* silu, const scalar_t* up, scalar_t* out, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) out[d] = narrow<scalar_t>(widen(narrow<scalar_t>(silu[d])) * widen(up[d]));
}

// out = silu(gate) * up for `rows` rows of [gate | up] (row stride 2 * inter), as PyTorch's
// F.silu and mul compute it: silu in float32, x / (1 + exp(-x)) with the exp of the vector
// width ATen runs in this process (its AVX-512 kernels: Sleef's 16-lane exp; AVX2: 8-lane),
// rounded to the dtype, times up, rounded. One loop instead of four ATen calls (silu_, mul
// and two narrows: ~5 us a layer, most of what a decode step's calling thread did between
// products). False where this build cannot match ATen's choice, or a row's length is not a
// multiple of ATen's step: the caller then uses ATen.
template <typename scalar_t>
bool silu_mul_rows(const scalar_t* gate_up, scalar_t* out, int64_t rows, int64_t inter) {
#ifdef SEMLINE_AVX2
  constexpr int64_t kBlock = 256;
  static const int64_t lanes = [] {  // fixed for the process (ATen reads ATEN_CPU_CAPABILITY once)
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX512" ? 16 : capability == "AVX2" ? 8 : 0;
  }();
#ifndef SEMLINE_AVX512
  if (lanes == 16) return false;
#endif
  // ATen's loop takes two of its vectors of the dtype at a time (64 bf16 or 32 float32 lanes
  // under AVX-512) and the rest one by one through the C library's exp.
  if (lanes == 0 || inter % (2 * lanes * static_cast<int64_t>(sizeof(float) / sizeof(scalar_t))) != 0) return false;
  alignas(64) float silu[kBlock];
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* gate = gate_up + r * 2 * inter;
    for (int64_t d0 = 0; d0 < inter; d0 += kBlock) {
      const int64_t n = std::min(kBlock, inter - d0);  // a multiple of the lanes
      for (int64_t d = 0; d < n; d += lanes) {
#ifdef SEMLINE_AVX512
        if (lanes == 16) {
          const __m512 x = load16(gate + d0 + d);
          const __m512 e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), x));
          _mm512_store_ps(silu + d, _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
          continue;
        }
#endif
        const __m256 x = load8(gate + d0 + d);
        const __m256 e = Sleef_expf8_u10(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_store_ps(silu + d, _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), e)));
      }
      times_up<scalar_t>(silu, gate + inter + d0, out + r * inter + d0, n);
    }
  }
  return true;
#else
  return false;
#endif
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.size(0) == x.size(1),
              "x: [T, D] with unit stride over D; weight: [D]");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight dtypes differ");
  auto out = torch::empty({x.size(0), x.size(1)}, x.options());
  SEMLINE_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                            x.size(0), x.size(1), x.stride(0), static_cast<float>(eps));
  });
  return out;
}

c10::optional<torch::Tensor> silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up: contiguous [T, 2 * I]");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({rows, inter}, gate_up.options());
  bool done = true;
  SEMLINE_DISPATCH(gate_up.scalar_type(), "silu_mul", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* y = out.data_ptr<scalar_t>();
    done = silu_mul_rows<scalar_t>(in, y, 0, inter);  // whether this build matches ATen here
    if (done) {
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        silu_mul_rows<scalar_t>(in + begin * 2 * inter, y + begin * inter, end - begin, inter);
      });
    }
  });
  if (!done) return c10::nullopt;
  return out;
}

void rotary_(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, "q, k: [T, heads, D]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes(), "cos, sin: [T, D]");
  TORCH_CHECK(cos.numel() == q.size(0) * q.size(2) && q.size(2) == k.size(2) && q.size(2) % 2 == 0,
              "one full-width cos/sin row per token");
  TORCH_CHECK(q.scalar_type() == cos.scalar_type() && k.scalar_type() == cos.scalar_type(), "dtypes differ");
  SEMLINE_DISPATCH(q.scalar_type(), "rotary_", [&] {
    for (auto* x : {&q, &k})
      rotate_heads<scalar_t>(x->data_ptr<scalar_t>(), x->size(0), x->size(1), x->stride(0), x->stride(1),
                             cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), x->size(2) / 2);
  });
}


// --- a decode step's Llama layers in one call ------------------------------------------------
//
// A decode step of a small model on a CPU is bound by its ~25 PyTorch calls per layer made
// from Python (5-10 us each), not by its arithmetic: SmolLM2's 30 layers spent ~2.5 of a
// 5.4 ms step there. DecodeStack holds every layer's weights and runs the step's layers from
// C++: the matmuls through the same ATen/oneDNN ops the Python modules call, the norms,
// rotary and attention through this file's kernels, the K/V rows copied straight into their
// slots. Only pure decode steps of pre-norm, SiLU-gated, fully-rotary layers come here
// (engine/kernels/decode_stack.py decides); the values are those of the Python path.

namespace {

enum LinearKind : int64_t { kDense = 0, kOneDNN = 1, kInt4 = 2, kQ4 = 3, kQ8 = 4, kInt8 = 5 };

// x += delta (each sum rounded to the dtype, as PyTorch's add), then out = rms_norm(x).
template <typename scalar_t>
void add_rms_norm_rows(scalar_t* x, const scalar_t* delta, const scalar_t* weight, scalar_t* out, int64_t rows,
                       int64_t dim, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* row = x + r * dim;
      const scalar_t* add = delta + r * dim;
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) row[d] = narrow<scalar_t>(widen(row[d]) + widen(add[d]));
    }
  });
  rms_norm_rows<scalar_t>(x, weight, out, rows, dim, dim, eps);
}

}  // namespace

// One linear layer as the Python module holding it runs it (engine/kernels/decode_stack.py
// linear_spec builds these), by kind:
//   dense: weight [N, K];  oneDNN: weight prepacked;
//   int4 (PyTorch's kernel): weight the int4pack buffer, scales [K/g, N, 2], group_size g;
//   q4 (W4A8): weight q4_pack's bytes, group_size N;  q8 (W8A8): weight q8_pack's bytes, scales [N]
//     (ones where the pack holds group scales);
//   int8 (weight-only, PyTorch's packed kernel): weight [N, K] int8, scales [N] in the activations' dtype.
struct LinearSpec {
  int64_t kind;
  torch::Tensor weight;
  torch::Tensor scales;
  c10::optional<torch::Tensor> bias;
  int64_t group_size;

  torch::Tensor operator()(const torch::Tensor& x, int64_t padded_rows) const {
    if (kind == kQ4) return q4_linear(x, weight, group_size, bias, -1);
    if (kind == kQ8) return q8_linear(x, weight, scales, bias, -1);
    if (kind == kInt8) {  // weight-only int8: activations in the scales' dtype, as the Python layers
      auto in = x.scalar_type() == scales.scalar_type() ? x : x.to(scales.scalar_type());
      auto y = at::_weight_int8pack_mm(in.contiguous(), weight, scales);
      if (y.scalar_type() != x.scalar_type()) y = y.to(x.scalar_type());
      return bias.has_value() ? y + *bias : y;
    }
    if (kind == kInt4) {
      const auto dtype = x.scalar_type();
      auto in = dtype == at::kBFloat16 ? x : x.to(at::kBFloat16);
      auto y = at::_weight_int4pack_mm_for_cpu(in.contiguous(), weight, group_size, scales);
      if (dtype != at::kBFloat16) y = y.to(dtype);
      return bias.has_value() ? y + bias->to(y.scalar_type()) : y;
    }
    if (kind == kOneDNN) {
      // Padded to the row counts the Python layer uses (engine/models/linear.py padded_rows),
      // so oneDNN's kernel caches see the same bounded set of shapes.
      static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
      const int64_t rows = x.size(0);
      std::vector<c10::IValue> stack;
      stack.emplace_back(padded_rows != rows ? at::constant_pad_nd(x, {0, 0, 0, padded_rows - rows}, 0) : x);
      stack.emplace_back(weight);
      stack.emplace_back(bias);
      stack.emplace_back(std::string("none"));
      stack.emplace_back(c10::List<c10::optional<at::Scalar>>());
      stack.emplace_back(std::string(""));
      op.callBoxed(&stack);
      auto y = stack[0].toTensor();
      return padded_rows != rows ? y.narrow(0, 0, rows) : y;
    }
    return at::linear(x, weight, bias);
  }
};

struct StackLayer {
  torch::Tensor input_norm, post_norm;
  LinearSpec qkv, o, gate_up, down;
  int64_t num_heads, num_kv_heads, head_dim, window, rope;
  double scale, softcap;
};

// A layer's rotary on the step's q and k (rows of `row` elements: q, k, v), then each token's
// k and v into its cache slot.
template <typename scalar_t>
void rotary_and_kv_write(const StackLayer& layer, const std::vector<torch::Tensor>& cos,
                         const std::vector<torch::Tensor>& sin, scalar_t* qkv, int64_t row, int64_t tokens,
                         const int64_t* slot, scalar_t* k_cache, scalar_t* v_cache) {
  const int64_t hd = layer.head_dim, q_size = layer.num_heads * hd, kv_size = layer.num_kv_heads * hd;
  const scalar_t* c = cos[layer.rope].data_ptr<scalar_t>();
  const scalar_t* s = sin[layer.rope].data_ptr<scalar_t>();
  rotate_heads<scalar_t>(qkv, tokens, layer.num_heads, row, hd, c, s, hd / 2);
  rotate_heads<scalar_t>(qkv + q_size, tokens, layer.num_kv_heads, row, hd, c, s, hd / 2);
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(k_cache + slot[t] * kv_size, qkv + t * row + q_size, kv_size * sizeof(scalar_t));
    std::memcpy(v_cache + slot[t] * kv_size, qkv + t * row + q_size + kv_size, kv_size * sizeof(scalar_t));
  }
}

class DecodeStack {
 public:
  explicit DecodeStack(double eps) : eps_(eps) {}

  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, LinearSpec qkv, LinearSpec o,
                 LinearSpec gate_up, LinearSpec down, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                 double scale, int64_t window, double softcap, int64_t rope) {
    TORCH_CHECK(num_heads % num_kv_heads == 0 && head_dim % 2 == 0, "head shapes disagree");
    layers_.push_back({input_norm.contiguous(), post_norm.contiguous(), qkv, o, gate_up, down, num_heads,
                       num_kv_heads, head_dim, window, rope, scale, softcap});
    // The team path (forward_team) takes a stack whose every product is a W4A8/W8A8 one,
    // run on activations of the norms' dtype (team_dtype_, checked per step: nothing may
    // throw inside its parallel region).
    const auto dtype = input_norm.scalar_type();
    if (layers_.size() == 1) team_dtype_ = dtype;
    const int64_t dim = input_norm.numel(), q_size = num_heads * head_dim;
    const int64_t qkv_n = q_size + 2 * num_kv_heads * head_dim, inter = team_n(gate_up) / 2;
    team_ = team_ && dtype == team_dtype_ && post_norm.scalar_type() == dtype && team_fits(qkv, dim, qkv_n, dtype) &&
            team_fits(o, q_size, dim, dtype) && team_fits(gate_up, dim, 2 * inter, dtype) &&
            team_fits(down, inter, dim, dtype);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x: [T, D] embedded tokens (one decode token per sequence), updated in place and returned
  // as the hidden states after the first `num_layers` layers (before the final norm).
  // cos/sin: per rope table, [T, head_dim] rows of this step's positions; caches: per layer;
  // slots: [T] flat K/V slot of each token; tables: [T, max_blocks]; lens: [T] keys attended.
  torch::Tensor forward(torch::Tensor x, std::vector<torch::Tensor> cos, std::vector<torch::Tensor> sin,
                        std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches,
                        torch::Tensor slots, torch::Tensor tables, torch::Tensor lens, int64_t padded_rows,
                        int64_t num_layers) {
    TORCH_CHECK(num_layers >= 1 && num_layers <= this->num_layers(), "bad layer count");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [T, D]");
    TORCH_CHECK(static_cast<int64_t>(k_caches.size()) >= num_layers && k_caches.size() == v_caches.size(),
                "one K and V cache per layer");
    TORCH_CHECK(slots.scalar_type() == at::kLong && tables.scalar_type() == at::kLong &&
                    lens.scalar_type() == at::kLong && slots.is_contiguous() && tables.is_contiguous() &&
                    lens.is_contiguous(),
                "slots, tables, lens: contiguous int64");
    const int64_t tokens = x.size(0);
    TORCH_CHECK(slots.size(0) == tokens && tables.size(0) == tokens && lens.size(0) == tokens,
                "one slot, table and length per token");
    for (int64_t i = 0; i < num_layers; ++i) {
      const StackLayer& layer = layers_[i];
      TORCH_CHECK(k_caches[i].is_contiguous() && v_caches[i].is_contiguous() &&
                      k_caches[i].sizes() == v_caches[i].sizes() && k_caches[i].size(2) == layer.num_kv_heads &&
                      k_caches[i].size(3) == layer.head_dim && k_caches[i].scalar_type() == x.scalar_type() &&
                      v_caches[i].scalar_type() == x.scalar_type(),
                  "cache of layer ", i, " does not match it");
    }
    if (team_ && x.scalar_type() == team_dtype_ && tokens <= kTeamTokens) {
      SEMLINE_DISPATCH(x.scalar_type(), "decode_stack", [&] {
        forward_team<scalar_t>(x, cos, sin, k_caches, v_caches, slots, tables, lens, num_layers);
      });
      return x;
    }
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t* len = lens.data_ptr<int64_t>();
    std::vector<int64_t> starts(tokens);
    SEMLINE_DISPATCH(x.scalar_type(), "decode_stack", [&] {
      scalar_t* xs = x.data_ptr<scalar_t>();
      const int64_t dim = x.size(1);
      auto h = torch::empty_like(x);
      rms_norm_rows<scalar_t>(xs, layers_[0].input_norm.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), tokens, dim,
                              dim, static_cast<float>(eps_));
      for (int64_t i = 0; i < num_layers; ++i) {
        const StackLayer& layer = layers_[i];
        const int64_t heads = layer.num_heads, kv_heads = layer.num_kv_heads, hd = layer.head_dim;
        const int64_t q_size = heads * hd, kv_size = kv_heads * hd;
        auto& k_cache = k_caches[i];
        auto& v_cache = v_caches[i];
        auto qkv = layer.qkv(h, padded_rows);  // [T, q_size + 2 * kv_size], contiguous
        TORCH_CHECK(qkv.is_contiguous() && qkv.size(1) == q_size + 2 * kv_size, "qkv shape");
        scalar_t* qkv_data = qkv.data_ptr<scalar_t>();
        const int64_t row = qkv.size(1);
        scalar_t* kc = k_cache.data_ptr<scalar_t>();
        scalar_t* vc = v_cache.data_ptr<scalar_t>();
        {
          RECORD_FUNCTION("semline::rotary_and_kv_write", std::vector<c10::IValue>());
          rotary_and_kv_write<scalar_t>(layer, cos, sin, qkv_data, row, tokens, slot, kc, vc);
        }
        const int64_t* first = nullptr;
        if (layer.window > 0) {
          for (int64_t t = 0; t < tokens; ++t) starts[t] = std::max<int64_t>(0, len[t] - layer.window);
          first = starts.data();
        }
        auto attn = torch::empty({tokens, q_size}, x.options());
        {
          RECORD_FUNCTION("semline::decode_attention", std::vector<c10::IValue>());
          decode_attention<scalar_t>(qkv_data, kc, vc, tables.data_ptr<int64_t>(), len, first,
                                     attn.data_ptr<scalar_t>(), tokens, heads, kv_heads, hd, k_cache.size(1),
                                     tables.size(1), static_cast<float>(layer.scale),
                                     static_cast<float>(layer.softcap), row);
        }
        auto o = layer.o(attn, padded_rows).contiguous();
        {
          RECORD_FUNCTION("semline::add_rms_norm", std::vector<c10::IValue>());
          add_rms_norm_rows<scalar_t>(xs, o.data_ptr<scalar_t>(), layer.post_norm.data_ptr<scalar_t>(),
                                      h.data_ptr<scalar_t>(), tokens, dim, static_cast<float>(eps_));
        }
        auto gate_up = layer.gate_up(h, padded_rows);
        const int64_t inter = gate_up.size(1) / 2;
        auto gate = gate_up.narrow(1, 0, inter);
        at::silu_(gate);  // as the Python path: silu(gate), then times up, each rounded
        auto down = layer.down(at::mul(gate, gate_up.narrow(1, inter, inter)), padded_rows).contiguous();
        if (i + 1 < num_layers) {
          add_rms_norm_rows<scalar_t>(xs, down.data_ptr<scalar_t>(), layers_[i + 1].input_norm.data_ptr<scalar_t>(),
                                      h.data_ptr<scalar_t>(), tokens, dim, static_cast<float>(eps_));
        } else {
          x.add_(down);
        }
      }
    });
    return x;
  }

 private:
  // Output features of a W4A8 (n in group_size) or W8A8 (one scale per row) product.
  static int64_t team_n(const LinearSpec& spec) { return spec.kind == kQ8 ? spec.scales.numel() : spec.group_size; }

  static bool team_fits(const LinearSpec& spec, int64_t k, int64_t n, at::ScalarType dtype) {
    if (spec.kind != kQ4 && spec.kind != kQ8) return false;
    const bool q8 = spec.kind == kQ8;
    if (q8 && !(spec.scales.scalar_type() == at::kFloat && spec.scales.is_contiguous())) return false;
    return team_n(spec) == n && team_linear_fits(spec.weight, q8, k, n, spec.bias, dtype);
  }

  static void team_product(const LinearSpec& spec, const QuantizedRows& xq, torch::Tensor& out) {
    const bool q8 = spec.kind == kQ8;
    team_linear(xq, q8, spec.weight, team_n(spec), q8 ? spec.scales.data_ptr<float>() : nullptr, spec.bias, out);
  }

  // A step of at most kTeamTokens tokens whose products are all W4A8/W8A8 (quantization int4,
  // auto, w8a8) in one OpenMP parallel region: each product's weight blocks split over the
  // threads, barriers between the dependent parts, the small work between products (norms,
  // rotary, the K/V write, SiLU, quantizing activations) on the calling thread, attention on
  // all. A decode step of SmolLM2 makes ~120 products of 0.2-1.1 MB; as separate calls each
  // paid a fork, a join and its allocations, and each thread's stream of weights stopped and
  // started again (benchmarks/decode.py's one_product: the step's products one by one
  // streamed 37 GB/s where the same bytes as one product streamed 70). Single stream +6-14 %
  // here; past ~8 tokens the calling thread's share (norms, quantizing, SiLU of every row)
  // costs more than the calls did (batch 32 -5-14 %), so those steps take the other path.
  // Same arithmetic in the same order: the same floats as the other path. Every tensor is
  // allocated before the region, and nothing inside it checks or throws.
  template <typename scalar_t>
  void forward_team(torch::Tensor& x, const std::vector<torch::Tensor>& cos, const std::vector<torch::Tensor>& sin,
                    const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
                    const torch::Tensor& slots, const torch::Tensor& tables, const torch::Tensor& lens,
                    int64_t num_layers) {
    RECORD_FUNCTION("semline::decode_stack_team", std::vector<c10::IValue>());
    const int64_t tokens = x.size(0), dim = x.size(1);
    const int64_t* slot = slots.data_ptr<int64_t>();
    const int64_t* len = lens.data_ptr<int64_t>();
    const float eps = static_cast<float>(eps_);
    int64_t most_qkv = 0, most_q = 0, most_gate_up = 0;
    for (int64_t i = 0; i < num_layers; ++i) {
      const StackLayer& layer = layers_[i];
      most_q = std::max(most_q, layer.num_heads * layer.head_dim);
      most_qkv = std::max(most_qkv, team_n(layer.qkv));
      most_gate_up = std::max(most_gate_up, team_n(layer.gate_up));
    }
    auto h = torch::empty_like(x);
    auto o = torch::empty_like(x);
    auto down = torch::empty_like(x);
    auto qkv_store = torch::empty({tokens * most_qkv}, x.options());
    auto attn_store = torch::empty({tokens * most_q}, x.options());
    auto gate_up_store = torch::empty({tokens * most_gate_up}, x.options());
    auto act_store = torch::empty({tokens * most_gate_up / 2}, x.options());
    // Each layer's buffers: [tokens, n] views of the stores, made once per width (the layers
    // of a model share them; a view per layer and buffer cost ~0.5 us each, every step).
    auto rows_of = [tokens](std::vector<torch::Tensor>& views, int64_t i, const torch::Tensor& store, int64_t n) {
      views[i] = i > 0 && views[i - 1].size(1) == n ? views[i - 1] : store.narrow(0, 0, tokens * n).view({tokens, n});
    };
    std::vector<torch::Tensor> qkv(num_layers), attn(num_layers), gate_up(num_layers), act(num_layers);
    for (int64_t i = 0; i < num_layers; ++i) {
      const StackLayer& layer = layers_[i];
      rows_of(qkv, i, qkv_store, team_n(layer.qkv));
      rows_of(attn, i, attn_store, layer.num_heads * layer.head_dim);
      rows_of(gate_up, i, gate_up_store, team_n(layer.gate_up));
      rows_of(act, i, act_store, team_n(layer.gate_up) / 2);
    }
    std::vector<int64_t> starts(tokens);
    QuantizedRows xq;
    AttentionPlan plan;
    scalar_t* xs = x.data_ptr<scalar_t>();
    rms_norm_rows<scalar_t>(xs, layers_[0].input_norm.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), tokens, dim, dim,
                            eps);
    quantize_activations(xq, h);
    const int64_t threads = at::get_num_threads();
#pragma omp parallel num_threads(threads)
    for (int64_t i = 0; i < num_layers; ++i) {
      const StackLayer& layer = layers_[i];
      const int64_t heads = layer.num_heads, kv_heads = layer.num_kv_heads, hd = layer.head_dim;
      const int64_t row = team_n(layer.qkv);
      scalar_t* qkv_data = qkv[i].data_ptr<scalar_t>();
      scalar_t* kc = k_caches[i].data_ptr<scalar_t>();
      scalar_t* vc = v_caches[i].data_ptr<scalar_t>();
      const int64_t* first = layer.window > 0 ? starts.data() : nullptr;
      team_product(layer.qkv, xq, qkv[i]);
#pragma omp barrier
#pragma omp master
      {
        rotary_and_kv_write<scalar_t>(layer, cos, sin, qkv_data, row, tokens, slot, kc, vc);
        if (first != nullptr)
          for (int64_t t = 0; t < tokens; ++t) starts[t] = std::max<int64_t>(0, len[t] - layer.window);
        plan_attention(plan, len, first, tokens, heads, kv_heads, hd, threads);
      }
#pragma omp barrier
      attention_items<scalar_t>(plan, qkv_data, kc, vc, tables.data_ptr<int64_t>(), len, first,
                                attn[i].data_ptr<scalar_t>(), tokens, heads, kv_heads, hd, k_caches[i].size(1),
                                tables.size(1), static_cast<float>(layer.scale), static_cast<float>(layer.softcap),
                                row);
#pragma omp master
      quantize_activations(xq, attn[i]);
#pragma omp barrier
      team_product(layer.o, xq, o);
#pragma omp barrier
#pragma omp master
      {
        add_rms_norm_rows<scalar_t>(xs, o.data_ptr<scalar_t>(), layer.post_norm.data_ptr<scalar_t>(),
                                    h.data_ptr<scalar_t>(), tokens, dim, eps);
        quantize_activations(xq, h);
      }
#pragma omp barrier
      team_product(layer.gate_up, xq, gate_up[i]);
#pragma omp barrier
#pragma omp master
      {
        const int64_t inter = gate_up[i].size(1) / 2;
        if (!silu_mul_rows<scalar_t>(gate_up[i].data_ptr<scalar_t>(), act[i].data_ptr<scalar_t>(), tokens, inter)) {
          auto gate = gate_up[i].narrow(1, 0, inter);
          at::silu_(gate);  // as the other path: silu(gate), then times up, each rounded
          at::mul_out(act[i], gate, gate_up[i].narrow(1, inter, inter));
        }
        quantize_activations(xq, act[i]);
      }
#pragma omp barrier
      team_product(layer.down, xq, down);
#pragma omp barrier
#pragma omp master
      {
        if (i + 1 < num_layers) {
          add_rms_norm_rows<scalar_t>(xs, down.data_ptr<scalar_t>(), layers_[i + 1].input_norm.data_ptr<scalar_t>(),
                                      h.data_ptr<scalar_t>(), tokens, dim, eps);
          quantize_activations(xq, h);
        } else {
          x.add_(down);
        }
      }
#pragma omp barrier
    }
  }

  double eps_;
  std::vector<StackLayer> layers_;
  bool team_ = true;  // every layer's products W4A8/W8A8 (forward_team)
  at::ScalarType team_dtype_ = at::kFloat;  // the activations' dtype team_ holds for
  static constexpr int64_t kTeamTokens = 8;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object: each runs without the GIL, so the process's other
  // threads (a server's event loop streaming answers, a tokenizer thread) go on meanwhile.
  using nogil = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("paged_decode_attention", &paged_decode_attention, "Paged decode attention (CPU)", nogil(), pybind11::arg("q"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_tables"),
        pybind11::arg("context_lens"), pybind11::arg("scale"), pybind11::arg("starts") = pybind11::none(),
        pybind11::arg("softcap") = 0.0);
  m.def("rms_norm", &rms_norm, "Llama's RMSNorm, fused (CPU)", nogil());
  m.def("argmax_rows", &argmax_rows, "Each row's argmax, as torch.argmax(dim=-1) (float32, CPU)", nogil());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of [gate | up] rows as PyTorch rounds it, threads over the "
        "rows; None where this build cannot match ATen's (CPU)", nogil());
  m.def("rotary_", &rotary_, "Rotary embedding of q and k in place (CPU)", nogil());

  m.def("q4_paths", &q4_paths, "The W4A8 kernel paths compiled for this CPU");
  m.def("q4_pack", &q4_pack, "Pack 4-bit weights (q, scales, minimums) for q4_linear");
  m.def("q8_pack", &q8_pack, "Pack int8 weights [N, K] (and their group scales and minimums) for q8_linear",
        pybind11::arg("q"), pybind11::arg("scales") = pybind11::none(), pybind11::arg("mins") = pybind11::none());
  m.def("gguf_pack", &gguf_pack, "GGUF blocks read in place into q4_linear's or q8_linear's records", nogil(),
        pybind11::arg("raws"), pybind11::arg("kinds"), pybind11::arg("first_blocks"), pybind11::arg("row_part"),
        pybind11::arg("row_src"), pybind11::arg("cols"), pybind11::arg("record"), pybind11::arg("out") = pybind11::none());
  m.def("q8_linear", &q8_linear, "x @ (W * scales[:, None])^T for q8_pack'ed int8 weights (CPU)", nogil(),
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("scales"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("path") = -1);
  m.def("q4_linear", &q4_linear, "x @ W^T for q4_pack'ed 4-bit weights (CPU)", nogil(), pybind11::arg("x"),
        pybind11::arg("packed"), pybind11::arg("n"), pybind11::arg("bias") = pybind11::none(),
        pybind11::arg("path") = -1);
  m.def("unpack_weights", &unpack_weights, "q4_pack'ed or q8_pack'ed weights as bfloat16 [N, K] (CPU)", nogil(),
        pybind11::arg("packed"), pybind11::arg("n"), pybind11::arg("scales") = pybind11::none());
  m.def("packed_rows", &packed_rows, "Rows of q4_pack'ed or q8_pack'ed weights in float32 (CPU)", nogil(),
        pybind11::arg("packed"), pybind11::arg("ids"), pybind11::arg("n"), pybind11::arg("scales") = pybind11::none());
  m.def("set_unpack_rows", &set_unpack_rows, "From how many activation rows q4_linear and q8_linear multiply "
        "bfloat16 activations by unpacked bfloat16 weights (0: never), at most slab_weights at a time",
        pybind11::arg("rows"), pybind11::arg("slab_weights") = int64_t{1} << 25);
  m.def("unpack_rows", &unpack_rows);
  pybind11::class_<LinearSpec>(m, "LinearSpec")
      .def(pybind11::init([](int64_t kind, torch::Tensor weight, c10::optional<torch::Tensor> scales,
                             c10::optional<torch::Tensor> bias, int64_t group_size) {
             return LinearSpec{kind, weight, scales.value_or(torch::Tensor()), bias, group_size};
           }),
           pybind11::arg("kind"), pybind11::arg("weight"), pybind11::arg("scales") = pybind11::none(),
           pybind11::arg("bias") = pybind11::none(), pybind11::arg("group_size") = 0)
      .def("__call__", &LinearSpec::operator(), nogil(), pybind11::arg("x"), pybind11::arg("padded_rows"));
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def_property_readonly("num_layers", &DecodeStack::num_layers)
      .def("forward", &DecodeStack::forward, nogil());
}
