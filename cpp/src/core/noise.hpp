// The portable noise generator (spec: eclipse_export/runtime/noise.py, README "The noise
// generator"): Philox4x64-10 words keyed by (seed, stream), float64 Box-Muller, float32 out.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace eclipse::core {

using PhiloxBlock = std::array<uint64_t, 4>;

// One Philox4x64-10 block (Salmon et al., SC'11): 10 rounds of the 4x64 bijection.
PhiloxBlock philox4x64_10(PhiloxBlock counter, std::array<uint64_t, 2> key);

// Normals 0 .. count-1 of stream `stream` of `seed`.
void standard_normal(uint64_t seed, uint32_t stream, float *out, size_t count);

}  // namespace eclipse::core
