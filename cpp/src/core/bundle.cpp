#include "core/bundle.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <fstream>
#include <set>
#include <system_error>
#include <vector>

#include "core/common.hpp"
#include "core/families.hpp"
#include "core/onnx_refs.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace eclipse::core {
namespace {

std::string hint(const fs::path &root) { return "re-export it (eclipse-export ... --out " + root.string() + ")"; }

[[noreturn]] void bundle_error(const std::string &message) { throw Error(ECLIPSE_ERR_BUNDLE, message); }

// The components, dims and files a bundle must have come from its family (core/families.hpp).
constexpr const char *kPrecisions[] = {"fp32", "fp16", "int8"};
constexpr const char *kEngineFlavours[] = {"tensorrt", "tensorrt-rtx"};
constexpr const char *kStepGraphKinds[] = {"cfg", "plain", "unclip_learned_cfg", "unclip_learned", "unclip_fixed"};
// Far above any real stack (bigG: D = E = 1280, T = 77), small enough that arrays sized from
// them cannot exhaust memory before a graph refuses them.
constexpr int64_t kMaxDim = int64_t{1} << 16;

template <size_t N>
bool one_of(const json &v, const char *const (&names)[N]) {
    if (!v.is_string()) return false;
    for (const char *n : names) {
        if (v.get<std::string>() == n) return true;
    }
    return false;
}

// Why a manifest path may not name a file of the bundle, or "" when it may (lexical only: the
// file system is checked after the whole manifest is).
std::string unsafe_reason(const json &value) {
    if (!value.is_string() || value.get<std::string>().empty()) return "is not a non-empty string";
    const std::string rel = value.get<std::string>();
    if (rel.find_first_of(std::string("\\:\0", 3)) != std::string::npos) return "holds a backslash, NUL or colon";
    if (rel.front() == '/') return "is absolute";
    size_t start = 0;
    while (true) {  // no ".", ".." or empty parts
        const size_t slash = rel.find('/', start);
        const std::string part = rel.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
        if (part.empty() || part == "." || part == "..") return "is not a plain relative path (., .. or empty parts)";
        if (slash == std::string::npos) break;
        start = slash + 1;
    }
    if (rel == "manifest.json") return "is the manifest itself";
    return "";
}

bool is_sha256(const json &v) {
    if (!v.is_string() || v.get<std::string>().size() != 64) return false;
    for (char c : v.get<std::string>()) {
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    }
    return true;
}

// Everything wrong with the manifest's structure, as runtime/bundle.py's manifest_problems.
std::vector<std::string> manifest_problems(const json &m) {
    std::vector<std::string> problems;
    const Family *family = find_family(family_name(m));
    if (!family) return {unknown_family_message(family_name(m))};
    const json files = m.value("files", json());
    if (!files.is_object() || files.empty()) return {"'files' must be a non-empty object"};
    for (const auto &[rel, entry] : files.items()) {
        if (const std::string why = unsafe_reason(rel); !why.empty()) {
            problems.push_back("files entry '" + rel + "' " + why);
        } else if (!entry.is_object()) {
            problems.push_back("files['" + rel + "'] must be an object");
        } else {
            if (!is_sha256(entry.value("sha256", json()))) problems.push_back("files['" + rel + "'].sha256 must be 64 lowercase hex digits");
            if (!entry.value("bytes", json()).is_number_unsigned())
                problems.push_back("files['" + rel + "'].bytes must be a non-negative integer");
        }
    }
    auto listed = [&](const std::string &where, const json &rel) {
        if (!unsafe_reason(rel).empty() || !files.contains(rel.get<std::string>()))
            problems.push_back(where + " " + rel.dump() + " is not one of the manifest's files");
    };
    for (const std::string &rel : family->required_files) listed("required file", rel);
    if (!one_of(m.value("precision", json()), kPrecisions))
        problems.push_back("precision must be one of fp32, fp16, int8, got " + m.value("precision", json()).dump());
    const json dims = m.value("dims", json());
    if (!dims.is_object()) {
        problems.push_back("'dims' must be an object");
    } else {
        for (const std::string &k : family->dim_names) {
            const json d = dims.value(k, json());
            if (!d.is_number_integer() || d.get<int64_t>() < 1 || d.get<int64_t>() > kMaxDim)
                problems.push_back("dims." + k + " must be an integer in 1.." + std::to_string(kMaxDim) + ", got " + d.dump());
        }
    }
    const json components = m.value("components", json());
    bool exact = components.is_object() && components.size() == family->components.size();
    for (const std::string &name : family->components) exact = exact && components.contains(name);
    if (!exact) {
        problems.push_back("'components' must name exactly " + join(family->components, ", "));
    } else {
        for (const auto &[name, c] : components.items()) {
            if (!c.is_object()) {
                problems.push_back("components." + name + " must be an object");
                continue;
            }
            const json graph = c.value("graph", json());
            listed("components." + name + ".graph", graph);
            const json graph_files = c.value("files", json());
            if (!graph_files.is_array() || std::find(graph_files.begin(), graph_files.end(), graph) == graph_files.end()) {
                problems.push_back("components." + name + ".files must be a list holding its graph");
            } else {
                for (const auto &rel : graph_files) listed("components." + name + ".files entry", rel);
            }
            const json io = c.value("io", json());
            if (!io.is_object() || !io.value("inputs", json()).is_array() || !io.value("outputs", json()).is_array())
                problems.push_back("components." + name + ".io must list inputs and outputs");
        }
    }
    json engines = m.value("engines", json::object());
    if (engines.is_null()) engines = json::object();
    if (!engines.is_object()) {
        problems.push_back("'engines' must be an object");
        engines = json::object();
    }
    for (const auto &[name, e] : engines.items()) {
        const bool known = std::find(family->components.begin(), family->components.end(), name) != family->components.end();
        if (!known || !e.is_object()) {
            problems.push_back("engines." + name + " must be an object of a known component");
            continue;
        }
        listed("engines." + name + ".file", e.value("file", json()));
        if (!one_of(e.value("flavour", json()), kEngineFlavours))
            problems.push_back("engines." + name + ".flavour must be one of tensorrt, tensorrt-rtx");
        if (!e.value("version", json()).is_string() || !e.value("key", json()).is_string())
            problems.push_back("engines." + name + ".version and .key must be strings");
        const json ccs = e.value("compute_capabilities", json());
        if (!ccs.is_array() || !std::all_of(ccs.begin(), ccs.end(), [](const json &c) { return c.is_string(); }))
            problems.push_back("engines." + name + ".compute_capabilities must be a list of strings");
    }
    json steps = m.value("step_graphs", json::object());
    if (steps.is_null()) steps = json::object();
    bool steps_ok = steps.is_object();
    for (const auto &[kind, rel] : steps_ok ? steps.items() : json::object().items()) {
        if (!one_of(json(kind), kStepGraphKinds)) steps_ok = false;
        else listed("step_graphs." + kind, rel);
    }
    if (!steps_ok) problems.push_back("'step_graphs' must be an object with keys among cfg, plain, unclip_learned_cfg, unclip_learned, unclip_fixed");
    return problems;
}

bool inside(const fs::path &root, const fs::path &path) {
    auto r = root.begin(), p = path.begin();
    for (; r != root.end(); ++r, ++p) {
        if (p == path.end() || *r != *p) return false;
    }
    return p != path.end();
}

// An untrusted name from a graph, quoted and cut (it can be any length).
std::string quoted(const std::string &text, size_t limit = 80) {
    return "'" + (text.size() <= limit ? text : text.substr(0, limit) + "...") + "'";
}

}  // namespace

std::vector<std::string> engine_problems(const json &entry, const std::string &installed_version, const std::string &gpu_cc) {
    // the manifest check at open guarantees flavour, version and compute_capabilities
    const std::string flavour = entry.at("flavour").get<std::string>();
    const std::string version = entry.at("version").get<std::string>();
    std::vector<std::string> problems;
    if (installed_version.empty())
        problems.push_back((flavour == "tensorrt-rtx" ? std::string("tensorrt_rtx") : flavour) + " is not installed");
    else if (installed_version != version)
        problems.push_back("built with " + flavour + " " + version + ", this machine has " + installed_version);
    std::vector<std::string> built_for;
    for (const auto &c : entry.at("compute_capabilities")) {
        if (c != "unknown") built_for.push_back(c.get<std::string>());
    }
    if (!gpu_cc.empty() && !built_for.empty() && std::find(built_for.begin(), built_for.end(), gpu_cc) == built_for.end()) {
        std::string list;
        for (const auto &c : built_for) list += (list.empty() ? "" : ", ") + c;
        problems.push_back("built for " + list + ", this GPU is " + gpu_cc);
    }
    return problems;
}

std::string sha256_file(const fs::path &path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(ECLIPSE_ERR_BUNDLE, "cannot read " + path.string());
    std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
    if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error(ECLIPSE_ERR_INTERNAL, "OpenSSL SHA-256 unavailable");
    std::vector<char> block(size_t{4} << 20);
    while (in) {
        in.read(block.data(), static_cast<std::streamsize>(block.size()));
        if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), block.data(), static_cast<size_t>(in.gcount()));
    }
    if (in.bad()) throw Error(ECLIPSE_ERR_BUNDLE, "error reading " + path.string());
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_DigestFinal_ex(ctx.get(), digest, &len);
    static const char *kHex = "0123456789abcdef";
    std::string out;
    for (unsigned int i = 0; i < len; ++i) {
        out += kHex[digest[i] >> 4];
        out += kHex[digest[i] & 15];
    }
    return out;
}

std::shared_ptr<const Bundle> Bundle::open(const fs::path &given, bool verify_hashes) {
    std::error_code ec;
    if (!fs::is_directory(given, ec))
        bundle_error("bundle " + given.string() + " does not exist or is not a directory; create one with eclipse-export");
    auto bundle = std::make_shared<Bundle>();
    bundle->root_ = fs::canonical(given, ec);
    if (ec) bundle_error("cannot resolve bundle path " + given.string() + ": " + ec.message());
    const fs::path manifest_path = given / "manifest.json";
    if (!fs::exists(fs::symlink_status(manifest_path, ec)))
        bundle_error(given.string() + " has no manifest.json: not a bundle, or an export that did not finish; " + hint(given));
    const fs::path manifest_real = fs::weakly_canonical(manifest_path, ec);
    if (ec || !inside(bundle->root_, manifest_real))
        bundle_error(manifest_path.string() + " leads outside the bundle; " + hint(given));
    try {
        std::ifstream in(manifest_real);
        if (!in) throw std::runtime_error("cannot open it");
        bundle->manifest_ = json::parse(in);
    } catch (const std::exception &e) {
        bundle_error(manifest_path.string() + " is unreadable (" + e.what() + "); " + hint(given));
    }
    const json &m = bundle->manifest_;
    if (!m.is_object() || m.value("format", json()) != kBundleFormat) {
        std::string got = m.is_object() && m.contains("format") ? m["format"].dump() : "None";
        bundle_error(given.string() + " is not an eclipse-export bundle (format " + got + ")");
    }
    const json version = m.value("format_version", json());
    if (!version.is_number_integer() || version.get<int64_t>() < 1)
        bundle_error(manifest_path.string() + ": format_version must be a positive integer, got " + version.dump() + "; " + hint(given));
    if (version.get<int64_t>() > kBundleFormatVersion) {
        bundle_error(given.string() + " has bundle format " + version.dump() + ", newer than this runtime reads (" +
                     std::to_string(kBundleFormatVersion) +
                     "); upgrade eclipse-export, or re-export the bundle with this version");
    }
    if (!find_family(family_name(m)))
        bundle_error(given.string() + ": " + unknown_family_message(family_name(m)) +
                     "; upgrade eclipse-export, or re-export the bundle with this version");
    // structure first: a malformed entry must not be followed to the file system
    if (auto problems = manifest_problems(m); !problems.empty())
        bundle_error(manifest_path.string() + " is invalid: " + join(problems) + "; " + hint(given));

    std::vector<std::string> problems;
    for (const auto &[rel, entry] : m["files"].items()) {  // nlohmann's object is sorted: same order as Python
        const fs::path path = bundle->root_ / rel;
        const fs::path real = fs::weakly_canonical(path, ec);
        if (ec || !inside(bundle->root_, real)) {
            problems.push_back(rel + " resolves outside the bundle (a symlink?)");
            continue;
        }
        if (!fs::is_regular_file(real, ec)) {
            problems.push_back("missing " + rel);
            continue;
        }
        const auto size = fs::file_size(real, ec);
        if (ec || size != entry["bytes"].get<uint64_t>()) {
            problems.push_back(rel + " has " + std::to_string(size) + " bytes, manifest says " + entry["bytes"].dump());
            continue;
        }
        if (verify_hashes && sha256_file(real) != entry["sha256"].get<std::string>()) {
            problems.push_back(rel + " was altered (sha256 differs from the manifest)");
            continue;
        }
        bundle->files_[rel] = real;
    }
    if (!problems.empty()) bundle_error("bundle " + given.string() + " is damaged: " + join(problems) + "; " + hint(given));
    // The graphs name files themselves (external data), which a backend opens on its own (ONNX
    // Runtime before 1.24 follows "../x" and absolute paths; TensorRT's parser refits from them):
    // checked here, before any backend can be given a graph of this bundle.
    for (const std::string &name : find_family(family_name(m))->components) bundle->check_graph(name);
    const json steps = m.value("step_graphs", json::object());
    if (steps.is_object()) {  // the device loop's step graphs, written whole by export: no external data
        for (const auto &[kind, rel] : steps.items()) bundle->check_references("step_graphs." + kind, rel.get<std::string>(), {});
    }
    return bundle;
}

int64_t Bundle::dim(const std::string &name) const {
    const json dims = manifest_.value("dims", json::object());
    return dims.contains(name) && dims[name].is_number_integer() ? dims[name].get<int64_t>() : -1;
}

const json &Bundle::component(const std::string &name) const {
    const auto &components = manifest_.value("components", json::object());
    if (!manifest_.contains("components") || !components.contains(name))
        bundle_error("bundle " + root_.string() + " has no " + name + " component; " + hint(root_));
    return manifest_["components"][name];
}

fs::path Bundle::path(const std::string &rel) const {
    auto it = files_.find(rel);
    if (it == files_.end())
        bundle_error("bundle " + root_.string() + " does not list " + rel + " in its manifest; " + hint(root_));
    return it->second;
}

std::string Bundle::read(const std::string &rel) const {
    std::string out;
    if (!read_file(path(rel), out)) bundle_error("cannot read " + rel + " in bundle " + root_.string());
    return out;
}

void Bundle::check_graph(const std::string &name) const {
    const json &c = component(name);
    const std::string graph = c.at("graph").get<std::string>();
    std::set<std::string> data_files;
    for (const auto &rel : c.value("files", json::array())) data_files.insert(rel.get<std::string>());
    data_files.erase(graph);
    check_references(name, graph, data_files);
}

void Bundle::check_references(const std::string &name, const std::string &graph, const std::set<std::string> &data_files) const {
    std::vector<std::string> problems;
    std::vector<ExternalRef> refs;
    try {
        refs = external_data_refs(path(graph));
    } catch (const OnnxRefsError &e) {
        problems.push_back(std::string("its protobuf is malformed (") + e.what() + ")");
    } catch (const std::system_error &e) {
        problems.push_back(std::string("it is unreadable (") + e.what() + ")");
    }
    const fs::path folder = fs::path(graph).parent_path();
    std::set<std::string> used;
    for (const auto &ref : refs) {
        const std::string where = "tensor " + quoted(ref.tensor) + " names external data " + quoted(ref.location);
        std::string why = unsafe_reason(ref.location);
        if (ref.location == kOrtMemoryTag) why = "is ONNX Runtime's in-memory address tag";
        if (!why.empty()) {
            problems.push_back(where + ", which " + why);
            continue;
        }
        const std::string rel = folder.empty() ? ref.location : (folder / ref.location).generic_string();
        if (!data_files.count(rel)) {
            std::string list, whose;
            for (const auto &f : data_files) list += (list.empty() ? "'" : ", '") + f + "'";
            for (const auto &[other, o] : manifest_["components"].items()) {
                if (other == name || !o.is_object() || !o.contains("files") || !o["files"].is_array()) continue;
                for (const auto &f : o["files"]) {
                    if (whose.empty() && f == rel) whose = " (it is " + other + "'s)";
                }
            }
            problems.push_back(where + ", which is not one of " + name + "'s external data files [" + list + "]" + whose);
            continue;
        }
        std::error_code ec;
        const fs::path real = fs::weakly_canonical(path(rel), ec);
        const uint64_t size = ec ? 0 : fs::file_size(real, ec);
        if (ec || !inside(root_, real)) {
            problems.push_back(where + ", which resolves outside the bundle");
            continue;
        }
        if (ref.offset > size || (ref.has_length && ref.length > size - ref.offset)) {
            const std::string length = ref.has_length ? std::to_string(ref.length) + " bytes" : "the rest";
            problems.push_back(where + " at offset " + std::to_string(ref.offset) + " (" + length + "), past the end of its " +
                               std::to_string(size) + " bytes");
            continue;
        }
        used.insert(rel);
    }
    if (problems.empty() && used != data_files) {
        std::string list;
        for (const auto &f : data_files) {
            if (!used.count(f)) list += (list.empty() ? "'" : ", '") + f + "'";
        }
        problems.push_back("components." + name + ".files lists [" + list + "], which its graph does not use");
    }
    if (!problems.empty())
        bundle_error("bundle " + root_.string() + ": the " + name + " graph " + graph + " cannot be loaded: " + join(problems) + "; " +
                     hint(root_));
}

json Bundle::read_json(const std::string &rel) const {
    try {
        return json::parse(read(rel));
    } catch (const json::exception &e) {
        bundle_error(rel + " in bundle " + root_.string() + " is not valid JSON (" + e.what() + ")");
    }
}

}  // namespace eclipse::core
