// Reads the small float arrays a bundle ships (negative_image_embeds.npy). The .npy format is
// documented by numpy (NEP 1): magic, version, a little Python-dict header, raw data.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace eclipse::core {

struct NpyArray {
    std::vector<int64_t> shape;
    std::vector<float> data;  // converted to float32 (as the Python runtime's astype(float32))
};

// Parses the bytes of a .npy file; little-endian float32/float64, C order. Throws Error
// (ECLIPSE_ERR_BUNDLE) naming `what` on anything else.
NpyArray parse_npy(const std::string &bytes, const std::string &what);

}  // namespace eclipse::core
