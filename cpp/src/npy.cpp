#include "npy.hpp"

#include <cstring>
#include <regex>

#include "common.hpp"

namespace eclipse::core {
namespace {

[[noreturn]] void fail(const std::string &what, const std::string &why) {
    throw Error(ECLIPSE_ERR_BUNDLE, what + " is not a readable .npy array (" + why + ")");
}

// The value of 'key' in the header dict, as written by numpy: 'descr': '<f4', 'shape': (1, 32), ...
std::string header_value(const std::string &header, const std::string &key, const std::string &pattern,
                         const std::string &what) {
    std::smatch m;
    if (!std::regex_search(header, m, std::regex("'" + key + "'\\s*:\\s*" + pattern))) fail(what, "no " + key);
    return m[1].str();
}

}  // namespace

NpyArray parse_npy(const std::string &bytes, const std::string &what) {
    static const char kMagic[] = "\x93NUMPY";
    if (bytes.size() < 10 || std::memcmp(bytes.data(), kMagic, 6) != 0) fail(what, "no .npy magic");
    const auto major = static_cast<unsigned char>(bytes[6]);
    size_t header_len, offset;
    if (major == 1) {
        header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
        offset = 10;
    } else if (major == 2 || major == 3) {
        if (bytes.size() < 12) fail(what, "truncated header");
        header_len = 0;
        for (int i = 3; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(bytes[8 + i]);
        offset = 12;
    } else {
        fail(what, "format version " + std::to_string(major));
    }
    if (bytes.size() < offset + header_len) fail(what, "truncated header");
    const std::string header = bytes.substr(offset, header_len);
    const std::string descr = header_value(header, "descr", "'([^']*)'", what);
    if (header_value(header, "fortran_order", "(True|False)", what) != "False") fail(what, "Fortran order");
    const std::string shape_text = header_value(header, "shape", "\\(([^)]*)\\)", what);

    NpyArray out;
    int64_t count = 1;
    static const std::regex kInt("\\d+");
    for (auto it = std::sregex_iterator(shape_text.begin(), shape_text.end(), kInt); it != std::sregex_iterator(); ++it) {
        out.shape.push_back(std::stoll(it->str()));
        count *= out.shape.back();
    }
    size_t item;
    if (descr == "<f4" || descr == "=f4") item = 4;
    else if (descr == "<f8" || descr == "=f8") item = 8;
    else fail(what, "dtype " + descr + ", expected float32 or float64");
    const size_t data_at = offset + header_len;
    if (bytes.size() != data_at + static_cast<size_t>(count) * item) fail(what, "data size does not match the shape");
    out.data.resize(static_cast<size_t>(count));
    for (int64_t i = 0; i < count; ++i) {
        const char *p = bytes.data() + data_at + i * item;
        if (item == 4) {
            std::memcpy(&out.data[i], p, 4);
        } else {
            double d;
            std::memcpy(&d, p, 8);
            out.data[i] = static_cast<float>(d);
        }
    }
    return out;
}

}  // namespace eclipse::core
