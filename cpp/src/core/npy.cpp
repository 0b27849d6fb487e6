#include "core/npy.hpp"

#include <cstring>

#include "core/common.hpp"

namespace eclipse::core {
namespace {

[[noreturn]] void fail(const std::string &what, const std::string &why) {
    throw Error(ECLIPSE_ERR_BUNDLE, what + " is not a readable .npy array (" + why + ")");
}

// The text after 'key': in the header dict, as numpy writes it: {'descr': '<f4', 'fortran_order':
// False, 'shape': (1, 32), }
std::string header_value(const std::string &header, const std::string &key, const std::string &what) {
    const size_t at = header.find("'" + key + "'");
    if (at == std::string::npos) fail(what, "no " + key);
    size_t v = header.find(':', at);
    if (v == std::string::npos) fail(what, "no value for " + key);
    v = header.find_first_not_of(' ', v + 1);
    if (v == std::string::npos) fail(what, "no value for " + key);
    const char open = header[v];
    const char close = open == '\'' ? '\'' : open == '(' ? ')' : ',';
    const size_t end = header.find(close, v + 1);
    if (end == std::string::npos) fail(what, "unterminated " + key);
    return open == '\'' || open == '(' ? header.substr(v + 1, end - v - 1) : header.substr(v, end - v);
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
    const std::string descr = header_value(header, "descr", what);
    if (header_value(header, "fortran_order", what) != "False") fail(what, "Fortran order");
    const std::string shape_text = header_value(header, "shape", what);

    NpyArray out;
    int64_t count = 1;
    for (size_t i = 0; i < shape_text.size();) {  // "1, 32" or "32," or ""
        if (shape_text[i] < '0' || shape_text[i] > '9') {
            if (shape_text[i] != ',' && shape_text[i] != ' ') fail(what, "shape (" + shape_text + ")");
            ++i;
            continue;
        }
        int64_t d = 0;
        for (; i < shape_text.size() && shape_text[i] >= '0' && shape_text[i] <= '9'; ++i) {
            d = d * 10 + (shape_text[i] - '0');
            if (d > (int64_t{1} << 32)) fail(what, "a dimension too large");
        }
        out.shape.push_back(d);
        count *= d;
        if (count > (int64_t{1} << 32)) fail(what, "too many values");
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
