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
#include <string.h>

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
} Kernels;

static const Kernels plain = {"plain", forward_image_plain, backward_image_plain,
                              conv1_image_plain, conv1_grad_image_plain,
                              forward2_image_plain, backward2_image_plain};
#ifdef HAVE_AVX2_VARIANT
static const Kernels avx2 = {"avx2", forward_image_avx2, backward_image_avx2,
                             conv1_image_avx2, conv1_grad_image_avx2,
                             forward2_image_avx2, backward2_image_avx2};
#endif
static const Kernels *kernels = &plain;

/* forward1(x, w, b, out, arg, count): addresses of float32 x (count, 28, 28), w (6, 25), b (6),
 * out (count, 12, 12, 6) and uint8 arg (count, 12, 12, 6). One thread: PyTorch's own threads
 * are busy-waiting for their next task between its operations, and threads of ours competing
 * with them made a whole training step slower, not faster (measured). */
static PyObject *forward1(PyObject *self, PyObject *args)
{
    Py_ssize_t x, w, b, out, arg, count;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnn", &x, &w, &b, &out, &arg, &count))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t n = 0; n < count; n++)
        kernels->forward1((const float *)x + n * SIDE * SIDE, (const float *)w, (const float *)b,
                      (float *)out + n * POOLED * POOLED * MAPS,
                      (unsigned char *)arg + n * POOLED * POOLED * MAPS);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* backward1(x, g, arg, dw, db, count): g is float32 (count, 12, 12, 6), the gradient of the
 * pooled maps; dw (6, 25) and db (6) are overwritten with the weight and bias gradients. */
static PyObject *backward1(PyObject *self, PyObject *args)
{
    Py_ssize_t x, g, arg, dw, db, count;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnn", &x, &g, &arg, &dw, &db, &count))
        return NULL;
    float *dw_out = (float *)dw, *db_out = (float *)db;
    Py_BEGIN_ALLOW_THREADS
    v8 dw8[MAPS * TAPS];
    memset(dw8, 0, sizeof dw8);
    memset(db_out, 0, MAPS * sizeof(float));
    for (Py_ssize_t n = 0; n < count; n++)
        kernels->backward1((const float *)x + n * SIDE * SIDE,
                       (const float *)g + n * POOLED * POOLED * MAPS,
                       (const unsigned char *)arg + n * POOLED * POOLED * MAPS, dw8, db_out);
    for (int i = 0; i < MAPS * TAPS; i++)
        dw_out[i] = lane_sum(dw8[i]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* conv1_forward(x, w, b, out, count): the first convolution alone, for lenet-relu, whose
 * BatchNorm comes between it and the pooling: float32 x (count, 28, 28), w (6, 25), b (6),
 * out (count, 6, 24, 24). */
static PyObject *conv1_forward(PyObject *self, PyObject *args)
{
    Py_ssize_t x, w, b, out, count;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnn", &x, &w, &b, &out, &count))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t n = 0; n < count; n++)
        kernels->conv1((const float *)x + n * SIDE * SIDE, (const float *)w,
                            (const float *)b, (float *)out + n * MAPS * CONV * CONV);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* conv1_backward(x, g, dw, db, count): g float32 (count, 6, 24, 24), the gradient of the maps;
 * dw (6, 25) and db (6) are overwritten with the weight and bias gradients. */
static PyObject *conv1_backward(PyObject *self, PyObject *args)
{
    Py_ssize_t x, g, dw, db, count;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnn", &x, &g, &dw, &db, &count))
        return NULL;
    float *dw_out = (float *)dw, *db_out = (float *)db;
    Py_BEGIN_ALLOW_THREADS
    v8 dw8[MAPS * TAPS];
    memset(dw8, 0, sizeof dw8);
    memset(db_out, 0, MAPS * sizeof(float));
    for (Py_ssize_t n = 0; n < count; n++)
        kernels->conv1_grad((const float *)x + n * SIDE * SIDE,
                             (const float *)g + n * MAPS * CONV * CONV, dw8, db_out);
    for (int i = 0; i < MAPS * TAPS; i++)
        dw_out[i] = lane_sum(dw8[i]);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* forward2(x, w, b, out, arg, count): float32 x (count, 12, 12, 6), w (5, 5, 6, 16), b (16),
 * out (count, 4, 4, 16) and uint8 arg (count, 4, 4, 16). */
static PyObject *forward2(PyObject *self, PyObject *args)
{
    Py_ssize_t x, w, b, out, arg, count;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnn", &x, &w, &b, &out, &arg, &count))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t n = 0; n < count; n++)
        kernels->forward2((const float *)x + n * 12 * 12 * 6, (const float *)w, (const float *)b,
                       (float *)out + n * 4 * 4 * 16, (unsigned char *)arg + n * 4 * 4 * 16);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* backward2(x, g, arg, w8, dx, dw, db, count): g float32 (count, 4, 4, 16), the gradient of the
 * pooled maps; w8 the weights as (16, 5, 5, 8), the six input maps padded to eight. Written:
 * dx (count, 12, 12, 6), dw (16, 5, 5, 6) and db (16). */
static PyObject *backward2(PyObject *self, PyObject *args)
{
    Py_ssize_t x, g, arg, w8, dx, dw, db, count;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnnnn", &x, &g, &arg, &w8, &dx, &dw, &db, &count))
        return NULL;
    float *dw_out = (float *)dw, *db_out = (float *)db;
    Py_BEGIN_ALLOW_THREADS
    v8 dw8[16 * TAPS];
    memset(dw8, 0, sizeof dw8);
    memset(db_out, 0, 16 * sizeof(float));
    for (Py_ssize_t n = 0; n < count; n++)
        kernels->backward2((const float *)x + n * 12 * 12 * 6, (const float *)g + n * 4 * 4 * 16,
                        (const unsigned char *)arg + n * 4 * 4 * 16, (const v8 *)w8,
                        (float *)dx + n * 12 * 12 * 6, dw8, db_out);
    for (int tap = 0; tap < 16 * TAPS; tap++)
        for (int c = 0; c < 6; c++)
            dw_out[tap * 6 + c] = dw8[tap][c];
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_stages", "LeNet's convolution and pooling stages, fused.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__stages(void)
{
#ifdef HAVE_AVX2_VARIANT
    if (cpu_has_avx2())
        kernels = &avx2;
#endif
    return PyModule_Create(&module);
}
