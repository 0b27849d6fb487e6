#include "core/noise.hpp"

#include <cmath>

namespace eclipse::core {
namespace {

// Philox4x64's round multipliers and key increments (the generator's published constants).
constexpr uint64_t kMul0 = 0xD2E7470EE14C6C93ULL;
constexpr uint64_t kMul1 = 0xCA5A826395121157ULL;
constexpr uint64_t kWeyl0 = 0x9E3779B97F4A7C15ULL;  // golden ratio
constexpr uint64_t kWeyl1 = 0xBB67AE8584CAA73BULL;  // sqrt(3) - 1

inline void mul_hi_lo(uint64_t a, uint64_t b, uint64_t &hi, uint64_t &lo) {
#if defined(__SIZEOF_INT128__)
    unsigned __int128 p = static_cast<unsigned __int128>(a) * b;
    hi = static_cast<uint64_t>(p >> 64);
    lo = static_cast<uint64_t>(p);
#else  // portable 64x64 -> 128 from 32-bit halves
    uint64_t a0 = a & 0xFFFFFFFFu, a1 = a >> 32, b0 = b & 0xFFFFFFFFu, b1 = b >> 32;
    uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    uint64_t mid = (p00 >> 32) + (p01 & 0xFFFFFFFFu) + (p10 & 0xFFFFFFFFu);
    lo = (mid << 32) | (p00 & 0xFFFFFFFFu);
    hi = p11 + (p01 >> 32) + (p10 >> 32) + (mid >> 32);
#endif
}

}  // namespace

PhiloxBlock philox4x64_10(PhiloxBlock x, std::array<uint64_t, 2> key) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            key[0] += kWeyl0;
            key[1] += kWeyl1;
        }
        uint64_t hi0, lo0, hi1, lo1;
        mul_hi_lo(kMul0, x[0], hi0, lo0);
        mul_hi_lo(kMul1, x[2], hi1, lo1);
        x = {hi1 ^ x[1] ^ key[0], lo1, hi0 ^ x[3] ^ key[1], lo0};
    }
    return x;
}

void standard_normal(uint64_t seed, uint32_t stream, float *out, size_t count) {
    constexpr double kTwoPi = 6.283185307179586;  // the float64 nearest 2*pi, as in noise.py
    constexpr double kInv2To53 = 1.0 / 9007199254740992.0;
    const std::array<uint64_t, 2> key{seed, stream};
    size_t written = 0;
    for (uint64_t block = 0; written < count; ++block) {
        const PhiloxBlock w = philox4x64_10({block, 0, 0, 0}, key);
        for (int pair = 0; pair < 2 && written < count; ++pair) {
            // top 53 bits; u1 shifted into (0, 1] so that log(u1) is finite
            const double u1 = static_cast<double>((w[2 * pair] >> 11) + 1) * kInv2To53;
            const double u2 = static_cast<double>(w[2 * pair + 1] >> 11) * kInv2To53;
            const double r = std::sqrt(-2.0 * std::log(u1));
            const double theta = kTwoPi * u2;
            out[written++] = static_cast<float>(r * std::cos(theta));
            if (written < count) out[written++] = static_cast<float>(r * std::sin(theta));
        }
    }
}

}  // namespace eclipse::core
