#include "core/scheduler.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/common.hpp"

using nlohmann::json;

namespace eclipse::core {
namespace {

[[noreturn]] void unsupported(const std::string &message) { throw Error(ECLIPSE_ERR_UNSUPPORTED, message); }

// diffusers' __init__ defaults for the keys read here (as runtime/schedulers.py's _DEFAULTS)
json with_defaults(const json &config) {
    json cfg = {{"num_train_timesteps", 1000}, {"beta_start", 0.0001}, {"beta_end", 0.02},
                {"beta_schedule", "linear"}, {"trained_betas", nullptr}, {"rescale_betas_zero_snr", false},
                {"prediction_type", "epsilon"}, {"clip_sample", true}, {"clip_sample_range", 1.0},
                {"thresholding", false}, {"timestep_spacing", "leading"}, {"steps_offset", 0},
                {"variance_type", "fixed_small"}, {"set_alpha_to_one", true}};
    for (auto it = cfg.begin(); it != cfg.end(); ++it) {
        if (config.contains(it.key())) *it = config[it.key()];
    }
    return cfg;
}

std::string choice(const json &cfg, const std::string &key, std::initializer_list<const char *> allowed) {
    const std::string value = cfg[key].is_string() ? cfg[key].get<std::string>() : cfg[key].dump();
    std::string list;
    for (const char *a : allowed) {
        if (value == a) return value;
        list += (list.empty() ? "" : ", ") + std::string(a);
    }
    unsupported(key + "='" + value + "' is not supported (supported: " + list + ")");
}

// torch.linspace(start, end, n, dtype=float32) bit for bit: float32 endpoints and step, evaluated
// in double from the nearer end (runtime/schedulers.py's _linspace32).
std::vector<float> linspace32(double start, double end, int64_t n) {
    if (n == 1) return {static_cast<float>(start)};
    const float fs = static_cast<float>(start), fe = static_cast<float>(end);
    const double s = fs, e = fe;
    const double step = static_cast<double>((fe - fs) / static_cast<float>(n - 1));
    std::vector<float> out(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
        out[static_cast<size_t>(i)] = static_cast<float>(i < n / 2 ? s + step * static_cast<double>(i)
                                                                   : e - step * static_cast<double>(n - 1 - i));
    }
    return out;
}

// torch's float32 cumprod accumulates in double
std::vector<float> cumprod32(const std::vector<float> &x) {
    std::vector<float> out(x.size());
    double acc = 1.0;
    for (size_t i = 0; i < x.size(); ++i) out[i] = static_cast<float>(acc *= static_cast<double>(x[i]));
    return out;
}

std::vector<float> one_minus(const std::vector<float> &x) {
    std::vector<float> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = 1.0f - x[i];
    return out;
}

std::vector<float> betas_from(const json &cfg, int64_t n) {
    std::vector<float> betas;
    if (!cfg["trained_betas"].is_null()) {
        for (const auto &b : cfg["trained_betas"]) betas.push_back(static_cast<float>(b.get<double>()));
        if (static_cast<int64_t>(betas.size()) != n)
            unsupported("trained_betas has " + std::to_string(betas.size()) + " values, num_train_timesteps is " + std::to_string(n));
    } else {
        const std::string schedule = choice(cfg, "beta_schedule", {"linear", "scaled_linear", "squaredcos_cap_v2"});
        const double start = cfg["beta_start"].get<double>(), end = cfg["beta_end"].get<double>();
        if (schedule == "linear") {
            betas = linspace32(start, end, n);
        } else if (schedule == "scaled_linear") {
            betas = linspace32(std::sqrt(start), std::sqrt(end), n);
            for (float &b : betas) b = b * b;
        } else {  // cosine alpha-bar (Nichol & Dhariwal), in double, rounded once
            const double pi = 3.141592653589793;
            auto alpha_bar = [pi](double t) {
                const double c = std::cos((t + 0.008) / 1.008 * pi / 2);
                return c * c;
            };
            for (int64_t i = 0; i < n; ++i) {
                const double v = 1 - alpha_bar(static_cast<double>(i + 1) / n) / alpha_bar(static_cast<double>(i) / n);
                betas.push_back(static_cast<float>(std::min(v, 0.999)));
            }
        }
    }
    if (cfg["rescale_betas_zero_snr"].get<bool>()) {  // Lin et al. 2023, Algorithm 1
        std::vector<float> root = cumprod32(one_minus(betas));
        for (float &r : root) r = std::sqrt(r);
        const float first = root.front(), last = root.back();
        const float scale = first / (first - last);
        std::vector<float> bar(root.size());
        for (size_t i = 0; i < root.size(); ++i) {
            const float r = (root[i] - last) * scale;
            bar[i] = r * r;
        }
        for (size_t i = 0; i < bar.size(); ++i) betas[i] = 1.0f - (i == 0 ? bar[0] : bar[i] / bar[i - 1]);
    }
    return betas;
}

inline float clampf(float x, float lo, float hi) { return std::min(std::max(x, lo), hi); }

}  // namespace

Scheduler::Scheduler(const json &config, const std::string &kind_name) {
    if (!config.is_object()) unsupported("scheduler_config.json is not a JSON object");
    std::string kind = kind_name;
    if (kind.empty()) {
        const std::string cls = config.value("_class_name", "DDPMScheduler");
        if (cls == "DDPMScheduler") kind = "ddpm";
        else if (cls == "DDIMScheduler") kind = "ddim";
        else unsupported("_class_name='" + cls + "' is not supported (supported: DDPMScheduler, DDIMScheduler)");
    }
    if (kind != "ddpm" && kind != "ddim") unsupported("unknown scheduler kind '" + kind + "' (choose from ddpm, ddim)");
    kind_ = kind == "ddpm" ? SchedulerKind::DDPM : SchedulerKind::DDIM;
    try {
        const json cfg = with_defaults(config);
        if (cfg["thresholding"].get<bool>()) unsupported("thresholding=True is not supported (pixel-space dynamic thresholding)");
        const std::string pred = choice(cfg, "prediction_type", {"epsilon", "v_prediction", "sample"});
        prediction_ = pred == "epsilon" ? Prediction::Epsilon : pred == "sample" ? Prediction::Sample : Prediction::VPrediction;
        spacing_ = choice(cfg, "timestep_spacing", {"leading", "linspace", "trailing"});
        train_steps_ = cfg["num_train_timesteps"].get<int64_t>();
        if (train_steps_ < 1) unsupported("num_train_timesteps=" + std::to_string(train_steps_) + " must be at least 1");
        steps_offset_ = cfg["steps_offset"].get<int64_t>();
        clip_ = cfg["clip_sample"].get<bool>();
        clip_range_ = static_cast<float>(cfg["clip_sample_range"].get<double>());
        alphas_cumprod_ = cumprod32(one_minus(betas_from(cfg, train_steps_)));
        if (kind_ == SchedulerKind::DDPM) {
            const std::string v = cfg["variance_type"].is_string() ? cfg["variance_type"].get<std::string>() : "";
            if (v == "fixed_large_log") unsupported("variance_type='fixed_large_log' is not supported (diffusers yields NaN)");
            if (v == "learned" || v == "learned_range")
                unsupported("variance_type='" + v + "' is not supported (the UNet graph has no variance output)");
            variance_ = choice(cfg, "variance_type", {"fixed_small", "fixed_small_log", "fixed_large"});
        } else {
            final_alpha_cumprod_ = cfg["set_alpha_to_one"].get<bool>() ? 1.0f : alphas_cumprod_[0];
        }
    } catch (const json::exception &e) {
        unsupported(std::string("scheduler_config.json has a value of the wrong type (") + e.what() + ")");
    }
}

void Scheduler::set_timesteps(int32_t n) {
    if (n < 1 || n > train_steps_)
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT, "steps must be between 1 and " + std::to_string(train_steps_) +
                                                      " (the trained timesteps), got " + std::to_string(n));
    const int64_t total = train_steps_;
    std::vector<int64_t> t;
    if (spacing_ == "linspace") {  // np.linspace(0, total - 1, n).round()[::-1]
        const double step = n > 1 ? static_cast<double>(total - 1) / (n - 1) : 0.0;
        for (int64_t i = n - 1; i >= 0; --i) {
            const double v = (n > 1 && i == n - 1) ? static_cast<double>(total - 1) : static_cast<double>(i) * step;
            t.push_back(static_cast<int64_t>(std::nearbyint(v)));  // round half to even, as numpy
        }
    } else if (spacing_ == "leading") {
        for (int64_t i = n - 1; i >= 0; --i) t.push_back(i * (total / n) + steps_offset_);
    } else {  // trailing: np.round(np.arange(total, 0, -total / n)) - 1, with numpy's float arange
        const double delta = -static_cast<double>(total) / n;
        const auto len = static_cast<int64_t>(std::ceil((0.0 - static_cast<double>(total)) / delta));
        const double start = static_cast<double>(total);
        const double d = (start + delta) - start;  // numpy fills start + i * (second - first)
        for (int64_t i = 0; i < len; ++i) {
            const double v = i == 0 ? start : i == 1 ? start + delta : start + static_cast<double>(i) * d;
            t.push_back(static_cast<int64_t>(std::nearbyint(v)) - 1);
        }
    }
    const auto [lo, hi] = std::minmax_element(t.begin(), t.end());
    if (static_cast<int64_t>(t.size()) != n || *lo < 0 || *hi >= total) {
        throw Error(ECLIPSE_ERR_INVALID_ARGUMENT,
                    "timestep_spacing='" + spacing_ + "' with " + std::to_string(n) + " steps gives timesteps outside 0.." +
                        std::to_string(total - 1) + " in diffusers (" + std::to_string(t.front()) + ".." +
                        std::to_string(t.back()) + ", " + std::to_string(t.size()) + " steps); choose another step count");
    }
    timesteps_ = std::move(t);
    inference_steps_ = n;
}

float Scheduler::alpha_prod(int64_t t, float final_value) const {
    return t >= 0 ? alphas_cumprod_[static_cast<size_t>(t)] : final_value;
}

int64_t Scheduler::ddpm_prev(int64_t t) const {
    auto it = std::find(timesteps_.begin(), timesteps_.end(), t);
    if (it == timesteps_.end())
        throw Error(ECLIPSE_ERR_INTERNAL, "timestep " + std::to_string(t) + " is not in this schedule");
    return it + 1 == timesteps_.end() ? -1 : *(it + 1);
}

Scheduler::DdpmTerms Scheduler::ddpm_terms(int64_t t) const {
    const float alpha_prod_t = alphas_cumprod_[static_cast<size_t>(t)];
    const float alpha_prod_prev = alpha_prod(ddpm_prev(t), 1.0f);
    const float beta_prod_t = 1.0f - alpha_prod_t, beta_prod_prev = 1.0f - alpha_prod_prev;
    const float current_alpha = alpha_prod_t / alpha_prod_prev;
    const float current_beta = 1.0f - current_alpha;
    DdpmTerms k{alpha_prod_t, std::sqrt(alpha_prod_prev) * current_beta / beta_prod_t,
                std::sqrt(current_alpha) * beta_prod_prev / beta_prod_t, 0.0f};
    if (t > 0) {
        const float small = std::max(beta_prod_prev / beta_prod_t * current_beta, 1e-20f);
        if (variance_ == "fixed_small") k.std = std::sqrt(small);
        else if (variance_ == "fixed_small_log") k.std = std::exp(0.5f * std::log(small));
        else k.std = std::sqrt(current_beta);  // fixed_large
    }
    return k;
}

eclipse_step_coefficients Scheduler::coefficients(int64_t t) const {
    if (prediction_ != Prediction::Epsilon)
        throw Error(ECLIPSE_ERR_UNSUPPORTED, "prediction_type has no device step (epsilon only)");
    const float clip = clip_ ? clip_range_ : std::numeric_limits<float>::infinity();
    const float alpha_prod_t = alphas_cumprod_[static_cast<size_t>(t)];
    const float a = std::sqrt(alpha_prod_t), b = std::sqrt(1.0f - alpha_prod_t);
    if (kind_ == SchedulerKind::DDPM) {
        const DdpmTerms k = ddpm_terms(t);
        return {a, b, clip, k.x0_coeff, k.sample_coeff, 0.0f, k.std};
    }
    const float prev = alpha_prod(t - train_steps_ / inference_steps_, final_alpha_cumprod_);
    return {a, b, clip, std::sqrt(prev), 0.0f, std::sqrt(1.0f - prev), 0.0f};
}

void Scheduler::step(const float *model_output, int64_t t, float *sample, const float *noise, size_t n) const {
    const float alpha_prod_t = alphas_cumprod_[static_cast<size_t>(t)];
    const float beta_prod_t = 1.0f - alpha_prod_t;
    const float sa = std::sqrt(alpha_prod_t), sb = std::sqrt(beta_prod_t);
    DdpmTerms k{};
    float c_x0 = 0, c_eps = 0;
    if (kind_ == SchedulerKind::DDPM) {
        k = ddpm_terms(t);
        if (t > 0 && noise == nullptr) throw Error(ECLIPSE_ERR_INTERNAL, "DDPM step needs a variance noise");
    } else {  // diffusers' DDIM steps back by total // n whatever the spacing
        const float prev = alpha_prod(t - train_steps_ / inference_steps_, final_alpha_cumprod_);
        c_x0 = std::sqrt(prev);
        c_eps = std::sqrt(1.0f - prev);
    }
    for (size_t i = 0; i < n; ++i) {
        const float x = sample[i], m = model_output[i];
        float x0, eps;  // the clean sample and the noise the model output implies (as _predict)
        switch (prediction_) {
            case Prediction::Epsilon: x0 = (x - sb * m) / sa; eps = m; break;
            case Prediction::Sample: x0 = m; eps = (x - sa * x0) / sb; break;
            default: x0 = sa * x - sb * m; eps = sa * m + sb * x; break;
        }
        // diffusers clips x0 but keeps the unclipped eps for DDIM's direction term
        if (clip_) x0 = clampf(x0, -clip_range_, clip_range_);
        float prev;
        if (kind_ == SchedulerKind::DDPM) {
            prev = k.x0_coeff * x0 + k.sample_coeff * x;
            if (t > 0) prev = prev + k.std * noise[i];
        } else {
            prev = c_x0 * x0 + c_eps * eps;
        }
        sample[i] = prev;
    }
}

}  // namespace eclipse::core
