// 4-bit weights times int8-quantized activations (W4A8) for the CPU: the linear layers of a
// GGUF Q4_1 model (or of an HF model quantized to 4 bits at load) at memory bandwidth.
//
// Weights: per output row n and group g of 32 inputs, q in 0..15 with a scale d and a minimum
// m (w = q * d + m), as GGUF's Q4_1. Activations: per row and group, quantized to int8 with
// scale s = max|x| / 127 (llama.cpp's Q8_1 for the same dot product). Then
//     y[r, n] = sum_g  d[n, g] * s[r, g] * sum_i q[n, i] * xq[r, i]  +  m[n, g] * sum_i x[r, i]
// where the inner sums are integer dot products: 64 at a time with AVX512-VNNI (vpdpbusd,
// unsigned 4-bit weights times signed 8-bit activations), 32 with AVX2 (vpmaddubsw).
// PyTorch's CPU int4 kernel widens every weight to float instead: ~25 GB/s of weights at one
// decode row on our 2-core EPYC, against ~39 GB/s the memory streams.
//
// Packed layout: rows in blocks of 16, each block's groups consecutive (a block streams from
// memory as one run), each (block, group) record 320 bytes:
//   4 x 64 bytes of nibbles: step s holds, per row r (4 bytes each, rows in order), the
//     weights k0 .. k0+3 in the low nibbles and k0+4 .. k0+7 in the high, k0 = 32 g + 8 s;
//   16 float16 scales d, 16 float16 minimums m.
// Rows past N (the last block) are zero.

#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SEMLINE_Q4_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SEMLINE_Q4_VNNI 1
#endif
#endif

namespace {

constexpr int64_t kRows = 16;    // output rows per block
constexpr int64_t kGroup = 32;   // inputs per group
constexpr int64_t kRecord = 320; // bytes per (block, group)
constexpr int64_t kNibbles = 256;
constexpr int64_t kRecord6K = 420;  // the Q6_K record of the 8-bit kernel's (below): per group on average

enum Path : int64_t { kBest = -1, kScalar = 0, kAvx2 = 1, kVnni = 2 };
// Each kernel asks for the weights 4 KiB ahead of those it reads, into L2 (a thread's blocks are
// one run of memory): the hardware prefetchers alone left a 1B model's decode step at ~75 % of
// the machine's read bandwidth (2-core Xeon: single stream Q6_K +22 %, Q8_0 +14 %, Q4_K_M
// +13 %; batch 8 +9-15 %; 1, 2 and 8 KiB ahead and into L1 measured worse or no better).
constexpr int64_t kPrefetchAhead = 4096;
inline void prefetch_ahead(const uint8_t* record, int64_t bytes) {
  for (int64_t at = 0; at < bytes; at += 64) __builtin_prefetch(record + kPrefetchAhead + at, 0, 2);
}

template <typename scalar_t>
void quantize_rows_into(QuantizedRows& out, const scalar_t* x, int64_t rows, int64_t k, int64_t stride) {
  const int64_t groups = k / kGroup;
  out.q.resize(rows * k);
  out.scale.resize(rows * groups);
  out.sum.resize(rows * groups);
  out.isum.resize(rows * groups * 2);
  at::parallel_for(0, rows * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / groups, g = item % groups;
      const scalar_t* src = x + r * stride + g * kGroup;
      float values[kGroup];
      float amax = 0.f, sum = 0.f;
      for (int64_t i = 0; i < kGroup; ++i) {
        values[i] = static_cast<float>(src[i]);
        amax = std::max(amax, std::fabs(values[i]));
        sum += values[i];
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int8_t* dst = out.q.data() + r * k + g * kGroup;
      int32_t halves[2] = {0, 0};
      for (int64_t i = 0; i < kGroup; ++i) {
        dst[i] = static_cast<int8_t>(std::nearbyint(values[i] * inv));
        halves[i / 16] += dst[i];
      }
      out.isum[2 * item] = halves[0];
      out.isum[2 * item + 1] = halves[1];
      out.scale[item] = amax / 127.f;
      out.sum[item] = sum;
    }
  });
}

template <typename scalar_t>
QuantizedRows quantize_rows(const scalar_t* x, int64_t rows, int64_t k, int64_t stride) {
  QuantizedRows out;
  quantize_rows_into(out, x, rows, k, stride);
  return out;
}

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// acc[r][j] (float) for rows [row_begin, row_end) of x and the 16 rows of one block.
void block_scalar(const uint8_t* block, const QuantizedRows& xq, int64_t row_begin, int64_t row_end, int64_t k,
                  float* acc) {
  const int64_t groups = k / kGroup;
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* out = acc + (r - row_begin) * kRows;
    for (int64_t j = 0; j < kRows; ++j) out[j] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* rec = block + g * kRecord;
      const uint16_t* d = reinterpret_cast<const uint16_t*>(rec + kNibbles);
      const uint16_t* m = d + kRows;
      const int8_t* xs = xq.q.data() + r * k + g * kGroup;
      for (int64_t j = 0; j < kRows; ++j) {
        int32_t dot = 0;
        for (int64_t s = 0; s < 4; ++s) {
          const uint8_t* w = rec + s * 64 + j * 4;
          for (int64_t b = 0; b < 4; ++b) {
            dot += static_cast<int32_t>(w[b] & 0xF) * xs[8 * s + b];
            dot += static_cast<int32_t>(w[b] >> 4) * xs[8 * s + 4 + b];
          }
        }
        out[j] += half_to_float(d[j]) * xq.scale[r * groups + g] * static_cast<float>(dot);
        out[j] += half_to_float(m[j]) * xq.sum[r * groups + g];
      }
    }
  }
}

#ifdef SEMLINE_Q4_AVX2
inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Up to 4 activation rows at a time share each block's unpacked weights.
void block_avx2(const uint8_t* block, const QuantizedRows& xq, int64_t row_begin, int64_t row_end, int64_t k,
                float* acc) {
  const int64_t groups = k / kGroup;
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r0 = row_begin; r0 < row_end; r0 += 4) {
    const int64_t n = std::min<int64_t>(4, row_end - r0);
    __m256 sums[4][2];
    for (int64_t i = 0; i < 4; ++i) sums[i][0] = sums[i][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* rec = block + g * kRecord;
      prefetch_ahead(rec, kRecord);
      for (int64_t h = 0; h < 2; ++h) {  // rows 0-7, 8-15 of the block
        __m256i lo[4], hi[4];
        for (int64_t s = 0; s < 4; ++s) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + s * 64 + h * 32));
          lo[s] = _mm256_and_si256(w, low);
          hi[s] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
        }
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + kNibbles + h * 16)));
        const __m256 m =
            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + kNibbles + 32 + h * 16)));
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = r0 + i;
          const int8_t* xs = xq.q.data() + r * k + g * kGroup;
          // Eight pairwise sums of at most 2 * 15 * 127 each fit an int16 lane.
          __m256i dot16 = _mm256_setzero_si256();
          for (int64_t s = 0; s < 4; ++s) {
            dot16 = _mm256_add_epi16(dot16, _mm256_maddubs_epi16(lo[s], _mm256_set1_epi32(load4(xs + 8 * s))));
            dot16 = _mm256_add_epi16(dot16, _mm256_maddubs_epi16(hi[s], _mm256_set1_epi32(load4(xs + 8 * s + 4))));
          }
          const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(dot16, ones));
          const float scale = xq.scale[r * groups + g], total = xq.sum[r * groups + g];
          sums[i][h] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(scale)), dot, sums[i][h]);
          sums[i][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(total), sums[i][h]);
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      _mm256_storeu_ps(acc + (r0 + i - row_begin) * kRows, sums[i][0]);
      _mm256_storeu_ps(acc + (r0 + i - row_begin) * kRows + 8, sums[i][1]);
    }
  }
}
#endif

#ifdef SEMLINE_Q4_VNNI
// R activation rows against one block: every loop unrolled, so the R rows' dot products are
// independent chains the core overlaps and the accumulators stay in registers.
template <int R>
inline void tile_vnni(const uint8_t* block, const QuantizedRows& xq, int64_t r0, int64_t k, float* acc) {
  const int64_t groups = k / kGroup;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 sums[R];
  for (int i = 0; i < R; ++i) sums[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* rec = block + g * kRecord;
    prefetch_ahead(rec, kRecord);
    __m512i lo[4], hi[4];
    for (int s = 0; s < 4; ++s) {
      const __m512i w = _mm512_loadu_si512(rec + s * 64);
      lo[s] = _mm512_and_si512(w, low);
      hi[s] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + kNibbles)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + kNibbles + 32)));
    __m512i even[R], odd[R];  // two chains per row: the low and the high nibbles
    for (int i = 0; i < R; ++i) even[i] = odd[i] = _mm512_setzero_si512();
    for (int s = 0; s < 4; ++s)
      for (int i = 0; i < R; ++i) {
        const int8_t* xs = xq.q.data() + (r0 + i) * k + g * kGroup + 8 * s;
        even[i] = _mm512_dpbusd_epi32(even[i], lo[s], _mm512_set1_epi32(load4(xs)));
        odd[i] = _mm512_dpbusd_epi32(odd[i], hi[s], _mm512_set1_epi32(load4(xs + 4)));
      }
    for (int i = 0; i < R; ++i) {
      const int64_t at = (r0 + i) * groups + g;
      const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(even[i], odd[i]));
      sums[i] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(xq.scale[at])), dot, sums[i]);
      sums[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xq.sum[at]), sums[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(acc + i * kRows, sums[i]);
}

// Rows [row_begin, row_end) in tiles of 4, the rest in one tile of 1-3: tile(rows, r0, acc) runs
// an R-row tile (rows: std::integral_constant<int, R>, so its loops unroll for that R).
template <typename Tile>
inline void for_row_tiles(int64_t row_begin, int64_t row_end, float* acc, const Tile& tile) {
  int64_t r = row_begin;
  for (; r + 4 <= row_end; r += 4) tile(std::integral_constant<int, 4>(), r, acc + (r - row_begin) * kRows);
  switch (row_end - r) {
    case 3: tile(std::integral_constant<int, 3>(), r, acc + (r - row_begin) * kRows); break;
    case 2: tile(std::integral_constant<int, 2>(), r, acc + (r - row_begin) * kRows); break;
    case 1: tile(std::integral_constant<int, 1>(), r, acc + (r - row_begin) * kRows); break;
    default: break;
  }
}

// for_row_tiles over Tiles::run<R>, a kernel's R-row tile.
template <typename Tiles>
void in_tiles(const uint8_t* block, const QuantizedRows& xq, int64_t row_begin, int64_t row_end, int64_t k,
              float* acc) {
  for_row_tiles(row_begin, row_end, acc, [&](auto rows, int64_t r0, float* out) {
    Tiles::template run<decltype(rows)::value>(block, xq, r0, k, out);
  });
}

struct VnniTiles {
  template <int R>
  static void run(const uint8_t* block, const QuantizedRows& xq, int64_t r0, int64_t k, float* acc) {
    tile_vnni<R>(block, xq, r0, k, acc);
  }
};
#endif

int64_t best_path() {
#if defined(SEMLINE_Q4_VNNI)
  return kVnni;
#elif defined(SEMLINE_Q4_AVX2)
  return kAvx2;
#else
  return kScalar;
#endif
}

// A kernel's pass over one 16-row block: activation rows [row_begin, row_end) into acc.
using BlockFn = void (*)(const uint8_t* block, const QuantizedRows& xq, int64_t row_begin, int64_t row_end,
                         int64_t k, float* acc);

// Weight blocks [begin, end) of one product: at most 64 activation rows per pass, then
// per-row scales (int8) and the bias, rounded as the Python layers round them.
template <typename scalar_t>
void blocks_range(BlockFn pass, const uint8_t* weights, int64_t record, const QuantizedRows& xq, int64_t rows,
                  int64_t k, int64_t n, const float* row_scales, const scalar_t* b, scalar_t* y, int64_t begin,
                  int64_t end) {
  const int64_t groups = k / kGroup;
  float acc[64 * kRows];
  for (int64_t blk = begin; blk < end; ++blk) {
    const int64_t cols = std::min(kRows, n - blk * kRows);
    for (int64_t r0 = 0; r0 < rows; r0 += 64) {
      const int64_t r1 = std::min(rows, r0 + 64);
      pass(weights + blk * groups * record, xq, r0, r1, k, acc);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < cols; ++j) {
          float v = acc[(r - r0) * kRows + j];
          if (row_scales != nullptr) v *= row_scales[blk * kRows + j];
          if (b != nullptr) v = static_cast<float>(static_cast<scalar_t>(v)) + static_cast<float>(b[blk * kRows + j]);
          y[r * n + blk * kRows + j] = static_cast<scalar_t>(v);
        }
    }
  }
}

// Whether `packed` is a pack's [blocks, groups, record] bytes (kSixK's: whole super-blocks),
// and one for K inputs and N outputs.
bool packed_layout(const torch::Tensor& packed, int64_t record) {
  return packed.dim() == 3 && packed.size(2) == record && packed.element_size() == 1 && packed.is_contiguous() &&
         (record != kRecord6K || packed.size(1) % 8 == 0);
}
bool packed_shape(const torch::Tensor& packed, int64_t k, int64_t n) {
  return packed.size(1) * kGroup == k && (n + kRows - 1) / kRows == packed.size(0);
}
bool bias_fits(const c10::optional<torch::Tensor>& bias, at::ScalarType dtype, int64_t n) {
  return !bias.has_value() || (bias->scalar_type() == dtype && bias->numel() == n && bias->is_contiguous());
}

// What q4_linear and q8_linear check: x against the packed weights and bias.
void check_product(const char* name, const torch::Tensor& x, const torch::Tensor& packed, int64_t record, int64_t n,
                   const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x: [M, K] with unit stride over K");
  TORCH_CHECK(packed_layout(packed, record), name, ": the packed weights are not its pack's [blocks, groups, ",
              record, "] bytes");
  TORCH_CHECK(packed_shape(packed, x.size(1), n), "x and weights disagree");
  TORCH_CHECK(bias_fits(bias, x.scalar_type(), n), "bias: [N] in x's dtype");
}

}  // namespace

// Prefill chunks' products through bfloat16 weights (the last section of this file).
bool unpacks(const torch::Tensor& x, int64_t path);
torch::Tensor unpacked_linear(const torch::Tensor& x, bool q8, const torch::Tensor& packed, int64_t n,
                              const float* row_scales, const c10::optional<torch::Tensor>& bias);

namespace {

// What q4_linear and q8_linear share: the checks, the activations quantized once, the weight
// blocks split over the threads (each thread's blocks stream from memory in one run); from the
// unpacking threshold's rows up on the best path, the unpacked bfloat16 product instead.
// kernels[path]: the pass for each path (scalar, AVX2, VNNI).
torch::Tensor run_blocks(const char* name, const torch::Tensor& x, const torch::Tensor& packed, int64_t record,
                         int64_t n, const float* row_scales, const c10::optional<torch::Tensor>& bias,
                         int64_t path, const BlockFn* kernels) {
  check_product(name, x, packed, record, n, bias);
  if (unpacks(x, path)) return unpacked_linear(x, packed.scalar_type() == at::kChar, packed, n, row_scales, bias);
  const int64_t rows = x.size(0), k = x.size(1), blocks = packed.size(0);
  if (path == kBest) path = best_path();
  TORCH_CHECK(path >= kScalar && path <= best_path(), "path ", path, " is not compiled for this CPU");
  RECORD_FUNCTION(name, std::vector<c10::IValue>({x}));
  auto out = torch::empty({rows, n}, x.options());
  if (rows == 0) return out;
  const BlockFn pass = kernels[path];
  const uint8_t* weights = static_cast<const uint8_t*>(packed.data_ptr());
  SEMLINE_DISPATCH(x.scalar_type(), "semline quantized linear", [&] {
    const QuantizedRows xq = quantize_rows<scalar_t>(x.data_ptr<scalar_t>(), rows, k, x.stride(0));
    scalar_t* y = out.data_ptr<scalar_t>();
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      blocks_range<scalar_t>(pass, weights, record, xq, rows, k, n, row_scales, b, y, begin, end);
    });
  });
  return out;
}

}  // namespace

std::vector<std::string> q4_paths() {
  std::vector<std::string> paths{"scalar"};
#ifdef SEMLINE_Q4_AVX2
  paths.push_back("avx2");
#endif
#ifdef SEMLINE_Q4_VNNI
  paths.push_back("avx512_vnni");
#endif
  return paths;
}

torch::Tensor q4_pack(torch::Tensor q, torch::Tensor scales, torch::Tensor mins) {
  TORCH_CHECK(q.dim() == 2 && q.size(1) % kGroup == 0, "q: [N, K] with K a multiple of 32");
  const int64_t n = q.size(0), k = q.size(1), groups = k / kGroup, blocks = (n + kRows - 1) / kRows;
  TORCH_CHECK(scales.sizes() == mins.sizes() && scales.size(0) == n && scales.size(1) == groups,
              "scales and minimums: [N, K / 32]");
  auto qi = q.to(at::kInt).contiguous();
  auto d = scales.to(at::kHalf).contiguous();
  auto m = mins.to(at::kHalf).contiguous();
  TORCH_CHECK(qi.min().item<int32_t>() >= 0 && qi.max().item<int32_t>() <= 15, "q must lie in 0..15");
  auto packed = torch::zeros({blocks, groups, kRecord}, torch::dtype(at::kByte));
  uint8_t* out = packed.data_ptr<uint8_t>();
  const int32_t* qs = qi.data_ptr<int32_t>();
  const uint16_t* ds = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* ms = reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* rec = out + (b * groups + g) * kRecord;
        uint16_t* rd = reinterpret_cast<uint16_t*>(rec + kNibbles);
        for (int64_t j = 0; j < kRows && b * kRows + j < n; ++j) {
          const int64_t row = b * kRows + j;
          const int32_t* w = qs + row * k + g * kGroup;
          for (int64_t s = 0; s < 4; ++s)
            for (int64_t i = 0; i < 4; ++i)
              rec[s * 64 + j * 4 + i] = static_cast<uint8_t>(w[8 * s + i] | (w[8 * s + 4 + i] << 4));
          rd[j] = ds[row * groups + g];
          rd[kRows + j] = ms[row * groups + g];
        }
      }
  });
  return packed;
}

namespace {

const BlockFn* q4_kernels() {
  static const BlockFn kernels[] = {
      block_scalar,
#ifdef SEMLINE_Q4_AVX2
      block_avx2,
#else
      block_scalar,
#endif
#ifdef SEMLINE_Q4_VNNI
      in_tiles<VnniTiles>,
#else
      block_scalar,
#endif
  };
  return kernels;
}

}  // namespace

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                        const c10::optional<torch::Tensor>& bias, int64_t path) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "packed: q4_pack's bytes");
  return run_blocks("semline::q4_linear", x, packed, kRecord, n, nullptr, bias, path, q4_kernels());
}

// --- 8-bit weights times the same int8 activations -----------------------------------------
//
// Packed like the 4-bit layout, one byte a weight: per (16-row block, group of 32) 512 bytes,
// step s (0..7) holding per row its weights k0 .. k0+3, k0 = 32 g + 4 s. Four record formats,
// told apart by the record's size:
//   512 (kPerRow): one float scale per output row, a float tensor beside the pack (int8 at load);
//   544 (kGroupScale): then 16 float16 scales d, one per row for the group (GGUF Q8_0, Q5_0);
//   576 (kHalfScales): then 16 float16 scales for inputs 0-15 and 16 for inputs 16-31 (Q6_K);
//   608 (kHalvesMin): those and 16 float16 minimums m per row and group, w = q * d + m
//        (Q5_1, Q5_K, and a layer whose parts mix them).
// The group formats take a row scale of 1 (the kernels multiply by what they are given).
// VNNI multiplies unsigned by signed bytes, so the weights go in offset by 128 (w + 128 =
// w ^ 0x80, once per record for every activation row) and 128 * the activations' integer sum
// per half group (quantize_rows' isum) comes off, as the 5- and 6-bit records' offsets do;
// AVX2 takes |w| and moves w's sign onto the activation (vpsignb), as llama.cpp does, so no
// pair sum saturates.

namespace {

constexpr int64_t kRecord8 = 512;
enum Format8 : int {
  kPerRow = 0, kGroupScale = 1, kHalfScales = 2, kHalvesMin = 3, kSix = 4, kSixMin = 5, kFive = 6, kFiveMin = 7,
  kSixK = 8
};
// kSix (448 bytes): 6-bit weights u = q + 32 (q in -32..31, GGUF Q6_K's; Q5_0's q - 16 too) with
// the half-group scales: 256 bytes of low nibbles (byte b: u's low 4 bits of 8-bit record byte
// b, and of byte b + 256 in its high nibble), 128 bytes of high bits (byte b: bits 4-5 of
// record bytes b, b + 128, b + 256, b + 384 at bits 0-1, 2-3, 4-5, 6-7), then the 64 bytes of
// float16 scales; 7 bits a weight instead of 9. u is the unsigned operand itself (vpdpbusd,
// vpmaddubsw); 32 * the activations' integer sum per half comes off. kSixMin (480 bytes): the
// same and 16 float16 minimums per row and group (Q5_1, Q5_K centred; mixed 4- and 6-bit parts).
// kFive (352 bytes): 5-bit weights u = q + 16 (q in -16..15: GGUF Q5_0's q - 16, and the centred
// Q4_0/Q4_1/Q4_K/Q5_1/Q5_K) with one scale per group: the 256 bytes of low nibbles as kSix's, 64
// bytes of high bits (byte b: bit 4 of record bytes b, b + 64, ..., b + 448 at bits 0..7), then
// 16 float16 scales; 5.5 bits a weight, as the file's Q5_0 (6-bit records took 7). 16 * the
// activations' integer sum per group comes off. kFiveMin (384 bytes): then 16 float16 minimums
// per row and group (Q5_1, Q5_K; Q4 parts mixed in).
// kSixK (420 bytes a group on average: a layer of Q6_K parts only, K a multiple of 256): the
// file's own scales. A 16-row block is its super-blocks (8 groups: a Q6_K block's 256 inputs)
// of 3,360 bytes each: the 16 rows' float16 d, then per group kSix's 384 bytes of weights and
// 32 int8 sub-scales (16 rows for inputs 0-15, then 16 for 16-31). The half group's scale is
// d * sub, exactly the file's; 6.56 bits a weight, the file's, where kSix's float16 scales
// took 7. In the order the kernels read it: the d and sub-scales kept apart from the weights
// (each group's weights 64-byte aligned) ran 12-17 % slower here.
constexpr int64_t kRecord6 = 448, kRecord5 = 352, kSuper6K = 8 * kRecord6K;
constexpr int64_t record8_bytes(int format) {
  return format == kSix      ? kRecord6
         : format == kSixMin ? kRecord6 + 32
         : format == kFive   ? kRecord5
         : format == kFiveMin ? kRecord5 + 32
         : format == kSixK   ? kRecord6K
                              : kRecord8 + 32 * format;
}

int format8_of(int64_t record) {
  for (int f = kPerRow; f <= kSixK; ++f)
    if (record == record8_bytes(f)) return f;
  return -1;
}

// The 8-bit record's step s (64 bytes: 16 rows x 4 weights) of a 6-bit record, as unsigned u.
inline uint8_t six_at(const uint8_t* rec, int64_t byte) {
  const uint8_t low = byte < 256 ? rec[byte] & 0xF : rec[byte - 256] >> 4;
  const uint8_t high = (rec[256 + byte % 128] >> (2 * (byte / 128))) & 3;
  return low | (high << 4);
}

// ... of a 5-bit record.
inline uint8_t five_at(const uint8_t* rec, int64_t byte) {
  const uint8_t low = byte < 256 ? rec[byte] & 0xF : rec[byte - 256] >> 4;
  const uint8_t high = (rec[256 + byte % 64] >> (byte / 64)) & 1;
  return low | (high << 4);
}

// The 5- and 6-bit records (kFive, kSix, kSixK with kSuper): where their fields lie. u = q +
// offset; the scales follow the weights: 5-bit a float16 scale per group (then the minimum),
// 6-bit a float16 scale per half group, two (then the minimum), or with kSuper two int8
// sub-scales times the super-block's float16 d.
template <int Bits, bool kMin = false, bool kSuper = false>
struct Narrow {
  static_assert(Bits == 5 || Bits == 6, "5- or 6-bit records");
  static_assert(!kSuper || (Bits == 6 && !kMin), "super-block scales: 6-bit records without minimums");
  static constexpr int64_t kWeightBytes = Bits == 5 ? 320 : 384;
  static constexpr int64_t kMinAt = kWeightBytes + (Bits == 5 ? 32 : 64);
  static constexpr int32_t kOffset = Bits == 5 ? 16 : 32;
  static constexpr int64_t kRecord = kSuper ? kRecord6K : (Bits == 5 ? kRecord5 : kRecord6) + (kMin ? 32 : 0);
  static uint8_t at(const uint8_t* rec, int64_t byte) { return Bits == 5 ? five_at(rec, byte) : six_at(rec, byte); }
  // Group g's record (its weights, then its scales and minimum) in a block's bytes; kSuper:
  // its weights only.
  static const uint8_t* record(const uint8_t* block, int64_t g) {
    return kSuper ? block + (g / 8) * kSuper6K + 32 + (g % 8) * (384 + 32) : block + g * kRecord;
  }
  // Group g's scales: float16 (two for 6-bit: inputs 0-15, 16-31), kSuper's int8 sub-scales.
  static const uint8_t* scales(const uint8_t* block, int64_t g) { return record(block, g) + kWeightBytes; }
  // kSuper: the 16 float16 d of group g's super-block.
  static const uint8_t* super(const uint8_t* block, int64_t g) { return block + (g / 8) * kSuper6K; }
  // Row j's scale for half h (6-bit) of group g, in float32.
  static float half_scale(const uint8_t* block, int64_t g, int64_t h, int64_t j) {
    if constexpr (kSuper) {
      const uint16_t* d = reinterpret_cast<const uint16_t*>(super(block, g));
      return half_to_float(d[j]) * static_cast<float>(reinterpret_cast<const int8_t*>(scales(block, g))[h * kRows + j]);
    } else {
      return half_to_float(reinterpret_cast<const uint16_t*>(scales(block, g))[h * kRows + j]);
    }
  }
};

template <int Bits, bool kMin, bool kSuper = false>
void block_narrow_scalar(const uint8_t* bytes, const QuantizedRows& xq, int64_t row_begin, int64_t row_end, int64_t k,
                         float* acc) {
  using N = Narrow<Bits, kMin, kSuper>;
  const int64_t groups = k / kGroup;
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* out = acc + (r - row_begin) * kRows;
    for (int64_t j = 0; j < kRows; ++j) out[j] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* rec = N::record(bytes, g);
      const uint16_t* m = reinterpret_cast<const uint16_t*>(rec + N::kMinAt);
      const int8_t* xs = xq.q.data() + r * k + g * kGroup;
      const int64_t at = r * groups + g;
      for (int64_t j = 0; j < kRows; ++j) {
        int32_t dot[2] = {-N::kOffset * xq.isum[2 * at], -N::kOffset * xq.isum[2 * at + 1]};  // inputs 0-15, 16-31
        for (int64_t s = 0; s < 8; ++s)
          for (int64_t b = 0; b < 4; ++b) dot[s / 4] += static_cast<int32_t>(N::at(rec, s * 64 + j * 4 + b)) * xs[4 * s + b];
        if constexpr (Bits == 5) {
          out[j] += xq.scale[at] * (N::half_scale(bytes, g, 0, j) * static_cast<float>(dot[0] + dot[1]));
        } else {
          out[j] += xq.scale[at] * (N::half_scale(bytes, g, 0, j) * static_cast<float>(dot[0]) +
                                    N::half_scale(bytes, g, 1, j) * static_cast<float>(dot[1]));
        }
        if constexpr (kMin) out[j] += half_to_float(m[j]) * xq.sum[at];
      }
    }
  }
}

template <int F>
void block8_scalar(const uint8_t* bytes, const QuantizedRows& xq, int64_t row_begin, int64_t row_end, int64_t k,
                   float* acc) {
  constexpr int64_t record = record8_bytes(F);
  const int64_t groups = k / kGroup;
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* out = acc + (r - row_begin) * kRows;
    for (int64_t j = 0; j < kRows; ++j) out[j] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const int8_t* rec = reinterpret_cast<const int8_t*>(bytes + g * record);
      const uint16_t* d = reinterpret_cast<const uint16_t*>(bytes + g * record + kRecord8);
      const int8_t* xs = xq.q.data() + r * k + g * kGroup;
      const float scale = xq.scale[r * groups + g];
      for (int64_t j = 0; j < kRows; ++j) {
        int32_t dot[2] = {0, 0};  // inputs 0-15, 16-31
        for (int64_t s = 0; s < 8; ++s)
          for (int64_t b = 0; b < 4; ++b) dot[s / 4] += static_cast<int32_t>(rec[s * 64 + j * 4 + b]) * xs[4 * s + b];
        if constexpr (F == kPerRow) {
          out[j] += scale * static_cast<float>(dot[0] + dot[1]);
        } else if constexpr (F == kGroupScale) {
          out[j] += half_to_float(d[j]) * scale * static_cast<float>(dot[0] + dot[1]);
        } else {
          out[j] += scale * (half_to_float(d[j]) * static_cast<float>(dot[0]) +
                             half_to_float(d[kRows + j]) * static_cast<float>(dot[1]));
          if constexpr (F == kHalvesMin) out[j] += half_to_float(d[2 * kRows + j]) * xq.sum[r * groups + g];
        }
      }
    }
  }
}

#ifdef SEMLINE_Q4_AVX2
template <int F>
void block8_avx2(const uint8_t* bytes, const QuantizedRows& xq, int64_t row_begin, int64_t row_end, int64_t k,
                 float* acc) {
  constexpr int64_t record = record8_bytes(F);
  const int64_t groups = k / kGroup;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r = row_begin; r < row_end; ++r) {
    __m256 sums[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* base = bytes + g * record;
      prefetch_ahead(base, record);
      const int8_t* rec = reinterpret_cast<const int8_t*>(base);
      const int8_t* xs = xq.q.data() + r * k + g * kGroup;
      const __m256 scale = _mm256_set1_ps(xq.scale[r * groups + g]);
      for (int64_t h = 0; h < 2; ++h) {
        __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t s = 0; s < 8; ++s) {
          const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + s * 64 + h * 32));
          const __m256i x = _mm256_set1_epi32(load4(xs + 4 * s));
          const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
          dot[s / 4] = _mm256_add_epi32(dot[s / 4], _mm256_madd_epi16(pairs, ones));
        }
        auto scales_at = [&](int64_t i) {
          return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + kRecord8 + i * 32 + h * 16)));
        };
        if constexpr (F == kPerRow) {
          sums[h] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(_mm256_add_epi32(dot[0], dot[1])), sums[h]);
        } else if constexpr (F == kGroupScale) {
          sums[h] = _mm256_fmadd_ps(_mm256_mul_ps(scales_at(0), scale),
                                    _mm256_cvtepi32_ps(_mm256_add_epi32(dot[0], dot[1])), sums[h]);
        } else {
          const __m256 halves = _mm256_fmadd_ps(scales_at(1), _mm256_cvtepi32_ps(dot[1]),
                                                _mm256_mul_ps(scales_at(0), _mm256_cvtepi32_ps(dot[0])));
          sums[h] = _mm256_fmadd_ps(scale, halves, sums[h]);
          if constexpr (F == kHalvesMin)
            sums[h] = _mm256_fmadd_ps(scales_at(2), _mm256_set1_ps(xq.sum[r * groups + g]), sums[h]);
        }
      }
    }
    _mm256_storeu_ps(acc + (r - row_begin) * kRows, sums[0]);
    _mm256_storeu_ps(acc + (r - row_begin) * kRows + 8, sums[1]);
  }
}
#endif

#ifdef SEMLINE_Q4_AVX2
// A 6-bit record's 8 steps of 32 bytes (rows 8h .. 8h + 7) as unsigned u.
inline void six_steps_avx2(const uint8_t* rec, int64_t h, __m256i* w) {
  const __m256i low = _mm256_set1_epi8(0x0F), two = _mm256_set1_epi8(0x03);
  for (int64_t s = 0; s < 8; ++s) {
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + (s % 4) * 64 + h * 32));
    const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 256 + (s % 2) * 64 + h * 32));
    const __m256i lo = s < 4 ? _mm256_and_si256(l, low) : _mm256_and_si256(_mm256_srli_epi16(l, 4), low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, static_cast<int>(2 * (s / 2))), two);
    w[s] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
  }
}

// ... of a 5-bit record.
inline void five_steps_avx2(const uint8_t* rec, int64_t h, __m256i* w) {
  const __m256i low = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(0x01);
  const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 256 + h * 32));
  for (int64_t s = 0; s < 8; ++s) {
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + (s % 4) * 64 + h * 32));
    const __m256i lo = s < 4 ? _mm256_and_si256(l, low) : _mm256_and_si256(_mm256_srli_epi16(l, 4), low);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(hb, static_cast<int>(s)), one);
    w[s] = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
  }
}

template <int Bits, bool kMin, bool kSuper = false>
void block_narrow_avx2(const uint8_t* bytes, const QuantizedRows& xq, int64_t row_begin, int64_t row_end, int64_t k,
                       float* acc) {
  using N = Narrow<Bits, kMin, kSuper>;
  const int64_t groups = k / kGroup;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t r = row_begin; r < row_end; ++r) {
    __m256 sums[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* rec = N::record(bytes, g);
      prefetch_ahead(rec, N::kRecord);
      const int8_t* xs = xq.q.data() + r * k + g * kGroup;
      const int64_t at = r * groups + g;
      for (int64_t h = 0; h < 2; ++h) {
        __m256i w[8];
        if constexpr (Bits == 5) {
          five_steps_avx2(rec, h, w);
        } else {
          six_steps_avx2(rec, h, w);
        }
        __m256i dot[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t s = 0; s < 8; ++s) {  // pairs of u * x: at most 2 * 63 * 127, an int16
          const __m256i pairs = _mm256_maddubs_epi16(w[s], _mm256_set1_epi32(load4(xs + 4 * s)));
          dot[s / 4] = _mm256_add_epi32(dot[s / 4], _mm256_madd_epi16(pairs, ones));
        }
        auto field = [&](int64_t at_byte) {
          return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec + at_byte + h * 16)));
        };
        const __m256i a = _mm256_sub_epi32(dot[0], _mm256_set1_epi32(N::kOffset * xq.isum[2 * at]));
        const __m256i b = _mm256_sub_epi32(dot[1], _mm256_set1_epi32(N::kOffset * xq.isum[2 * at + 1]));
        __m256 part;
        if constexpr (Bits == 5) {
          part = _mm256_mul_ps(field(N::kWeightBytes), _mm256_cvtepi32_ps(_mm256_add_epi32(a, b)));
        } else if constexpr (kSuper) {  // d * the int8 sub-scales of rows 8h .. 8h + 7
          const __m256 d =
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(N::super(bytes, g) + h * 16)));
          auto sub = [&](int64_t half) {
            const __m128i s8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(N::scales(bytes, g) + half * 16 + h * 8));
            return _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8)));
          };
          part = _mm256_fmadd_ps(sub(1), _mm256_cvtepi32_ps(b), _mm256_mul_ps(sub(0), _mm256_cvtepi32_ps(a)));
        } else {
          part = _mm256_fmadd_ps(field(N::kWeightBytes + 32), _mm256_cvtepi32_ps(b),
                                 _mm256_mul_ps(field(N::kWeightBytes), _mm256_cvtepi32_ps(a)));
        }
        sums[h] = _mm256_fmadd_ps(_mm256_set1_ps(xq.scale[at]), part, sums[h]);
        if constexpr (kMin) sums[h] = _mm256_fmadd_ps(field(N::kMinAt), _mm256_set1_ps(xq.sum[at]), sums[h]);
      }
    }
    _mm256_storeu_ps(acc + (r - row_begin) * kRows, sums[0]);
    _mm256_storeu_ps(acc + (r - row_begin) * kRows + 8, sums[1]);
  }
}
#endif

#ifdef SEMLINE_Q4_VNNI
// (a & 0x0F) | high per byte, `high` already masked to bits 4-5: one vpternlogd.
inline __m512i nibble_or(__m512i a, __m512i high) {
  return _mm512_ternarylogic_epi32(a, high, _mm512_set1_epi8(0x0F), 0xEC);  // (A & C) | B
}

// A 6-bit record's 8 steps (64 bytes: 16 rows x 4 weights each) as unsigned u: each a byte's
// nibble and its two high bits, shifted (16-bit lanes: no bit that matters crosses a byte) to
// bits 4-5.
inline void six_steps_vnni(const uint8_t* rec, __m512i* w) {
  const __m512i pair = _mm512_set1_epi8(0x30);
  const __m512i h0 = _mm512_loadu_si512(rec + 256), h1 = _mm512_loadu_si512(rec + 320);
  for (int s = 0; s < 4; ++s) {
    const __m512i l = _mm512_loadu_si512(rec + s * 64);
    const __m512i hb = (s % 2) ? h1 : h0;  // steps s and s + 4 share bytes b % 128: bits 2 (s / 2), 2 (s / 2) + 4
    const __m512i a = s < 2 ? _mm512_slli_epi16(hb, 4) : _mm512_slli_epi16(hb, 2);
    const __m512i b = s < 2 ? hb : _mm512_srli_epi16(hb, 2);
    w[s] = nibble_or(l, _mm512_and_si512(a, pair));
    w[s + 4] = nibble_or(_mm512_srli_epi16(l, 4), _mm512_and_si512(b, pair));
  }
}

// A 5-bit record's 8 steps (64 bytes: 16 rows x 4 weights each) as unsigned u (bit s and
// s + 4 of the high byte to bit 4).
inline void five_steps_vnni(const uint8_t* rec, __m512i* w) {
  const __m512i bit = _mm512_set1_epi8(0x10);
  const __m512i hb = _mm512_loadu_si512(rec + 256);
  for (int s = 0; s < 4; ++s) {
    const __m512i l = _mm512_loadu_si512(rec + s * 64);
    w[s] = nibble_or(l, _mm512_and_si512(_mm512_slli_epi16(hb, 4 - s), bit));
    w[s + 4] = nibble_or(_mm512_srli_epi16(l, 4), _mm512_and_si512(_mm512_srli_epi16(hb, s), bit));
  }
}

// unpacked: the block's records already as u (512 bytes a group, in_tiles_narrow's buffer), or
// null to unpack each record here. 5-bit records have a scale per group: the two chains
// (inputs 0-15 and 16-31, shorter dependency chains) add up before it.
template <int Bits, bool kMin, bool kSuper, int R>
inline void tile_narrow_vnni(const uint8_t* bytes, const uint8_t* unpacked, const QuantizedRows& xq, int64_t r0,
                             int64_t k, float* acc) {
  using N = Narrow<Bits, kMin, kSuper>;
  const int64_t groups = k / kGroup;
  __m512 sums[R];
  for (int i = 0; i < R; ++i) sums[i] = _mm512_setzero_ps();
  __m512 d_super = _mm512_setzero_ps();  // kSuper: the super-block's d of the 16 rows
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* rec = N::record(bytes, g);
    prefetch_ahead(rec, N::kRecord);
    __m512i w[8];
    if (unpacked != nullptr) {
      for (int s = 0; s < 8; ++s) w[s] = _mm512_loadu_si512(unpacked + g * kRecord8 + s * 64);
    } else if constexpr (Bits == 5) {
      five_steps_vnni(rec, w);
    } else {
      six_steps_vnni(rec, w);
    }
    auto field = [&](int64_t at_byte) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + at_byte)));
    };
    __m512i lo[R], hi[R];
    for (int i = 0; i < R; ++i) {
      const int64_t at = (r0 + i) * groups + g;
      lo[i] = _mm512_set1_epi32(-N::kOffset * xq.isum[2 * at]);
      hi[i] = _mm512_set1_epi32(-N::kOffset * xq.isum[2 * at + 1]);
    }
    for (int s = 0; s < 4; ++s)
      for (int i = 0; i < R; ++i) {
        const int8_t* xs = xq.q.data() + (r0 + i) * k + g * kGroup + 4 * s;
        lo[i] = _mm512_dpbusd_epi32(lo[i], w[s], _mm512_set1_epi32(load4(xs)));
        hi[i] = _mm512_dpbusd_epi32(hi[i], w[s + 4], _mm512_set1_epi32(load4(xs + 16)));
      }
    __m512 da, db;
    if constexpr (kSuper) {
      if (g % 8 == 0)
        d_super = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(N::super(bytes, g))));
      auto sub = [&](int64_t half) {
        const __m128i s8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(N::scales(bytes, g) + half * 16));
        return _mm512_mul_ps(d_super, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(s8)));
      };
      da = sub(0);
      db = sub(1);
    } else {
      da = field(N::kWeightBytes);
      db = Bits == 5 ? da : field(N::kWeightBytes + 32);
    }
    for (int i = 0; i < R; ++i) {
      const int64_t at = (r0 + i) * groups + g;
      __m512 part;
      if constexpr (Bits == 5) {
        part = _mm512_mul_ps(da, _mm512_cvtepi32_ps(_mm512_add_epi32(lo[i], hi[i])));
      } else {
        part = _mm512_fmadd_ps(db, _mm512_cvtepi32_ps(hi[i]), _mm512_mul_ps(da, _mm512_cvtepi32_ps(lo[i])));
      }
      sums[i] = _mm512_fmadd_ps(_mm512_set1_ps(xq.scale[at]), part, sums[i]);
      if constexpr (kMin) sums[i] = _mm512_fmadd_ps(field(N::kMinAt), _mm512_set1_ps(xq.sum[at]), sums[i]);
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(acc + i * kRows, sums[i]);
}

// Rows [row_begin, row_end) against one block of 5- or 6-bit records in tiles of up to 4 rows
// (as in_tiles). For a prefill chunk's pass (more than 32 rows) the block's records are
// unpacked once into a per-thread buffer that every tile reads (the unpacking is ~40 % of a
// tile's work otherwise: 1B Q6_K prefill +10-15 %); decode batches unpack per tile (buffering
// them made batch 8 slower here). The products are the same either way, bit for bit.
template <int Bits, bool kMin, bool kSuper = false>
void in_tiles_narrow(const uint8_t* block, const QuantizedRows& xq, int64_t row_begin, int64_t row_end, int64_t k,
                     float* acc) {
  using N = Narrow<Bits, kMin, kSuper>;
  const int64_t groups = k / kGroup;
  const uint8_t* unpacked = nullptr;
  if (row_end - row_begin > 32) {
    thread_local std::vector<uint8_t> buffer;
    buffer.resize(groups * kRecord8);
    __m512i w[8];
    for (int64_t g = 0; g < groups; ++g) {
      if constexpr (Bits == 5) {
        five_steps_vnni(N::record(block, g), w);
      } else {
        six_steps_vnni(N::record(block, g), w);
      }
      for (int s = 0; s < 8; ++s) _mm512_storeu_si512(buffer.data() + g * kRecord8 + s * 64, w[s]);
    }
    unpacked = buffer.data();
  }
  for_row_tiles(row_begin, row_end, acc, [&](auto rows, int64_t r0, float* out) {
    tile_narrow_vnni<Bits, kMin, kSuper, decltype(rows)::value>(block, unpacked, xq, r0, k, out);
  });
}

template <int F, int R>
inline void tile8_vnni(const uint8_t* bytes, const QuantizedRows& xq, int64_t r0, int64_t k, float* acc) {
  constexpr int64_t record = record8_bytes(F);
  const int64_t groups = k / kGroup;
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  __m512 sums[R];
  for (int i = 0; i < R; ++i) sums[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const uint8_t* base = bytes + g * record;
    prefetch_ahead(base, record);
    __m512i u[8];  // w + 128
    for (int s = 0; s < 8; ++s) u[s] = _mm512_xor_si512(_mm512_loadu_si512(base + s * 64), flip);
    // Two chains per row: inputs 0-15 (steps 0-3) and 16-31 (steps 4-7), each less 128 * its sum(x).
    __m512i lo[R], hi[R];
    for (int i = 0; i < R; ++i) {
      const int64_t at = (r0 + i) * groups + g;
      lo[i] = _mm512_set1_epi32(-128 * xq.isum[2 * at]);
      hi[i] = _mm512_set1_epi32(-128 * xq.isum[2 * at + 1]);
    }
    for (int s = 0; s < 4; ++s)
      for (int i = 0; i < R; ++i) {
        const int8_t* xs = xq.q.data() + (r0 + i) * k + g * kGroup + 4 * s;
        lo[i] = _mm512_dpbusd_epi32(lo[i], u[s], _mm512_set1_epi32(load4(xs)));
        hi[i] = _mm512_dpbusd_epi32(hi[i], u[s + 4], _mm512_set1_epi32(load4(xs + 16)));
      }
    auto scales_at = [&](int i) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + kRecord8 + i * 32)));
    };
    if constexpr (F == kPerRow || F == kGroupScale) {
      const __m512 d = F == kGroupScale ? scales_at(0) : _mm512_set1_ps(1.f);
      for (int i = 0; i < R; ++i) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo[i], hi[i]));
        sums[i] = _mm512_fmadd_ps(_mm512_mul_ps(d, _mm512_set1_ps(xq.scale[(r0 + i) * groups + g])), dot, sums[i]);
      }
    } else {
      const __m512 da = scales_at(0), db = scales_at(1);
      for (int i = 0; i < R; ++i) {
        const int64_t at = (r0 + i) * groups + g;
        const __m512 halves = _mm512_fmadd_ps(db, _mm512_cvtepi32_ps(hi[i]), _mm512_mul_ps(da, _mm512_cvtepi32_ps(lo[i])));
        sums[i] = _mm512_fmadd_ps(_mm512_set1_ps(xq.scale[at]), halves, sums[i]);
        if constexpr (F == kHalvesMin) sums[i] = _mm512_fmadd_ps(scales_at(2), _mm512_set1_ps(xq.sum[at]), sums[i]);
      }
    }
  }
  for (int i = 0; i < R; ++i) _mm512_storeu_ps(acc + i * kRows, sums[i]);
}

template <int F>
struct Vnni8Tiles {
  template <int R>
  static void run(const uint8_t* block, const QuantizedRows& xq, int64_t r0, int64_t k, float* acc) {
    tile8_vnni<F, R>(block, xq, r0, k, acc);
  }
};
#endif

}  // namespace

torch::Tensor q8_pack(torch::Tensor q, c10::optional<torch::Tensor> scales, c10::optional<torch::Tensor> mins) {
  TORCH_CHECK(q.dim() == 2 && q.size(1) % kGroup == 0 && q.scalar_type() == at::kChar,
              "q: int8 [N, K] with K a multiple of 32");
  const int64_t n = q.size(0), k = q.size(1), groups = k / kGroup, blocks = (n + kRows - 1) / kRows;
  int format = kPerRow;
  torch::Tensor d, m;
  if (scales.has_value()) {
    TORCH_CHECK(scales->dim() == 2 && scales->size(0) == n && (scales->size(1) == groups || scales->size(1) == 2 * groups),
                "scales: [N, K / 32] (one per group) or [N, K / 16] (one per half group)");
    d = scales->to(at::kHalf).reshape({n, groups, -1}).contiguous();
    format = d.size(2) == 2 ? kHalfScales : kGroupScale;
    if (mins.has_value()) {
      TORCH_CHECK(mins->dim() == 2 && mins->size(0) == n && mins->size(1) == groups, "minimums: [N, K / 32]");
      m = mins->to(at::kHalf).contiguous();
      if (format == kGroupScale) d = d.expand({n, groups, 2}).contiguous();
      format = kHalvesMin;
    }
  } else {
    TORCH_CHECK(!mins.has_value(), "minimums need group scales");
  }
  const int64_t record = record8_bytes(format), halves = format == kGroupScale ? 1 : 2;
  auto src = q.contiguous();
  auto packed = torch::zeros({blocks, groups, record}, torch::dtype(at::kChar));
  int8_t* out = packed.data_ptr<int8_t>();
  const int8_t* w = src.data_ptr<int8_t>();
  const uint16_t* ds = format == kPerRow ? nullptr : reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const uint16_t* ms = format == kHalvesMin ? reinterpret_cast<const uint16_t*>(m.data_ptr<at::Half>()) : nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t g = 0; g < groups; ++g) {
        int8_t* rec = out + (b * groups + g) * record;
        uint16_t* rd = reinterpret_cast<uint16_t*>(rec + kRecord8);
        for (int64_t j = 0; j < kRows && b * kRows + j < n; ++j) {
          const int64_t row = b * kRows + j;
          for (int64_t s = 0; s < 8; ++s) std::memcpy(rec + s * 64 + j * 4, w + row * k + g * kGroup + 4 * s, 4);
          for (int64_t h = 0; ds != nullptr && h < halves; ++h) rd[h * kRows + j] = ds[(row * groups + g) * halves + h];
          if (ms != nullptr) rd[2 * kRows + j] = ms[row * groups + g];
        }
      }
  });
  return packed;
}

namespace {

template <int F>
const BlockFn* q8_kernels_of() {
  static const BlockFn kernels[] = {
      block8_scalar<F>,
#ifdef SEMLINE_Q4_AVX2
      block8_avx2<F>,
#else
      block8_scalar<F>,
#endif
#ifdef SEMLINE_Q4_VNNI
      in_tiles<Vnni8Tiles<F>>,
#else
      block8_scalar<F>,
#endif
  };
  return kernels;
}

template <int Bits, bool kMin, bool kSuper = false>
const BlockFn* narrow_kernels() {
  static const BlockFn kernels[] = {
      block_narrow_scalar<Bits, kMin, kSuper>,
#ifdef SEMLINE_Q4_AVX2
      block_narrow_avx2<Bits, kMin, kSuper>,
#else
      block_narrow_scalar<Bits, kMin, kSuper>,
#endif
#ifdef SEMLINE_Q4_VNNI
      in_tiles_narrow<Bits, kMin, kSuper>,
#else
      block_narrow_scalar<Bits, kMin, kSuper>,
#endif
  };
  return kernels;
}

const BlockFn* q8_kernels(int64_t record) {
  switch (format8_of(record)) {
    case kFive: return narrow_kernels<5, false>();
    case kFiveMin: return narrow_kernels<5, true>();
    case kSix: return narrow_kernels<6, false>();
    case kSixMin: return narrow_kernels<6, true>();
    case kSixK: return narrow_kernels<6, false, true>();
    case kGroupScale: return q8_kernels_of<kGroupScale>();
    case kHalfScales: return q8_kernels_of<kHalfScales>();
    case kHalvesMin: return q8_kernels_of<kHalvesMin>();
    default: return q8_kernels_of<kPerRow>();
  }
}

}  // namespace

torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& bias, int64_t path) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 3 && format8_of(packed.size(2)) >= 0,
              "packed: q8_pack's bytes");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous(), "scales: float32 [N]");
  return run_blocks("semline::q8_linear", x, packed, packed.size(2), scales.numel(), scales.data_ptr<float>(), bias,
                    path, q8_kernels(packed.size(2)));
}

// --- DecodeStack's one parallel region ----------------------------------------------------

void quantize_activations(QuantizedRows& out, const torch::Tensor& x) {
  SEMLINE_DISPATCH(x.scalar_type(), "semline quantize_activations", [&] {
    quantize_rows_into<scalar_t>(out, x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.stride(0));
  });
}

bool team_linear_fits(const torch::Tensor& packed, bool q8, int64_t k, int64_t n,
                      const c10::optional<torch::Tensor>& bias, at::ScalarType dtype) {
  const bool layout = q8 ? packed.dim() == 3 && format8_of(packed.size(2)) >= 0 && packed_layout(packed, packed.size(2))
                         : packed_layout(packed, kRecord);
  return layout && packed_shape(packed, k, n) && bias_fits(bias, dtype, n);
}

void team_linear(const QuantizedRows& xq, bool q8, const torch::Tensor& packed, int64_t n, const float* row_scales,
                 const c10::optional<torch::Tensor>& bias, torch::Tensor& out) {
  const int64_t blocks = packed.size(0), rows = out.size(0), k = packed.size(1) * kGroup;
#ifdef _OPENMP
  const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
#else
  const int64_t t = 0, threads = 1;
#endif
  const int64_t begin = blocks * t / threads, end = blocks * (t + 1) / threads;
  const int64_t record = packed.size(2);
  const BlockFn pass = (q8 ? q8_kernels(record) : q4_kernels())[best_path()];
  const uint8_t* weights = static_cast<const uint8_t*>(packed.data_ptr());
  SEMLINE_DISPATCH(out.scalar_type(), "semline team_linear", [&] {
    const scalar_t* b = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    blocks_range<scalar_t>(pass, weights, record, xq, rows, k, n, row_scales, b,
                           out.data_ptr<scalar_t>(), begin, end);
  });
}

// --- Prefill: the records unpacked to bfloat16 for a matmul on AMX ---------------------------
//
// A prefill chunk's product (hundreds of activation rows) is compute-bound: the int8 tiles above
// run it at 0.34-0.43 TFLOP/s on a 2-core Xeon, where torch's bfloat16 matmul (oneDNN on the
// AMX tiles) runs the same 512 x 2048 x 8192 product at 1.4-1.5. So from `unpack_rows` rows up
// (0: never; engine/kernels/__init__.py sets it where the CPU has AMX), q4_linear and q8_linear
// unpack the layer's records to bfloat16 weights (each weight q * a + m in float32, rounded
// once) into a per-thread buffer and call at::mm. Decode steps (a few rows: bandwidth-bound)
// keep the packed kernels. The same unpacking reads rows of the weights in float32 for the
// embeddings that share a packed head (packed_rows).

namespace {

int64_t g_unpack_rows = 0;
// The most weights unpacked at once (64 MiB of bfloat16): a larger layer (an 8B model's fused
// gate and up projections, a head scoring every position) goes in slabs of rows.
int64_t g_unpack_slab = int64_t{1} << 25;

// One (block, group): the weights as int8 q in the 8-bit record's step layout (step s, 64
// bytes: 16 rows x inputs 4s .. 4s + 3) and per row w = q * a[half] + m.
struct GroupWeights {
  alignas(64) int8_t q[kRecord8];
  float a[2][kRows];
  float m[kRows];
};

// The q of one group, portably (the scalar kernels' accessors).
template <typename Q>
void steps_scalar(GroupWeights& gw, const Q& q_at) {
  for (int64_t byte = 0; byte < kRecord8; ++byte) gw.q[byte] = static_cast<int8_t>(q_at(byte));
}

// Record format R (-1: the 4-bit record; else a Format8) of block `bytes`, group g.
template <int R>
void group_weights(const uint8_t* bytes, int64_t g, GroupWeights& gw) {
  if constexpr (R == -1) {  // q in 0..15, d and m per row
    const uint8_t* rec = bytes + g * kRecord;
    const uint16_t* d = reinterpret_cast<const uint16_t*>(rec + kNibbles);
#ifdef SEMLINE_Q4_VNNI
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int s = 0; s < 4; ++s) {
      const __m512i v = _mm512_loadu_si512(rec + s * 64);
      _mm512_store_si512(gw.q + 128 * s, _mm512_and_si512(v, low));
      _mm512_store_si512(gw.q + 128 * s + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
#else
    steps_scalar(gw, [&](int64_t byte) {  // 8-bit step t: 4-bit step t / 2's low (even t) or high nibbles
      const int64_t t = byte / 64;
      const uint8_t v = rec[(t / 2) * 64 + byte % 64];
      return t % 2 ? v >> 4 : v & 0xF;
    });
#endif
    for (int64_t j = 0; j < kRows; ++j) {
      gw.a[0][j] = gw.a[1][j] = half_to_float(d[j]);
      gw.m[j] = half_to_float(d[kRows + j]);
    }
  } else if constexpr (R == kSix || R == kSixMin || R == kFive || R == kFiveMin || R == kSixK) {
    constexpr int Bits = R == kFive || R == kFiveMin ? 5 : 6;
    constexpr bool kMin = R == kSixMin || R == kFiveMin;
    using N = Narrow<Bits, kMin, R == kSixK>;
    const uint8_t* rec = N::record(bytes, g);
#ifdef SEMLINE_Q4_VNNI
    __m512i w[8];
    if constexpr (Bits == 5) {
      five_steps_vnni(rec, w);
    } else {
      six_steps_vnni(rec, w);
    }
    const __m512i offset = _mm512_set1_epi8(static_cast<char>(N::kOffset));
    for (int s = 0; s < 8; ++s) _mm512_store_si512(gw.q + 64 * s, _mm512_sub_epi8(w[s], offset));
#else
    steps_scalar(gw, [&](int64_t byte) { return static_cast<int32_t>(N::at(rec, byte)) - N::kOffset; });
#endif
    const uint16_t* m = reinterpret_cast<const uint16_t*>(rec + N::kMinAt);
    for (int64_t j = 0; j < kRows; ++j) {
      gw.a[0][j] = N::half_scale(bytes, g, 0, j);
      gw.a[1][j] = Bits == 5 ? gw.a[0][j] : N::half_scale(bytes, g, 1, j);
      gw.m[j] = kMin ? half_to_float(m[j]) : 0.f;
    }
  } else {  // the 8-bit records: q as stored, their fields after the 512 bytes
    const uint8_t* rec = bytes + g * record8_bytes(R);
    std::memcpy(gw.q, rec, kRecord8);
    const uint16_t* d = reinterpret_cast<const uint16_t*>(rec + kRecord8);
    for (int64_t j = 0; j < kRows; ++j) {
      gw.a[0][j] = R == kPerRow ? 1.f : half_to_float(d[j]);
      gw.a[1][j] = R == kPerRow || R == kGroupScale ? gw.a[0][j] : half_to_float(d[kRows + j]);
      gw.m[j] = R == kHalvesMin ? half_to_float(d[2 * kRows + j]) : 0.f;
    }
  }
}

// The group's q as 16 rows of 32 (row j's inputs in order), from the step layout (step s holds
// row j's inputs 4s .. 4s + 3 at bytes 64s + 4j): an 8 x 16 transpose of dwords.
inline void rows_major(const int8_t* steps, int8_t* rows) {
#ifdef SEMLINE_Q4_VNNI
  __m512i w[8], t[8], u[8];
  for (int s = 0; s < 8; ++s) w[s] = _mm512_load_si512(steps + 64 * s);
  for (int s = 0; s < 8; s += 2) {  // per 128-bit lane L (rows 4L .. 4L + 3): steps s, s + 1 of rows 4L, 4L + 1 | 4L + 2, 4L + 3
    t[s] = _mm512_unpacklo_epi32(w[s], w[s + 1]);
    t[s + 1] = _mm512_unpackhi_epi32(w[s], w[s + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // u[4h + i], lane L: row 4L + i, steps 4h .. 4h + 3
    u[4 * h + 0] = _mm512_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 1] = _mm512_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
    u[4 * h + 2] = _mm512_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
    u[4 * h + 3] = _mm512_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
  }
  const __m512i lanes01 = _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);  // rows i, 4 + i
  const __m512i lanes23 = _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);  // rows 8 + i, 12 + i
  for (int i = 0; i < 4; ++i) {
    const __m512i a = _mm512_permutex2var_epi64(u[i], lanes01, u[4 + i]);
    const __m512i b = _mm512_permutex2var_epi64(u[i], lanes23, u[4 + i]);
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows + 32 * i), _mm512_castsi512_si256(a));
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows + 32 * (4 + i)), _mm512_extracti64x4_epi64(a, 1));
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows + 32 * (8 + i)), _mm512_castsi512_si256(b));
    _mm256_store_si256(reinterpret_cast<__m256i*>(rows + 32 * (12 + i)), _mm512_extracti64x4_epi64(b, 1));
  }
#else
  for (int64_t j = 0; j < kRows; ++j)
    for (int64_t s = 0; s < 8; ++s) std::memcpy(rows + 32 * j + 4 * s, steps + 64 * s + 4 * j, 4);
#endif
}

// One row's 32 weights q[i] * (a[i / 16] * scale) + m * scale (a product, then a sum: as
// blocks_to_float and PyTorch compute them), into out as float32 or bfloat16 (rounded once).
template <typename Out>
inline void write_row(const int8_t* q, float a0, float a1, float m_, float scale, Out* out) {
  static_assert(std::is_same<Out, float>::value || std::is_same<Out, uint16_t>::value, "float32 or bfloat16 bits");
#ifdef SEMLINE_Q4_VNNI
  const __m512 m = _mm512_set1_ps(m_ * scale);
  const __m512 lo = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)))), _mm512_set1_ps(a0 * scale)), m);
  const __m512 hi = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)))), _mm512_set1_ps(a1 * scale)), m);
  if constexpr (std::is_same<Out, float>::value) {
    _mm512_storeu_ps(out, lo);
    _mm512_storeu_ps(out + 16, hi);
  } else {
#ifdef __AVX512BF16__
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
#else
    // Round to nearest even by hand (the weights are finite): bits + 0x7FFF + the kept lowest bit.
    auto round = [](__m512 v) {
      const __m512i bits = _mm512_castps_si512(v);
      const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      return _mm512_cvtepi32_epi16(_mm512_srli_epi32(
          _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16));
    };
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), round(lo));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), round(hi));
#endif
  }
#else
  for (int64_t i = 0; i < kGroup; ++i) {
    const float w = static_cast<float>(q[i]) * ((i < 16 ? a0 : a1) * scale) + m_ * scale;
    if constexpr (std::is_same<Out, float>::value) {
      out[i] = w;
    } else {
      out[i] = c10::BFloat16(w).x;  // round to nearest even
    }
  }
#endif
}

// Blocks [begin, end) of the weights in bfloat16: row r at out + r * K.
template <int R>
void unpack_blocks(const uint8_t* weights, int64_t record, int64_t groups, int64_t n, const float* row_scales,
                   uint16_t* out, int64_t begin, int64_t end) {
  const int64_t k = groups * kGroup;
  GroupWeights gw;
  alignas(64) int8_t rows[kRecord8];
  for (int64_t blk = begin; blk < end; ++blk) {
    const uint8_t* bytes = weights + blk * groups * record;
    const int64_t cols = std::min(kRows, n - blk * kRows);
    for (int64_t g = 0; g < groups; ++g) {
      group_weights<R>(bytes, g, gw);
      rows_major(gw.q, rows);
      for (int64_t j = 0; j < cols; ++j)
        write_row(rows + 32 * j, gw.a[0][j], gw.a[1][j], gw.m[j],
                  row_scales == nullptr ? 1.f : row_scales[blk * kRows + j], out + (blk * kRows + j) * k + g * kGroup);
    }
  }
}

// Rows ids[begin, end) of the weights, in float32.
template <int R>
void rows_of(const uint8_t* weights, int64_t record, int64_t groups, const int64_t* ids, const float* row_scales,
             float* out, int64_t begin, int64_t end) {
  const int64_t k = groups * kGroup;
  GroupWeights gw;
  int8_t row[kGroup];
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t* bytes = weights + (ids[i] / kRows) * groups * record;
    const int64_t j = ids[i] % kRows;
    for (int64_t g = 0; g < groups; ++g) {
      group_weights<R>(bytes, g, gw);
      for (int64_t s = 0; s < 8; ++s) std::memcpy(row + 4 * s, gw.q + 64 * s + 4 * j, 4);
      write_row(row, gw.a[0][j], gw.a[1][j], gw.m[j], row_scales == nullptr ? 1.f : row_scales[ids[i]],
                out + i * k + g * kGroup);
    }
  }
}

// f(std::integral_constant<int, R>()) for the record format R of a pack (-1: the 4-bit record).
template <typename F>
void with_format(bool q8, int64_t record, const F& f) {
  if (!q8) return f(std::integral_constant<int, -1>());
  switch (format8_of(record)) {
    case kFive: return f(std::integral_constant<int, kFive>());
    case kFiveMin: return f(std::integral_constant<int, kFiveMin>());
    case kSix: return f(std::integral_constant<int, kSix>());
    case kSixMin: return f(std::integral_constant<int, kSixMin>());
    case kSixK: return f(std::integral_constant<int, kSixK>());
    case kGroupScale: return f(std::integral_constant<int, kGroupScale>());
    case kHalfScales: return f(std::integral_constant<int, kHalfScales>());
    case kHalvesMin: return f(std::integral_constant<int, kHalvesMin>());
    default: return f(std::integral_constant<int, kPerRow>());
  }
}

// Blocks [block_begin, block_end) of the weights (rows 16 * block_begin ..) in bfloat16 into
// `out`, [rows, K] from its first row.
void unpack_into(bool q8, const torch::Tensor& packed, int64_t n, const float* row_scales, uint16_t* out,
                 int64_t block_begin, int64_t block_end) {
  const int64_t record = packed.size(2), groups = packed.size(1);
  const uint8_t* weights = static_cast<const uint8_t*>(packed.data_ptr());
  out -= block_begin * kRows * groups * kGroup;
  with_format(q8, record, [&](auto format) {
    at::parallel_for(block_begin, block_end, 1, [&](int64_t begin, int64_t end) {
      unpack_blocks<decltype(format)::value>(weights, record, groups, n, row_scales, out, begin, end);
    });
  });
}

// What unpack_weights and packed_rows check: a q4_pack's or q8_pack's bytes for N rows, row scales.
bool check_pack(const torch::Tensor& packed, int64_t n, const c10::optional<torch::Tensor>& scales) {
  const bool q8 = packed.scalar_type() == at::kChar;
  TORCH_CHECK(q8 ? packed.dim() == 3 && format8_of(packed.size(2)) >= 0 : packed.scalar_type() == at::kByte,
              "packed: q4_pack's or q8_pack's bytes");
  TORCH_CHECK(packed_layout(packed, q8 ? packed.size(2) : kRecord) && (n + kRows - 1) / kRows == packed.size(0),
              "packed: not ", n, " rows");
  TORCH_CHECK(!scales.has_value() || (scales->scalar_type() == at::kFloat && scales->numel() == n &&
                                      scales->is_contiguous()), "scales: float32 [N]");
  return q8;
}

}  // namespace

torch::Tensor unpack_weights(const torch::Tensor& packed, int64_t n, const c10::optional<torch::Tensor>& scales) {
  const bool q8 = check_pack(packed, n, scales);
  auto out = torch::empty({n, packed.size(1) * kGroup}, torch::dtype(at::kBFloat16));
  unpack_into(q8, packed, n, scales.has_value() ? scales->data_ptr<float>() : nullptr,
              reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), 0, packed.size(0));
  return out;
}

torch::Tensor packed_rows(const torch::Tensor& packed, const torch::Tensor& ids, int64_t n,
                          const c10::optional<torch::Tensor>& scales) {
  const bool q8 = check_pack(packed, n, scales);
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, "ids: int64 [M]");
  const auto id = ids.contiguous();
  TORCH_CHECK(id.numel() == 0 || (id.min().item<int64_t>() >= 0 && id.max().item<int64_t>() < n),
              "ids: rows 0 .. ", n - 1);
  const int64_t record = packed.size(2), groups = packed.size(1);
  auto out = torch::empty({id.numel(), groups * kGroup}, torch::dtype(at::kFloat));
  const uint8_t* weights = static_cast<const uint8_t*>(packed.data_ptr());
  const float* row_scales = scales.has_value() ? scales->data_ptr<float>() : nullptr;
  with_format(q8, record, [&](auto format) {
    at::parallel_for(0, id.numel(), 16, [&](int64_t begin, int64_t end) {
      rows_of<decltype(format)::value>(weights, record, groups, id.data_ptr<int64_t>(), row_scales,
                                       out.data_ptr<float>(), begin, end);
    });
  });
  return out;
}

void set_unpack_rows(int64_t rows, int64_t slab_weights) {
  g_unpack_rows = rows;
  g_unpack_slab = slab_weights;
}
int64_t unpack_rows() { return g_unpack_rows; }

bool unpacks(const torch::Tensor& x, int64_t path) {
  return path == kBest && g_unpack_rows > 0 && x.size(0) >= g_unpack_rows && x.scalar_type() == at::kBFloat16;
}

torch::Tensor unpacked_linear(const torch::Tensor& x, bool q8, const torch::Tensor& packed, int64_t n,
                              const float* row_scales, const c10::optional<torch::Tensor>& bias) {
  RECORD_FUNCTION("semline::unpacked_linear", std::vector<c10::IValue>({x}));
  const int64_t k = packed.size(1) * kGroup, blocks = packed.size(0);
  const int64_t slab = std::max<int64_t>(1, std::min(blocks, g_unpack_slab / (kRows * k)));  // blocks at once
  // One buffer a thread, kept: freshly allocated each call, a layer's bfloat16 weights (32 MiB
  // at 2048 x 8192) would be first-touched page by page (unpacking alone 2-3 ms -> 11).
  thread_local torch::Tensor buffer;
  if (!buffer.defined() || buffer.numel() < slab * kRows * k)
    buffer = torch::empty({slab * kRows * k}, torch::dtype(at::kBFloat16));
  uint16_t* bytes = reinterpret_cast<uint16_t*>(buffer.data_ptr<at::BFloat16>());
  torch::Tensor out;
  if (slab < blocks) out = torch::empty({x.size(0), n}, x.options());
  for (int64_t b0 = 0; b0 < blocks; b0 += slab) {
    const int64_t b1 = std::min(blocks, b0 + slab), r0 = b0 * kRows, rows = std::min(n, b1 * kRows) - r0;
    unpack_into(q8, packed, n, row_scales, bytes, b0, b1);
    const torch::Tensor w = buffer.narrow(0, 0, rows * k).view({rows, k}).t();
    if (slab >= blocks) return bias.has_value() ? at::addmm(*bias, x, w) : at::mm(x, w);
    torch::Tensor part = out.narrow(1, r0, rows);
    if (bias.has_value()) {
      part.copy_(at::addmm(bias->narrow(0, r0, rows), x, w));
    } else {
      part.copy_(at::mm(x, w));
    }
  }
  return out;
}
