// GGUF blocks straight into the records of the W4A8/W8A8 kernels (int4_gemm.cpp), read in place
// from the memory-mapped file: no integer, scale or float copy of a tensor is ever made. A layer
// is one or more parts (fused q/k/v, gate/up), each a GGUF tensor, a window of its columns (whole
// blocks: a tensor-parallel rank's columns) and a list of its rows (a rank's rows, and llama's
// q/k rows un-permuted); every output row names its part and source row.
//
// Per group of 32 weights a block gives integers q, a scale per 16 or 32 weights and, for the
// unsigned types, a minimum: w = q * scale + min, in float32 exactly as gguf's dequantizer (and
// engine/gguf_weights.read_blocks) computes it:
//   Q4_0 q in 0..15, min -8 d;  Q4_1 q in 0..15, min m;  Q5_0 q - 16;  Q5_1 q in 0..31, min m;
//   Q8_0 int8;  Q4_K/Q5_K  d * 6-bit sub-scale, min -(dmin * 6-bit sub-min);  Q6_K q - 32 with
//   d * int8 sub-scale per 16.
// The record holds them as engine/gguf_weights.packed_form chooses (the record size says which):
//   320  4-bit (every part Q4_0/Q4_1/Q4_K): q unsigned, float16 scale and minimum per group;
//   352/384  5-bit (every part Q4/Q5 but no Q6_K, Q8_0), u = q + 16 with q centred as for 6-bit,
//            a scale per group (and a minimum: 384, where a part has them);
//   448/480  6-bit, u = q + 32 with q centred (unsigned types: q - 8 or q - 16, min + 8 or 16 times
//            the scale), half-group scales (and minimums: 480, where a part has them);
//   420  6-bit with the file's own scales (every part Q6_K): per super-block of 8 groups the
//        16 rows' float16 d, then per group its weights and their int8 sub-scales;
//   544/576/608  8-bit (a part is Q8_0): scales per group, per half group, halves and minimums.
// Scales and minimums are rounded to float16 once (round to nearest even, as torch's .half()).

#include "cpu_ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kRows = 16, kGroup = 32;
enum Kind : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

struct BlockShape {
  int64_t weights, bytes;
};

BlockShape block_shape(int64_t kind) {
  switch (kind) {
    case kQ4_0: return {32, 18};
    case kQ4_1: return {32, 20};
    case kQ5_0: return {32, 22};
    case kQ5_1: return {32, 24};
    case kQ8_0: return {32, 34};
    case kQ4_K: return {256, 144};
    case kQ5_K: return {256, 176};
    case kQ6_K: return {256, 210};
    default: TORCH_CHECK(false, "GGUF type ", kind, " is not kept packed");
  }
}

inline float f16_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline uint16_t to_f16(float f) { return c10::Half(f).x; }

// One group of 32 weights of a row: w = q * scale[i / 16] + min.
struct Group {
  int8_t q[kGroup];
  float scale[2];
  float min;
  int centre;  // unsigned q: 8 (4-bit) or 16 (5-bit); 0 for signed q (and no minimum)
  uint16_t super_d;  // Q6_K: the super-block's float16 d and the group's two int8 sub-scales
  int8_t sub[2];
};

// Q4_K/Q5_K's 6-bit sub-block scale and minimum of sub-block s (ggml's get_scale_min_k4).
inline void k_scale_min(const uint8_t* q, int s, int* sc, int* mn) {
  if (s < 4) {
    *sc = q[s] & 63;
    *mn = q[s + 4] & 63;
  } else {
    *sc = (q[s + 4] & 0xF) | ((q[s - 4] >> 6) << 4);
    *mn = (q[s + 4] >> 4) | ((q[s] >> 6) << 4);
  }
}

// Group g (counted from `row`, the first block of the part's column window) of a row.
void decode_group(int64_t kind, const uint8_t* row, int64_t g, Group& out) {
  switch (kind) {
    case kQ4_0:
    case kQ4_1: {
      const uint8_t* b = row + g * (kind == kQ4_0 ? 18 : 20);
      const float d = f16_at(b);
      const uint8_t* qs = b + (kind == kQ4_0 ? 2 : 4);
      for (int j = 0; j < 16; ++j) {
        out.q[j] = qs[j] & 0xF;
        out.q[j + 16] = qs[j] >> 4;
      }
      out.scale[0] = out.scale[1] = d;
      out.min = kind == kQ4_0 ? -8 * d : f16_at(b + 2);
      out.centre = 8;
      return;
    }
    case kQ5_0:
    case kQ5_1: {
      const uint8_t* b = row + g * (kind == kQ5_0 ? 22 : 24);
      const float d = f16_at(b);
      const int at = kind == kQ5_0 ? 2 : 4;
      uint32_t qh;
      std::memcpy(&qh, b + at, 4);
      const uint8_t* qs = b + at + 4;
      const int offset = kind == kQ5_0 ? 16 : 0;
      for (int j = 0; j < 16; ++j) {
        out.q[j] = static_cast<int8_t>(((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - offset);
        out.q[j + 16] = static_cast<int8_t>(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - offset);
      }
      out.scale[0] = out.scale[1] = d;
      out.min = kind == kQ5_0 ? 0.0f : f16_at(b + 2);
      out.centre = kind == kQ5_0 ? 0 : 16;
      return;
    }
    case kQ8_0: {
      const uint8_t* b = row + g * 34;
      out.scale[0] = out.scale[1] = f16_at(b);
      std::memcpy(out.q, b + 2, kGroup);
      out.min = 0.0f;
      out.centre = 0;
      return;
    }
    case kQ4_K:
    case kQ5_K: {
      const uint8_t* b = row + (g / 8) * (kind == kQ4_K ? 144 : 176);
      const int s = static_cast<int>(g % 8);
      int sc, mn;
      k_scale_min(b + 4, s, &sc, &mn);
      out.scale[0] = out.scale[1] = f16_at(b) * static_cast<float>(sc);
      out.min = -(f16_at(b + 2) * static_cast<float>(mn));
      const int shift = 4 * (s % 2);
      if (kind == kQ4_K) {
        const uint8_t* qs = b + 16 + 32 * (s / 2);
        for (int j = 0; j < kGroup; ++j) out.q[j] = (qs[j] >> shift) & 0xF;
        out.centre = 8;
      } else {
        const uint8_t* qh = b + 16;
        const uint8_t* qs = b + 48 + 32 * (s / 2);
        for (int j = 0; j < kGroup; ++j) out.q[j] = ((qs[j] >> shift) & 0xF) | (((qh[j] >> s) & 1) << 4);
        out.centre = 16;
      }
      return;
    }
    case kQ6_K: {
      const uint8_t* b = row + (g / 8) * 210;
      const int h = static_cast<int>(g % 8) / 4, t = static_cast<int>(g % 8) % 4;
      const uint8_t* ql = b + 64 * h + 32 * (t % 2);
      const uint8_t* qh = b + 128 + 32 * h;
      const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192) + 8 * h + 2 * t;
      const float d = f16_at(b + 208);
      for (int j = 0; j < kGroup; ++j)
        out.q[j] = static_cast<int8_t>((((ql[j] >> (4 * (t / 2))) & 0xF) | (((qh[j] >> (2 * t)) & 3) << 4)) - 32);
      out.scale[0] = d * static_cast<float>(sc[0]);
      out.scale[1] = d * static_cast<float>(sc[1]);
      std::memcpy(&out.super_d, b + 208, 2);
      out.sub[0] = sc[0];
      out.sub[1] = sc[1];
      out.min = 0.0f;
      out.centre = 0;
      return;
    }
    default: TORCH_CHECK(false, "GGUF type ", kind, " is not kept packed");
  }
}

}  // namespace

torch::Tensor gguf_pack(const std::vector<torch::Tensor>& raws, const std::vector<int64_t>& kinds,
                        const std::vector<int64_t>& first_blocks, const torch::Tensor& row_part,
                        const torch::Tensor& row_src, int64_t cols, int64_t record,
                        const c10::optional<torch::Tensor>& out_) {
  const size_t parts = raws.size();
  TORCH_CHECK(parts > 0 && kinds.size() == parts && first_blocks.size() == parts, "one kind and window per part");
  TORCH_CHECK(cols > 0 && cols % kGroup == 0, "columns: a multiple of 32");
  TORCH_CHECK(record == 320 || record == 352 || record == 384 || record == 420 || record == 448 || record == 480 ||
                  record == 544 || record == 576 || record == 608,
              "record: 320 (4-bit), 352/384 (5-bit), 420/448/480 (6-bit) or 544/576/608 (8-bit) bytes");
  TORCH_CHECK(row_part.scalar_type() == at::kLong && row_src.scalar_type() == at::kLong && row_part.dim() == 1 &&
                  row_src.sizes() == row_part.sizes(),
              "row_part, row_src: int64 [N]");
  const int64_t n = row_part.size(0), groups = cols / kGroup, blocks = (n + kRows - 1) / kRows;
  std::vector<const uint8_t*> starts(parts);
  std::vector<int64_t> rows_of(parts), stride(parts);
  for (size_t p = 0; p < parts; ++p) {
    const auto& raw = raws[p];
    TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.stride(1) == 1, "raw: uint8 [rows, bytes]");
    const BlockShape shape = block_shape(kinds[p]);
    TORCH_CHECK(cols % shape.weights == 0, "part ", p, ": columns not whole blocks of ", shape.weights);
    TORCH_CHECK(first_blocks[p] >= 0 && (first_blocks[p] * shape.weights + cols) * shape.bytes <=
                                            raw.size(1) * shape.weights,
                "part ", p, ": its column window lies outside its rows");
    if (record == 320)
      TORCH_CHECK(kinds[p] == kQ4_0 || kinds[p] == kQ4_1 || kinds[p] == kQ4_K, "the 4-bit record takes Q4 types only");
    if (record == 448 || record == 480) TORCH_CHECK(kinds[p] != kQ8_0, "the 6-bit record cannot hold Q8_0");
    if (record == 352 || record == 384)
      TORCH_CHECK(kinds[p] != kQ8_0 && kinds[p] != kQ6_K, "the 5-bit record holds Q4 and Q5 types only");
    if (record == 352 || record == 448 || record == 544 || record == 576)
      TORCH_CHECK(kinds[p] == kQ5_0 || kinds[p] == kQ6_K || kinds[p] == kQ8_0, "a part with minimums needs a record with them");
    if (record == 544) TORCH_CHECK(kinds[p] != kQ6_K, "half-group scales need a record with them");
    if (record == 420) TORCH_CHECK(kinds[p] == kQ6_K, "the record of super-block scales holds Q6_K only");
    starts[p] = raw.data_ptr<uint8_t>() + first_blocks[p] * shape.bytes;
    rows_of[p] = raw.size(0);
    stride[p] = raw.stride(0);
  }
  const int64_t* part_of = row_part.data_ptr<int64_t>();
  const int64_t* src_of = row_src.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(part_of[r] >= 0 && part_of[r] < static_cast<int64_t>(parts) && src_of[r] >= 0 &&
                    src_of[r] < rows_of[part_of[r]],
                "row ", r, ": no such part or source row");

  const bool four = record == 320, five = record == 352 || record == 384, super = record == 420;
  const bool six = super || record == 448 || record == 480;
  const int fields = four    ? 2
                     : five  ? static_cast<int>((record - 352) / 32 + 1)  // the scale (and the minimum)
                     : super ? 0                                          // the int8 sub-scales
                     : six   ? static_cast<int>((record - 448) / 32 + 2)
                             : static_cast<int>((record - 512) / 32);
  const int64_t weight_bytes = four ? 256 : five ? 320 : six ? 384 : 512;
  const auto dtype = four ? at::kByte : at::kChar;
  torch::Tensor packed;
  if (out_.has_value()) {  // e.g. a view of a huge-page arena
    packed = *out_;
    TORCH_CHECK(packed.scalar_type() == dtype && packed.is_contiguous() &&
                    packed.sizes() == torch::IntArrayRef({blocks, groups, record}),
                "out: a contiguous ", four ? "uint8" : "int8", " [", blocks, ", ", groups, ", ", record, "]");
  } else {
    packed = torch::empty({blocks, groups, record}, torch::dtype(dtype));
  }
  uint8_t* out = reinterpret_cast<uint8_t*>(packed.data_ptr());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    Group grp;
    uint8_t layout[512];  // the 8-bit layout: step s (8), row j (16), 4 weights; 6-bit: u = q + 32, 5-bit: q + 16
    for (int64_t b = begin; b < end; ++b)
      for (int64_t g = 0; g < groups; ++g) {
        // 420 (int4_gemm.cpp's kSixK): super-block g / 8 (3,360 bytes) holds the 16 rows' d, then
        // per group its weights (384 bytes) and sub-scales (32).
        uint8_t* const head = out + b * groups * record + (g / 8) * 8 * record;
        uint8_t* rec = super ? head + 32 + (g % 8) * 416 : out + (b * groups + g) * record;
        uint16_t* field = reinterpret_cast<uint16_t*>(rec + weight_bytes);
        std::memset(layout, 0, sizeof(layout));
        std::memset(field, 0, (super ? 416 : record) - weight_bytes);
        if (super && g % 8 == 0) std::memset(head, 0, 32);
        for (int64_t j = 0; j < kRows && b * kRows + j < n; ++j) {
          const int64_t r = b * kRows + j, p = part_of[r];
          decode_group(kinds[p], starts[p] + src_of[r] * stride[p], g, grp);
          if (four) {
            for (int s = 0; s < 4; ++s)
              for (int i = 0; i < 4; ++i)
                rec[s * 64 + j * 4 + i] = static_cast<uint8_t>(grp.q[8 * s + i] | (grp.q[8 * s + 4 + i] << 4));
            field[j] = to_f16(grp.scale[0]);
            field[kRows + j] = to_f16(grp.min);
            continue;
          }
          float min = grp.min;
          if (grp.centre != 0) {  // w = (q - c) * d + (m + c * d)
            for (int i = 0; i < kGroup; ++i) grp.q[i] = static_cast<int8_t>(grp.q[i] - grp.centre);
            const float offset = static_cast<float>(grp.centre) * grp.scale[0];
            min = min + offset;
          }
          const int add = six ? 32 : five ? 16 : 0;
          for (int s = 0; s < 8; ++s)
            for (int i = 0; i < 4; ++i) layout[s * 64 + j * 4 + i] = static_cast<uint8_t>(grp.q[4 * s + i] + add);
          if (five) {
            field[j] = to_f16(grp.scale[0]);
            if (fields == 2) field[kRows + j] = to_f16(min);
          } else if (super) {
            reinterpret_cast<uint16_t*>(head)[j] = grp.super_d;
            reinterpret_cast<int8_t*>(field)[j] = grp.sub[0];
            reinterpret_cast<int8_t*>(field)[kRows + j] = grp.sub[1];
          } else if (fields == 1) {
            field[j] = to_f16(grp.scale[0]);
          } else {
            field[j] = to_f16(grp.scale[0]);
            field[kRows + j] = to_f16(grp.scale[1]);
            if (fields == 3) field[2 * kRows + j] = to_f16(min);
          }
        }
        if (four) {
          if (b * kRows + kRows > n)  // rows past N: zero
            for (int s = 0; s < 4; ++s)
              for (int64_t j = n - b * kRows; j < kRows; ++j) std::memset(rec + s * 64 + j * 4, 0, 4);
        } else if (five) {  // 256 bytes of low nibbles, 64 of high bits (int4_gemm.cpp's kFive)
          for (int i = 0; i < 256; ++i) rec[i] = (layout[i] & 0xF) | ((layout[i + 256] & 0xF) << 4);
          for (int i = 0; i < 64; ++i) {
            uint8_t bits = 0;
            for (int t = 0; t < 8; ++t) bits |= static_cast<uint8_t>(((layout[i + 64 * t] >> 4) & 1) << t);
            rec[256 + i] = bits;
          }
        } else if (six) {  // 256 bytes of low nibbles, 128 of high bit pairs (int4_gemm.cpp's kSix)
          for (int i = 0; i < 256; ++i) rec[i] = (layout[i] & 0xF) | ((layout[i + 256] & 0xF) << 4);
          for (int i = 0; i < 128; ++i)
            rec[256 + i] = ((layout[i] >> 4) & 3) | (((layout[i + 128] >> 4) & 3) << 2) |
                           (((layout[i + 256] >> 4) & 3) << 4) | (((layout[i + 384] >> 4) & 3) << 6);
        } else {
          std::memcpy(rec, layout, 512);
        }
      }
  });
  return packed;
}
