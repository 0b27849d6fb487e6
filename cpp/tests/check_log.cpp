// eclipse-cuda-check's log(): the check links only the CUDA sources and the device loop, not the
// core library, so it runs on a GPU machine that has none of the core's libraries (libpng,
// libcrypto, utf8proc): it travels to an air-gapped GPU as one file (bench/gpu).
#include <cstdio>

#include "core/common.hpp"

namespace eclipse::core {

void log(eclipse_log_level level, const std::string &message) {
    std::fprintf(stderr, "[eclipse %d] %s\n", static_cast<int>(level), message.c_str());
}

}  // namespace eclipse::core
