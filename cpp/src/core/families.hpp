// The model families this runtime knows, as data: what a bundle of each carries (components,
// dims, files the chain opens by name). The twin of eclipse_export/families/ (tests hold the two
// equal); a bundle names its family in its manifest ("family"; format 1 manifests carry none and
// are Kandinsky 2.2), and a family not listed here is refused when the bundle is opened.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace eclipse::core {

struct Family {
    std::string name;
    std::vector<std::string> components;      // chain order
    std::vector<std::string> dim_names;       // static dims the manifest records
    std::vector<std::string> required_files;  // files the chain opens by name
};

const std::vector<Family> &families();
// nullptr where the family is not known; `name` as the manifest gives it (format rules applied
// by family_name)
const Family *find_family(const std::string &name);
// The manifest's family: its "family" string, "kandinsky22" for format 1, "" where missing or
// not a string.
std::string family_name(const nlohmann::json &manifest);
// "model family 'x' is not known to this version of eclipse-export (it knows ...)"
std::string unknown_family_message(const std::string &name);

}  // namespace eclipse::core
