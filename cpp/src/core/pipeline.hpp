// The chain, as runtime/pipeline.py runs it:
//   tokens -> text encoder -> prior (one pass; the negative prompt shares its batch) ->
//   UNet loop with classifier-free guidance (host loop, or the backend's device loop) -> MoVQ.
// BundleData and Context are immutable after creation; everything a generation writes lives
// in the State (or on its stack), so states on one context generate concurrently.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/backend.hpp"
#include "core/bundle.hpp"
#include "core/families.hpp"
#include "core/image_input.hpp"
#include "core/npy.hpp"
#include "core/tokenizer.hpp"

namespace eclipse::core {

struct BundleData {
    std::shared_ptr<const Bundle> bundle;
    const Family *family;  // core/families.hpp: the bundle's components in chain order
    std::unique_ptr<ClipTokenizer> tokenizer;
    nlohmann::json scheduler_config;
    std::vector<float> negative_image_embeds;  // (D): CLIP image embedding of a zeros image
    int64_t C = 0, D = 0, S = 0;
    // Karlo (core/chain_karlo.cpp): its two UnCLIP scheduler configs, decoder and super-resolution sizes
    nlohmann::json decoder_scheduler_config, super_res_scheduler_config;
    int64_t P = 0, Q = 0;
    // λ-ECLIPSE (core/chain_lambda.cpp): the CLIP image preprocessing of its image encoder (R x R input)
    std::optional<ClipImageConfig> image_processor;
    int64_t R = 0;

    static std::shared_ptr<const BundleData> open(const std::string &path, bool verify_hashes);
};

struct Context {
    std::shared_ptr<const BundleData> data;
    std::shared_ptr<Backend> backend;
    std::map<std::string, std::unique_ptr<Session>> sessions;  // by component name
    std::map<std::string, double> load_seconds;

    static std::shared_ptr<const Context> create(std::shared_ptr<const BundleData> data, std::shared_ptr<Backend> backend);
};

struct State {
    std::shared_ptr<const Context> context;
    std::map<std::string, std::unique_ptr<SessionState>> session_states;
};

struct Result {
    int32_t width = 0, height = 0;
    std::vector<uint8_t> pixels;  // height * width * 3
    std::map<std::string, double> timings;
    std::vector<std::string> warnings;
};

std::string scheduler_kind_name(eclipse_scheduler s);  // "" for the bundle's own

// What a request carries besides eclipse_params' scalars, decoded and checked at the C boundary
// (api.cpp) before any graph runs, as runtime/request.py's Request.make does.
struct Subject {
    Rgb8Image image;
    std::string keyword;  // stripped of surrounding whitespace, as the Python request stores it
};
struct NoiseInput {
    const float *data;
    size_t count;
};
struct Inputs {
    std::vector<Subject> subjects;
    std::optional<Rgb8Image> control;
    std::map<std::string, NoiseInput> noises;  // injected, by name (eclipse_noise; the API 1 fields folded in)
};

Result generate(State &state, const char *prompt, const eclipse_params &params, const Inputs &inputs);

// Writes an RGB8 image as PNG (libpng) atomically: a temporary file renamed into place.
void save_png(const std::string &path, const uint8_t *pixels, int32_t width, int32_t height);

}  // namespace eclipse::core
