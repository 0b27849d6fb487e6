#include "core/onnx_refs.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <map>
#include <system_error>

namespace eclipse::core {
namespace {

// protobuf's default recursion limit (ONNX Runtime's parser refuses deeper files too)
constexpr int kMaxDepth = 100;
constexpr uint64_t kExternal = 1;  // TensorProto.DataLocation.EXTERNAL

// field numbers (onnx/onnx.proto3)
enum : uint64_t {
    kModelGraph = 7, kModelTrainingInfo = 20, kModelFunctions = 25,
    kTrainingInit = 1, kTrainingAlgo = 2,
    kGraphNode = 1, kGraphInitializer = 5, kGraphSparse = 15,
    kNodeAttribute = 5, kFunctionNode = 7,
    kAttrT = 5, kAttrG = 6, kAttrTensors = 10, kAttrGraphs = 11, kAttrSparse = 22, kAttrSparses = 23,
    kSparseValues = 1, kSparseIndices = 2,
    kTensorName = 8, kTensorExternal = 13, kTensorLocation = 14,
    kEntryKey = 1, kEntryValue = 2,
};

struct Field {
    uint64_t number = 0;
    unsigned wire = 0;
    uint64_t value = 0;     // wire type 0
    size_t begin = 0, end = 0;  // wire type 2: the payload
};

// Strict UTF-8 (no overlong forms, surrogates or code points past U+10FFFF), as Python's decoder.
bool valid_utf8(const std::string &s) {
    size_t i = 0;
    while (i < s.size()) {
        const auto c = static_cast<unsigned char>(s[i]);
        size_t n = 0;
        uint32_t cp = 0, min = 0;
        if (c < 0x80) { ++i; continue; }
        if ((c & 0xE0) == 0xC0) n = 1, cp = c & 0x1F, min = 0x80;
        else if ((c & 0xF0) == 0xE0) n = 2, cp = c & 0x0F, min = 0x800;
        else if ((c & 0xF8) == 0xF0) n = 3, cp = c & 0x07, min = 0x10000;
        else return false;
        for (size_t k = 1; k <= n; ++k) {
            if (i + k >= s.size()) return false;
            const auto d = static_cast<unsigned char>(s[i + k]);
            if ((d & 0xC0) != 0x80) return false;
            cp = cp << 6 | (d & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += n + 1;
    }
    return true;
}

class Reader {
public:
    Reader(const uint8_t *data, std::vector<ExternalRef> &refs) : data_(data), refs_(refs) {}

    void model(size_t pos, size_t end) {
        Field f;
        while (next(pos, end, f)) {
            if (f.wire != 2) continue;
            if (f.number == kModelGraph) graph(f.begin, f.end, 2);
            else if (f.number == kModelFunctions) nodes(f.begin, f.end, kFunctionNode, 2);
            else if (f.number == kModelTrainingInfo) {
                size_t p = f.begin;
                Field g;
                while (next(p, f.end, g)) {
                    if (g.wire == 2 && (g.number == kTrainingInit || g.number == kTrainingAlgo)) graph(g.begin, g.end, 3);
                }
            }
        }
    }

private:
    const uint8_t *data_;
    std::vector<ExternalRef> &refs_;

    [[noreturn]] static void fail(const std::string &why, size_t at) {
        throw OnnxRefsError(why + " at byte " + std::to_string(at));
    }

    uint64_t varint(size_t &pos, size_t end) const {
        uint64_t value = 0;
        for (int i = 0; i < 10; ++i) {
            if (pos >= end) fail("truncated varint", pos);
            const uint8_t b = data_[pos++];
            value |= static_cast<uint64_t>(b & 0x7F) << (7 * i);  // bits past 64 are dropped, as protobuf does
            if (!(b & 0x80)) return value;
        }
        fail("varint longer than 10 bytes", pos);
    }

    // The next field of the message [pos, end); false at its end.
    bool next(size_t &pos, size_t end, Field &f) const {
        if (pos >= end) return false;
        const uint64_t key = varint(pos, end);
        f.number = key >> 3;
        f.wire = static_cast<unsigned>(key & 7);
        if (f.number == 0) fail("field number 0", pos);
        switch (f.wire) {
            case 0: f.value = varint(pos, end); break;
            case 1:
            case 5: {
                const size_t n = f.wire == 1 ? 8 : 4;
                if (n > end - pos) fail("fixed-size field past the end of its message", pos);
                pos += n;
                break;
            }
            case 2: {
                const uint64_t length = varint(pos, end);
                if (length > end - pos) fail("field of " + std::to_string(length) + " bytes past the end of its message", pos);
                f.begin = pos;
                f.end = pos + static_cast<size_t>(length);
                pos = f.end;
                break;
            }
            default: fail("wire type " + std::to_string(f.wire), pos);  // groups are not in ONNX's schema
        }
        return true;
    }

    static void deep(int depth) {
        if (depth > kMaxDepth) throw OnnxRefsError("messages nested deeper than " + std::to_string(kMaxDepth));
    }

    void graph(size_t pos, size_t end, int depth) {
        deep(depth);
        Field f;
        while (next(pos, end, f)) {
            if (f.wire != 2) continue;
            if (f.number == kGraphNode) node(f.begin, f.end, depth + 1);
            else if (f.number == kGraphInitializer) tensor(f.begin, f.end);
            else if (f.number == kGraphSparse) sparse(f.begin, f.end, depth + 1);
        }
    }

    void nodes(size_t pos, size_t end, uint64_t node_field, int depth) {
        deep(depth);
        Field f;
        while (next(pos, end, f)) {
            if (f.wire == 2 && f.number == node_field) node(f.begin, f.end, depth + 1);
        }
    }

    void node(size_t pos, size_t end, int depth) {
        deep(depth);
        Field f;
        while (next(pos, end, f)) {
            if (f.wire != 2 || f.number != kNodeAttribute) continue;
            deep(depth + 1);  // the attribute's own level, as the Python reader counts it
            size_t p = f.begin;
            Field a;
            while (next(p, f.end, a)) {
                if (a.wire != 2) continue;
                if (a.number == kAttrT || a.number == kAttrTensors) tensor(a.begin, a.end);
                else if (a.number == kAttrG || a.number == kAttrGraphs) graph(a.begin, a.end, depth + 2);
                else if (a.number == kAttrSparse || a.number == kAttrSparses) sparse(a.begin, a.end, depth + 2);
            }
        }
    }

    void sparse(size_t pos, size_t end, int depth) {
        deep(depth);
        Field f;
        while (next(pos, end, f)) {
            if (f.wire == 2 && (f.number == kSparseValues || f.number == kSparseIndices)) tensor(f.begin, f.end);
        }
    }

    std::string text(const Field &f) const { return std::string(reinterpret_cast<const char *>(data_ + f.begin), f.end - f.begin); }

    static uint64_t count(const std::string &key, const std::string &value, const std::string &tensor) {
        // decimal digits only, as runtime/onnx_refs.py (ONNX Runtime and onnx parse "+1", " 1" differently)
        bool ok = !value.empty() && value.size() <= 19;
        for (char c : value) ok = ok && c >= '0' && c <= '9';
        if (!ok) throw OnnxRefsError("tensor '" + tensor + "': external data " + key + " '" + value + "' is not a non-negative integer");
        return std::stoull(value);
    }

    void tensor(size_t pos, size_t end) {
        std::string name;
        bool external = false;
        std::vector<std::pair<std::string, std::string>> entries;
        Field f;
        while (next(pos, end, f)) {
            if (f.number == kTensorName && f.wire == 2) {
                name = text(f);
            } else if (f.number == kTensorLocation && f.wire == 0) {
                external = (f.value & 0xFFFFFFFFu) == kExternal;  // a closed enum read as int32
            } else if (f.number == kTensorExternal && f.wire == 2) {
                std::string key, value;
                size_t p = f.begin;
                Field e;
                while (next(p, f.end, e)) {
                    if (e.wire == 2 && e.number == kEntryKey) key = text(e);
                    else if (e.wire == 2 && e.number == kEntryValue) value = text(e);
                }
                // a loader opens the raw bytes: names must compare exactly (Python refuses them too)
                if (!valid_utf8(key) || !valid_utf8(value)) fail("external data entry that is not UTF-8", f.begin);
                entries.emplace_back(std::move(key), std::move(value));
            }
        }
        if (!external && entries.empty()) return;
        // any location entry counts, even without data_location EXTERNAL (stricter than loaders)
        std::map<std::string, std::string> seen;
        for (const auto &[key, value] : entries) {
            if (key != "location" && key != "offset" && key != "length") continue;
            if (!seen.emplace(key, value).second) throw OnnxRefsError("tensor '" + name + "': external data names its " + key + " twice");
        }
        if (!seen.count("location")) throw OnnxRefsError("tensor '" + name + "': external data without a location");
        ExternalRef ref;
        ref.tensor = name;
        ref.location = seen["location"];
        if (seen.count("offset")) ref.offset = count("offset", seen["offset"], name);
        if (seen.count("length")) {
            ref.has_length = true;
            ref.length = count("length", seen["length"], name);
        }
        refs_.push_back(std::move(ref));
    }
};

}  // namespace

std::vector<ExternalRef> external_data_refs(const uint8_t *data, size_t size) {
    std::vector<ExternalRef> refs;
    Reader(data, refs).model(0, size);
    return refs;
}

std::vector<ExternalRef> external_data_refs(const std::filesystem::path &graph) {
    const int fd = ::open(graph.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw std::system_error(errno, std::generic_category(), "cannot open " + graph.string());
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
        const int err = errno;
        ::close(fd);
        throw std::system_error(err, std::generic_category(), "cannot stat " + graph.string());
    }
    const size_t size = static_cast<size_t>(st.st_size);
    if (size == 0) {
        ::close(fd);
        return {};
    }
    // mapped, not read: a graph without external data holds its weights inline (GBs), and the
    // walk touches only the pages of its structure
    void *map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
    const int err = errno;
    ::close(fd);
    if (map == MAP_FAILED) throw std::system_error(err, std::generic_category(), "cannot map " + graph.string());
    struct Unmap {
        void *p;
        size_t n;
        ~Unmap() { ::munmap(p, n); }
    } unmap{map, size};
    return external_data_refs(static_cast<const uint8_t *>(map), size);
}

}  // namespace eclipse::core
