// ECLIPSE + Karlo (unCLIP), as runtime/chains/karlo.py runs it: text encoder on ["", prompt] ->
// ECLIPSE prior (one pass, the prompt's rows) -> text_proj -> 64 px decoder loop (guidance on the
// 3 noise channels, learned variance from the conditional half) -> antialiased bicubic upsample
// -> super-resolution loop (super_res_first, then super_res_last for the last step) -> image.
#pragma once

#include <string>

#include "core/pipeline.hpp"

namespace eclipse::core {

// Reads a Karlo bundle's scheduler configs and sizes into `data` (the tokenizer is read already).
void open_karlo(BundleData &data, const std::string &path);
Result generate_karlo(State &state, const char *prompt, const eclipse_params &params, const Inputs &inputs);

// torch's F.interpolate(mode="bicubic", align_corners=False, antialias=True) of (planes, h, w)
// float32 to (planes, out_h, out_w), as runtime/resample.py computes it (float64 sums, one rounding).
std::vector<float> resize_bicubic_aa(const std::vector<float> &x, int64_t planes, int64_t h, int64_t w, int64_t out_h,
                                     int64_t out_w);

}  // namespace eclipse::core
