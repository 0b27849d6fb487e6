// What every family's chain (core/pipeline.cpp: Kandinsky 2.2, core/chain_karlo.cpp: Karlo,
// core/chain_lambda.cpp: λ-ECLIPSE) uses to run its graphs: feeds, outputs, one component call,
// timings and errors; and the Kandinsky 2.2 decoder side that Kandinsky 2.2 and λ-ECLIPSE share.
#pragma once

#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "core/pipeline.hpp"
#include "core/scheduler.hpp"

namespace eclipse::core::chain {

struct Feed {
    const void *data;
    size_t count;  // elements the pipeline holds: the spec's shape must agree, or the graph would read past them
    DType dtype;
};
// by output name; an int32 output is stored in a float buffer of the same count (read it with int32_output)
using Outputs = std::map<std::string, std::vector<float>>;

double seconds_since(std::chrono::steady_clock::time_point t0);
[[noreturn]] void bad_request(const std::string &message);
[[noreturn]] void bad_io(const std::string &component, const std::string &why);
std::string format_number(double v);
const std::vector<float> &output(const Outputs &out, const std::string &component, const std::string &name);
Outputs run_component(State &state, const std::string &name, const std::map<std::string, Feed> &feed,
                      const std::map<std::string, int64_t> &dims);
void stage_done(State &state, const std::string &name, Result &result);
Feed f32(const std::vector<float> &v);

inline std::vector<int32_t> int32_output(const Outputs &out, const std::string &component, const std::string &name) {
    const std::vector<float> &raw = output(out, component, name);
    std::vector<int32_t> v(raw.size());
    std::memcpy(v.data(), raw.data(), raw.size() * sizeof(int32_t));
    return v;
}

// --- injected noises (eclipse_params.noises, by name) ---
// Refuses a noise name the family does not draw (names: the ones it does, for the message).
void require_noise_names(const Inputs &inputs, const std::vector<std::string> &names, const std::string &family_title);
// The injected noise `name` when its count is `want` (else a problem appended), else the seed's stream.
std::vector<float> noise_or_seed(const Inputs &inputs, const char *name, const char *what, uint64_t seed, uint32_t stream,
                                 size_t want, std::string &problems);
// families/<name>/__init__.py's title of the bundle's family
std::string family_title(const BundleData &data);
// Plain ECLIPSE families refuse subject and control images (runtime/chains/kandinsky22.py's words).
void refuse_subjects(const BundleData &data, const Inputs &inputs);
// the manifest's integer dims, T from the tokenizer
std::map<std::string, int64_t> manifest_dims(const BundleData &data);

// --- the Kandinsky 2.2 decoder side (kandinsky22 and lambda) ---
struct DecoderNoise {
    std::vector<float> prior, latents, steps;
};
DecoderNoise decoder_noises(const eclipse_params &p, const Inputs &inputs, size_t prior_count, size_t latent_count,
                            size_t step_count);
// runtime/request.py's checks of prompt, size, steps and guidance, with its warnings
void check_decoder_request(const char *prompt, const eclipse_params &p, const std::function<void(const std::string &)> &warn);
// The UNet loop on unet_embeds ([negative; positive] under CFG; host loop or the backend's device
// loop), then MoVQ into result.pixels / width / height (as Kandinsky22Chain.denoise_and_decode).
// Returns the final latents.
std::vector<float> denoise_and_decode(State &state, const eclipse_params &p, Scheduler &sched, const DecoderNoise &noise,
                                      const std::vector<float> &unet_embeds, bool cfg, int64_t h, int64_t w,
                                      std::map<std::string, int64_t> &dims, Result &result);

}  // namespace eclipse::core::chain
