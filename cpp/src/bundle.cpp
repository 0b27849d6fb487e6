#include "bundle.hpp"

#include <openssl/evp.h>

#include <fstream>
#include <sstream>
#include <vector>

#include "common.hpp"

namespace fs = std::filesystem;
using nlohmann::json;

namespace eclipse::core {
namespace {

std::string hint(const fs::path &root) { return "re-export it (eclipse-export ... --out " + root.string() + ")"; }

[[noreturn]] void bundle_error(const std::string &message) { throw Error(ECLIPSE_ERR_BUNDLE, message); }

// Why a manifest path may not be opened, or "" when it may: relative, no "." or ".." parts.
std::string unsafe_reason(const std::string &rel) {
    if (rel.empty()) return "an empty path";
    if (rel.find('\0') != std::string::npos || rel.find('\\') != std::string::npos) return "a path with '\\' or NUL";
    const fs::path p(rel);
    if (p.is_absolute() || rel.front() == '/') return "an absolute path";
    for (const auto &part : p) {
        if (part == ".." || part == ".") return "a path with '" + part.string() + "'";
        if (part.empty()) return "a path with an empty part";
    }
    return "";
}

bool inside(const fs::path &root, const fs::path &path) {
    auto r = root.begin(), p = path.begin();
    for (; r != root.end(); ++r, ++p) {
        if (p == path.end() || *r != *p) return false;
    }
    return p != path.end();
}

}  // namespace

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
    if (!version.is_number_integer() || version.get<int64_t>() > kBundleFormatVersion) {
        bundle_error(given.string() + " has bundle format " + version.dump() + ", newer than this runtime reads (" +
                     std::to_string(kBundleFormatVersion) +
                     "); upgrade eclipse-export, or re-export the bundle with this version");
    }
    const json files = m.value("files", json::object());
    if (!files.is_object()) bundle_error(given.string() + "/manifest.json has no file list; " + hint(given));

    std::vector<std::string> problems;
    for (const auto &[rel, entry] : files.items()) {  // nlohmann's object is sorted: same order as Python
        if (const std::string why = unsafe_reason(rel); !why.empty()) {
            problems.push_back(rel + " is " + why + " (a bundle lists only files inside itself)");
            continue;
        }
        if (!entry.is_object() || !entry.contains("bytes") || !entry["bytes"].is_number_unsigned() ||
            !entry.contains("sha256") || !entry["sha256"].is_string()) {
            problems.push_back(rel + " has no size and sha256 in the manifest");
            continue;
        }
        const fs::path path = bundle->root_ / rel;
        const fs::path real = fs::weakly_canonical(path, ec);
        if (!ec && fs::exists(real) && !inside(bundle->root_, real)) {
            problems.push_back(rel + " leads outside the bundle (a symlink?)");
            continue;
        }
        if (ec || !fs::is_regular_file(real, ec)) {
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
    if (!problems.empty()) {
        std::string joined;
        for (const auto &p : problems) joined += (joined.empty() ? "" : "; ") + p;
        bundle_error("bundle " + given.string() + " is damaged: " + joined + "; " + hint(given));
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
    std::ifstream in(path(rel), std::ios::binary);
    std::ostringstream out;
    out << in.rdbuf();
    if (!in) bundle_error("cannot read " + rel + " in bundle " + root_.string());
    return out.str();
}

json Bundle::read_json(const std::string &rel) const {
    try {
        return json::parse(read(rel));
    } catch (const json::exception &e) {
        bundle_error(rel + " in bundle " + root_.string() + " is not valid JSON (" + e.what() + ")");
    }
}

}  // namespace eclipse::core
