// Classifier-free guidance + one scheduler step, fused: the UNet loop never leaves the device.
// Two entry points: guided_step (the Kandinsky schedulers' StepCoefficients) and unclip_step
// (Karlo's UnCLIPScheduler, below).
//
// One source for every runtime: the Python backend (eclipse_export/runtime/backends/cuda.py) compiles it
// with NVRTC at run time, the C++ runtime embeds this file at build time. Entry point and
// parameters are part of that contract; change both runtimes together.
//
// Per element i < n (n = elements of the latents, one CFG half):
//   eps  = pred[i]                                   (no CFG)
//        = u + scale * (c - u), u = pred[i], c = pred[i + n]   (CFG: pred holds [uncond; cond])
//   x0   = clamp((x - b * eps) / a, -clip, clip)     (clip = +inf: no clipping)
//   prev = c_x0 * x0 + c_x * x + c_eps * eps (+ stdv * noise[i] when noise != 0 and stdv != 0)
//   latents[i] = prev; sample_out[i] (and sample_out[i + n] under CFG) = prev, when sample_out != 0
// which is runtime.schedulers.apply_step + runtime.guidance.combine, checked against diffusers in CI.
//
// float32 throughout; compile with --fmad=false so no fused multiply-add rounds differently
// from numpy. The clamp is written with comparisons, not fminf/fmaxf: those return the bound for
// a NaN input, np.clip keeps the NaN. A non-finite result sets *bad_step (when bad_step != 0) to
// step + 1 unless an earlier step already did: the host reads it once after the loop and names
// the first step that blew up, without a synchronisation per step.
extern "C" __global__ void guided_step(const float* pred, float* latents, const float* noise, float* sample_out,
                                       long long n, int cfg, float scale, float a, float b, float clip,
                                       float c_x0, float c_x, float c_eps, float stdv,
                                       unsigned int* bad_step, unsigned int step) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float eps = pred[i];
    if (cfg) {
        float c = pred[i + n];
        eps = eps + scale * (c - eps);
    }
    float x = latents[i];
    float x0 = (x - b * eps) / a;
    x0 = x0 < -clip ? -clip : (x0 > clip ? clip : x0);  // NaN fails both tests and stays NaN
    float prev = c_x0 * x0 + c_x * x + c_eps * eps;
    if (noise != 0 && stdv != 0.0f) prev = prev + stdv * noise[i];
    latents[i] = prev;
    if (sample_out != 0) {
        sample_out[i] = prev;
        if (cfg) sample_out[i + n] = prev;
    }
    if (bad_step != 0 && !isfinite(prev)) atomicCAS(bad_step, 0u, step + 1u);
}

// One unCLIP step (diffusers' UnCLIPScheduler, Karlo's decoder and super-resolution loops),
// fused with the decoder's guidance: runtime.unclip_scheduler.apply_unclip_step after the chain's
// guidance (runtime/chains/karlo.py). latents are (B, C, H, W), n = B*C*H*W, plane = H*W; pred rows
// hold pred_channels (C, or 2C with the learned variance in channels C..2C) planes each:
//   eps  = pred[b, c]                                  (no CFG)
//        = u + scale * (k - u), u = pred[b, c], k = pred[B + b, c]   (CFG: pred holds [uncond; cond])
//   x0   = clamp((x - b_ * eps) / a, -clip, clip)
//   prev = c_x0 * x0 + c_x * x
//   when noise != 0 (every step but the last):
//     fixed_small_log (learned = 0): prev += std * noise[i]
//     learned_range   (learned = 1): v = pred[cond row of b, C + c], f = (double)((v + 1) / 2),
//                     prev += (float)exp(0.5 * (f * max_log + (1 - f) * min_log)) * noise[i]
//   latents[i] = prev; sample_out[i] (and sample_out[i + n] under CFG) = prev, when sample_out != 0
// float32 except the learned std, which the host computes in float64 and rounds once (the
// numpy and C++ host steps do the same); same --fmad=false, NaN-keeping clamp and NaN flag as
// guided_step.
extern "C" __global__ void unclip_step(const float* pred, float* latents, const float* noise, float* sample_out,
                                       long long n, long long plane, int channels, int pred_channels, int cfg,
                                       float scale, float a, float b_, float clip, float c_x0, float c_x,
                                       int learned, float std_, double min_log, double max_log,
                                       unsigned int* bad_step, unsigned int step) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    long long image = (long long)channels * plane;   // elements of one latent row
    long long row = i / image, within = i - row * image;
    long long pred_row = (long long)pred_channels * plane;
    long long cond_row = cfg ? n / image + row : row;  // the row whose variance counts
    float eps = pred[row * pred_row + within];
    if (cfg) {
        float k = pred[cond_row * pred_row + within];
        eps = eps + scale * (k - eps);
    }
    float x = latents[i];
    float x0 = (x - b_ * eps) / a;
    x0 = x0 < -clip ? -clip : (x0 > clip ? clip : x0);  // NaN fails both tests and stays NaN
    float prev = c_x0 * x0 + c_x * x;
    if (noise != 0) {
        float sd = std_;
        if (learned) {
            float v = pred[cond_row * pred_row + image + within];
            double f = (double)((v + 1.0f) / 2.0f);
            sd = (float)exp(0.5 * (f * max_log + (1.0 - f) * min_log));
        }
        prev = prev + sd * noise[i];
    }
    latents[i] = prev;
    if (sample_out != 0) {
        sample_out[i] = prev;
        if (cfg) sample_out[i + n] = prev;
    }
    if (bad_step != 0 && !isfinite(prev)) atomicCAS(bad_step, 0u, step + 1u);
}
