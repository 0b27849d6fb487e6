/*
 * eclipse: the eclipse-export runtime for C and C++ applications.
 *
 * Opens a bundle made by eclipse-export, runs the chain of its model family, e.g. Kandinsky 2.2's
 *   prompt -> CLIP tokenizer -> text encoder -> ECLIPSE prior -> UNet x N (CFG) -> MoVQ -> RGB8
 * (λ-ECLIPSE: subject images -> image encoder -> their embeddings in the keywords' places of the
 * prompt's text states -> λ prior -> the same decoder; Karlo: text_proj -> 64 px decoder ->
 * super-resolution)
 * through a backend (ONNX Runtime, or the caller's own engine), and gives the same image as the
 * Python runtime for the same prompt and seed.
 *
 * Objects (each created and freed in pairs; the library owns every buffer it returns):
 *   eclipse_backend  how graphs run (ONNX Runtime, or a table of the caller's functions)
 *   eclipse_bundle   a verified bundle: manifest, tokenizer, scheduler config (immutable)
 *   eclipse_context  bundle + loaded graphs (immutable, shared by any number of states)
 *   eclipse_state    per-request state; one generation at a time per state, so two threads
 *                    generate at once with one state each on one context
 *   eclipse_result   an image, its timings and warnings
 *
 * Errors: every function that can fail returns an eclipse_status; eclipse_last_error() gives
 * the message of the last failure on the calling thread.
 */
#ifndef ECLIPSE_H
#define ECLIPSE_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#if defined(ECLIPSE_BUILDING)
#define ECLIPSE_API __declspec(dllexport)
#elif defined(ECLIPSE_SHARED)
#define ECLIPSE_API __declspec(dllimport)
#else
#define ECLIPSE_API
#endif
#else
#define ECLIPSE_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Version of this header's API; eclipse_params.api_version carries it. 2 added the λ-ECLIPSE
 * subjects, the control image and named noises to eclipse_params (a caller built against API 1
 * passes the shorter struct and keeps working). */
#define ECLIPSE_API_VERSION 2

typedef enum eclipse_status {
    ECLIPSE_OK = 0,
    ECLIPSE_ERR_INVALID_ARGUMENT = 1, /* a bad request or a NULL where an object is needed */
    ECLIPSE_ERR_BUNDLE = 2,           /* bundle missing, damaged, altered, newer or unsafe */
    ECLIPSE_ERR_BACKEND = 3,          /* the backend failed to load or run a graph */
    ECLIPSE_ERR_UNSUPPORTED = 4,      /* not built into this library, or a config it cannot run */
    ECLIPSE_ERR_CANCELLED = 5,        /* the progress callback asked to stop */
    ECLIPSE_ERR_IO = 6,               /* writing a file failed */
    ECLIPSE_ERR_OUT_OF_MEMORY = 7,
    ECLIPSE_ERR_INTERNAL = 8
} eclipse_status;

typedef enum eclipse_log_level {
    ECLIPSE_LOG_DEBUG = 0,
    ECLIPSE_LOG_INFO = 1,
    ECLIPSE_LOG_WARN = 2,
    ECLIPSE_LOG_ERROR = 3
} eclipse_log_level;

typedef enum eclipse_scheduler {
    ECLIPSE_SCHEDULER_BUNDLE = 0, /* the class named in the bundle's scheduler_config.json */
    ECLIPSE_SCHEDULER_DDPM = 1,
    ECLIPSE_SCHEDULER_DDIM = 2
} eclipse_scheduler;

/* Noise streams of a seed (see eclipse_normals). */
typedef enum eclipse_noise_stream {
    ECLIPSE_STREAM_PRIOR = 0,
    ECLIPSE_STREAM_LATENTS = 1,
    ECLIPSE_STREAM_STEPS = 2
} eclipse_noise_stream;

typedef struct eclipse_backend eclipse_backend;
typedef struct eclipse_bundle eclipse_bundle;
typedef struct eclipse_context eclipse_context;
typedef struct eclipse_state eclipse_state;
typedef struct eclipse_result eclipse_result;

/* ---- library ------------------------------------------------------------------------------ */

ECLIPSE_API const char *eclipse_version(void);
ECLIPSE_API const char *eclipse_status_string(eclipse_status status);
/* Message of the last failed call on this thread ("" if none). Valid until the next call. */
ECLIPSE_API const char *eclipse_last_error(void);

/* Log messages (warnings such as a truncated prompt, backend notices). The default writes
 * warnings and errors to stderr; fn NULL silences the library. Called from any thread. */
typedef void (*eclipse_log_fn)(eclipse_log_level level, const char *message, void *user_data);
ECLIPSE_API void eclipse_set_log_callback(eclipse_log_fn fn, void *user_data);

/* ---- backends ----------------------------------------------------------------------------- */

/* 1 if this library was built with the named backend ("custom", "onnxruntime", "tensorrt",
 * "tensorrt-rtx"). */
ECLIPSE_API int eclipse_backend_available(const char *name);

typedef struct eclipse_onnxruntime_options {
    uint32_t struct_size;   /* sizeof(eclipse_onnxruntime_options) */
    const char *providers;  /* comma-separated, in order of preference: "cpu", "cuda" */
    int32_t intra_op_threads; /* 0: ONNX Runtime's default */
    int32_t device_id;        /* CUDA device */
    /* libonnxruntime to open (dlopen); NULL: the one named at build time, else the system's
     * libonnxruntime.so.1 */
    const char *library_path;
} eclipse_onnxruntime_options;
ECLIPSE_API eclipse_onnxruntime_options eclipse_onnxruntime_default_options(void);
/* ECLIPSE_ERR_UNSUPPORTED when the library was built without ONNX Runtime. */
ECLIPSE_API eclipse_status eclipse_backend_onnxruntime_create(const eclipse_onnxruntime_options *options,
                                                              eclipse_backend **out);

/* TensorRT (10.3 / 11.x) or TensorRT-RTX: the bundle's engines on an NVIDIA GPU, the UNet loop on
 * the device. A library is built for one flavour (eclipse_tensorrt_flavour()); TensorRT, the
 * NVIDIA driver and NVRTC are opened when the backend is created (dlopen), so a library built
 * with the backend still loads and runs the other backends on machines without them. */
typedef struct eclipse_tensorrt_options {
    uint32_t struct_size;      /* sizeof(eclipse_tensorrt_options) */
    int32_t device_id;         /* CUDA device */
    int32_t low_memory;        /* 1: one engine resident at a time, loaded when its stage starts and
                                * freed when it ends (8 GB Jetson boards) */
    int32_t cuda_graphs;       /* 1 (default): the UNet step replayed as a CUDA graph (TensorRT:
                                * captured by the library; TensorRT-RTX: its own strategy) */
    /* TensorRT-RTX keeps the kernels it compiles for this GPU here, one file per engine, saved
     * when an engine is freed. NULL: $XDG_CACHE_HOME (or ~/.cache)/eclipse-export/rtx-runtime-cache,
     * the directory eclipse-generate uses; "": no cache. */
    const char *runtime_cache_dir;
    const char *library_path;             /* NULL: libnvinfer.so.<major> / libtensorrt_rtx.so.<major> */
    const char *onnx_parser_library_path; /* for weight-stripped engines; NULL: the flavour's default */
    const char *nvrtc_library_path;       /* NULL: libnvrtc.so.<driver's CUDA major>, then older */
} eclipse_tensorrt_options;
ECLIPSE_API eclipse_tensorrt_options eclipse_tensorrt_default_options(void);
/* ECLIPSE_ERR_UNSUPPORTED when the library was built without the TensorRT backend;
 * ECLIPSE_ERR_BACKEND naming every missing piece (driver, GPU, NVRTC, TensorRT) otherwise. */
ECLIPSE_API eclipse_status eclipse_backend_tensorrt_create(const eclipse_tensorrt_options *options, eclipse_backend **out);
/* "tensorrt" or "tensorrt-rtx": the flavour this library's TensorRT backend was built for; NULL
 * when it was built without one. */
ECLIPSE_API const char *eclipse_tensorrt_flavour(void);

/* The custom backend: the caller runs the graphs. */
typedef enum eclipse_dtype { ECLIPSE_FLOAT32 = 1, ECLIPSE_INT32 = 2 } eclipse_dtype;

#define ECLIPSE_MAX_RANK 8
typedef struct eclipse_tensor {
    const char *name;   /* the graph's tensor name (README: graph I/O) */
    eclipse_dtype dtype;
    int32_t rank;
    int64_t shape[ECLIPSE_MAX_RANK];
    void *data;         /* contiguous, C order; owned by the library */
} eclipse_tensor;

/* One DDPM/DDIM epsilon step as scalars (the device kernel's statement):
 *   x0 = clamp((x - b*eps) / a, -clip, clip);  prev = c_x0*x0 + c_x*x + c_eps*eps + std*noise */
typedef struct eclipse_step_coefficients {
    float a, b, clip, c_x0, c_x, c_eps, std;
} eclipse_step_coefficients;

/* The whole UNet loop, for backends that keep latents on the device (see custom.denoise). */
typedef struct eclipse_denoise_call {
    const float *latents;          /* initial latents (B,C,h,w), already times init_noise_sigma */
    int64_t latent_shape[4];
    const float *image_embeds;     /* (rows, D): [negative, positive] with CFG, else [positive] */
    int64_t embeds_shape[2];
    int32_t steps;
    const float *timesteps;        /* (steps): the UNet's timestep input per step */
    const eclipse_step_coefficients *coefficients; /* (steps) */
    int32_t cfg;                   /* 1: UNet batch [latents, latents], guidance applied */
    float guidance_scale;
    const float *step_noise;       /* (steps, B,C,h,w), or NULL (DDIM) */
    float *out_latents;            /* (B,C,h,w): write the final latents here */
    /* call after each step; a non-zero return asks the backend to stop (return non-zero) */
    int (*progress)(int32_t step, int32_t steps, void *progress_data);
    void *progress_data;
} eclipse_denoise_call;

typedef struct eclipse_custom_backend {
    uint32_t struct_size;  /* sizeof(eclipse_custom_backend) */
    void *user_data;       /* passed to every function below */
    const char *name;      /* shown in logs and reports */
    /* Load one component ("text_encoder", "prior", "unet", "movq"; λ-ECLIPSE also "image_encoder";
     * Karlo: "text_proj", "decoder", "super_res_first", "super_res_last") from its verified graph
     * file; store the caller's session handle in *session. Return 0 on success. */
    int (*load)(void *user_data, const char *component, const char *graph_path, void **session);
    /* Run a loaded component. Inputs and outputs come in the graph's order with their shapes;
     * outputs are allocated by the library: fill output[i].data. Return 0 on success. May be
     * called from several threads at once (one call per eclipse_state). */
    int (*run)(void *user_data, void *session, const eclipse_tensor *inputs, size_t n_inputs,
               eclipse_tensor *outputs, size_t n_outputs);
    void (*free_session)(void *user_data, void *session);
    /* Optional (may be NULL). */
    void (*free_user_data)(void *user_data); /* when the backend is freed */
    /* The UNet loop in one call (guidance + step on the device); NULL: the library loops. */
    int (*denoise)(void *user_data, void *unet_session, const eclipse_denoise_call *call);
} eclipse_custom_backend;

/* The table is copied; user_data must outlive the backend and every context using it. */
ECLIPSE_API eclipse_status eclipse_backend_custom_create(const eclipse_custom_backend *table, eclipse_backend **out);
ECLIPSE_API void eclipse_backend_free(eclipse_backend *backend);

/* ---- bundle ------------------------------------------------------------------------------- */

/* Reads and verifies a bundle: format version, size and sha256 of every file (sizes only with
 * verify_hashes 0), every path inside the bundle and listed in its manifest. */
ECLIPSE_API eclipse_status eclipse_bundle_open(const char *path, int verify_hashes, eclipse_bundle **out);
ECLIPSE_API void eclipse_bundle_free(eclipse_bundle *bundle);
/* A dimension of the bundle's graphs: "C", "D", "E", "S", "T"; -1 if unknown. */
ECLIPSE_API int64_t eclipse_bundle_dim(const eclipse_bundle *bundle, const char *name);

/* CLIP tokens of one UTF-8 prompt: ids/mask of max_length entries (77: CLIP's context), padded;
 * *truncated set to 1 when text was cut to fit. */
ECLIPSE_API eclipse_status eclipse_tokenize(const eclipse_bundle *bundle, const char *text, int32_t *ids,
                                            int32_t *mask, int32_t max_length, int32_t *truncated);

/* The schedule the library will run: timesteps (steps) and per-step coefficients (steps). */
ECLIPSE_API eclipse_status eclipse_schedule(const eclipse_bundle *bundle, eclipse_scheduler scheduler, int32_t steps,
                                            int64_t *timesteps, eclipse_step_coefficients *coefficients);

/* Standard normals of a seed's stream (README: "The noise generator"), as float32. */
ECLIPSE_API void eclipse_normals(uint64_t seed, uint32_t stream, float *out, size_t count);

/* ---- context, state, generation ----------------------------------------------------------- */

/* Loads the bundle's graphs on the backend. The context keeps the bundle and backend
 * alive: both may be freed by the caller right after. */
ECLIPSE_API eclipse_status eclipse_context_create(const eclipse_bundle *bundle, eclipse_backend *backend,
                                                  eclipse_context **out);
ECLIPSE_API void eclipse_context_free(eclipse_context *context);

ECLIPSE_API eclipse_status eclipse_state_create(eclipse_context *context, eclipse_state **out);
ECLIPSE_API void eclipse_state_free(eclipse_state *state);

/* Return non-zero to cancel (eclipse_generate then returns ECLIPSE_ERR_CANCELLED). */
typedef int (*eclipse_progress_fn)(int32_t step, int32_t steps, void *user_data);

/* An image the caller gives (λ-ECLIPSE subject or control image): a PNG file, or pixels in memory.
 * Files: 8- or 16-bit, grey, RGB or palette, with or without alpha; transparency is composited on
 * white, as the Python runtime's runtime/subjects.py load_image does (JPEG and other formats:
 * decode them yourself and pass the pixels). The image is decoded and checked when
 * eclipse_generate starts, before any graph runs, and then CLIP-preprocessed exactly as the
 * Python runtime does (shortest edge bicubic, centre crop, mean/std from the bundle). */
typedef struct eclipse_image {
    const char *path;        /* a PNG file; NULL: the pixels below */
    const uint8_t *pixels;   /* row-major, top row first; `channels` bytes a pixel */
    int32_t width, height;
    int32_t channels;        /* 1: grey8; 3: RGB8; 4: RGBA8, composited on white */
    size_t stride;           /* bytes from one row to the next; 0: packed (width * channels) */
} eclipse_image;

/* One λ-ECLIPSE subject: its image and the prompt word it stands for (UTF-8). Every prompt
 * position holding any sub-token of the keyword gets the image's embedding; a later subject wins
 * a token two keywords share; a keyword absent from the prompt gives a warning on the result. */
typedef struct eclipse_subject {
    eclipse_image image;
    const char *keyword;
} eclipse_subject;

/* One injected noise, by name (float32, C order; count must be the request's exactly):
 *   every family:  "prior" (prior batch * D), "latents" (the first latents), "steps" (one noise
 *                  per sampler step: steps * latents; DDPM / unCLIP only)
 *   Karlo also:    "sr_latents" (3*Q*Q), "sr_steps" (7 * 3*Q*Q): the super-resolution loop's
 * Names not drawn by the bundle's family are refused; a name not given is drawn from the seed
 * (README: "The noise generator", streams 0-4). */
typedef struct eclipse_noise {
    const char *name;
    const float *data;
    size_t count;
} eclipse_noise;


typedef struct eclipse_params {
    uint32_t struct_size;     /* sizeof(eclipse_params) as the caller was compiled */
    uint32_t api_version;     /* ECLIPSE_API_VERSION */
    /* NULL: the bundle's zero-image embedding as the negative; any string, "" included: the
     * prior run on it in the same batch. */
    const char *negative_prompt;
    int32_t width, height;    /* multiples of 64, 64..2048 */
    int32_t steps;
    double guidance_scale;    /* <= 1: no classifier-free guidance */
    uint64_t seed;            /* 0 .. 2^64-1 */
    eclipse_scheduler scheduler;
    eclipse_progress_fn progress;
    void *progress_data;
    /* Injected noises (NULL: drawn from the seed). Counts must fit the request exactly:
     * prior (prior batch * D), latents (C*h*w), step noise (steps*C*h*w, DDPM only). */
    const float *prior_noise;
    size_t prior_noise_count;
    const float *latent_noise;
    size_t latent_noise_count;
    const float *step_noise;
    size_t step_noise_count;
    /* ---- API 2 (a struct_size without these fields reads them as NULL / 0) ---- */
    /* λ-ECLIPSE bundles: the subject images and keywords (at least one: a λ bundle refuses a
     * request without subjects, as the Python runtime does); other families refuse subjects. */
    const eclipse_subject *subjects;
    size_t subject_count;
    /* λ-ECLIPSE: an edge map used as it is (white edges on black, as Canny draws them); NULL: the
     * bundle's zero-image embedding. Canny edges of a photo are computed by the Python runtime
     * only (OpenCV: eclipse-generate --canny); compute them yourself and pass the edge image. */
    const eclipse_image *control_image;
    /* Named noises (see eclipse_noise), for every family; Karlo's super-resolution noises can be
     * injected only this way. A noise given here and in the fields above is refused. */
    const eclipse_noise *noises;
    size_t noise_count;
} eclipse_params;

/* 512x512, 50 steps, guidance 4, seed 0, the bundle's scheduler, no negative prompt, no subjects,
 * no control image, every noise from the seed. */
ECLIPSE_API eclipse_params eclipse_default_params(void);
/* The defaults of the bundle's model family: Kandinsky 2.2 as above; Karlo: the bundle's image
 * size (256x256, its super-resolution UNets'; other sizes are refused), 25 decoder steps (the
 * super-resolution runs 7), guidance 8. A NULL bundle gives eclipse_default_params(). */
ECLIPSE_API eclipse_params eclipse_bundle_default_params(const eclipse_bundle *bundle);

/* One image for one UTF-8 prompt ("" is accepted: unconditional generation, with a warning). */
ECLIPSE_API eclipse_status eclipse_generate(eclipse_state *state, const char *prompt, const eclipse_params *params,
                                            eclipse_result **out);

ECLIPSE_API int32_t eclipse_result_width(const eclipse_result *result);
ECLIPSE_API int32_t eclipse_result_height(const eclipse_result *result);
/* height * width * 3 bytes, RGB, row-major; owned by the result. */
ECLIPSE_API const uint8_t *eclipse_result_pixels(const eclipse_result *result);
/* Seconds spent in a stage: "text_encoder", "prior", "unet", "unet_per_step", "movq", "total";
 * λ-ECLIPSE also "image_encoder" (all images) and "image_encoder.subject0", ...,
 * "image_encoder.control"; Karlo "text_proj", "decoder", "decoder_per_step", "upsample",
 * "super_res"; -1 for a stage the generation did not run. */
ECLIPSE_API double eclipse_result_timing(const eclipse_result *result, const char *stage);
ECLIPSE_API size_t eclipse_result_warning_count(const eclipse_result *result);
ECLIPSE_API const char *eclipse_result_warning(const eclipse_result *result, size_t index);
/* Writes the image as PNG; the file appears whole or not at all. */
ECLIPSE_API eclipse_status eclipse_result_save_png(const eclipse_result *result, const char *path);
ECLIPSE_API void eclipse_result_free(eclipse_result *result);

#ifdef __cplusplus
}
#endif

#endif /* ECLIPSE_H */
