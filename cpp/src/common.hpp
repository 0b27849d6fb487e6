// Shared by the core's modules: the error type every failure travels as, tensors at the
// backend boundary, and the log hook.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "eclipse/eclipse.h"

namespace eclipse::core {

// Thrown inside the library, turned into a status + eclipse_last_error() at the C boundary.
class Error : public std::runtime_error {
public:
    Error(eclipse_status status, const std::string &message) : std::runtime_error(message), status(status) {}
    eclipse_status status;
};

enum class DType { Float32, Int32 };

// A non-owning view of a contiguous C-order tensor at the backend boundary.
struct TensorView {
    std::string name;
    DType dtype = DType::Float32;
    std::vector<int64_t> shape;
    void *data = nullptr;

    int64_t count() const {
        int64_t n = 1;
        for (int64_t d : shape) n *= d;
        return n;
    }
    size_t bytes() const { return static_cast<size_t>(count()) * 4; }  // float32 and int32 only
};

// Delivered to the callback set with eclipse_set_log_callback.
void log(eclipse_log_level level, const std::string &message);

}  // namespace eclipse::core
