// diffusers' UnCLIPScheduler (Karlo's decoder and super-resolution sampler), computing what
// runtime/unclip_scheduler.py computes with the same float32 operations in the same order.
#pragma once

#include <cstdint>
#include <vector>

#include <nlohmann/json.hpp>

namespace eclipse::core {

class UnclipScheduler {
public:
    // Throws Error(ECLIPSE_ERR_UNSUPPORTED) for configs the Python runtime refuses too.
    explicit UnclipScheduler(const nlohmann::json &config);
    // Throws Error(ECLIPSE_ERR_INVALID_ARGUMENT) outside 2..num_train_timesteps.
    void set_timesteps(int32_t steps);
    const std::vector<int64_t> &timesteps() const { return timesteps_; }
    int64_t prev_timestep(size_t i) const;  // after step i (t - 1 after the last)
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
