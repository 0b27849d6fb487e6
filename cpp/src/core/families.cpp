#include "core/families.hpp"

namespace eclipse::core {

const std::vector<Family> &families() {
    static const std::vector<Family> known = {
        {"kandinsky22",
         {"text_encoder", "prior", "unet", "movq"},
         {"T", "D", "E", "C", "S"},
         {"scheduler_config.json", "negative_image_embeds.npy", "tokenizer/tokenizer.json"}},
        // λ-ECLIPSE: its chain is core/chain_lambda.cpp
        {"lambda",
         {"text_encoder", "image_encoder", "prior", "unet", "movq"},
         {"T", "D", "E", "C", "S", "R"},
         {"scheduler_config.json", "negative_image_embeds.npy", "tokenizer/tokenizer.json",
          "image_processor/preprocessor_config.json"}},
        {"karlo",
         {"text_encoder", "prior", "text_proj", "decoder", "super_res_first", "super_res_last"},
         {"T", "D", "E", "X", "L", "K", "M", "P", "Q"},
         {"decoder_scheduler_config.json", "super_res_scheduler_config.json", "tokenizer/tokenizer.json"}},
    };
    return known;
}

const Family *find_family(const std::string &name) {
    for (const Family &f : families()) {
        if (f.name == name) return &f;
    }
    return nullptr;
}

std::string family_name(const nlohmann::json &m) {
    const nlohmann::json version = m.value("format_version", nlohmann::json());
    if (version == 1 && !m.contains("family")) return "kandinsky22";  // before families
    const nlohmann::json f = m.value("family", nlohmann::json());
    return f.is_string() ? f.get<std::string>() : "";
}

std::string unknown_family_message(const std::string &name) {
    std::string known;
    for (const Family &f : families()) known += (known.empty() ? "" : ", ") + f.name;
    return "model family '" + name + "' is not known to this version of eclipse-export (it knows " + known + ")";
}

}  // namespace eclipse::core
