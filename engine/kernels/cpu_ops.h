// What the sources of semline's CPU extension share (engine/kernels/__init__.py builds them
// into one module).
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

// The model dtypes semline runs (no float64: fewer instantiations, a quicker first build).
#define SEMLINE_DISPATCH(TYPE, NAME, ...)                                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                 \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// int4_gemm.cpp: 4-bit weights (GGUF Q4_1's form) times int8-quantized activations.
// path: -1 the best this CPU runs, 0 scalar, 1 AVX2, 2 AVX512-VNNI.
std::vector<std::string> q4_paths();
torch::Tensor q4_pack(torch::Tensor q, torch::Tensor scales, torch::Tensor mins);
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& packed, int64_t n,
                        const c10::optional<torch::Tensor>& bias, int64_t path);
// 8-bit weights times the same int8-quantized activations: one scale per output row (scales
// given to q8_linear), or float16 scales per group or half group and minimums per group in the
// pack (GGUF's Q8_0, Q5_*, Q6_K blocks; q8_linear then takes row scales of 1).
torch::Tensor q8_pack(torch::Tensor q, c10::optional<torch::Tensor> scales, c10::optional<torch::Tensor> mins);
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& bias, int64_t path);
// A pack's weights [N, K] in bfloat16 (each q * a + m in float32, times `scales` where given,
// rounded once): what prefill chunks multiply on AMX. From set_unpack_rows' rows up (0: never),
// q4_linear and q8_linear on bfloat16 activations (path -1) unpack and call torch's matmul, at
// most slab_weights weights at a time (a slab of whole 16-row blocks; at least one).
torch::Tensor unpack_weights(const torch::Tensor& packed, int64_t n, const c10::optional<torch::Tensor>& scales);
// Rows `ids` of the same weights in float32 [M, K] (a tied or packed embedding's lookups).
torch::Tensor packed_rows(const torch::Tensor& packed, const torch::Tensor& ids, int64_t n,
                          const c10::optional<torch::Tensor>& scales);
void set_unpack_rows(int64_t rows, int64_t slab_weights);
int64_t unpack_rows();

// gguf_pack.cpp: a layer's GGUF tensors (uint8 [rows, bytes] views of the file, kinds = GGML
// types, each part's first block of its column window) packed straight into the 4-bit (record
// 320) or 8-bit (352/384 5-bit, 420/448/480 6-bit, 544/576/608) kernel's records; output row r
// is row row_src[r] of part row_part[r]; written into `out` where given ([ceil(N / 16),
// cols / 32, record]).
torch::Tensor gguf_pack(const std::vector<torch::Tensor>& raws, const std::vector<int64_t>& kinds,
                        const std::vector<int64_t>& first_blocks, const torch::Tensor& row_part,
                        const torch::Tensor& row_src, int64_t cols, int64_t record,
                        const c10::optional<torch::Tensor>& out);

// The products of a decode step inside one OpenMP parallel region (paged_attention.cpp's
// DecodeStack): one thread quantizes the activations, then every thread of the region calls
// team_linear for its share of the weight blocks, written into `out` ([rows, n], allocated
// before). The same arithmetic as q4_linear / q8_linear, on the best path; no checks inside
// (team_linear_fits, before the region: the weights and bias for K inputs, N outputs and
// activations of `dtype`).
struct QuantizedRows {
  std::vector<int8_t> q;     // [M, K]
  std::vector<float> scale;  // [M, G]
  std::vector<float> sum;    // [M, G]: sum of the unquantized inputs
  std::vector<int32_t> isum; // [M, 2G]: sum of the quantized inputs per half group (16)
};
void quantize_activations(QuantizedRows& out, const torch::Tensor& x);
bool team_linear_fits(const torch::Tensor& packed, bool q8, int64_t k, int64_t n,
                      const c10::optional<torch::Tensor>& bias, at::ScalarType dtype);
void team_linear(const QuantizedRows& xq, bool q8, const torch::Tensor& packed, int64_t n, const float* row_scales,
                 const c10::optional<torch::Tensor>& bias, torch::Tensor& out);
