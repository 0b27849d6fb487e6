#include "core/pipeline.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>

#include "core/chain.hpp"
#include "core/chain_karlo.hpp"
#include "core/chain_lambda.hpp"
#include "core/noise.hpp"
#include "core/scheduler.hpp"

using nlohmann::json;

namespace eclipse::core {
namespace {
constexpr int32_t kMinSize = 64, kMaxSize = 2048, kSizeMultiple = 64;
}  // namespace

// the helpers every family's chain uses (core/chain.hpp)
namespace chain {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

[[noreturn]] void bad_request(const std::string &message) { throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, message); }

std::string format_number(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
}

[[noreturn]] void bad_io(const std::string &component, const std::string &why) {
    throw Error(ECLIPSE_ERR_BUNDLE, "the manifest's I/O spec of " + component + " " + why +
                                        "; re-export the bundle (eclipse-export ... --out DIR)");
}

int64_t resolve_dim(const std::string &component, const json &d, const std::map<std::string, int64_t> &dims) {
    constexpr int64_t kMaxDim = int64_t{1} << 16;
    if (d.is_number_integer()) {
        const int64_t v = d.get<int64_t>();
        if (v < 1 || v > kMaxDim) bad_io(component, "has a dimension " + d.dump());
        return v;
    }
    if (!d.is_string()) bad_io(component, "has a dimension " + d.dump());
    const std::string expr = d.get<std::string>();
    int64_t value = 1;
    size_t start = 0;
    while (true) {  // "X" or "X*Y*..."
        const size_t star = expr.find('*', start);
        const std::string name = expr.substr(start, star == std::string::npos ? std::string::npos : star - start);
        auto it = dims.find(name);
        if (it == dims.end()) bad_io(component, "uses an unknown dimension '" + name + "'");
        value *= it->second;
        if (value > kMaxDim * kMaxDim) bad_io(component, "has a dimension too large to be real: " + expr);
        if (star == std::string::npos) return value;
        start = star + 1;
    }
}

std::vector<TensorView> views(const std::string &component, const json &specs, const std::map<std::string, int64_t> &dims) {
    if (!specs.is_array()) bad_io(component, "is not a list of tensors");
    std::vector<TensorView> out;
    for (const auto &s : specs) {
        if (!s.is_object() || !s.value("name", json()).is_string() || !s.value("shape", json()).is_array())
            bad_io(component, "has a tensor without a name or shape");
        TensorView t;
        t.name = s["name"].get<std::string>();
        const json dtype = s.value("dtype", json());
        if (dtype == "float32") t.dtype = DType::Float32;
        else if (dtype == "int32") t.dtype = DType::Int32;
        else throw Error(ECLIPSE_ERR_UNSUPPORTED, component + "." + t.name + " has dtype " + dtype.dump() + " (float32/int32 only)");
        if (s["shape"].size() > ECLIPSE_MAX_RANK) bad_io(component, "has a tensor of rank above 8");
        for (const auto &d : s["shape"]) t.shape.push_back(resolve_dim(component, d, dims));
        out.push_back(std::move(t));
    }
    return out;
}


const std::vector<float> &output(const Outputs &out, const std::string &component, const std::string &name) {
    auto it = out.find(name);
    if (it == out.end()) bad_io(component, "has no output '" + name + "'");
    return it->second;
}

// Runs one component: inputs by name from `feed`, outputs into buffers sized here.
Outputs run_component(State &state, const std::string &name, const std::map<std::string, Feed> &feed,
                      const std::map<std::string, int64_t> &dims) {
    const Context &ctx = *state.context;
    const json &io = ctx.data->bundle->component(name).at("io");
    std::vector<TensorView> inputs = views(name, io.at("inputs"), dims), outputs = views(name, io.at("outputs"), dims);
    for (auto &t : inputs) {
        auto it = feed.find(t.name);
        if (it == feed.end()) throw Error(ECLIPSE_ERR_UNSUPPORTED, name + " graph wants an input '" + t.name + "' this runtime does not know");
        if (static_cast<size_t>(t.count()) != it->second.count || t.dtype != it->second.dtype)
            bad_io(name, "gives " + t.name + " " + std::to_string(t.count()) + " values of another type or count than the chain's " +
                             std::to_string(it->second.count));
        t.data = const_cast<void *>(it->second.data);  // backends read inputs only
    }
    Outputs out;
    for (auto &t : outputs) {  // int32 outputs land in a float buffer of the same count (4 bytes each): int32_output()
        auto &buf = out[t.name];
        buf.assign(static_cast<size_t>(t.count()), 0.0f);
        t.data = buf.data();
    }
    ctx.sessions.at(name)->run(state.session_states[name].get(), inputs, outputs);
    return out;
}

void stage_done(State &state, const std::string &name, Result &result) {
    SessionState *session_state = state.session_states[name].get();
    state.context->backend->stage_done(*state.context->sessions.at(name), session_state);
    if (session_state) {  // already logged by the backend: only moved into the result here
        for (auto &w : session_state->warnings) result.warnings.push_back(std::move(w));
        session_state->warnings.clear();
    }
}

Feed f32(const std::vector<float> &v) { return {v.data(), v.size(), DType::Float32}; }

}  // namespace chain

using namespace chain;  // NOLINT: this file is the chain's home

namespace chain {

void require_noise_names(const Inputs &inputs, const std::vector<std::string> &names, const std::string &family_title) {
    for (const auto &[name, noise] : inputs.noises) {
        if (std::find(names.begin(), names.end(), name) == names.end())
            bad_request("injected noise '" + name + "' is not drawn by " + family_title + " bundles (they draw " +
                        join(names, ", ") + ")");
    }
}

std::vector<float> noise_or_seed(const Inputs &inputs, const char *name, const char *what, uint64_t seed, uint32_t stream,
                                 size_t want, std::string &problems) {
    std::vector<float> dst;
    auto it = inputs.noises.find(name);
    if (it != inputs.noises.end()) {
        if (it->second.count != want) {
            problems += std::string(problems.empty() ? "" : "; ") + what + " has " + std::to_string(it->second.count) +
                        " values, the request needs " + std::to_string(want);
            return dst;
        }
        dst.assign(it->second.data, it->second.data + want);
    } else {
        dst.resize(want);
        standard_normal(seed, stream, dst.data(), want);
    }
    return dst;
}

DecoderNoise decoder_noises(const eclipse_params &p, const Inputs &inputs, size_t prior_count, size_t latent_count,
                            size_t step_count) {
    DecoderNoise n;
    std::string problems;
    n.prior = noise_or_seed(inputs, "prior", "prior noise", p.seed, ECLIPSE_STREAM_PRIOR, prior_count, problems);
    n.latents = noise_or_seed(inputs, "latents", "latent noise", p.seed, ECLIPSE_STREAM_LATENTS, latent_count, problems);
    if (step_count) n.steps = noise_or_seed(inputs, "steps", "step noise", p.seed, ECLIPSE_STREAM_STEPS, step_count, problems);
    if (!problems.empty()) bad_request("injected noises do not fit: " + problems);
    return n;
}

}  // namespace chain

namespace {

struct ProgressRelay {  // turns the user's callback into the device loop's and remembers a cancel
    const eclipse_params *params;
    bool cancelled = false;
    static int call(int32_t step, int32_t steps, void *self) {
        auto *r = static_cast<ProgressRelay *>(self);
        if (r->params->progress && r->params->progress(step, steps, r->params->progress_data) != 0) r->cancelled = true;
        return r->cancelled ? 1 : 0;
    }
};

}  // namespace

std::shared_ptr<const BundleData> BundleData::open(const std::string &path, bool verify_hashes) {
    auto data = std::make_shared<BundleData>();
    data->bundle = Bundle::open(path, verify_hashes);
    const Bundle &b = *data->bundle;
    // Bundle::open refused families this library does not know; each has its chain here
    data->family = find_family(family_name(b.manifest()));
    if (!data->family ||
        (data->family->name != "kandinsky22" && data->family->name != "karlo" && data->family->name != "lambda"))
        throw Error(ECLIPSE_ERR_BUNDLE, path + ": this library has no chain for model family '" +
                                            family_name(b.manifest()) + "'");
    const json config = b.listed("tokenizer/tokenizer_config.json") ? b.read_json("tokenizer/tokenizer_config.json") : json();
    data->tokenizer = std::make_unique<ClipTokenizer>(b.read_json("tokenizer/tokenizer.json"), config);
    if (data->family->name == "karlo") {
        open_karlo(*data, path);
        return data;
    }
    data->scheduler_config = b.read_json("scheduler_config.json");
    data->C = b.dim("C"), data->D = b.dim("D"), data->S = b.dim("S");
    if (data->C <= 0 || data->D <= 0 || data->S <= 0)
        throw Error(ECLIPSE_ERR_BUNDLE, "bundle " + path + " has no dims C, D, S in its manifest");
    NpyArray neg = parse_npy(b.read("negative_image_embeds.npy"), "negative_image_embeds.npy");
    const bool finite = std::all_of(neg.data.begin(), neg.data.end(), [](float v) { return std::isfinite(v); });
    if (neg.shape != std::vector<int64_t>{1, data->D} || !finite)
        throw Error(ECLIPSE_ERR_BUNDLE, path + "/negative_image_embeds.npy does not hold finite floats of shape (1, " +
                                            std::to_string(data->D) + ")");
    data->negative_image_embeds = std::move(neg.data);
    Scheduler(data->scheduler_config, "");  // refuse an unsupported scheduler now, not mid-request
    if (data->family->name == "lambda") open_lambda(*data, path);
    return data;
}

std::shared_ptr<const Context> Context::create(std::shared_ptr<const BundleData> data, std::shared_ptr<Backend> backend) {
    auto ctx = std::make_shared<Context>();
    ctx->data = std::move(data);
    ctx->backend = std::move(backend);
    const Bundle &b = *ctx->data->bundle;
    const json engines = b.manifest().value("engines", json::object());
    ctx->backend->preflight(b);
    for (const std::string &name : ctx->data->family->components) {
        const json &c = b.component(name);
        ComponentFiles files{name, b.path(c.at("graph").get<std::string>()), nullptr};
        for (const auto &rel : c.value("files", json::array())) b.path(rel.get<std::string>());  // listed + inside
        if (engines.is_object() && engines.contains(name)) {
            files.engine = &b.manifest()["engines"][name];
            if (files.engine->contains("file")) b.path((*files.engine)["file"].get<std::string>());
        }
        const auto t0 = std::chrono::steady_clock::now();
        ctx->sessions[name] = ctx->backend->load(b, files);
        ctx->load_seconds[name] = seconds_since(t0);
        log(ECLIPSE_LOG_DEBUG, std::string("loaded ") + name + " on " + ctx->backend->name());
    }
    return ctx;
}

std::string scheduler_kind_name(eclipse_scheduler s) {
    switch (s) {
        case ECLIPSE_SCHEDULER_BUNDLE: return "";
        case ECLIPSE_SCHEDULER_DDPM: return "ddpm";
        case ECLIPSE_SCHEDULER_DDIM: return "ddim";
    }
    bad_request("unknown scheduler " + std::to_string(static_cast<int>(s)) + " (choose bundle, ddpm or ddim)");
}

namespace chain {

void check_decoder_request(const char *prompt, const eclipse_params &p, const std::function<void(const std::string &)> &warn) {
    // as runtime/request.py's Request.make, in its order
    if (prompt == nullptr) bad_request("no prompt given");
    if (is_blank(prompt)) warn("the prompt is empty: generating without text conditioning");
    for (const auto &[name, value] : {std::pair{"height", p.height}, std::pair{"width", p.width}}) {
        if (value % kSizeMultiple != 0 || value < kMinSize || value > kMaxSize)
            bad_request(std::string(name) + " " + std::to_string(value) + " must be a multiple of " +
                        std::to_string(kSizeMultiple) + " between " + std::to_string(kMinSize) + " and " + std::to_string(kMaxSize));
    }
    if (p.steps < 1) bad_request("steps must be a whole number >= 1, got " + std::to_string(p.steps));
    if (!std::isfinite(p.guidance_scale)) bad_request("guidance scale must be a finite number, got " + format_number(p.guidance_scale));
    if (p.guidance_scale < 1)
        warn("guidance scale " + format_number(p.guidance_scale) + " < 1 means no classifier-free guidance (same as 1)");
    if (p.negative_prompt != nullptr && p.guidance_scale <= 1)
        warn("the negative prompt has no effect without classifier-free guidance (guidance <= 1)");
}

std::map<std::string, int64_t> manifest_dims(const BundleData &data) {
    std::map<std::string, int64_t> dims;
    for (const auto &[k, v] : data.bundle->manifest().at("dims").items()) {
        if (v.is_number_integer()) dims[k] = v.get<int64_t>();  // the family's dims are checked at open
    }
    dims["T"] = data.tokenizer->max_length();
    return dims;
}

std::vector<float> denoise_and_decode(State &state, const eclipse_params &p, Scheduler &sched, const DecoderNoise &noise,
                                      const std::vector<float> &unet_embeds, bool cfg, int64_t h, int64_t w,
                                      std::map<std::string, int64_t> &dims, Result &result) {
    const BundleData &data = *state.context->data;
    const int64_t B = 1, C = data.C, D = data.D;
    const size_t n = static_cast<size_t>(B * C * h * w);
    const size_t steps = sched.timesteps().size();
    const float scale = static_cast<float>(p.guidance_scale);  // float32, as np.float32(scale)
    std::vector<float> latents(n);
    for (size_t i = 0; i < n; ++i) latents[i] = noise.latents[i] * sched.init_noise_sigma();
    const int64_t unet_batch = cfg ? 2 * B : B;
    dims["B"] = unet_batch, dims["h"] = h, dims["w"] = w;

    const Backend &backend = *state.context->backend;
    auto t0 = std::chrono::steady_clock::now();
    if (backend.has_device_loop() && sched.prediction() == Prediction::Epsilon) {
        std::vector<float> timesteps;
        std::vector<eclipse_step_coefficients> coefficients;
        for (int64_t t : sched.timesteps()) {
            timesteps.push_back(static_cast<float>(t));
            coefficients.push_back(sched.coefficients(t));
        }
        ProgressRelay relay{&p};
        eclipse_denoise_call call{};
        call.latents = latents.data();
        const int64_t latent_shape[4] = {B, C, h, w};
        std::copy(latent_shape, latent_shape + 4, call.latent_shape);
        call.image_embeds = unet_embeds.data();
        call.embeds_shape[0] = unet_batch;
        call.embeds_shape[1] = D;
        call.steps = static_cast<int32_t>(steps);
        call.timesteps = timesteps.data();
        call.coefficients = coefficients.data();
        call.cfg = cfg ? 1 : 0;
        call.guidance_scale = scale;
        call.step_noise = sched.needs_noise() ? noise.steps.data() : nullptr;
        std::vector<float> out(n);
        call.out_latents = out.data();
        call.progress = &ProgressRelay::call;
        call.progress_data = &relay;
        if (!backend.denoise(*state.context->sessions.at("unet"), state.session_states["unet"].get(), call)) {
            if (relay.cancelled) throw Error(ECLIPSE_ERR_CANCELLED, "generation cancelled by the progress callback");
            throw Error(ECLIPSE_ERR_BACKEND, backend.name() + " backend's UNet loop failed");
        }
        latents = std::move(out);
    } else {
        std::vector<float> sample(static_cast<size_t>(unet_batch) * n), guided(n);
        for (size_t i = 0; i < steps; ++i) {
            const int64_t t = sched.timesteps()[i];
            std::copy(latents.begin(), latents.end(), sample.begin());
            if (cfg) std::copy(latents.begin(), latents.end(), sample.begin() + static_cast<long>(n));
            const float timestep = static_cast<float>(t);
            auto eps = run_component(state, "unet",
                                     {{"sample", f32(sample)}, {"timestep", {&timestep, 1, DType::Float32}},
                                      {"image_embeds", f32(unet_embeds)}},
                                     dims);
            const std::vector<float> &pred = output(eps, "unet", "noise_pred");
            if (pred.size() != sample.size()) bad_io("unet", "does not give noise_pred of the sample's shape");
            const float *e = pred.data();
            if (cfg) {  // eps = u + s * (c - u), float32 as guidance.combine
                for (size_t k = 0; k < n; ++k) guided[k] = pred[k] + scale * (pred[n + k] - pred[k]);
                e = guided.data();
            }
            sched.step(e, t, latents.data(), sched.needs_noise() ? noise.steps.data() + i * n : nullptr, n);
            if (p.progress && p.progress(static_cast<int32_t>(i + 1), static_cast<int32_t>(steps), p.progress_data) != 0)
                throw Error(ECLIPSE_ERR_CANCELLED, "generation cancelled by the progress callback at step " +
                                                       std::to_string(i + 1) + "/" + std::to_string(steps));
        }
    }
    stage_done(state, "unet", result);
    result.timings["unet"] = seconds_since(t0);
    result.timings["unet_per_step"] = result.timings["unet"] / static_cast<double>(steps);

    // MoVQ decode (post-processing is inside the graph: image in [0, 1], (B, H, W, 3))
    dims["B"] = B;
    t0 = std::chrono::steady_clock::now();
    auto image = run_component(state, "movq", {{"latents", f32(latents)}}, dims);
    result.timings["movq"] = seconds_since(t0);
    stage_done(state, "movq", result);
    const std::vector<float> &rgb = output(image, "movq", "image");
    result.height = static_cast<int32_t>(data.S * h);
    result.width = static_cast<int32_t>(data.S * w);
    if (rgb.size() != static_cast<size_t>(result.height) * static_cast<size_t>(result.width) * 3)
        bad_io("movq", "does not give (B, H, W, 3) images for " + std::to_string(p.height) + "x" + std::to_string(p.width));
    result.pixels.resize(rgb.size());
    for (size_t i = 0; i < rgb.size(); ++i) {  // as images.to_uint8: clip, * 255 in float32, round half even
        const float v = std::min(std::max(rgb[i], 0.0f), 1.0f) * 255.0f;
        result.pixels[i] = static_cast<uint8_t>(std::nearbyint(v));
    }
    return latents;
}

std::string family_title(const BundleData &data) {
    // families/<name>/__init__.py's titles (the words the Python runtime's messages use)
    if (data.family->name == "kandinsky22") return "ECLIPSE + Kandinsky 2.2";
    if (data.family->name == "karlo") return "ECLIPSE + Karlo (unCLIP)";
    if (data.family->name == "lambda") return "λ-ECLIPSE + Kandinsky 2.2";
    return data.family->name;
}

void refuse_subjects(const BundleData &data, const Inputs &inputs) {
    if (!inputs.subjects.empty() || inputs.control)
        bad_request("this bundle is plain ECLIPSE (" + family_title(data) +
                    "): it takes no subject or control images; export a λ-ECLIPSE bundle (eclipse-export --preset "
                    "lambda) for those");
}

}  // namespace chain

Result generate(State &state, const char *prompt, const eclipse_params &p, const Inputs &inputs) {
    const BundleData &data = *state.context->data;
    if (data.family->name == "karlo") return generate_karlo(state, prompt, p, inputs);
    if (data.family->name == "lambda") return generate_lambda(state, prompt, p, inputs);
    Result result;
    auto warn = [&](const std::string &w) {
        result.warnings.push_back(w);
        log(ECLIPSE_LOG_WARN, w);
    };

    // 0. validate everything before any work (as runtime/request.py + runtime/chains/kandinsky22.py)
    check_decoder_request(prompt, p, warn);
    refuse_subjects(data, inputs);
    require_noise_names(inputs, {"prior", "latents", "steps"}, family_title(data));
    Scheduler sched(data.scheduler_config, scheduler_kind_name(p.scheduler));
    sched.set_timesteps(p.steps);

    const bool negative = p.negative_prompt != nullptr;
    const int64_t B = 1, prior_batch = negative ? 2 : 1, C = data.C, D = data.D;
    const int64_t h = p.height / data.S, w = p.width / data.S;
    const size_t n = static_cast<size_t>(B * C * h * w);
    const auto steps = sched.timesteps().size();
    const DecoderNoise noise = decoder_noises(p, inputs, static_cast<size_t>(prior_batch * D), n, sched.needs_noise() ? steps * n : 0);

    const auto t_start = std::chrono::steady_clock::now();  // "total" as the Python runtime counts it

    // 1. tokens: the prompt, then the negative prompt (it shares the batch)
    std::vector<std::string> texts{prompt};
    if (negative) texts.emplace_back(p.negative_prompt);
    const int64_t T = data.tokenizer->max_length();
    std::vector<int32_t> ids, mask;
    for (size_t i = 0; i < texts.size(); ++i) {
        const std::string &text = texts[i];
        const char *which = i == 0 ? "the prompt" : "the negative prompt";
        Tokens tok;
        try {
            tok = data.tokenizer->encode(text);
        } catch (const Error &e) {  // the tokenizer speaks of "the prompt": say which one
            std::string message = e.what();
            if (i > 0 && message.rfind("the prompt", 0) == 0) message = which + message.substr(10);
            throw Error(e.status, message);
        }
        if (tok.truncated)
            warn(std::string(i == 0 ? "prompt" : "negative prompt") + " truncated to " + std::to_string(T) + " tokens: '" +
                 text.substr(0, 60) + "'...");
        ids.insert(ids.end(), tok.ids.begin(), tok.ids.end());
        mask.insert(mask.end(), tok.mask.begin(), tok.mask.end());
    }
    std::map<std::string, int64_t> dims = manifest_dims(data);

    // 2. text encoder
    dims["B"] = prior_batch;
    auto t0 = std::chrono::steady_clock::now();
    auto text = run_component(state, "text_encoder", {{"input_ids", {ids.data(), ids.size(), DType::Int32}}}, dims);
    const std::vector<float> &text_embeds = output(text, "text_encoder", "text_embeds");
    const std::vector<float> &text_hidden = output(text, "text_encoder", "text_hidden_states");
    result.timings["text_encoder"] = seconds_since(t0);
    stage_done(state, "text_encoder", result);

    // 3. prior: one forward pass, noise in the hidden_states slot
    t0 = std::chrono::steady_clock::now();
    auto prior = run_component(state, "prior",
                               {{"noise", f32(noise.prior)}, {"text_embeds", f32(text_embeds)},
                                {"text_hidden_states", f32(text_hidden)},
                                {"attention_mask", {mask.data(), mask.size(), DType::Int32}}},
                               dims);
    result.timings["prior"] = seconds_since(t0);
    stage_done(state, "prior", result);
    const std::vector<float> &embeds = output(prior, "prior", "image_embeds");
    if (static_cast<int64_t>(embeds.size()) != prior_batch * D) bad_io("prior", "does not give (B, D) image embeddings");
    const float *positive = embeds.data();
    const float *negative_embeds = negative ? embeds.data() + D : data.negative_image_embeds.data();

    // 4. UNet loop; guidance only for scale > 1 (diffusers' rule), 5. MoVQ
    const bool cfg = p.guidance_scale > 1.0;
    std::vector<float> unet_embeds;
    if (cfg) unet_embeds.insert(unet_embeds.end(), negative_embeds, negative_embeds + D);
    unet_embeds.insert(unet_embeds.end(), positive, positive + D);
    denoise_and_decode(state, p, sched, noise, unet_embeds, cfg, h, w, dims, result);
    result.timings["total"] = seconds_since(t_start);
    return result;
}

}  // namespace eclipse::core
