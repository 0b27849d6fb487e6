// The external-data references of an ONNX graph file, read from its protobuf wire format: the
// C++ twin of eclipse_export/runtime/onnx_refs.py (same fields, same refusals; both are tested
// against the onnx package on every graph the tests export). A graph names its weight files
// itself, and ONNX Runtime before 1.24 follows a location anywhere, so bundle.cpp checks every
// reference against the manifest before a backend sees the graph.
#pragma once

#include <cstdint>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

namespace eclipse::core {

// ONNX Runtime reads a tensor whose location is this tag from process memory at `offset`.
constexpr const char *kOrtMemoryTag = "*/_ORT_MEM_ADDR_/*";

struct ExternalRef {
    std::string tensor;
    std::string location;
    uint64_t offset = 0;
    bool has_length = false;  // false: to the end of the file
    uint64_t length = 0;
};

// The file is not a well-formed protobuf, or a reference is malformed.
class OnnxRefsError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Every reference of the graph file, in file order. The file is memory-mapped read-only and
// walked with bounds checks; raw weights are skipped, never copied. Throws OnnxRefsError for a
// malformed file, std::system_error when it cannot be opened or mapped.
std::vector<ExternalRef> external_data_refs(const std::filesystem::path &graph);

// The same over bytes in memory (tests, fuzzing).
std::vector<ExternalRef> external_data_refs(const uint8_t *data, size_t size);

}  // namespace eclipse::core
