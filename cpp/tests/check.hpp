// The C++ tests' small harness (CTest runs each binary; also under ASan + UBSan): EXPECT throws,
// run() reports each test, finish() gives the exit status.
#pragma once

#include <cstdio>
#include <functional>
#include <stdexcept>

namespace eclipse::test {

inline int g_failed = 0, g_passed = 0;

#define EXPECT(cond)                                                                   \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            std::fprintf(stderr, "  %s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
            throw std::runtime_error("expectation failed");                            \
        }                                                                              \
    } while (0)

inline void run(const char *name, const std::function<void()> &test) {
    try {
        test();
        ++g_passed;
        std::printf("ok   %s\n", name);
    } catch (const std::exception &e) {
        ++g_failed;
        std::printf("FAIL %s: %s\n", name, e.what());
    }
}

inline int finish() {
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}

}  // namespace eclipse::test
