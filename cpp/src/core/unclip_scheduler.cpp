#include "core/unclip_scheduler.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "core/common.hpp"

using nlohmann::json;

namespace eclipse::core {

UnclipScheduler::UnclipScheduler(const json &config) {
    if (!config.is_object()) throw Error(ECLIPSE_ERR_UNSUPPORTED, "the unCLIP scheduler config is not an object");
    auto get = [&](const char *key, json fallback) { return config.contains(key) ? config[key] : fallback; };
    const json name = get("_class_name", "UnCLIPScheduler");
    if (name != "UnCLIPScheduler")
        throw Error(ECLIPSE_ERR_UNSUPPORTED, "the Karlo chain samples with UnCLIPScheduler, the config names " + name.dump());
    if (get("beta_schedule", "squaredcos_cap_v2") != "squaredcos_cap_v2")
        throw Error(ECLIPSE_ERR_UNSUPPORTED, "UnCLIPScheduler supports beta_schedule 'squaredcos_cap_v2' only");
    const json variance = get("variance_type", "fixed_small_log");
    if (variance != "fixed_small_log" && variance != "learned_range")
        throw Error(ECLIPSE_ERR_UNSUPPORTED, "variance_type=" + variance.dump() + " is not supported");
    const json prediction = get("prediction_type", "epsilon");
    if (prediction != "epsilon" && prediction != "sample")
        throw Error(ECLIPSE_ERR_UNSUPPORTED, "prediction_type=" + prediction.dump() + " is not supported");
    const json n = get("num_train_timesteps", 1000), clip = get("clip_sample", true), range = get("clip_sample_range", 1.0);
    if (!n.is_number_integer() || n.get<int64_t>() < 2 || !clip.is_boolean() || !range.is_number())
        throw Error(ECLIPSE_ERR_UNSUPPORTED, "the unCLIP scheduler config has a malformed num_train_timesteps, "
                                             "clip_sample or clip_sample_range");
    learned_ = variance == "learned_range";
    sample_prediction_ = prediction == "sample";
    clip_ = clip.get<bool>();
    clip_range_ = static_cast<float>(range.get<double>());
    train_steps_ = n.get<int64_t>();
    // cosine alpha-bar (Nichol & Dhariwal) in double, rounded once; cumprod in double, as numpy/torch
    const double pi = 3.141592653589793;
    auto alpha_bar = [pi](double t) {
        const double c = std::cos((t + 0.008) / 1.008 * pi / 2);
        return c * c;
    };
    double acc = 1.0;
    for (int64_t i = 0; i < train_steps_; ++i) {
        const double v = 1 - alpha_bar(static_cast<double>(i + 1) / train_steps_) / alpha_bar(static_cast<double>(i) / train_steps_);
        betas_.push_back(static_cast<float>(std::min(v, 0.999)));
        alphas_.push_back(1.0f - betas_.back());
        acc *= static_cast<double>(alphas_.back());
        alphas_cumprod_.push_back(static_cast<float>(acc));
    }
}

void UnclipScheduler::set_timesteps(int32_t steps) {
    if (steps < 2 || steps > train_steps_)  // diffusers divides by (steps - 1)
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "steps must be between 2 and " + std::to_string(train_steps_) +
                                                      " for the unCLIP scheduler, got " + std::to_string(steps));
    const double ratio = static_cast<double>(train_steps_ - 1) / static_cast<double>(steps - 1);
    timesteps_.clear();
    for (int32_t i = steps - 1; i >= 0; --i) timesteps_.push_back(static_cast<int64_t>(std::nearbyint(i * ratio)));
}

int64_t UnclipScheduler::prev_timestep(size_t i) const {
    return i + 1 < timesteps_.size() ? timesteps_[i + 1] : timesteps_[i] - 1;
}

UnclipStepTerms UnclipScheduler::terms(int64_t t, int64_t prev) const {
    const float a_t = alphas_cumprod_[static_cast<size_t>(t)];
    const float a_prev = prev >= 0 ? alphas_cumprod_[static_cast<size_t>(prev)] : 1.0f;
    const float b_t = 1.0f - a_t, b_prev = 1.0f - a_prev;
    float beta, alpha;
    if (prev == t - 1) {
        beta = betas_[static_cast<size_t>(t)], alpha = alphas_[static_cast<size_t>(t)];
    } else {
        beta = 1.0f - a_t / a_prev;
        alpha = 1.0f - beta;
    }
    UnclipStepTerms k;
    k.a = std::sqrt(a_t), k.b = std::sqrt(b_t);
    k.clip = clip_ ? clip_range_ : std::numeric_limits<float>::infinity();
    k.c_x0 = (std::sqrt(a_prev) * beta) / b_t;
    k.c_x = std::sqrt(alpha) * b_prev / b_t;
    k.noise = t > 0, k.learned = learned_;
    if (k.noise) {
        // log and exp in double, rounded once (runtime/unclip_scheduler.py says why)
        const double var = static_cast<double>(b_prev / b_t * beta);
        if (learned_) k.min_log = std::log(var), k.max_log = std::log(static_cast<double>(beta));
        else k.std_dev = static_cast<float>(std::exp(0.5 * std::log(std::max(var, 1e-20))));
    }
    return k;
}

void UnclipScheduler::step(const float *eps, const float *variance, int64_t t, int64_t prev, float *sample,
                           const float *noise, size_t n) const {
    const UnclipStepTerms k = terms(t, prev);
    if (k.noise && noise == nullptr) throw Error(ECLIPSE_ERR_INTERNAL, "the unCLIP step needs its variance noise");
    if (k.noise && learned_ && variance == nullptr) throw Error(ECLIPSE_ERR_INTERNAL, "learned_range needs the variance channels");
    for (size_t i = 0; i < n; ++i) {
        float x0 = sample_prediction_ ? eps[i] : (sample[i] - k.b * eps[i]) / k.a;
        if (clip_) x0 = std::min(std::max(x0, -clip_range_), clip_range_);
        float prev_sample = k.c_x0 * x0 + k.c_x * sample[i];
        if (k.noise) {
            float std_dev = k.std_dev;
            if (learned_) {
                const double frac = static_cast<double>((variance[i] + 1.0f) / 2.0f);
                std_dev = static_cast<float>(std::exp(0.5 * (frac * k.max_log + (1.0 - frac) * k.min_log)));
            }
            prev_sample = prev_sample + std_dev * noise[i];
        }
        sample[i] = prev_sample;
    }
}

}  // namespace eclipse::core
