// diffusers' UnCLIPScheduler (Karlo's decoder and super-resolution sampler), computing what
// runtime/unclip_scheduler.py computes with the same float32 operations in the same order.
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

namespace eclipse::core {

// One unCLIP step as scalars (runtime/unclip_scheduler.py UnCLIPStepTerms): what step() computes
// with and what the device loop's unclip_step kernel receives per step.
struct UnclipStepTerms {
    float a = 1, b = 0, clip = 0, c_x0 = 0, c_x = 0;  // clip: +inf for no clipping
    float std_dev = 0;                                // fixed_small_log's (0 where !noise)
    bool noise = false, learned = false;              // noise: every step but the last
    double min_log = 0, max_log = 0;                  // learned_range: log posterior variance, log beta
};

class UnclipScheduler {
public:
    // Throws Error(ECLIPSE_ERR_UNSUPPORTED) for configs the Python runtime refuses too.
    explicit UnclipScheduler(const nlohmann::json &config);
    // Throws Error(ECLIPSE_ERR_INVALID_ARGUMENT) outside 2..num_train_timesteps.
    void set_timesteps(int32_t steps);
    const std::vector<int64_t> &timesteps() const { return timesteps_; }
    int64_t prev_timestep(size_t i) const;  // after step i (t - 1 after the last)
    UnclipStepTerms terms(int64_t t, int64_t prev) const;
    bool sample_prediction() const { return sample_prediction_; }
    bool learned() const { return learned_; }
    // sample <- step on n values in place; variance: the model's learned-variance channels (n
    // values, learned_range only), noise: n values (unused at t = 0).
    void step(const float *eps, const float *variance, int64_t t, int64_t prev, float *sample, const float *noise,
              size_t n) const;

private:
    bool learned_ = false, clip_ = true, sample_prediction_ = false;
    float clip_range_ = 1.0f;
    int64_t train_steps_ = 1000;
    std::vector<float> betas_, alphas_, alphas_cumprod_;
    std::vector<int64_t> timesteps_;
};

}  // namespace eclipse::core
