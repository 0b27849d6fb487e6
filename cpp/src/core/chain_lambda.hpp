// λ-ECLIPSE + Kandinsky 2.2, as runtime/chains/lambda_eclipse.py runs it: tokens -> text encoder;
// each subject image (and the edge map) -> CLIP preprocessing -> image encoder; the keyword
// positions of the text states replaced by their subject's embedding; λ prior (one pass, control
// embedding) -> the Kandinsky 2.2 UNet loop against the zero-image embedding -> MoVQ.
#pragma once

#include <string>

#include "core/pipeline.hpp"

namespace eclipse::core {

// Reads the λ bundle's image processor config into `data` (the Kandinsky 2.2 resources are read already).
void open_lambda(BundleData &data, const std::string &path);
Result generate_lambda(State &state, const char *prompt, const eclipse_params &params, const Inputs &inputs);

// Python's repr() of a str for the messages the Python runtime writes with {keyword!r}
std::string py_repr(const std::string &utf8);

// runtime/subjects.py interleave for one prompt: every position of `ids` (T) holding any id of a
// subject's keyword gets that subject's embedding (E) in `hidden` (T, E); later subjects win.
// found[s]: whether subject s matched anywhere.
void interleave(const std::vector<int32_t> &ids, std::vector<float> &hidden, int64_t E,
                const std::vector<std::vector<int32_t>> &keyword_ids, const std::vector<std::vector<float>> &embeddings,
                std::vector<bool> &found);

}  // namespace eclipse::core
