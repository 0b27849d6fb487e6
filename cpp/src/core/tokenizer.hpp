// The CLIP BPE tokenizer, read from a bundle's tokenizer/tokenizer.json, giving the ids the
// Python runtime gets from the `tokenizers` library with that file (runtime/tokenizer.py):
//   1. the added (special) tokens are split out of the raw text first (leftmost-longest);
//   2. each remaining piece: NFC, runs of whitespace -> " ", lower case (per character);
//   3. CLIP's split pattern ('s|'t|...|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+, whitespace removed),
//      then GPT-2's byte-level pattern on each piece, bytes mapped to GPT-2's printable chars;
//   4. BPE with the json's merges (lowest rank first, leftmost on ties), "</w>" on the last
//      symbol of a word;
//   5. [bos] ids [eos], cut to max_length keeping eos, padded with the pad id.
// "Whitespace" is the regex engine's \s (Oniguruma): U+0009-000D, U+0085 and the Unicode
// space/line/paragraph separators; letters and numbers are Unicode categories L* and N*
// (utf8proc). Only the tokenizer.json layout CLIP uses is accepted; anything else is refused.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

namespace eclipse::core {

struct Tokens {
    std::vector<int32_t> ids;   // max_length
    std::vector<int32_t> mask;  // 1 for bos..eos, 0 for padding
    bool truncated = false;
};

// True when the UTF-8 text is empty or only whitespace as Python's str.isspace sees it (the
// Python runtime's test for an empty prompt); invalid UTF-8 counts as not blank.
bool is_blank(const std::string &utf8);

class ClipTokenizer {
public:
    // tokenizer.json and tokenizer_config.json (may be null) of the bundle
    ClipTokenizer(const nlohmann::json &tokenizer, const nlohmann::json &config);

    Tokens encode(const std::string &utf8) const;  // throws Error on invalid UTF-8
    int32_t max_length() const { return max_length_; }
    // ids without bos/eos, never truncated (λ-ECLIPSE keywords: runtime/tokenizer.py encode_words);
    // throws Error on invalid UTF-8
    std::vector<int32_t> encode_ids(const std::string &utf8) const;

private:
    void bpe(const std::string &word, std::vector<int32_t> &out) const;

    std::unordered_map<std::string, int32_t> vocab_;
    std::unordered_map<std::string, int32_t> merge_rank_;  // "left right" -> rank
    std::vector<std::pair<std::string, int32_t>> added_;   // content, id
    std::string byte_char_[256];                          // GPT-2 byte -> printable char (UTF-8)
    std::string suffix_ = "</w>";
    int32_t unk_id_ = -1, bos_id_ = -1, eos_id_ = -1, pad_id_ = 0, max_length_ = 77;
};

}  // namespace eclipse::core
