// A bundle directory, read and verified as the Python runtime does (runtime/bundle.py): the
// manifest's format and version, every listed file's size and sha256; for every path the
// runtime opens, that it is listed in the manifest and resolves inside the bundle (no absolute
// paths, no "..", no symlink leading out); and the same for the files each graph names as its
// external data (onnx_refs.hpp), which must be exactly its component's other files.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace eclipse::core {

constexpr const char *kBundleFormat = "eclipse-export-bundle";
// 2: the manifest names its model family and may list step graphs (read by the Python ORT
// device loop); format 1 bundles are still read (core/families.hpp)
constexpr int kBundleFormatVersion = 2;

class Bundle {
public:
    // Throws Error(ECLIPSE_ERR_BUNDLE) listing every problem found.
    static std::shared_ptr<const Bundle> open(const std::filesystem::path &root, bool verify_hashes);

    const std::filesystem::path &root() const { return root_; }
    const nlohmann::json &manifest() const { return manifest_; }
    int64_t dim(const std::string &name) const;  // -1 when the manifest has no such dim
    const nlohmann::json &component(const std::string &name) const;

    bool listed(const std::string &rel) const { return files_.count(rel) != 0; }
    // The absolute path of a listed file (checked inside the bundle at open); throws otherwise.
    std::filesystem::path path(const std::string &rel) const;
    std::string read(const std::string &rel) const;
    nlohmann::json read_json(const std::string &rel) const;
    // Refuses (Error(ECLIPSE_ERR_BUNDLE)) a component's graph whose external-data references are
    // not exactly its other `files`: each a plain relative location naming one of them, inside
    // the bundle, offset + length within it; every one used. As runtime/bundle.py's
    // external_data_problems; open() runs it for every component, so no backend is ever given
    // a graph that has not passed it.
    void check_graph(const std::string &name) const;

private:
    // check_graph's rule for any graph of the bundle: `name` owns it and may reference exactly `data_files`
    void check_references(const std::string &name, const std::string &graph, const std::set<std::string> &data_files) const;

    std::filesystem::path root_;  // canonical
    nlohmann::json manifest_;
    std::map<std::string, std::filesystem::path> files_;  // manifest path -> resolved path
};

// Why an engine entry of the manifest cannot run with the installed TensorRT flavour on this
// GPU (empty: it can), as eclipse_export/export/engines.py's check_engine_compatible says it: the
// version must be the one that built it, the GPU one of the compute capabilities it was built
// for ("unknown" entries ignored). installed_version "" means the flavour is not installed;
// gpu_cc like "SM89", "" when unknown. For device backends (TensorRT), before deserializing.
std::vector<std::string> engine_problems(const nlohmann::json &entry, const std::string &installed_version,
                                         const std::string &gpu_cc);

// Lower-case hex sha256 of a file (OpenSSL), read in 4 MiB blocks.
std::string sha256_file(const std::filesystem::path &path);

}  // namespace eclipse::core
