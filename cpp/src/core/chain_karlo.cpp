#include "core/chain_karlo.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "backends/device_loop.hpp"
#include "core/chain.hpp"
#include "core/noise.hpp"
#include "core/unclip_scheduler.hpp"

using nlohmann::json;

namespace eclipse::core {
using namespace chain;  // NOLINT

namespace {

constexpr int64_t kChannels = 3;     // RGB: the decoder and the super-resolution UNets work in image space
constexpr int32_t kSuperResSteps = 7;  // the UnCLIPPipeline's (runtime/chains/karlo.py: super_res_steps)
// runtime/noise.py: Karlo's super-resolution streams
constexpr uint32_t kStreamSrLatents = 3, kStreamSrSteps = 4;

// (out, in) float64 weights of one axis (runtime/resample.py: aa_weights)
std::vector<double> aa_weights(int64_t in, int64_t out) {
    const double scale = static_cast<double>(in) / static_cast<double>(out);
    const double support = scale >= 1.0 ? 2.0 * scale : 2.0, invscale = scale >= 1.0 ? 1.0 / scale : 1.0;
    auto cubic = [](double x) {
        constexpr double a = -0.5;
        x = std::fabs(x);
        if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
        if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
        return 0.0;
    };
    std::vector<double> w(static_cast<size_t>(out * in), 0.0);
    for (int64_t i = 0; i < out; ++i) {
        const double centre = scale * (static_cast<double>(i) + 0.5);
        const int64_t lo = std::max<int64_t>(static_cast<int64_t>(centre - support + 0.5), 0);
        const int64_t hi = std::min<int64_t>(static_cast<int64_t>(centre + support + 0.5), in);
        double total = 0;
        for (int64_t j = lo; j < hi; ++j) total += (w[static_cast<size_t>(i * in + j)] = cubic((j - centre + 0.5) * invscale));
        if (total != 0)
            for (int64_t j = lo; j < hi; ++j) w[static_cast<size_t>(i * in + j)] /= total;
    }
    return w;
}

// One loop (the decoder, or super_res_first + super_res_last) on the backend's device
// (backends/device_loop.hpp denoise_unclip_on_device); false where the backend has none (the
// host loop runs). x: initial -> final latents; progress reports done + steps of this loop.
bool unclip_device_loop(State &state, const std::vector<std::string> &names, const UnclipScheduler &sched,
                        std::vector<float> &x, int64_t C, int64_t size, bool cfg, float scale, const std::vector<float> &noise,
                        std::vector<TensorView> constants, const eclipse_params &p, size_t done, size_t total) {
    const Backend &backend = *state.context->backend;
    if (!backend.has_unclip_loop() || sched.sample_prediction()) return false;
    UnclipLoopCall call;
    call.latents = x.data();
    const int64_t shape[4] = {1, C, size, size};
    std::copy(shape, shape + 4, call.latent_shape);
    call.constants = std::move(constants);
    for (size_t i = 0; i < sched.timesteps().size(); ++i) {
        call.timesteps.push_back(static_cast<float>(sched.timesteps()[i]));
        call.terms.push_back(sched.terms(sched.timesteps()[i], sched.prev_timestep(i)));
    }
    call.cfg = cfg, call.guidance_scale = scale, call.step_noise = noise.data();
    std::vector<float> out(x.size());
    call.out_latents = out.data();
    bool cancelled = false;
    call.progress = [&](int32_t step, int32_t) {
        cancelled = p.progress && p.progress(static_cast<int32_t>(done) + step, static_cast<int32_t>(total), p.progress_data) != 0;
        return !cancelled;
    };
    std::vector<std::pair<const Session *, SessionState *>> unets;
    for (const auto &name : names) unets.emplace_back(state.context->sessions.at(name).get(), state.session_states[name].get());
    if (!backend.denoise_unclip(unets, call)) {
        if (cancelled) throw Error(ECLIPSE_ERR_CANCELLED, "generation cancelled by the progress callback");
        throw Error(ECLIPSE_ERR_BACKEND, backend.name() + " backend's " + names[0] + " loop failed");
    }
    x = std::move(out);
    return true;
}

TensorView view(const char *name, DType dtype, std::vector<int64_t> shape, const void *data) {
    return {name, dtype, std::move(shape), const_cast<void *>(data)};  // the loop reads its constants only
}

}  // namespace

std::vector<float> resize_bicubic_aa(const std::vector<float> &x, int64_t planes, int64_t h, int64_t w, int64_t out_h,
                                     int64_t out_w) {
    const std::vector<double> wh = aa_weights(h, out_h), ww = aa_weights(w, out_w);
    std::vector<float> out(static_cast<size_t>(planes * out_h * out_w));
    std::vector<double> rows(static_cast<size_t>(h * out_w));
    for (int64_t p = 0; p < planes; ++p) {
        const float *src = x.data() + p * h * w;
        for (int64_t r = 0; r < h; ++r)  // along the width first
            for (int64_t q = 0; q < out_w; ++q) {
                double acc = 0;
                for (int64_t c = 0; c < w; ++c) acc += ww[static_cast<size_t>(q * w + c)] * src[r * w + c];
                rows[static_cast<size_t>(r * out_w + q)] = acc;
            }
        for (int64_t o = 0; o < out_h; ++o)
            for (int64_t q = 0; q < out_w; ++q) {
                double acc = 0;
                for (int64_t r = 0; r < h; ++r) acc += wh[static_cast<size_t>(o * h + r)] * rows[static_cast<size_t>(r * out_w + q)];
                out[static_cast<size_t>((p * out_h + o) * out_w + q)] = static_cast<float>(acc);
            }
    }
    return out;
}

void open_karlo(BundleData &data, const std::string &path) {
    const Bundle &b = *data.bundle;
    data.decoder_scheduler_config = b.read_json("decoder_scheduler_config.json");
    data.super_res_scheduler_config = b.read_json("super_res_scheduler_config.json");
    data.D = b.dim("D"), data.P = b.dim("P"), data.Q = b.dim("Q");
    if (data.D <= 0 || data.P <= 0 || data.Q <= 0)
        throw Error(ECLIPSE_ERR_BUNDLE, "bundle " + path + " has no dims D, P, Q in its manifest");
    UnclipScheduler check_decoder(data.decoder_scheduler_config), check_super_res(data.super_res_scheduler_config);
}

Result generate_karlo(State &state, const char *prompt, const eclipse_params &p, const Inputs &inputs) {
    const BundleData &data = *state.context->data;
    Result result;
    auto warn = [&](const std::string &w) {
        result.warnings.push_back(w);
        log(ECLIPSE_LOG_WARN, w);
    };
    // 0. validate before any work (as runtime/chains/karlo.py)
    if (prompt == nullptr) bad_request("no prompt given");
    if (p.negative_prompt != nullptr)
        bad_request("Karlo bundles take no negative prompt (the unconditional half is the empty prompt with "
                    "text_proj's learned embedding)");
    if (p.height != data.Q || p.width != data.Q)
        bad_request("this Karlo bundle generates " + std::to_string(data.Q) + "x" + std::to_string(data.Q) +
                    " images (its super-resolution UNets' size), not " + std::to_string(p.height) + "x" + std::to_string(p.width));
    if (p.scheduler != ECLIPSE_SCHEDULER_BUNDLE) bad_request("Karlo bundles sample with the unCLIP scheduler only");
    refuse_subjects(data, inputs);
    require_noise_names(inputs, {"prior", "latents", "steps", "sr_latents", "sr_steps"}, family_title(data));
    if (!std::isfinite(p.guidance_scale)) bad_request("guidance scale must be a finite number, got " + format_number(p.guidance_scale));
    if (is_blank(prompt)) warn("the prompt is empty: generating without text conditioning");
    if (p.guidance_scale < 1)
        warn("guidance scale " + format_number(p.guidance_scale) + " < 1 means no classifier-free guidance (same as 1)");
    UnclipScheduler dec(data.decoder_scheduler_config), sr(data.super_res_scheduler_config);
    dec.set_timesteps(p.steps);
    sr.set_timesteps(kSuperResSteps);

    const bool cfg = p.guidance_scale > 1.0;
    const float scale = static_cast<float>(p.guidance_scale);
    const int64_t B = 1, rows = cfg ? 2 : 1, D = data.D, P = data.P, Q = data.Q, C = kChannels;
    const size_t n = static_cast<size_t>(B * C * P * P), m = static_cast<size_t>(B * C * Q * Q);
    const size_t dec_steps = dec.timesteps().size(), sr_steps = sr.timesteps().size(), total_steps = dec_steps + sr_steps;
    // injected (by name, as KarloNoises' fields) or drawn from the seed's streams
    std::string problems;
    const std::vector<float> prior_noise = noise_or_seed(inputs, "prior", "prior noise", p.seed, ECLIPSE_STREAM_PRIOR,
                                                         static_cast<size_t>(B * D), problems);
    std::vector<float> latents = noise_or_seed(inputs, "latents", "latent noise", p.seed, ECLIPSE_STREAM_LATENTS, n, problems);
    const std::vector<float> step_noise =
        noise_or_seed(inputs, "steps", "step noise", p.seed, ECLIPSE_STREAM_STEPS, dec_steps * n, problems);
    std::vector<float> x = noise_or_seed(inputs, "sr_latents", "super-resolution latent noise", p.seed, kStreamSrLatents, m, problems);
    const std::vector<float> sr_noise =
        noise_or_seed(inputs, "sr_steps", "super-resolution step noise", p.seed, kStreamSrSteps, sr_steps * m, problems);
    if (!problems.empty()) bad_request("injected noises do not fit: " + problems);
    auto progress = [&](size_t done) {
        if (p.progress && p.progress(static_cast<int32_t>(done), static_cast<int32_t>(total_steps), p.progress_data) != 0)
            throw Error(ECLIPSE_ERR_CANCELLED, "generation cancelled by the progress callback at step " +
                                                   std::to_string(done) + "/" + std::to_string(total_steps));
    };
    const auto t_start = std::chrono::steady_clock::now();

    // 1. one text-encoder call on the guidance batch ["", prompt]
    std::vector<std::string> texts;
    if (cfg) texts.emplace_back("");
    texts.emplace_back(prompt);
    const int64_t T = data.tokenizer->max_length();
    std::vector<int32_t> ids, mask;
    for (const auto &text : texts) {
        Tokens tok = data.tokenizer->encode(text);
        if (tok.truncated) warn("prompt truncated to " + std::to_string(T) + " tokens: '" + text.substr(0, 60) + "'...");
        ids.insert(ids.end(), tok.ids.begin(), tok.ids.end());
        mask.insert(mask.end(), tok.mask.begin(), tok.mask.end());
    }
    std::map<std::string, int64_t> dims;
    for (const auto &[k, v] : data.bundle->manifest().at("dims").items())
        if (v.is_number_integer()) dims[k] = v.get<int64_t>();
    dims["T"] = T;
    dims["B"] = rows;
    auto t0 = std::chrono::steady_clock::now();
    auto text = run_component(state, "text_encoder", {{"input_ids", {ids.data(), ids.size(), DType::Int32}}}, dims);
    const std::vector<float> &embeds = output(text, "text_encoder", "text_embeds");
    const std::vector<float> &hidden = output(text, "text_encoder", "text_hidden_states");
    result.timings["text_encoder"] = seconds_since(t0);
    stage_done(state, "text_encoder", result);
    const int64_t E = static_cast<int64_t>(hidden.size()) / (rows * T);
    if (static_cast<int64_t>(embeds.size()) != rows * D) bad_io("text_encoder", "does not give (B, D) text embeddings");

    // 2. the prior on the prompt's rows (the last row) and the noise
    const size_t c = static_cast<size_t>(rows - 1);
    std::vector<float> cond_embeds(embeds.begin() + static_cast<long>(c * D), embeds.end());
    std::vector<float> cond_hidden(hidden.begin() + static_cast<long>(c * T * E), hidden.end());
    std::vector<int32_t> cond_mask(mask.begin() + static_cast<long>(c * T), mask.end());
    dims["B"] = B;
    t0 = std::chrono::steady_clock::now();
    auto prior = run_component(state, "prior",
                               {{"noise", f32(prior_noise)}, {"text_embeds", f32(cond_embeds)},
                                {"text_hidden_states", f32(cond_hidden)},
                                {"attention_mask", {cond_mask.data(), cond_mask.size(), DType::Int32}}},
                               dims);
    result.timings["prior"] = seconds_since(t0);
    stage_done(state, "prior", result);
    const std::vector<float> &image_embeds = output(prior, "prior", "image_embeds");
    if (static_cast<int64_t>(image_embeds.size()) != B * D) bad_io("prior", "does not give (B, D) image embeddings");

    // 3. text_proj on the guidance batch: unconditional rows get its learned embedding
    std::vector<float> proj_embeds;
    for (int64_t r = 0; r < rows; ++r) proj_embeds.insert(proj_embeds.end(), image_embeds.begin(), image_embeds.end());
    std::vector<int32_t> unconditional(static_cast<size_t>(rows), 0);
    if (cfg) unconditional[0] = 1;
    dims["B"] = rows;
    t0 = std::chrono::steady_clock::now();
    auto proj = run_component(state, "text_proj",
                              {{"image_embeds", f32(proj_embeds)},
                               {"unconditional", {unconditional.data(), unconditional.size(), DType::Int32}},
                               {"text_embeds", f32(embeds)}, {"text_hidden_states", f32(hidden)},
                               {"attention_mask", {mask.data(), mask.size(), DType::Int32}}},
                              dims);
    result.timings["text_proj"] = seconds_since(t0);
    stage_done(state, "text_proj", result);
    const std::vector<float> &context = output(proj, "text_proj", "encoder_hidden_states");
    const std::vector<float> &class_labels = output(proj, "text_proj", "class_labels");
    const std::vector<int32_t> decoder_mask = int32_output(proj, "text_proj", "decoder_attention_mask");

    // 4. the decoder loop: guidance on the noise channels, variance from the conditional half
    std::vector<float> sample(static_cast<size_t>(rows) * n), eps(n), variance(n);
    t0 = std::chrono::steady_clock::now();
    const int64_t L = static_cast<int64_t>(decoder_mask.size()) / rows;
    const bool dec_on_device = unclip_device_loop(
        state, {"decoder"}, dec, latents, C, P, cfg, scale, step_noise,
        {view("encoder_hidden_states", DType::Float32, {rows, L, static_cast<int64_t>(context.size()) / (rows * L)}, context.data()),
         view("class_labels", DType::Float32, {rows, static_cast<int64_t>(class_labels.size()) / rows}, class_labels.data()),
         view("attention_mask", DType::Int32, {rows, L}, decoder_mask.data())},
        p, 0, total_steps);
    for (size_t i = 0; i < (dec_on_device ? 0 : dec_steps); ++i) {  // else: the host loop
        const int64_t t = dec.timesteps()[i];
        std::copy(latents.begin(), latents.end(), sample.begin());
        if (cfg) std::copy(latents.begin(), latents.end(), sample.begin() + static_cast<long>(n));
        const float timestep = static_cast<float>(t);
        auto out = run_component(state, "decoder",
                                 {{"sample", f32(sample)}, {"timestep", {&timestep, 1, DType::Float32}},
                                  {"encoder_hidden_states", f32(context)}, {"class_labels", f32(class_labels)},
                                  {"attention_mask", {decoder_mask.data(), decoder_mask.size(), DType::Int32}}},
                                 dims);
        const std::vector<float> &pred = output(out, "decoder", "noise_pred");  // (rows, 2C, P, P)
        if (pred.size() != static_cast<size_t>(rows) * 2 * n) bad_io("decoder", "does not give (B, 6, P, P) predictions");
        const float *cond = pred.data() + (rows - 1) * 2 * n, *uncond = pred.data();
        for (size_t k = 0; k < n; ++k) {  // B = 1: the 3 noise channels, then the 3 variance channels
            eps[k] = cfg ? uncond[k] + scale * (cond[k] - uncond[k]) : cond[k];
            variance[k] = cond[n + k];
        }
        dec.step(eps.data(), variance.data(), t, dec.prev_timestep(i), latents.data(), step_noise.data() + i * n, n);
        progress(i + 1);
    }
    stage_done(state, "decoder", result);
    result.timings["decoder"] = seconds_since(t0);
    result.timings["decoder_per_step"] = result.timings["decoder"] / static_cast<double>(dec_steps);
    for (float &v : latents) v = std::min(std::max(v, -1.0f), 1.0f);

    // 5. upsample, 6. super-resolution
    t0 = std::chrono::steady_clock::now();
    const std::vector<float> upscaled = resize_bicubic_aa(latents, B * C, P, P, Q, Q);
    result.timings["upsample"] = seconds_since(t0);
    dims["B"] = B;
    t0 = std::chrono::steady_clock::now();
    const bool sr_on_device = unclip_device_loop(state, {"super_res_first", "super_res_last"}, sr, x, C, Q, false, 1.0f, sr_noise,
                                                 {view("image_upscaled", DType::Float32, {B, C, Q, Q}, upscaled.data())}, p,
                                                 dec_steps, total_steps);
    for (size_t i = 0; i < (sr_on_device ? 0 : sr_steps); ++i) {  // else: the host loop
        const int64_t t = sr.timesteps()[i];
        const std::string name = i + 1 == sr_steps ? "super_res_last" : "super_res_first";
        const float timestep = static_cast<float>(t);
        auto out = run_component(state, name,
                                 {{"sample", f32(x)}, {"image_upscaled", f32(upscaled)},
                                  {"timestep", {&timestep, 1, DType::Float32}}},
                                 dims);
        const std::vector<float> &pred = output(out, name, "noise_pred");
        if (pred.size() != m) bad_io(name, "does not give (B, 3, Q, Q) predictions");
        sr.step(pred.data(), nullptr, t, sr.prev_timestep(i), x.data(), sr_noise.data() + i * m, m);
        progress(dec_steps + i + 1);
    }
    stage_done(state, "super_res_first", result);
    stage_done(state, "super_res_last", result);
    result.timings["super_res"] = seconds_since(t0);

    // 7. image: x * 0.5 + 0.5 clamped, (C, Q, Q) -> (Q, Q, C), as images.to_uint8
    result.height = result.width = static_cast<int32_t>(Q);
    result.pixels.resize(m);
    const size_t qq = static_cast<size_t>(Q * Q);
    for (size_t ch = 0; ch < static_cast<size_t>(C); ++ch)
        for (size_t k = 0; k < qq; ++k) {
            const float v = std::min(std::max(x[ch * qq + k] * 0.5f + 0.5f, 0.0f), 1.0f) * 255.0f;
            result.pixels[k * static_cast<size_t>(C) + ch] = static_cast<uint8_t>(std::nearbyint(v));
        }
    result.timings["total"] = seconds_since(t_start);
    return result;
}

}  // namespace eclipse::core
