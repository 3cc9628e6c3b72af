/* SPEC's loss and gradient at t1 = t2 = 1 for dense labels, fused for the CPU (float32).

   At t1 = t2 = 1 the loss of a row is sum y log(y / p) - sum y + 1 and its gradient p sum(y) - y,
   with p = softmax(a) and y the (smoothed) labels. Eager torch ops spend a log, two exps and about
   ten passes per element on it; this kernel reads each row's logits twice and its labels twice
   while the row is in the core's cache, writes the gradient once, and takes one exp and one log
   per element. bindings/torch/native/cpu_kernel.py compiles it on first use (with OpenMP and
   glibc's vector math library), caches the library and verifies it before each load;
   bindings/torch/native/loss.py calls it. The eager path stays the reference and the fallback.

   Per row, with d = a - max(a) and log p = d - lse, lse = log sum exp(d):
       loss = sum_{y > 0} y (log y - d) + sum(y) (lse - 1) + 1
       grad = scale (exp(d) sum(y) / sum exp(d) - y)
   A y = 0 class adds nothing to the loss (SPEC: 0 log 0 = 0, also where p = 0). A row the fused
   form cannot give exactly comes back with a non-finite loss, and the caller recomputes it on its
   general path: NaN or +inf logits (d is NaN), every logit -inf, or label mass on a class with
   p = 0 (a -inf logit: the loss is +inf). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* glibc declares these vector variants only under -ffast-math (which would also assume no NaN or
   inf); declaring them here lets the compiler call libmvec's SIMD expf/logf in the loops below. */
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
float logf(float);

/* One row; returns its loss, adds its labels outside [0, 1] (or NaN) to *bad. exp(d) goes to
   out (the gradient row, or scratch without a gradient: the same loop either way, so the loss has
   the same bits with and without gradient). Cloned per ISA (resolved once when the library
   loads), so one build runs on any x86-64 machine. */
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
static float dense_row(const float *a, const float *labels, float *out, int write_grad, int64_t c,
                       float on, float off, float scale, int64_t *bad) {
    float max = -INFINITY;
#pragma omp simd reduction(max : max)
    for (int64_t i = 0; i < c; i++) max = a[i] > max ? a[i] : max;

    float sum_exp = 0.0f, sum_y = 0.0f, y_log_ratio = 0.0f; /* y_log_ratio: sum y (log y - d) */
    int64_t outside = 0;
#pragma omp simd reduction(+ : sum_exp, sum_y, y_log_ratio, outside)
    for (int64_t i = 0; i < c; i++) {
        float d = a[i] - max;
        float e = expf(d);
        out[i] = e;
        sum_exp += e;
        float given = labels[i];
        outside += !(given >= 0.0f && given <= 1.0f);
        float y = on * given + off;
        sum_y += y;
        float term = y * (logf(y) - d);
        y_log_ratio += y > 0.0f ? term : 0.0f;
    }
    *bad += outside;
    if (write_grad) {
        float p_scale = scale * sum_y / sum_exp;
#pragma omp simd
        for (int64_t i = 0; i < c; i++) out[i] = p_scale * out[i] - scale * (on * labels[i] + off);
    }
    return y_log_ratio + sum_y * (logf(sum_exp) - 1.0f) + 1.0f;
}

/* Rows [n, c] with unit class stride and the given row strides (in elements). grad may be NULL
   (no gradient); loss has n entries. Labels are smoothed as on * y + off (SPEC's smoothing; 1, 0
   for none) and checked as given. Returns how many label values lie outside [0, 1] or are NaN,
   or -1 if the scratch row (no gradient only) could not be allocated. */
int64_t bitempered_dense_cross_entropy_f32(const float *logits, int64_t logits_row_stride,
                                           const float *labels, int64_t labels_row_stride,
                                           float *grad, int64_t grad_row_stride, float *loss,
                                           int64_t n, int64_t c, float on, float off, float scale,
                                           int threads) {
    int64_t bad = 0;
    int out_of_memory = 0;
    /* one thread below ~32k elements, as ATen's grain size: a parallel region costs more there */
#pragma omp parallel num_threads(threads) if (threads > 1 && n > 1 && n * c >= 32768)
    {
        float *scratch = grad ? 0 : (float *)malloc((size_t)c * sizeof(float));
        if (!grad && !scratch) {
#pragma omp atomic write
            out_of_memory = 1;
        }
#pragma omp for schedule(static) reduction(+ : bad)
        for (int64_t r = 0; r < n; r++) {
            float *out = grad ? grad + r * grad_row_stride : scratch;
            if (out) loss[r] = dense_row(logits + r * logits_row_stride, labels + r * labels_row_stride,
                                         out, grad != 0, c, on, off, scale, &bad);
        }
        free(scratch);
    }
    return out_of_memory ? -1 : bad;
}
