/* The tutorial LeNet's two stages on a CPU, each as one pass over each image: lenet's only
 * compiled code, for training steps (lenet/stages.py calls it and says when).
 *
 * Conv2d(1, 6, 5) on 28x28 images, then MaxPool2d(2, 2); Conv2d(6, 16, 5) on the 6x12x12 maps,
 * then MaxPool2d(2, 2). PyTorch runs each as general kernels, and at these small shapes they
 * are far from the machine's speed: on 2 cores the convolutions, the poolings and their
 * backward passes were 15 of 18 ms of a training step at batch 256. Here each image's maps
 * stay in a small local array and are pooled as soon as they are made; only the pooled maps
 * and which pixel won each window leave the forward pass, and the backward pass works from
 * the winners alone (the only convolution outputs with a gradient).
 *
 * The arithmetic is PyTorch's, in another order: the same outputs and gradients to float32
 * rounding; the pooling picks the first largest of a window's pixels in row order (NaN wins),
 * as PyTorch's does. tests/test_stages.py compares the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

/* The first stage's sizes; the second's (12x12 in, 6 and 16 maps, 8x8 and 4x4) are written
 * out where they are used. */
#define SIDE 28   /* input side */
#define K 5       /* kernel side */
#define CONV 24   /* SIDE - K + 1 */
#define POOLED 12 /* CONV / 2 */
#define MAPS 6
#define TAPS (K * K)

/* Eight floats, as GCC and Clang vectorise them (one AVX register, or two SSE ones). */
typedef float v8 __attribute__((vector_size(32)));

typedef int v8i __attribute__((vector_size(32)));
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* A vector's eight lanes added in a fixed order: every run gives the same bits. */
static inline float lane_sum(v8 s)
{
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

#define NAME(f) f##_plain
#define TARGET
#include "_stages_kernels.h"
#undef NAME
#undef TARGET

/* AVX2 with FMA where the CPU has them (x86-64 with GCC or Clang): three times the plain
 * build's speed here. Elsewhere the plain build, vectorised as the compiler sees fit. */
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define HAVE_AVX2_VARIANT 1
#define NAME(f) f##_avx2
#define TARGET __attribute__((target("avx2,fma")))
#include "_stages_kernels.h"
#undef NAME
#undef TARGET
#endif

/* One build's kernels; `kernels` points at the one in use. */
typedef struct {
    const char *name;
    void (*forward1)(const float *, const float *, const float *, float *, unsigned char *);
    void (*backward1)(const float *, const float *, const unsigned char *, v8 *, float *);
    void (*conv1)(const float *, const float *, const float *, float *);
    void (*conv1_grad)(const float *, const float *, v8 *, float *);
    void (*forward2)(const float *, const float *, const float *, float *, unsigned char *);
    void (*backward2)(const float *, const float *, const unsigned char *, const v8 *, float *,
                      v8 *, float *);
    void (*bn1_forward)(const float *, const float *, const float *, float *, unsigned char *,
                        double *);
    void (*bn1_backward)(const float *, const float *, const float *, const float *,
                         const unsigned char *, const double *, v8 *, float *, double *);
    void (*bn_pool_forward)(const float *, int, int, int, const float *, float *,
                            unsigned char *, double *);
    void (*bn_pool_sums)(const float *, const float *, const float *, int, int, const double *,
                         double *);
    void (*bn_pool_backward)(const float *, int, int, int, const float *, const float *,
                             const unsigned char *, const float *, float *);
    void (*input_grad2)(const float *, const float *, float *);
} Kernels;

static const Kernels plain = {"plain", forward_image_plain, backward_image_plain,
                              conv1_image_plain, conv1_grad_image_plain,
                              forward2_image_plain, backward2_image_plain,
                              bn1_forward_image_plain, bn1_backward_image_plain,
                              bn_pool_forward_image_plain, bn_pool_sums_image_plain,
                              bn_pool_backward_image_plain, input_grad2_image_plain};
#ifdef HAVE_AVX2_VARIANT
static const Kernels avx2 = {"avx2", forward_image_avx2, backward_image_avx2,
                             conv1_image_avx2, conv1_grad_image_avx2,
                             forward2_image_avx2, backward2_image_avx2,
                             bn1_forward_image_avx2, bn1_backward_image_avx2,
                             bn_pool_forward_image_avx2, bn_pool_sums_image_avx2,
                             bn_pool_backward_image_avx2, input_grad2_image_avx2};
#endif
static const Kernels *kernels = &plain;

/* ---- Running a batch on PyTorch's own threads ----
 *
 * The images of a batch are independent, so a batch is cut into one contiguous share per
 * thread. The threads are PyTorch's: its OpenMP runtime (libgomp on Linux), already loaded by
 * `import torch`, is found by name and asked for a parallel region, as `#pragma omp parallel`
 * would be, without linking to it. Threads of our own had to compete with PyTorch's, which
 * busy-wait for their next task after each of its operations, and two of ours ran a stage
 * slower than one (measured); PyTorch's waiting threads take the work at once instead.
 * Where no such runtime is loaded, one thread runs the whole batch. */

typedef void (*RegionFn)(void *);
static void (*gomp_parallel)(RegionFn, void *, unsigned, unsigned) = NULL;
static int (*omp_thread_num)(void) = NULL;
static int (*omp_team_size)(void) = NULL;
static const char *openmp_name = NULL;

static void find_openmp(void)
{
#if defined(__unix__) || defined(__APPLE__)
    /* RTLD_NOLOAD: only a runtime already in the process (PyTorch's), never a second one with
     * threads of its own. libgomp and LLVM's libomp both answer the GOMP_ entry points. */
    static const char *const names[] = {"libgomp.so.1", "libomp.so", "libomp.dylib",
                                        "libiomp5.so"};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        void *lib = dlopen(names[i], RTLD_LAZY | RTLD_NOLOAD);
        if (lib == NULL)
            continue;
        void *parallel = dlsym(lib, "GOMP_parallel");
        void *num = dlsym(lib, "omp_get_thread_num");
        void *size = dlsym(lib, "omp_get_num_threads");
        if (parallel != NULL && num != NULL && size != NULL) {
            /* Object to function pointers, as POSIX allows for dlsym's answers. */
            memcpy(&gomp_parallel, &parallel, sizeof parallel);
            memcpy(&omp_thread_num, &num, sizeof num);
            memcpy(&omp_team_size, &size, sizeof size);
            openmp_name = names[i];
            return; /* the handle stays open: the runtime stays loaded */
        }
        dlclose(lib);
    }
#endif
}

/* What lenet-relu's first stage sums over a batch in doubles (bn1_forward_image's moments). */
#define MOMENTS (2 * MAPS + MAPS * TAPS + TAPS)

/* What one thread adds up over its share of a batch: weight gradients (up to the second
 * stage's 16 x 25 taps, eight lanes each), bias gradients (up to 16), and sums in doubles. */
typedef struct {
    v8 dw8[16 * TAPS];
    float db[16];
    double moments[MOMENTS];
} Partial;

#define MAX_ADDRESSES 13

/* One entry point's work on the images [from, to) of a batch; a backward pass adds its
 * gradients to `partial` (NULL for a forward pass). `a` holds the entry point's addresses. */
typedef void (*ShareFn)(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *partial);

typedef struct {
    ShareFn fn;
    const Py_ssize_t *a;
    Py_ssize_t count;
    Partial *partials; /* one per thread, or NULL for a forward pass */
    int team;          /* how many threads ran: the runtime may give fewer than asked */
} Batch;

static void run_share(Batch *batch, int me, int team)
{
    Partial *partial = NULL;
    if (batch->partials != NULL) {
        partial = &batch->partials[me];
        memset(partial, 0, sizeof *partial);
    }
    batch->fn(batch->a, batch->count * me / team, batch->count * (me + 1) / team, partial);
}

static void region(void *data)
{
    Batch *batch = data;
    const int me = omp_thread_num(), team = omp_team_size();
    if (me == 0)
        batch->team = team;
    run_share(batch, me, team);
}

/* Runs fn over the `count` images of a batch on up to `threads` threads, the GIL released.
 * For a pass that sums (`total` not NULL), *total receives the threads' sums added up in
 * thread order (so one thread count gives the same bits on every run), for the caller to
 * free(). Returns 0, or -1 with a Python error set. */
static int run_shares(ShareFn fn, const Py_ssize_t *a, Py_ssize_t count, int threads,
                      Partial **total)
{
    const int sums = total != NULL;
    if (gomp_parallel == NULL || threads < 1)
        threads = 1;
    if (threads > count)
        threads = count > 0 ? (int)count : 1;
    Batch batch = {fn, a, count, NULL, 1};
    if (sums) {
        /* v8 needs 32-byte alignment; sizeof(Partial) is a multiple of 32. */
        batch.partials = aligned_alloc(32, (size_t)threads * sizeof(Partial));
        if (batch.partials == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    if (threads > 1)
        gomp_parallel(region, &batch, (unsigned)threads, 0);
    else
        run_share(&batch, 0, 1);
    for (int t = 1; t < batch.team && sums; t++) {
        for (int i = 0; i < 16 * TAPS; i++)
            batch.partials[0].dw8[i] += batch.partials[t].dw8[i];
        for (int i = 0; i < 16; i++)
            batch.partials[0].db[i] += batch.partials[t].db[i];
        for (int i = 0; i < MOMENTS; i++)
            batch.partials[0].moments[i] += batch.partials[t].moments[i];
    }
    Py_END_ALLOW_THREADS
    if (sums)
        *total = batch.partials;
    return 0;
}

/* What every entry point is called with: (addresses, count, threads[, eps, factor]), a tuple
 * of `n` addresses (and sizes, for some), the number of images, how many threads may run
 * them, and for BatchNorm's forward passes its epsilon and the running statistics' update
 * factor. */
typedef struct {
    Py_ssize_t a[MAX_ADDRESSES];
    Py_ssize_t count;
    int threads;
    double eps, factor;
} Call;

static int parse_call(PyObject *args, int n, Call *call)
{
    PyObject *addresses;
    call->eps = call->factor = 0.0;
    if (!PyArg_ParseTuple(args, "O!ni|dd", &PyTuple_Type, &addresses, &call->count,
                          &call->threads, &call->eps, &call->factor))
        return -1;
    if (PyTuple_GET_SIZE(addresses) != n) {
        PyErr_Format(PyExc_TypeError, "expected %d addresses", n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        call->a[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(addresses, i));
        if (call->a[i] == -1 && PyErr_Occurred())
            return -1;
    }
    return 0;
}

/* parse_call, then run_shares over the addresses as given. */
static int run_batch(PyObject *args, Py_ssize_t *a, int n, ShareFn fn, Partial **total)
{
    Call call;
    if (parse_call(args, n, &call) < 0)
        return -1;
    memcpy(a, call.a, n * sizeof *a);
    return run_shares(fn, a, call.count, call.threads, total);
}

/* ---- The entry points ----
 * Each takes (addresses, count, threads); the addresses are those of contiguous tensors,
 * listed in each entry point's comment. */

/* A forward entry point's body: run fn over the batch; no gradients to write. */
static PyObject *forward_batch(PyObject *args, int n, ShareFn fn)
{
    Py_ssize_t a[MAX_ADDRESSES];
    if (run_batch(args, a, n, fn, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void forward1_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    (void)p;
    for (Py_ssize_t n = from; n < to; n++)
        kernels->forward1((const float *)a[0] + n * SIDE * SIDE, (const float *)a[1],
                          (const float *)a[2], (float *)a[3] + n * POOLED * POOLED * MAPS,
                          (unsigned char *)a[4] + n * POOLED * POOLED * MAPS);
}

/* forward1((x, w, b, out, arg), count, threads): float32 x (count, 28, 28), w (6, 25), b (6),
 * out (count, 12, 12, 6) and uint8 arg (count, 12, 12, 6). */
static PyObject *forward1(PyObject *self, PyObject *args)
{
    (void)self;
    return forward_batch(args, 5, forward1_share);
}

static void backward1_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    for (Py_ssize_t n = from; n < to; n++)
        kernels->backward1((const float *)a[0] + n * SIDE * SIDE,
                           (const float *)a[1] + n * POOLED * POOLED * MAPS,
                           (const unsigned char *)a[2] + n * POOLED * POOLED * MAPS, p->dw8,
                           p->db);
}

/* A first-stage backward entry point's body (backward1, conv1_backward): run fn over the
 * batch, then write the summed gradients to its last two addresses, dw (6, 25) and db (6). */
static PyObject *first_backward_batch(PyObject *args, int n, ShareFn fn)
{
    Py_ssize_t a[MAX_ADDRESSES];
    Partial *total;
    if (run_batch(args, a, n, fn, &total) < 0)
        return NULL;
    float *dw = (float *)a[n - 2], *db = (float *)a[n - 1];
    for (int i = 0; i < MAPS * TAPS; i++)
        dw[i] = lane_sum(total->dw8[i]);
    memcpy(db, total->db, MAPS * sizeof(float));
    free(total);
    Py_RETURN_NONE;
}

/* backward1((x, g, arg, dw, db), count, threads): g is float32 (count, 12, 12, 6), the
 * gradient of the pooled maps; dw (6, 25) and db (6) are overwritten with the weight and bias
 * gradients. */
static PyObject *backward1(PyObject *self, PyObject *args)
{
    (void)self;
    return first_backward_batch(args, 5, backward1_share);
}

static void conv1_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    (void)p;
    for (Py_ssize_t n = from; n < to; n++)
        kernels->conv1((const float *)a[0] + n * SIDE * SIDE, (const float *)a[1],
                       (const float *)a[2], (float *)a[3] + n * MAPS * CONV * CONV);
}

/* conv1_forward((x, w, b, out), count, threads): the first convolution alone, for lenet-relu,
 * whose BatchNorm comes between it and the pooling: float32 x (count, 28, 28), w (6, 25),
 * b (6), out (count, 6, 24, 24). */
static PyObject *conv1_forward(PyObject *self, PyObject *args)
{
    (void)self;
    return forward_batch(args, 4, conv1_share);
}

static void conv1_grad_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    for (Py_ssize_t n = from; n < to; n++)
        kernels->conv1_grad((const float *)a[0] + n * SIDE * SIDE,
                            (const float *)a[1] + n * MAPS * CONV * CONV, p->dw8, p->db);
}

/* conv1_backward((x, g, dw, db), count, threads): g float32 (count, 6, 24, 24), the gradient
 * of the maps; dw (6, 25) and db (6) are overwritten with the weight and bias gradients. */
static PyObject *conv1_backward(PyObject *self, PyObject *args)
{
    (void)self;
    return first_backward_batch(args, 4, conv1_grad_share);
}

static void forward2_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    (void)p;
    for (Py_ssize_t n = from; n < to; n++)
        kernels->forward2((const float *)a[0] + n * 12 * 12 * 6, (const float *)a[1],
                          (const float *)a[2], (float *)a[3] + n * 4 * 4 * 16,
                          (unsigned char *)a[4] + n * 4 * 4 * 16);
}

/* forward2((x, w, b, out, arg), count, threads): float32 x (count, 12, 12, 6),
 * w (5, 5, 6, 16), b (16), out (count, 4, 4, 16) and uint8 arg (count, 4, 4, 16). */
static PyObject *forward2(PyObject *self, PyObject *args)
{
    (void)self;
    return forward_batch(args, 5, forward2_share);
}

static void backward2_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    for (Py_ssize_t n = from; n < to; n++)
        kernels->backward2((const float *)a[0] + n * 12 * 12 * 6,
                           (const float *)a[1] + n * 4 * 4 * 16,
                           (const unsigned char *)a[2] + n * 4 * 4 * 16, (const v8 *)a[3],
                           (float *)a[4] + n * 12 * 12 * 6, p->dw8, p->db);
}

/* backward2((x, g, arg, w8, dx, dw, db), count, threads): g float32 (count, 4, 4, 16), the
 * gradient of the pooled maps; w8 the weights as (16, 5, 5, 8), the six input maps padded to
 * eight. Written: dx (count, 12, 12, 6), dw (16, 5, 5, 6) and db (16). */
static PyObject *backward2(PyObject *self, PyObject *args)
{
    Py_ssize_t a[MAX_ADDRESSES];
    Partial *total;
    (void)self;
    if (run_batch(args, a, 7, backward2_share, &total) < 0)
        return NULL;
    float *dw = (float *)a[5];
    for (int tap = 0; tap < 16 * TAPS; tap++)
        for (int c = 0; c < 6; c++)
            dw[tap * 6 + c] = total->dw8[tap][c];
    memcpy((float *)a[6], total->db, 16 * sizeof(float));
    free(total);
    Py_RETURN_NONE;
}

/* ---- BatchNorm in training: lenet-relu's stages, lenet-plus's ----
 * Each forward pass runs twice over the batch: once to pool each window (by gamma's sign)
 * and sum the maps, then, with the batch's statistics known, once to normalise the pooled
 * pixels and apply the ReLU. Each backward pass sums the gradient first, then uses the sums.
 * The statistics' arithmetic (in doubles) is done here, between the two passes. */

/* From each map's sum and sum of squares over `positions` pixels (sums[0, maps), [maps,
 * 2 maps)): centre, the means then the inverse sigmas (doubles); scale_shift, what
 * normalising does to a pixel, gamma / sigma then beta - mean gamma / sigma; and the running
 * statistics updated as PyTorch's BatchNorm does (the variance unbiased, by `factor`). */
static void batch_statistics(const double *sums, int maps, double positions, const float *gamma,
                             const float *beta, double eps, double factor, float *running_mean,
                             float *running_var, double *centre, float *scale_shift)
{
    for (int c = 0; c < maps; c++) {
        const double mean = sums[c] / positions;
        double variance = sums[maps + c] / positions - mean * mean;
        if (variance < 0.0) /* rounding, where every pixel is alike */
            variance = 0.0;
        const double unbiased = positions > 1.0 ? variance * positions / (positions - 1.0)
                                                : variance;
        running_mean[c] = (float)((1.0 - factor) * running_mean[c] + factor * mean);
        running_var[c] = (float)((1.0 - factor) * running_var[c] + factor * unbiased);
        const double inverse = 1.0 / sqrt(variance + eps), scale = gamma[c] * inverse;
        centre[c] = mean;
        centre[maps + c] = inverse;
        scale_shift[c] = (float)scale;
        scale_shift[maps + c] = (float)(beta[c] - scale * mean);
    }
}

/* The second pass: out = relu(scale * picked + shift), both (count, pixels, maps). a: picked,
 * out, scale_shift, pixels, maps. */
static void normalise_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    (void)p;
    const Py_ssize_t maps = a[4], size = a[3] * maps;
    const float *scale = (const float *)a[2], *shift = scale + maps;
    for (Py_ssize_t n = from; n < to; n++) {
        const float *picked = (const float *)a[0] + n * size;
        float *out = (float *)a[1] + n * size;
        for (Py_ssize_t at = 0; at < size; at += maps)
            for (Py_ssize_t c = 0; c < maps; c++) {
                const float y = scale[c] * picked[at + c] + shift[c];
                out[at + c] = y < 0.0f ? 0.0f : y; /* as torch.relu: NaN stays NaN */
            }
    }
}

/* The statistics and the second pass, for `maps` maps of `positions` pixels a map in all;
 * a: gamma, beta, running_mean, running_var, picked, out, centre; `pixels`: pooled pixels an
 * image. */
static int normalise(const Call *call, const double *sums, int maps, double positions,
                     const Py_ssize_t *a, Py_ssize_t pixels)
{
    float scale_shift[2 * MOMENTS];
    batch_statistics(sums, maps, positions, (const float *)a[0], (const float *)a[1],
                     call->eps, call->factor, (float *)a[2], (float *)a[3], (double *)a[6],
                     scale_shift);
    const Py_ssize_t pass[] = {a[4], a[5], (Py_ssize_t)scale_shift, pixels, maps};
    return run_shares(normalise_share, pass, call->count, call->threads, NULL);
}

static void bn1_forward_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    for (Py_ssize_t n = from; n < to; n++)
        kernels->bn1_forward((const float *)a[0] + n * SIDE * SIDE, (const float *)a[1],
                             (const float *)a[2], (float *)a[6] + n * POOLED * POOLED * MAPS,
                             (unsigned char *)a[7] + n * POOLED * POOLED * MAPS, p->moments);
}

/* bn1_forward((x, w, gamma, beta, running_mean, running_var, picked, arg, out, moments,
 * centre), count, threads, eps, factor): lenet-relu's first stage in training. float32 x
 * (count, 28, 28), w (6, 25), BatchNorm's gamma, beta and running statistics (6, updated).
 * Written: picked (count, 12, 12, 6), each window's largest convolution output (smallest
 * where gamma < 0), uint8 arg, which pixel it was, out, the stage's output, float64 moments
 * (187), the batch's sums (bn1_forward_image lists them), and float64 centre (12), its means
 * and inverse sigmas. */
static PyObject *bn1_forward(PyObject *self, PyObject *args)
{
    Call call;
    Partial *total;
    (void)self;
    if (parse_call(args, 11, &call) < 0 ||
        run_shares(bn1_forward_share, call.a, call.count, call.threads, &total) < 0)
        return NULL;
    const Py_ssize_t *a = call.a;
    memcpy((double *)a[9], total->moments, MOMENTS * sizeof(double));
    free(total);
    const Py_ssize_t rest[] = {a[2], a[3], a[4], a[5], a[6], a[8], a[10]};
    if (normalise(&call, (const double *)a[9], MAPS, (double)call.count * CONV * CONV, rest,
                  POOLED * POOLED) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void bn1_backward_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    const Py_ssize_t size = POOLED * POOLED * MAPS;
    for (Py_ssize_t n = from; n < to; n++)
        kernels->bn1_backward((const float *)a[0] + n * SIDE * SIDE, (const float *)a[1] + n * size,
                              (const float *)a[2] + n * size, (const float *)a[3] + n * size,
                              (const unsigned char *)a[4] + n * size, (const double *)a[6],
                              p->dw8, p->db, p->moments);
}

/* bn1_backward((x, g, out, picked, arg, moments, centre, gamma, dw, dgamma, dbeta), count,
 * threads): g float32 (count, 12, 12, 6), the gradient of the stage's output out; the rest
 * from bn1_forward. Written: dw (6, 25), dgamma and dbeta (6).
 *
 * BatchNorm's input gradient is dense, scale (dy - mean(dy) - xhat mean(dy xhat)), with dy
 * the winners' gradients and scale gamma / sigma; but the weight gradient it gives is the
 * winners' term alone minus two made of batch sums: mean(dy) times the input's sum under
 * each tap, and mean(dy xhat) / sigma times each map's sum of (output - mean) times the input
 * under each tap. */
static PyObject *bn1_backward(PyObject *self, PyObject *args)
{
    Call call;
    Partial *total;
    (void)self;
    if (parse_call(args, 11, &call) < 0 ||
        run_shares(bn1_backward_share, call.a, call.count, call.threads, &total) < 0)
        return NULL;
    const Py_ssize_t *a = call.a;
    const double *moments = (const double *)a[5], *centre = (const double *)a[6];
    const double *under = moments + 2 * MAPS + MAPS * TAPS, positions = (double)call.count * CONV * CONV;
    const float *gamma = (const float *)a[7];
    float *dw = (float *)a[8], *dgamma = (float *)a[9], *dbeta = (float *)a[10];
    for (int c = 0; c < MAPS; c++) {
        const double mean = centre[c], inverse = centre[MAPS + c];
        const double dy_xhat = total->moments[c], dy = total->moments[MAPS + c];
        const double scale = gamma[c] * inverse, slope = dy_xhat * inverse / positions;
        for (int t = 0; t < TAPS; t++) {
            const double cross = moments[2 * MAPS + c * TAPS + t] - mean * under[t];
            const double winners = lane_sum(total->dw8[c * TAPS + t]);
            dw[c * TAPS + t] = (float)(scale * (winners - dy / positions * under[t] - slope * cross));
        }
        dgamma[c] = (float)dy_xhat;
        dbeta[c] = (float)dy;
    }
    free(total);
    Py_RETURN_NONE;
}

/* The BatchNorm-ReLU-pooling entry points after a convolution PyTorch ran take its sizes at
 * the end of the addresses tuple (they are numbers too): its output's height and width, both
 * even, and its maps, a multiple of eight up to MOMENTS / 2. */
static int maps_fit(const Py_ssize_t *sizes)
{
    const Py_ssize_t height = sizes[0], width = sizes[1], maps = sizes[2];
    if (maps < 8 || maps % 8 != 0 || 2 * maps > MOMENTS) {
        PyErr_Format(PyExc_ValueError, "%zd maps: the kernels take a multiple of 8 up to %d",
                     maps, MOMENTS / 2 / 8 * 8);
        return 0;
    }
    if (height < 2 || width < 2 || height % 2 != 0 || width % 2 != 0) {
        PyErr_Format(PyExc_ValueError, "%zdx%zd maps: the kernels pool even sides", height,
                     width);
        return 0;
    }
    return 1;
}

static void bn_pool_forward_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to,
                                  Partial *p)
{
    const int height = (int)a[9], width = (int)a[10], maps = (int)a[11];
    const Py_ssize_t size = (Py_ssize_t)height * width * maps, pooled = size / 4;
    for (Py_ssize_t n = from; n < to; n++)
        kernels->bn_pool_forward((const float *)a[0] + n * size, height, width, maps,
                                 (const float *)a[1], (float *)a[5] + n * pooled,
                                 (unsigned char *)a[6] + n * pooled, p->moments);
}

/* bn_pool_forward((conv, gamma, beta, running_mean, running_var, picked, arg, out, centre,
 * height, width, maps), count, threads, eps, factor): float32 conv (count, height, width,
 * maps), the convolution's output in channels-last order; BatchNorm's gamma, beta and running
 * statistics (maps, updated). Written: picked (count, height / 2, width / 2, maps), each
 * window's largest output (smallest where gamma < 0), uint8 arg of the same shape, which
 * pixel it was, out, the stage's output, and float64 centre (2 maps), the batch's means and
 * inverse sigmas. */
static PyObject *bn_pool_forward(PyObject *self, PyObject *args)
{
    Call call;
    Partial *total;
    (void)self;
    if (parse_call(args, 12, &call) < 0 || !maps_fit(&call.a[9]) ||
        run_shares(bn_pool_forward_share, call.a, call.count, call.threads, &total) < 0)
        return NULL;
    const Py_ssize_t *a = call.a, pixels = a[9] * a[10];
    const Py_ssize_t rest[] = {a[1], a[2], a[3], a[4], a[5], a[7], a[8]};
    const int done = normalise(&call, total->moments, (int)a[11],
                               (double)call.count * pixels, rest, pixels / 4);
    free(total);
    if (done < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void bn_pool_sums_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    const int pixels = (int)(a[10] * a[11] / 4), maps = (int)a[12];
    const Py_ssize_t size = (Py_ssize_t)pixels * maps;
    for (Py_ssize_t n = from; n < to; n++)
        kernels->bn_pool_sums((const float *)a[1] + n * size, (const float *)a[2] + n * size,
                              (const float *)a[3] + n * size, pixels, maps,
                              (const double *)a[5], p->moments);
}

/* a: as bn_pool_backward's, and at [13] the coefficients. */
static void bn_pool_backward_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to,
                                   Partial *p)
{
    (void)p;
    const int height = (int)a[10], width = (int)a[11], maps = (int)a[12];
    const Py_ssize_t size = (Py_ssize_t)height * width * maps, pooled = size / 4;
    for (Py_ssize_t n = from; n < to; n++)
        kernels->bn_pool_backward((const float *)a[0] + n * size, height, width, maps,
                                  (const float *)a[1] + n * pooled,
                                  (const float *)a[2] + n * pooled,
                                  (const unsigned char *)a[4] + n * pooled,
                                  (const float *)a[13], (float *)a[7] + n * size);
}

/* bn_pool_backward((conv, g, out, picked, arg, centre, gamma, dconv, dgamma, dbeta, height,
 * width, maps), count, threads): g float32, the gradient of the stage's output out, the
 * rest from bn_pool_forward. Written: dconv (count, height, width, maps), the gradient of
 * conv, and dgamma and dbeta (maps). First the gradient's sums over the batch, where it
 * passes the ReLU: its sum per map, and that sum weighted by the winners' normalised values;
 * then BatchNorm's backward pass gives every pixel of conv
 *   scale * dy - shift - slope * (conv - mean)
 * with dy the gradient that reached it (only winners have one), scale gamma / sigma, shift
 * scale mean(dy) and slope scale mean(dy xhat) / sigma. */
static PyObject *bn_pool_backward(PyObject *self, PyObject *args)
{
    Call call;
    Partial *total;
    (void)self;
    if (parse_call(args, 13, &call) < 0 || !maps_fit(&call.a[10]) ||
        run_shares(bn_pool_sums_share, call.a, call.count, call.threads, &total) < 0)
        return NULL;
    Py_ssize_t a[MAX_ADDRESSES + 1];
    memcpy(a, call.a, 13 * sizeof *a);
    const int maps = (int)a[12];
    const double positions = (double)call.count * a[10] * a[11];
    const double *centre = (const double *)a[5];
    const float *gamma = (const float *)a[6];
    float *dgamma = (float *)a[8], *dbeta = (float *)a[9];
    float coefficients[4 * MOMENTS];
    for (int c = 0; c < maps; c++) {
        const double dy = total->moments[c], dy_xhat = total->moments[maps + c];
        const double inverse = centre[maps + c], scale = gamma[c] * inverse;
        coefficients[c] = (float)scale;
        coefficients[maps + c] = (float)(scale * dy / positions);
        coefficients[2 * maps + c] = (float)(scale * inverse * dy_xhat / positions);
        coefficients[3 * maps + c] = (float)centre[c];
        dgamma[c] = (float)dy_xhat;
        dbeta[c] = (float)dy;
    }
    free(total);
    a[13] = (Py_ssize_t)coefficients;
    if (run_shares(bn_pool_backward_share, a, call.count, call.threads, NULL) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static void input_grad2_share(const Py_ssize_t *a, Py_ssize_t from, Py_ssize_t to, Partial *p)
{
    (void)p;
    for (Py_ssize_t n = from; n < to; n++)
        kernels->input_grad2((const float *)a[0] + n * 8 * 8 * 16, (const float *)a[1],
                             (float *)a[2] + n * 12 * 12 * 6);
}

/* input_grad2((g, wt, dx), count, threads): the input gradient of Conv2d(6, 16, 5) on 12x12
 * maps: g float32 (count, 8, 8, 16), the gradient of its output, channels-last; wt (6, 25,
 * 16), the weights; dx (count, 12, 12, 6) is written. */
static PyObject *input_grad2(PyObject *self, PyObject *args)
{
    (void)self;
    return forward_batch(args, 3, input_grad2_share);
}

/* openmp(): the name of the OpenMP runtime whose threads run the batches, or None when one
 * thread runs them all. */
static PyObject *openmp(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (openmp_name == NULL)
        Py_RETURN_NONE;
    return PyUnicode_FromString(openmp_name);
}

#ifdef HAVE_AVX2_VARIANT
static int cpu_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

static PyObject *variant(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(kernels->name);
}

/* use(name): run the "plain" or the "avx2" build from now on (tests check both); returns the
 * name of the one in use, which stays "plain" where the CPU or the build has no AVX2. */
static PyObject *use(PyObject *self, PyObject *args)
{
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    kernels = &plain;
#ifdef HAVE_AVX2_VARIANT
    if (strcmp(name, "avx2") == 0 && cpu_has_avx2())
        kernels = &avx2;
#endif
    return variant(self, NULL);
}

static PyMethodDef methods[] = {
    {"use", use, METH_VARARGS, "Run the plain or the AVX2 build from now on."},
    {"variant", variant, METH_NOARGS, "The build in use: plain or avx2."},
    {"forward1", forward1, METH_VARARGS, "The first stage's pooled maps and each window's winner."},
    {"backward1", backward1, METH_VARARGS, "The first stage's weight and bias gradients."},
    {"conv1_forward", conv1_forward, METH_VARARGS, "The first convolution's maps."},
    {"conv1_backward", conv1_backward, METH_VARARGS, "The first convolution's gradients."},
    {"forward2", forward2, METH_VARARGS, "The second stage's pooled maps and each window's winner."},
    {"backward2", backward2, METH_VARARGS, "The second stage's input, weight and bias gradients."},
    {"bn1_forward", bn1_forward, METH_VARARGS, "lenet-relu's first stage in training."},
    {"bn1_backward", bn1_backward, METH_VARARGS, "lenet-relu's first stage's gradients."},
    {"bn_pool_forward", bn_pool_forward, METH_VARARGS, "BatchNorm, ReLU, pooling: forward."},
    {"bn_pool_backward", bn_pool_backward, METH_VARARGS, "BatchNorm, ReLU, pooling: backward."},
    {"input_grad2", input_grad2, METH_VARARGS, "Conv2d(6, 16, 5)'s input gradient."},
    {"openmp", openmp, METH_NOARGS, "The OpenMP runtime whose threads run batches, or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_stages", "LeNet's convolution and pooling stages, fused.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__stages(void)
{
    find_openmp();
#ifdef HAVE_AVX2_VARIANT
    if (cpu_has_avx2())
        kernels = &avx2;
#endif
    return PyModule_Create(&module);
}
