#include "core/chain_lambda.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "core/chain.hpp"
#include "core/scheduler.hpp"

using nlohmann::json;

namespace eclipse::core {
using namespace chain;  // NOLINT

namespace {
const char *kImageProcessorFile = "image_processor/preprocessor_config.json";  // families/lambda_eclipse IMAGE_PROCESSOR_FILE
}  // namespace

std::string py_repr(const std::string &s) {
    const bool single = s.find('\'') != std::string::npos, dbl = s.find('"') != std::string::npos;
    const char quote = single && !dbl ? '"' : '\'';
    std::string out(1, quote);
    for (unsigned char c : s) {
        if (c == '\\' || c == static_cast<unsigned char>(quote)) out += '\\', out += static_cast<char>(c);
        else if (c == '\n') out += "\\n";
        else if (c == '\r') out += "\\r";
        else if (c == '\t') out += "\\t";
        else if (c < 0x20 || c == 0x7f) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        } else out += static_cast<char>(c);  // UTF-8 of printable characters stays as it is
    }
    return out + quote;
}

void interleave(const std::vector<int32_t> &ids, std::vector<float> &hidden, int64_t E,
                const std::vector<std::vector<int32_t>> &keyword_ids, const std::vector<std::vector<float>> &embeddings,
                std::vector<bool> &found) {
    found.assign(keyword_ids.size(), false);
    for (size_t s = 0; s < keyword_ids.size(); ++s) {
        for (size_t t = 0; t < ids.size(); ++t) {  // every position, padding included (np.isin on the whole row)
            if (std::find(keyword_ids[s].begin(), keyword_ids[s].end(), ids[t]) == keyword_ids[s].end()) continue;
            std::copy(embeddings[s].begin(), embeddings[s].end(), hidden.begin() + static_cast<long>(t) * E);
            found[s] = true;
        }
    }
}

void open_lambda(BundleData &data, const std::string &path) {
    const Bundle &b = *data.bundle;
    try {
        data.image_processor = ClipImageConfig::from_json(b.read_json(kImageProcessorFile));
    } catch (const Error &e) {
        if (e.status != ECLIPSE_ERR_BUNDLE && e.status != ECLIPSE_ERR_INVALID_ARGUMENT) throw;
        throw Error(ECLIPSE_ERR_BUNDLE, path + ": " + kImageProcessorFile + " cannot be used (" + e.what() + ")");
    } catch (const json::exception &e) {
        throw Error(ECLIPSE_ERR_BUNDLE, path + ": " + kImageProcessorFile + " cannot be used (" + e.what() + ")");
    }
    data.R = b.dim("R");
    if (data.R <= 0) throw Error(ECLIPSE_ERR_BUNDLE, "bundle " + path + " has no dim R in its manifest");
    if (data.image_processor->crop_height != data.R || data.image_processor->crop_width != data.R)
        throw Error(ECLIPSE_ERR_BUNDLE, path + ": the image processor crops (" + std::to_string(data.image_processor->crop_height) +
                                            ", " + std::to_string(data.image_processor->crop_width) + "), the image encoder takes " +
                                            std::to_string(data.R) + "x" + std::to_string(data.R));
}

Result generate_lambda(State &state, const char *prompt, const eclipse_params &p, const Inputs &inputs) {
    const BundleData &data = *state.context->data;
    Result result;
    auto warn = [&](const std::string &w) {
        result.warnings.push_back(w);
        log(ECLIPSE_LOG_WARN, w);
    };

    // 0. validate before any work, in the Python runtime's order and words (request.py, then
    // chains/lambda_eclipse.py)
    check_decoder_request(prompt, p, warn);
    if (p.negative_prompt != nullptr)
        bad_request("λ-ECLIPSE takes no negative prompt (as the official pipeline, the negative is the zero-image embedding)");
    if (inputs.subjects.empty())
        bad_request("this is a λ-ECLIPSE bundle: give at least one subject image with its keyword (--subject dog.png=dog; "
                    "subjects=[(image, 'dog')]); plain text-to-image needs a plain ECLIPSE bundle");
    std::vector<std::vector<int32_t>> keyword_ids;
    for (size_t i = 0; i < inputs.subjects.size(); ++i) {
        const std::string &keyword = inputs.subjects[i].keyword;
        std::vector<int32_t> ids;
        try {
            ids = data.tokenizer->encode_ids(keyword);
        } catch (const Error &e) {  // invalid UTF-8: the tokenizer speaks of "the prompt"
            bad_request("subject " + std::to_string(i + 1) + ": the keyword is not valid UTF-8");
        }
        if (ids.empty()) bad_request("the subject keyword " + py_repr(keyword) + " tokenizes to nothing: give a word of the prompt");
        keyword_ids.push_back(std::move(ids));
    }
    require_noise_names(inputs, {"prior", "latents", "steps"}, family_title(data));
    Scheduler sched(data.scheduler_config, scheduler_kind_name(p.scheduler));
    sched.set_timesteps(p.steps);
    const int64_t B = 1, C = data.C, D = data.D, R = data.R;
    const int64_t h = p.height / data.S, w = p.width / data.S;
    const size_t n = static_cast<size_t>(B * C * h * w);
    const size_t steps = sched.timesteps().size();
    // no negative prompt: the prior batch is the prompts'
    const DecoderNoise noise = decoder_noises(p, inputs, static_cast<size_t>(B * D), n, sched.needs_noise() ? steps * n : 0);
    const auto t_start = std::chrono::steady_clock::now();

    // 1. tokens, 2. text encoder
    const int64_t T = data.tokenizer->max_length();
    const Tokens tok = data.tokenizer->encode(prompt);
    if (tok.truncated) warn("prompt truncated to " + std::to_string(T) + " tokens: '" + std::string(prompt).substr(0, 60) + "'...");
    std::map<std::string, int64_t> dims = manifest_dims(data);
    dims["B"] = B;
    auto t0 = std::chrono::steady_clock::now();
    auto text = run_component(state, "text_encoder", {{"input_ids", {tok.ids.data(), tok.ids.size(), DType::Int32}}}, dims);
    const std::vector<float> &text_embeds = output(text, "text_encoder", "text_embeds");
    std::vector<float> hidden = output(text, "text_encoder", "text_hidden_states");
    result.timings["text_encoder"] = seconds_since(t0);
    stage_done(state, "text_encoder", result);
    if (static_cast<int64_t>(text_embeds.size()) != B * D) bad_io("text_encoder", "does not give (B, D) text embeddings");
    const int64_t E = static_cast<int64_t>(hidden.size()) / (B * T);
    if (E * B * T != static_cast<int64_t>(hidden.size()) || E != D)
        bad_io("text_encoder", "gives text states whose width is not the image embeddings' (D)");

    // 3. image encoder: each subject, then the edge map (else the zero-image embedding)
    double encoder_seconds = 0;
    auto embed = [&](const Rgb8Image &image, const std::string &key) {
        const std::vector<float> pixels = clip_preprocess(image, *data.image_processor);
        if (static_cast<int64_t>(pixels.size()) != 3 * R * R) bad_io("image_encoder", "takes images of another size than the preprocessing gives");
        const auto t = std::chrono::steady_clock::now();
        auto out = run_component(state, "image_encoder", {{"pixel_values", f32(pixels)}}, dims);
        const double seconds = seconds_since(t);
        result.timings["image_encoder." + key] = seconds;
        encoder_seconds += seconds;
        std::vector<float> e = output(out, "image_encoder", "image_embeds");
        if (static_cast<int64_t>(e.size()) != D) bad_io("image_encoder", "does not give (B, D) image embeddings");
        return e;
    };
    std::vector<std::vector<float>> subject_embeds;
    for (size_t i = 0; i < inputs.subjects.size(); ++i)
        subject_embeds.push_back(embed(inputs.subjects[i].image, "subject" + std::to_string(i)));
    const std::vector<float> control = inputs.control ? embed(*inputs.control, "control") : data.negative_image_embeds;
    result.timings["image_encoder"] = encoder_seconds;
    stage_done(state, "image_encoder", result);

    // 4. interleave: the keyword's positions take the subject's embedding
    std::vector<bool> found;
    interleave(tok.ids, hidden, E, keyword_ids, subject_embeds, found);
    for (size_t s = 0; s < found.size(); ++s) {
        if (!found[s])
            warn("the subject keyword " + py_repr(inputs.subjects[s].keyword) + " is not in the prompt: its image is unused");
    }

    // 5. λ prior: one pass, noise in the hidden_states slot, the control token
    t0 = std::chrono::steady_clock::now();
    auto prior = run_component(state, "prior",
                               {{"noise", f32(noise.prior)}, {"text_embeds", f32(text_embeds)},
                                {"text_hidden_states", f32(hidden)},
                                {"attention_mask", {tok.mask.data(), tok.mask.size(), DType::Int32}},
                                {"control_embeds", f32(control)}},
                               dims);
    result.timings["prior"] = seconds_since(t0);
    stage_done(state, "prior", result);
    const std::vector<float> &embeds = output(prior, "prior", "image_embeds");
    if (static_cast<int64_t>(embeds.size()) != B * D) bad_io("prior", "does not give (B, D) image embeddings");

    // 6. UNet loop against the zero-image embedding, 7. MoVQ
    const bool cfg = p.guidance_scale > 1.0;
    std::vector<float> unet_embeds;
    if (cfg) unet_embeds = data.negative_image_embeds;
    unet_embeds.insert(unet_embeds.end(), embeds.begin(), embeds.end());
    denoise_and_decode(state, p, sched, noise, unet_embeds, cfg, h, w, dims, result);
    result.timings["total"] = seconds_since(t_start);
    return result;
}

}  // namespace eclipse::core
