/* The first stage of the tutorial's LeNet on a CPU, as one pass over each image.
 *
 * Conv2d(1, 6, 5) on 28x28 images followed by MaxPool2d(2, 2): PyTorch runs these as two
 * kernels for general shapes, and at these small ones (one input map, six output maps) they
 * are far from the machine's speed: on 2 cores the convolution, the pooling and their
 * backward passes were half of a training step (benchmarks/train_step.py). Here each image's
 * 6x24x24 maps stay in a small local array, are pooled as soon as they are made, and only the
 * pooled maps and which of the four pixels won leave the function.
 *
 * The arithmetic is PyTorch's, in another order: the same outputs to float32 rounding; the
 * pooling picks the first largest of the four pixels in row order, as PyTorch's does.
 * lenet/first_stage.py calls this and says when; tests/test_first_stage.py compares the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

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

#define NAME(f) f##_plain
#define TARGET
#include "_first_stage_kernels.h"
#undef NAME
#undef TARGET

/* AVX2 with FMA where the CPU has them (x86-64 with GCC or Clang): three times the plain
 * build's speed here. Elsewhere the plain build, vectorised as the compiler sees fit. */
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define HAVE_AVX2_VARIANT 1
#define NAME(f) f##_avx2
#define TARGET __attribute__((target("avx2,fma")))
#include "_first_stage_kernels.h"
#undef NAME
#undef TARGET
#endif

typedef void (*ForwardImage)(const float *, const float *, const float *, float *,
                             unsigned char *);
typedef void (*BackwardImage)(const float *, const float *, const unsigned char *, v8 *,
                              float *);
static ForwardImage forward_image = forward_image_plain;
static BackwardImage backward_image = backward_image_plain;

/* forward(x, w, b, out, arg, count): addresses of float32 x (count, 28, 28), w (6, 25), b (6),
 * out (count, 12, 12, 6) and uint8 arg (count, 12, 12, 6). One thread: PyTorch's own threads
 * are busy-waiting for their next task between its operations, and threads of ours competing
 * with them made a whole training step slower, not faster (measured). */
static PyObject *forward(PyObject *self, PyObject *args)
{
    Py_ssize_t x, w, b, out, arg, count;
    (void)self;
    if (!PyArg_ParseTuple(args, "nnnnnn", &x, &w, &b, &out, &arg, &count))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t n = 0; n < count; n++)
        forward_image((const float *)x + n * SIDE * SIDE, (const float *)w, (const float *)b,
                      (float *)out + n * POOLED * POOLED * MAPS,
                      (unsigned char *)arg + n * POOLED * POOLED * MAPS);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* backward(x, g, arg, dw, db, count): g is float32 (count, 12, 12, 6), the gradient of the
 * pooled maps; dw (6, 25) and db (6) are overwritten with the weight and bias gradients. */
static PyObject *backward(PyObject *self, PyObject *args)
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
        backward_image((const float *)x + n * SIDE * SIDE,
                       (const float *)g + n * POOLED * POOLED * MAPS,
                       (const unsigned char *)arg + n * POOLED * POOLED * MAPS, dw8, db_out);
    /* Each tap's eight lanes added in a fixed order: every run gives the same bits. */
    for (int i = 0; i < MAPS * TAPS; i++) {
        const v8 s = dw8[i];
        dw_out[i] = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS, "The first stage's pooled maps and each window's winner."},
    {"backward", backward, METH_VARARGS, "The first stage's weight and bias gradients."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_first_stage", "LeNet's first convolution and pooling, fused.", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__first_stage(void)
{
#ifdef HAVE_AVX2_VARIANT
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        forward_image = forward_image_avx2;
        backward_image = backward_image_avx2;
    }
#endif
    PyObject *m = PyModule_Create(&module);
    const char *variant = forward_image == forward_image_plain ? "plain" : "avx2";
    if (m != NULL && PyModule_AddStringConstant(m, "variant", variant) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
