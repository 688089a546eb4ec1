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
// 8-bit weights (one scale per output row) times the same int8-quantized activations.
torch::Tensor q8_pack(torch::Tensor q);
torch::Tensor q8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& bias, int64_t path);
