/* The kernels of _stages.c, compiled once for each instruction set it dispatches to:
 * included with NAME(f) giving each function its variant's name and TARGET its instruction
 * set (empty: the compiler's default). */

static inline TARGET v8 NAME(load8)(const float *p)
{
    v8 v;
    memcpy(&v, p, sizeof v); /* unaligned */
    return v;
}

static inline TARGET v8 NAME(splat8)(float f) { return (v8){f, f, f, f, f, f, f, f}; }


static inline TARGET v8 NAME(select8)(v8i mask, v8 a, v8 b)
{
    return (v8)((mask & (v8i)a) | (~mask & (v8i)b));
}

/* Four candidates per lane (a 2x2 window's pixels in row order): the largest and which one
 * it was (0 1 / 2 3), the first largest in row order, NaN winning, as PyTorch's pooling picks.
 * Selects, not branches: which pixel wins is a coin toss to a branch predictor (branches took
 * several times the convolution's time). */
static inline TARGET void NAME(first_max4)(const v8 cand[4], v8 *best, v8i *k)
{
    v8 m = cand[0];
    v8i which = {0};
    for (int i = 1; i < 4; i++) {
        const v8i wins = (cand[i] > m) | (cand[i] != cand[i]);
        m = NAME(select8)(wins, cand[i], m);
        which = (wins & i) | (~wins & which);
    }
    *best = m;
    *k = which;
}

/* The 2x2 windows of two map rows 16 pixels wide (a0 a1: the top row's two halves, b0 b1:
 * the bottom row's), eight windows at a time. */
static inline TARGET void NAME(pool_row)(v8 a0, v8 a1, v8 b0, v8 b1, v8 *best, v8i *k)
{
    const v8 cand[4] = {
        SHUFFLE(a0, a1, 0, 2, 4, 6, 8, 10, 12, 14), SHUFFLE(a0, a1, 1, 3, 5, 7, 9, 11, 13, 15),
        SHUFFLE(b0, b1, 0, 2, 4, 6, 8, 10, 12, 14), SHUFFLE(b0, b1, 1, 3, 5, 7, 9, 11, 13, 15),
    };
    NAME(first_max4)(cand, best, k);
}

/* The first convolution of one image: x (28, 28) to the six 24x24 maps of conv (6, 24, 24),
 * the layout PyTorch calls contiguous (lenet-relu takes them so, for its BatchNorm; the first
 * stage pools them). Each row of a map is three vectors; the maps are made
 * three at a time, so that 9 running sums, the 3 vectors of input and a weight fit the 16 AVX
 * registers, and every input vector loaded serves three maps. */
static TARGET void NAME(conv1_image)(const float *restrict x, const float *restrict w,
                                            const float *restrict b, float *restrict conv)
{
    for (int c0 = 0; c0 < MAPS; c0 += 3) {
        for (int i = 0; i < CONV; i++) {
            v8 acc[3][3];
            for (int c = 0; c < 3; c++)
                acc[c][0] = acc[c][1] = acc[c][2] = NAME(splat8)(b[c0 + c]);
            for (int u = 0; u < K; u++) {
                const float *xr = x + (i + u) * SIDE;
                for (int v = 0; v < K; v++) {
                    const v8 x0 = NAME(load8)(xr + v), x1 = NAME(load8)(xr + v + 8),
                             x2 = NAME(load8)(xr + v + 16);
                    for (int c = 0; c < 3; c++) {
                        const v8 wv = NAME(splat8)(w[(c0 + c) * TAPS + u * K + v]);
                        acc[c][0] += wv * x0;
                        acc[c][1] += wv * x1;
                        acc[c][2] += wv * x2;
                    }
                }
            }
            for (int c = 0; c < 3; c++)
                memcpy(conv + ((c0 + c) * CONV + i) * CONV, acc[c], sizeof acc[c]);
        }
    }
}

/* Adds one image's share of the first convolution's weight gradient, eight lanes per tap, to
 * dw8 (6 x 25), and of its bias gradient to db (6), from the gradient of its maps
 * grad (6, 24, 24). */
static TARGET void NAME(conv1_grad_image)(const float *restrict x,
                                                 const float *restrict grad,
                                                 v8 *restrict dw8, float *restrict db)
{
    for (int c = 0; c < MAPS; c++) {
        const float *map = grad + c * CONV * CONV;
        v8 bias = {0};
        for (int at = 0; at < CONV * CONV; at += 8)
            bias += NAME(load8)(map + at);
        db[c] += lane_sum(bias);
        for (int u = 0; u < K; u++) {
            v8 acc[K] = {0};
            for (int i = 0; i < CONV; i++) {
                const float *xr = x + (i + u) * SIDE, *gr = map + i * CONV;
                const v8 g0 = NAME(load8)(gr), g1 = NAME(load8)(gr + 8), g2 = NAME(load8)(gr + 16);
                for (int v = 0; v < K; v++)
                    acc[v] += g0 * NAME(load8)(xr + v) + g1 * NAME(load8)(xr + v + 8) +
                              g2 * NAME(load8)(xr + v + 16);
            }
            for (int v = 0; v < K; v++)
                dw8[c * TAPS + u * K + v] += acc[v];
        }
    }
}

static TARGET void NAME(forward_image)(const float *restrict x, const float *restrict w,
                                       const float *restrict b, float *restrict out,
                                       unsigned char *restrict arg)
{
    float conv[MAPS][CONV][CONV];
    NAME(conv1_image)(x, w, b, &conv[0][0][0]);
    /* out and arg are (12, 12, 6): channels last, the layout the second convolution takes. */
    for (int c = 0; c < MAPS; c++) {
        for (int p = 0; p < POOLED; p++) {
            const float *top = conv[c][2 * p], *bottom = conv[c][2 * p + 1];
            v8 best[2];
            v8i k[2];
            NAME(pool_row)(NAME(load8)(top), NAME(load8)(top + 8), NAME(load8)(bottom),
                           NAME(load8)(bottom + 8), &best[0], &k[0]);
            const v8 top2 = NAME(load8)(top + 16), bottom2 = NAME(load8)(bottom + 16);
            NAME(pool_row)(top2, top2, bottom2, bottom2, &best[1], &k[1]);
            for (int q = 0; q < POOLED; q++) {
                out[(p * POOLED + q) * MAPS + c] = best[q >> 3][q & 7];
                arg[(p * POOLED + q) * MAPS + c] = (unsigned char)k[q >> 3][q & 7];
            }
        }
    }
}

/* Adds this image's share of the weight gradient to dw8 (6 x 25 vectors, whose lanes the
 * caller adds up: here each tap's sum goes to lane 0), and of the bias gradient to db (6):
 * the pooled gradient g (12, 12, 6) goes to each window's winner, the only pixel of the maps
 * with a gradient, so the work follows the 144 winners of each map alone. A winner's 5x5
 * patch is five rows of five pixels: one vector each (three lanes spare), times its gradient,
 * into five running sums, one per weight row. (This took the stage's backward pass from the
 * dense 24x24 gradient's 86,400 multiply-adds an image to 21,600.) */
static TARGET void NAME(backward_image)(const float *restrict x, const float *restrict g,
                                        const unsigned char *restrict arg, v8 *restrict dw8,
                                        float *restrict db)
{
    /* The image with three spare columns a row, so a row's last patch loads inside it. */
    float padded[SIDE][SIDE + 4];
    for (int r = 0; r < SIDE; r++) {
        memcpy(padded[r], x + r * SIDE, SIDE * sizeof(float));
        memset(padded[r] + SIDE, 0, 4 * sizeof(float));
    }
    for (int c = 0; c < MAPS; c++) {
        v8 rows[K] = {{0}};
        float bias = 0.0f;
        for (int p = 0; p < POOLED; p++)
            for (int q = 0; q < POOLED; q++) {
                const int at = (p * POOLED + q) * MAPS + c, k = arg[at];
                const float *patch = &padded[2 * p + (k >> 1)][2 * q + (k & 1)];
                const v8 gv = NAME(splat8)(g[at]);
                bias += g[at];
                for (int u = 0; u < K; u++)
                    rows[u] += gv * NAME(load8)(patch + u * (SIDE + 4));
            }
        db[c] += bias;
        for (int u = 0; u < K; u++)
            for (int v = 0; v < K; v++)
                dw8[c * TAPS + u * K + v][0] += rows[u][v];
    }
}

/* The second stage: Conv2d(6, 16, 5) on the 6x12x12 maps, then MaxPool2d(2, 2). The sixteen
 * output maps are two vectors, so each input value is broadcast once and multiplied into all
 * sixteen; four neighbouring pixels are made together so that eight running sums hide the
 * multiply-add latency. x is (12, 12, 6), w (5, 5, 6, 16), out and arg (4, 4, 16). */
static TARGET void NAME(forward2_image)(const float *restrict x, const float *restrict w,
                                        const float *restrict b, float *restrict out,
                                        unsigned char *restrict arg)
{
    v8 conv[8][8][2];
    const v8 b0 = NAME(load8)(b), b1 = NAME(load8)(b + 8);
    for (int i = 0; i < 8; i++) {
        for (int j0 = 0; j0 < 8; j0 += 4) {
            v8 acc[4][2];
            for (int t = 0; t < 4; t++) {
                acc[t][0] = b0;
                acc[t][1] = b1;
            }
            for (int u = 0; u < K; u++) {
                for (int v = 0; v < K; v++) {
                    const float *wp = w + (u * K + v) * 6 * 16;
                    const float *xp = x + ((i + u) * 12 + j0 + v) * 6;
                    for (int c = 0; c < 6; c++) {
                        const v8 w0 = NAME(load8)(wp + c * 16), w1 = NAME(load8)(wp + c * 16 + 8);
                        for (int t = 0; t < 4; t++) {
                            const v8 xs = NAME(splat8)(xp[t * 6 + c]);
                            acc[t][0] += xs * w0;
                            acc[t][1] += xs * w1;
                        }
                    }
                }
            }
            for (int t = 0; t < 4; t++) {
                conv[i][j0 + t][0] = acc[t][0];
                conv[i][j0 + t][1] = acc[t][1];
            }
        }
    }
    for (int p = 0; p < 4; p++) {
        for (int q = 0; q < 4; q++) {
            for (int h = 0; h < 2; h++) {
                const v8 cand[4] = {conv[2 * p][2 * q][h], conv[2 * p][2 * q + 1][h],
                                    conv[2 * p + 1][2 * q][h], conv[2 * p + 1][2 * q + 1][h]};
                v8 m;
                v8i which;
                NAME(first_max4)(cand, &m, &which);
                memcpy(out + (p * 4 + q) * 16 + h * 8, &m, sizeof m);
                for (int l = 0; l < 8; l++)
                    arg[(p * 4 + q) * 16 + h * 8 + l] = (unsigned char)which[l];
            }
        }
    }
}

/* The second stage's gradients for one image. Only each window's winner has a gradient, so
 * the work goes map by map over its 16 windows' winners, the six input maps of a pixel in one
 * vector (padded to eight). A weight row's five taps gather their sums over the 16 windows in
 * registers and are added to dw8 once per map; the input gradient is added to dx8 where each
 * winner's 5x5 neighbourhood falls. x is (12, 12, 6), g and arg (4, 4, 16), w8 (16, 5, 5, 8);
 * dx (12, 12, 6) is written, dw8 (16, 5, 5) vectors and db (16) are added to. */
static TARGET void NAME(backward2_image)(const float *restrict x, const float *restrict g,
                                         const unsigned char *restrict arg,
                                         const v8 *restrict w8, float *restrict dx,
                                         v8 *restrict dw8, float *restrict db)
{
    v8 x8[12 * 12], dx8[12 * 12];
    for (int at = 0; at < 12 * 12; at++) {
        v8 value = {0};
        for (int c = 0; c < 6; c++)
            value[c] = x[at * 6 + c];
        x8[at] = value;
        dx8[at] = (v8){0};
    }
    for (int o = 0; o < 16; o++) {
        int corner[16]; /* each window's winner: the top-left pixel of its 5x5 neighbourhood */
        v8 gs[16];
        float bias = 0.0f;
        for (int p = 0; p < 4; p++) {
            for (int q = 0; q < 4; q++) {
                const int at = (p * 4 + q) * 16 + o, k = arg[at];
                corner[p * 4 + q] = (2 * p + (k >> 1)) * 12 + 2 * q + (k & 1);
                gs[p * 4 + q] = NAME(splat8)(g[at]);
                bias += g[at];
            }
        }
        db[o] += bias;
        for (int u = 0; u < K; u++) {
            const v8 *w = &w8[(o * K + u) * K];
            const v8 w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4];
            v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0}, s4 = {0};
            for (int window = 0; window < 16; window++) {
                const int at = corner[window] + u * 12;
                const v8 gv = gs[window];
                s0 += gv * x8[at];
                s1 += gv * x8[at + 1];
                s2 += gv * x8[at + 2];
                s3 += gv * x8[at + 3];
                s4 += gv * x8[at + 4];
                dx8[at] += gv * w0;
                dx8[at + 1] += gv * w1;
                dx8[at + 2] += gv * w2;
                dx8[at + 3] += gv * w3;
                dx8[at + 4] += gv * w4;
            }
            v8 *dw = &dw8[(o * K + u) * K];
            dw[0] += s0;
            dw[1] += s1;
            dw[2] += s2;
            dw[3] += s3;
            dw[4] += s4;
        }
    }
    for (int at = 0; at < 12 * 12; at++)
        for (int c = 0; c < 6; c++)
            dx[at * 6 + c] = dx8[at][c];
}

/* lenet-relu's first stage in training: Conv2d(1, 6, 5) without bias, BatchNorm on the
 * batch's statistics, ReLU, MaxPool2d(2, 2), for one image. The statistics need the whole
 * batch before any map can be normalised, so the maps are not kept. BatchNorm scales each map
 * by gamma / sigma with sigma > 0, so a window's largest normalised pixel is its largest
 * convolution output where gamma >= 0 and its smallest where gamma < 0: that one is pooled
 * at once into picked (12, 12, 6), with which pixel it was into arg. Added to `moments`
 * (doubles) is what the batch's statistics and the backward pass need from the maps:
 *   [0, 6) each map's sum and [6, 12) its sum of squares;
 *   [12, 162) each map's sum of output times input under each tap, (6, 25);
 *   [162, 187) the input's sum under each tap, (25). */
static TARGET void NAME(bn1_forward_image)(const float *restrict x, const float *restrict w,
                                           const float *restrict gamma, float *restrict picked,
                                           unsigned char *restrict arg, double *restrict moments)
{
    static const float no_bias[MAPS] = {0};
    float conv[MAPS][CONV][CONV];
    NAME(conv1_image)(x, w, no_bias, &conv[0][0][0]);
    /* A map against the input under each tap is the weight gradient the map would give as
     * its own gradient; the same kernel computes it (and the map's sum, as its "bias"). */
    v8 cross[MAPS * TAPS];
    float sums[MAPS] = {0};
    memset(cross, 0, sizeof cross);
    NAME(conv1_grad_image)(x, &conv[0][0][0], cross, sums);
    for (int c = 0; c < MAPS; c++) {
        v8 squares = {0};
        for (int at = 0; at < CONV * CONV; at += 8) {
            const v8 v = NAME(load8)(&conv[c][0][0] + at);
            squares += v * v;
        }
        moments[c] += sums[c];
        moments[MAPS + c] += lane_sum(squares);
    }
    for (int i = 0; i < MAPS * TAPS; i++)
        moments[2 * MAPS + i] += lane_sum(cross[i]);
    for (int u = 0; u < K; u++) {
        v8 under[K] = {0};
        for (int i = 0; i < CONV; i++) {
            const float *xr = x + (i + u) * SIDE;
            for (int v = 0; v < K; v++)
                under[v] += NAME(load8)(xr + v) + NAME(load8)(xr + v + 8) +
                            NAME(load8)(xr + v + 16);
        }
        for (int v = 0; v < K; v++)
            moments[2 * MAPS + MAPS * TAPS + u * K + v] += lane_sum(under[v]);
    }
    for (int c = 0; c < MAPS; c++) {
        /* The smallest of a window is the largest of its negatives. */
        const v8 sign = NAME(splat8)(gamma[c] < 0.0f ? -1.0f : 1.0f);
        for (int p = 0; p < POOLED; p++) {
            const float *top = conv[c][2 * p], *bottom = conv[c][2 * p + 1];
            v8 best[2];
            v8i k[2];
            NAME(pool_row)(sign * NAME(load8)(top), sign * NAME(load8)(top + 8),
                           sign * NAME(load8)(bottom), sign * NAME(load8)(bottom + 8), &best[0],
                           &k[0]);
            const v8 top2 = sign * NAME(load8)(top + 16), bottom2 = sign * NAME(load8)(bottom + 16);
            NAME(pool_row)(top2, top2, bottom2, bottom2, &best[1], &k[1]);
            for (int q = 0; q < POOLED; q++) {
                picked[(p * POOLED + q) * MAPS + c] = sign[0] * best[q >> 3][q & 7];
                arg[(p * POOLED + q) * MAPS + c] = (unsigned char)k[q >> 3][q & 7];
            }
        }
    }
}

/* The same stage's backward pass for one image: g (12, 12, 6) is the gradient of its output
 * out (12, 12, 6), which passes the ReLU where out > 0 and lands on each window's winner
 * (arg). Added: the weight gradient those winners alone would give (dw8), and to sums, per
 * map, that gradient weighted by each winner's normalised value, (picked - mean) *
 * inverse_sigma (centre: the 6 means, then the 6 inverse sigmas), [0, 6), and unweighted,
 * [6, 12). The rest of BatchNorm's backward pass needs only sums over the batch. */
static TARGET void NAME(bn1_backward_image)(const float *restrict x, const float *restrict g,
                                            const float *restrict out,
                                            const float *restrict picked,
                                            const unsigned char *restrict arg,
                                            const double *restrict centre, v8 *restrict dw8,
                                            float *restrict db, double *restrict sums)
{
    float passed[POOLED * POOLED * MAPS], mean[MAPS], inverse[MAPS];
    float weighted[MAPS] = {0}, total[MAPS] = {0};
    for (int c = 0; c < MAPS; c++) {
        mean[c] = (float)centre[c];
        inverse[c] = (float)centre[MAPS + c];
    }
    for (int at = 0; at < POOLED * POOLED * MAPS; at += MAPS)
        for (int c = 0; c < MAPS; c++) {
            /* As PyTorch's ReLU: no gradient where out <= 0 (NaN passes it). */
            const float dy = out[at + c] <= 0.0f ? 0.0f : g[at + c];
            passed[at + c] = dy;
            weighted[c] += dy * ((picked[at + c] - mean[c]) * inverse[c]);
            total[c] += dy;
        }
    for (int c = 0; c < MAPS; c++) {
        sums[c] += weighted[c];
        sums[MAPS + c] += total[c];
    }
    NAME(backward_image)(x, passed, arg, dw8, db);
}

/* BatchNorm on the batch's statistics, ReLU and 2x2 max-pooling after a convolution PyTorch
 * made (lenet-relu's second stage, both of lenet-plus's), for one image: conv is its
 * (height, width, maps) output in channels-last order, maps a multiple of eight. As for the
 * first stage, each window's largest output is pooled where gamma >= 0 and its smallest where
 * gamma < 0, into picked (height / 2, width / 2, maps), with which pixel into arg; each map's
 * sum and sum of squares are added to sums[0, maps) and sums[maps, 2 maps). */
static TARGET void NAME(bn_pool_forward_image)(const float *restrict conv, int height, int width,
                                               int maps, const float *restrict gamma,
                                               float *restrict picked,
                                               unsigned char *restrict arg,
                                               double *restrict sums)
{
    const int row = width * maps;
    for (int c = 0; c < maps; c += 8) {
        const v8 g = NAME(load8)(gamma + c);
        const v8 sign = NAME(select8)(g < 0.0f, NAME(splat8)(-1.0f), NAME(splat8)(1.0f));
        v8 total = {0}, squares = {0};
        for (int p = 0; p < height / 2; p++) {
            for (int q = 0; q < width / 2; q++) {
                const float *at = conv + 2 * p * row + 2 * q * maps + c;
                v8 cand[4] = {NAME(load8)(at), NAME(load8)(at + maps), NAME(load8)(at + row),
                              NAME(load8)(at + row + maps)};
                for (int i = 0; i < 4; i++) {
                    total += cand[i];
                    squares += cand[i] * cand[i];
                    cand[i] *= sign; /* the smallest of a window is the largest of its negatives */
                }
                v8 best;
                v8i k;
                NAME(first_max4)(cand, &best, &k);
                const int out = (p * (width / 2) + q) * maps + c;
                best *= sign;
                memcpy(picked + out, &best, sizeof best);
                for (int l = 0; l < 8; l++)
                    arg[out + l] = (unsigned char)k[l];
            }
        }
        for (int l = 0; l < 8; l++) {
            sums[c + l] += total[l];
            sums[maps + c + l] += squares[l];
        }
    }
}

/* The same stage's backward pass, first half, for one image: g, the gradient of the stage's
 * output out (both (height / 2, width / 2, maps)), passes the ReLU where out > 0 and lands on
 * the windows' winners. Added to sums: its sum per map [0, maps), and that sum weighted by
 * the winners' normalised values [maps, 2 maps): (picked - mean) * inverse_sigma, from
 * centre (the means, then the inverse sigmas). */
static TARGET void NAME(bn_pool_sums_image)(const float *restrict g, const float *restrict out,
                                            const float *restrict picked, int pooled, int maps,
                                            const double *restrict centre,
                                            double *restrict sums)
{
    for (int c = 0; c < maps; c += 8) {
        v8 mean, inverse;
        for (int l = 0; l < 8; l++) {
            mean[l] = (float)centre[c + l];
            inverse[l] = (float)centre[maps + c + l];
        }
        v8 total = {0}, weighted = {0};
        for (int at = c; at < pooled * maps; at += maps) {
            /* As PyTorch's ReLU: no gradient where out <= 0 (NaN passes it). */
            const v8 dy = NAME(select8)(NAME(load8)(out + at) <= 0.0f, (v8){0}, NAME(load8)(g + at));
            total += dy;
            weighted += dy * ((NAME(load8)(picked + at) - mean) * inverse);
        }
        for (int l = 0; l < 8; l++) {
            sums[c + l] += total[l];
            sums[maps + c + l] += weighted[l];
        }
    }
}

/* Second half: the gradient of the convolution's output, dconv (height, width, maps),
 * written whole. BatchNorm's backward pass gives every pixel
 *   scale * dy - shift - slope * (conv - mean)
 * with dy the gradient that reached it (only winners have one): coefficients holds scale
 * (gamma * inverse_sigma), shift (scale * mean(dy)), slope (scale * inverse_sigma *
 * mean(dy * xhat)) and the mean, maps floats each. */
static TARGET void NAME(bn_pool_backward_image)(const float *restrict conv, int height, int width,
                                                int maps, const float *restrict g,
                                                const float *restrict out,
                                                const unsigned char *restrict arg,
                                                const float *restrict coefficients,
                                                float *restrict dconv)
{
    const int row = width * maps;
    for (int c = 0; c < maps; c += 8) {
        const v8 scale = NAME(load8)(coefficients + c);
        const v8 shift = NAME(load8)(coefficients + maps + c);
        const v8 slope = NAME(load8)(coefficients + 2 * maps + c);
        const v8 mean = NAME(load8)(coefficients + 3 * maps + c);
        for (int p = 0; p < height / 2; p++) {
            for (int q = 0; q < width / 2; q++) {
                const int pooled = (p * (width / 2) + q) * maps + c;
                const v8 dy = scale * NAME(select8)(NAME(load8)(out + pooled) <= 0.0f, (v8){0},
                                                    NAME(load8)(g + pooled));
                v8i k = {0};
                for (int l = 0; l < 8; l++)
                    k[l] = arg[pooled + l];
                for (int i = 0; i < 4; i++) {
                    const int at = (2 * p + (i >> 1)) * row + (2 * q + (i & 1)) * maps + c;
                    const v8 value = NAME(load8)(conv + at);
                    v8 grad = -shift - slope * (value - mean);
                    grad += NAME(select8)(k == i, dy, (v8){0});
                    memcpy(dconv + at, &grad, sizeof grad);
                }
            }
        }
    }
}

/* The input gradient of lenet-relu's second convolution, Conv2d(6, 16, 5) on 12x12 maps, for
 * one image: dx (12, 12, 6) from g (8, 8, 16), the gradient of its output (all of it: BatchNorm
 * gives every pixel one), and the weights as wt (6, 25, 16). Each input pixel gathers its sum
 * over the taps and output maps that reach it, the 16 output maps in two vectors: six running
 * sums, one per input map, added across their lanes at the end. (PyTorch's channels-last
 * transposed convolution took 3.5 ms for a batch of 256 on 2 threads, its contiguous one 1.8,
 * this 1.4.) */
static TARGET void NAME(input_grad2_image)(const float *restrict g, const float *restrict wt,
                                           float *restrict dx)
{
    for (int i = 0; i < 12; i++) {
        const int u_from = i > 7 ? i - 7 : 0, u_to = i < K ? i : K - 1;
        for (int j = 0; j < 12; j++) {
            const int v_from = j > 7 ? j - 7 : 0, v_to = j < K ? j : K - 1;
            v8 acc[6] = {{0}};
            for (int u = u_from; u <= u_to; u++)
                for (int v = v_from; v <= v_to; v++) {
                    const float *gp = g + ((i - u) * 8 + (j - v)) * 16;
                    const float *wp = wt + (u * K + v) * 16;
                    const v8 g0 = NAME(load8)(gp), g1 = NAME(load8)(gp + 8);
                    for (int c = 0; c < 6; c++)
                        acc[c] += g0 * NAME(load8)(wp + c * TAPS * 16) +
                                  g1 * NAME(load8)(wp + c * TAPS * 16 + 8);
                }
            for (int c = 0; c < 6; c++)
                dx[(i * 12 + j) * 6 + c] = lane_sum(acc[c]);
        }
    }
}
