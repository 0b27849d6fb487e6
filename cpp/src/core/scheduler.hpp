// DDPM and DDIM from a diffusers scheduler_config.json, computing what runtime/schedulers.py
// computes with the same float32 operations in the same order (so the host loop's latents
// match the Python runtime's bit for bit on the same inputs).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "eclipse/eclipse.h"

namespace eclipse::core {

enum class SchedulerKind { DDPM, DDIM };
enum class Prediction { Epsilon, VPrediction, Sample };

class Scheduler {
public:
    // kind "": the config's _class_name. Throws Error(ECLIPSE_ERR_UNSUPPORTED) for configs the
    // Python runtime refuses too.
    Scheduler(const nlohmann::json &config, const std::string &kind);

    // Throws Error(ECLIPSE_ERR_INVALID_ARGUMENT) for step counts outside the schedule.
    void set_timesteps(int32_t steps);
    const std::vector<int64_t> &timesteps() const { return timesteps_; }
    bool needs_noise() const { return kind_ == SchedulerKind::DDPM; }
    Prediction prediction() const { return prediction_; }
    float init_noise_sigma() const { return 1.0f; }
    const std::vector<float> &alphas_cumprod() const { return alphas_cumprod_; }

    // One step on n values in place: sample <- step(model_output, t, sample, noise).
    void step(const float *model_output, int64_t t, float *sample, const float *noise, size_t n) const;
    eclipse_step_coefficients coefficients(int64_t t) const;  // epsilon prediction only

private:
    struct DdpmTerms { float alpha_prod_t, x0_coeff, sample_coeff, std; };
    DdpmTerms ddpm_terms(int64_t t) const;
    int64_t ddpm_prev(int64_t t) const;
    float alpha_prod(int64_t t, float final_value) const;

    SchedulerKind kind_;
    Prediction prediction_ = Prediction::Epsilon;
    std::string spacing_, variance_ = "fixed_small";
    int64_t train_steps_ = 1000, steps_offset_ = 0;
    bool clip_ = true;
    float clip_range_ = 1.0f, final_alpha_cumprod_ = 1.0f;
    std::vector<float> alphas_cumprod_;
    std::vector<int64_t> timesteps_;
    int32_t inference_steps_ = 0;
};

}  // namespace eclipse::core
