// Shared by the core's modules: the error type every failure travels as, tensors at the
// backend boundary, and the log hook.
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
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

[[noreturn]] inline void backend_error(const std::string &message) { throw Error(ECLIPSE_ERR_BACKEND, message); }

// "a; b; c": the problems of one check, reported in one error.
inline std::string join(const std::vector<std::string> &parts, const char *separator = "; ") {
    std::string out;
    for (const auto &p : parts) out += (out.empty() ? "" : separator) + p;
    return out;
}

// The whole file in one read into a string sized beforehand: engines are hundreds of MB, and a
// stream-to-stringstream-to-string copy would hold them two or three times. false: unreadable.
inline bool read_file(const std::filesystem::path &path, std::string &out) {
    std::error_code ec;
    const auto size = std::filesystem::file_size(path, ec);
    if (ec) return false;
    std::ifstream in(path, std::ios::binary);
    out.resize(static_cast<size_t>(size));
    return static_cast<bool>(in) && static_cast<bool>(in.read(out.data(), static_cast<std::streamsize>(out.size())));
}

inline int64_t element_count(const std::vector<int64_t> &shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

enum class DType { Float32, Int32 };

// A non-owning view of a contiguous C-order tensor at the backend boundary.
struct TensorView {
    std::string name;
    DType dtype = DType::Float32;
    std::vector<int64_t> shape;
    void *data = nullptr;

    int64_t count() const { return element_count(shape); }
    size_t bytes() const { return static_cast<size_t>(count()) * 4; }  // float32 and int32 only
};

// Delivered to the callback set with eclipse_set_log_callback.
void log(eclipse_log_level level, const std::string &message);

}  // namespace eclipse::core
