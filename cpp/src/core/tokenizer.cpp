#include "core/tokenizer.hpp"

#include <utf8proc.h>

#include <climits>
#include <cstdlib>
#include <memory>

#include "core/common.hpp"

using nlohmann::json;

namespace eclipse::core {
namespace {

// CLIP's split pattern as tokenizer.json stores it; the hand-written splitter below implements
// exactly this one, so any other pattern is refused rather than tokenized differently.
const char *kClipSplitPattern =
    "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+";

[[noreturn]] void unsupported(const std::string &what) {
    throw Error(ECLIPSE_ERR_UNSUPPORTED, "tokenizer.json: " + what + " (this runtime reads CLIP's BPE tokenizer only)");
}

bool is_space(int32_t c) {  // Oniguruma's Unicode \s
    if ((c >= 0x09 && c <= 0x0D) || c == 0x85) return true;
    const auto cat = utf8proc_category(c);
    return cat == UTF8PROC_CATEGORY_ZS || cat == UTF8PROC_CATEGORY_ZL || cat == UTF8PROC_CATEGORY_ZP;
}

bool is_letter(int32_t c) {
    const auto cat = utf8proc_category(c);
    return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT ||
           cat == UTF8PROC_CATEGORY_LM || cat == UTF8PROC_CATEGORY_LO;
}

bool is_number(int32_t c) {
    const auto cat = utf8proc_category(c);
    return cat == UTF8PROC_CATEGORY_ND || cat == UTF8PROC_CATEGORY_NL || cat == UTF8PROC_CATEGORY_NO;
}

bool is_other(int32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); }

using CodePoints = std::vector<int32_t>;

CodePoints decode(const std::string &s) {
    CodePoints out;
    const auto *p = reinterpret_cast<const utf8proc_uint8_t *>(s.data());
    utf8proc_ssize_t at = 0, n = static_cast<utf8proc_ssize_t>(s.size());
    while (at < n) {
        utf8proc_int32_t c;
        const utf8proc_ssize_t len = utf8proc_iterate(p + at, n - at, &c);
        if (len <= 0) throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "the prompt is not valid UTF-8");
        out.push_back(c);
        at += len;
    }
    return out;
}

std::string to_utf8(const CodePoints &cps, size_t begin, size_t end) {
    std::string out;
    utf8proc_uint8_t buf[4];
    for (size_t i = begin; i < end; ++i) {
        const auto len = utf8proc_encode_char(cps[i], buf);
        out.append(reinterpret_cast<const char *>(buf), static_cast<size_t>(len));
    }
    return out;
}

// tokenizers' normalizer Sequence [NFC, Replace(\s+ -> " "), Lowercase].
CodePoints normalize(const std::string &segment) {
    utf8proc_uint8_t *nfc = nullptr;
    const utf8proc_ssize_t len = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t *>(segment.data()),
                                              static_cast<utf8proc_ssize_t>(segment.size()), &nfc,
                                              static_cast<utf8proc_option_t>(UTF8PROC_STABLE | UTF8PROC_COMPOSE));
    if (len < 0) throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "the prompt is not valid UTF-8");
    std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> owner(nfc, std::free);
    const CodePoints cps = decode(std::string(reinterpret_cast<const char *>(nfc), static_cast<size_t>(len)));
    CodePoints out;
    for (size_t i = 0; i < cps.size(); ++i) {
        if (is_space(cps[i])) {
            while (i + 1 < cps.size() && is_space(cps[i + 1])) ++i;
            out.push_back(' ');
        } else if (cps[i] == 0x0130) {
            // Rust's char::to_lowercase uses the full mapping: the one character whose lower case
            // is two characters (SpecialCasing.txt) is U+0130 -> "i" + U+0307
            out.push_back('i');
            out.push_back(0x0307);
        } else {
            out.push_back(utf8proc_tolower(cps[i]));  // per character, no context (as Rust's)
        }
    }
    return out;
}

bool starts_with(const CodePoints &s, size_t at, const char *ascii) {
    for (size_t k = 0; ascii[k]; ++k) {
        if (at + k >= s.size() || s[at + k] != static_cast<unsigned char>(ascii[k])) return false;
    }
    return true;
}

// Length of a contraction ('s 't 're 've 'm 'll 'd) at `at`, 0 if none.
size_t contraction(const CodePoints &s, size_t at) {
    for (const char *c : {"'s", "'t", "'re", "'ve", "'m", "'ll", "'d"}) {
        if (starts_with(s, at, c)) return std::char_traits<char>::length(c);
    }
    return 0;
}

template <class Pred>
size_t run(const CodePoints &s, size_t at, Pred pred) {
    size_t end = at;
    while (end < s.size() && pred(s[end])) ++end;
    return end - at;
}

// CLIP's split pattern (behaviour "Removed", inverted: the matches are kept, whitespace dropped).
// Alternatives are tried in the pattern's order at each position, as a backtracking engine does.
std::vector<std::pair<size_t, size_t>> clip_split(const CodePoints &s) {
    std::vector<std::pair<size_t, size_t>> pieces;
    size_t at = 0;
    while (at < s.size()) {
        size_t len = 0;
        if (starts_with(s, at, "<|startoftext|>")) len = 15;
        else if (starts_with(s, at, "<|endoftext|>")) len = 13;
        else if ((len = contraction(s, at)) != 0) {}
        else if (is_letter(s[at])) len = run(s, at, is_letter);
        else if (is_number(s[at])) len = 1;
        else if (is_other(s[at])) len = run(s, at, is_other);
        if (len == 0) {  // whitespace: no alternative matches here
            ++at;
            continue;
        }
        pieces.emplace_back(at, at + len);
        at += len;
    }
    return pieces;
}

// GPT-2's byte-level pattern ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+), with
// behaviour "Isolated", on one piece of clip_split: pieces hold no whitespace, so the optional
// leading space and the whitespace alternatives never apply.
std::vector<std::pair<size_t, size_t>> byte_level_split(const CodePoints &s, size_t begin, size_t end) {
    std::vector<std::pair<size_t, size_t>> pieces;
    const CodePoints piece(s.begin() + static_cast<long>(begin), s.begin() + static_cast<long>(end));
    size_t at = 0;
    while (at < piece.size()) {
        size_t len = contraction(piece, at);
        if (len == 0) {
            if (is_letter(piece[at])) len = run(piece, at, is_letter);
            else if (is_number(piece[at])) len = run(piece, at, is_number);
            else len = run(piece, at, is_other);
            if (len == 0) len = 1;  // not reachable for clip_split's pieces; keeps the loop finite
        }
        pieces.emplace_back(begin + at, begin + at + len);
        at += len;
    }
    return pieces;
}

}  // namespace

bool is_blank(const std::string &text) {
    try {
        for (int32_t c : decode(text)) {
            if (!is_space(c) && !(c >= 0x1C && c <= 0x1F)) return false;  // str.isspace adds U+001C..001F
        }
        return true;
    } catch (const Error &) {
        return false;
    }
}

ClipTokenizer::ClipTokenizer(const json &tok, const json &config) {
    try {
        const json &model = tok.at("model");
        if (model.value("type", "") != "BPE") unsupported("model type is not BPE");
        if (model.contains("byte_fallback") && model["byte_fallback"].is_boolean() && model["byte_fallback"].get<bool>())
            unsupported("byte_fallback");
        if (model.contains("dropout") && !model["dropout"].is_null()) unsupported("BPE dropout");
        const json prefix = model.value("continuing_subword_prefix", json());
        if (!prefix.is_null() && prefix != "") unsupported("a continuing_subword_prefix");
        suffix_ = model.value("end_of_word_suffix", json("")).is_string() ? model.value("end_of_word_suffix", "") : "";
        if (suffix_ != "</w>") unsupported("end_of_word_suffix is not </w>");

        for (const auto &[token, id] : model.at("vocab").items()) vocab_[token] = id.get<int32_t>();
        int32_t rank = 0;
        for (const auto &merge : model.at("merges")) {
            std::string key;
            if (merge.is_string()) key = merge.get<std::string>();  // older files: "left right"
            else key = merge.at(0).get<std::string>() + " " + merge.at(1).get<std::string>();
            merge_rank_.emplace(key, rank++);
        }
        if (model.contains("unk_token") && model["unk_token"].is_string()) {
            auto it = vocab_.find(model["unk_token"].get<std::string>());
            if (it != vocab_.end()) unk_id_ = it->second;
        }

        for (const auto &added : tok.value("added_tokens", json::array())) {
            if (added.value("normalized", false) || added.value("lstrip", false) || added.value("rstrip", false) ||
                added.value("single_word", false))
                unsupported("an added token with normalized/lstrip/rstrip/single_word set");
            added_.emplace_back(added.at("content").get<std::string>(), added.at("id").get<int32_t>());
        }

        const json &norm = tok.at("normalizer");
        const json expected_norm = json::parse(
            R"([{"type":"NFC"},{"type":"Replace","pattern":{"Regex":"\\s+"},"content":" "},{"type":"Lowercase"}])");
        if (norm.value("type", "") != "Sequence" || norm.at("normalizers") != expected_norm)
            unsupported("a normalizer other than CLIP's [NFC, whitespace runs -> ' ', Lowercase]");

        const json &pre = tok.at("pre_tokenizer");
        const json &steps = pre.at("pretokenizers");
        if (pre.value("type", "") != "Sequence" || steps.size() != 2 || steps[0].value("type", "") != "Split" ||
            steps[0].at("pattern").value("Regex", "") != kClipSplitPattern ||
            steps[0].value("behavior", "") != "Removed" || !steps[0].value("invert", false) ||
            steps[1].value("type", "") != "ByteLevel" || steps[1].value("add_prefix_space", true) ||
            !steps[1].value("use_regex", false))
            unsupported("a pre-tokenizer other than CLIP's split pattern + ByteLevel");

        const json &post = tok.at("post_processor");
        if (post.value("type", "") != "RobertaProcessing") unsupported("a post-processor other than RobertaProcessing");
        bos_id_ = post.at("cls").at(1).get<int32_t>();
        eos_id_ = post.at("sep").at(1).get<int32_t>();
    } catch (const json::exception &e) {
        unsupported(std::string("unexpected layout (") + e.what() + ")");
    }
    if (bos_id_ == eos_id_) unsupported("bos and eos are the same token");

    // pad token and context length from tokenizer_config.json, as runtime/tokenizer.py reads them
    std::string pad = "<|endoftext|>";
    if (config.is_object() && config.contains("pad_token")) {
        const json &p = config["pad_token"];
        pad = p.is_object() ? p.value("content", pad) : p.is_string() ? p.get<std::string>() : pad;
    }
    auto it = vocab_.find(pad);
    if (it == vocab_.end()) unsupported("pad token '" + pad + "' is not in the vocabulary");
    pad_id_ = it->second;
    if (config.is_object() && config.contains("model_max_length") && config["model_max_length"].is_number()) {
        const double m = config["model_max_length"].get<double>();
        // transformers' "no limit" sentinel is a huge number: CLIP's context is 77
        max_length_ = m > 10000 ? 77 : static_cast<int32_t>(m);
    }
    if (max_length_ < 2) unsupported("model_max_length below 2");

    // GPT-2's byte <-> printable character table: printable Latin-1 bytes stand for themselves,
    // the others are numbered from U+0100 in byte order.
    int next = 256;
    for (int b = 0; b < 256; ++b) {
        const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        byte_char_[b] = to_utf8({printable ? b : next++}, 0, 1);
    }
}

void ClipTokenizer::bpe(const std::string &word, std::vector<int32_t> &out) const {
    std::vector<std::string> symbols;
    for (unsigned char byte : word) symbols.push_back(byte_char_[byte]);
    if (symbols.empty()) return;
    symbols.back() += suffix_;
    // merge the adjacent pair of lowest rank, leftmost on ties, until none is in the merges
    while (symbols.size() > 1) {
        int best_rank = INT_MAX;
        size_t best = 0;
        for (size_t i = 0; i + 1 < symbols.size(); ++i) {
            auto it = merge_rank_.find(symbols[i] + " " + symbols[i + 1]);
            if (it != merge_rank_.end() && it->second < best_rank) {
                best_rank = it->second;
                best = i;
            }
        }
        if (best_rank == INT_MAX) break;
        symbols[best] += symbols[best + 1];
        symbols.erase(symbols.begin() + static_cast<long>(best) + 1);
    }
    for (const auto &s : symbols) {
        auto it = vocab_.find(s);
        if (it != vocab_.end()) out.push_back(it->second);
        else if (unk_id_ >= 0) out.push_back(unk_id_);
        else throw Error(ECLIPSE_ERR_UNSUPPORTED, "tokenizer.json: symbol '" + s + "' is not in the vocabulary and there is no unk token");
    }
}

std::vector<int32_t> ClipTokenizer::encode_ids(const std::string &text) const {
    decode(text);  // refuse invalid UTF-8 up front
    std::vector<int32_t> ids;
    auto segment = [&](size_t begin, size_t end) {
        if (begin == end) return;
        const CodePoints cps = normalize(text.substr(begin, end - begin));
        for (const auto &[pb, pe] : clip_split(cps)) {
            for (const auto &[wb, we] : byte_level_split(cps, pb, pe)) bpe(to_utf8(cps, wb, we), ids);
        }
    };
    // added tokens are matched on the raw text, leftmost then longest, before normalization
    size_t start = 0, at = 0;
    while (at < text.size()) {
        size_t best_len = 0;
        int32_t best_id = -1;
        for (const auto &[content, id] : added_) {
            if (content.size() > best_len && text.compare(at, content.size(), content) == 0) {
                best_len = content.size();
                best_id = id;
            }
        }
        if (best_len == 0) {
            ++at;
            continue;
        }
        segment(start, at);
        ids.push_back(best_id);
        at += best_len;
        start = at;
    }
    segment(start, text.size());
    return ids;
}

Tokens ClipTokenizer::encode(const std::string &text) const {
    std::vector<int32_t> body = encode_ids(text);
    Tokens out;
    const size_t room = static_cast<size_t>(max_length_) - 2;
    out.truncated = body.size() > room;
    if (out.truncated) body.resize(room);  // keep bos + the first tokens + eos, as transformers truncates
    out.ids.assign(static_cast<size_t>(max_length_), pad_id_);
    out.mask.assign(static_cast<size_t>(max_length_), 0);
    out.ids[0] = bos_id_;
    for (size_t i = 0; i < body.size(); ++i) out.ids[i + 1] = body[i];
    out.ids[body.size() + 1] = eos_id_;
    for (size_t i = 0; i < body.size() + 2; ++i) out.mask[i] = 1;
    return out;
}

}  // namespace eclipse::core
