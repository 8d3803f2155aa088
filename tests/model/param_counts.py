"""Parameter counts of TMC's parts written out from the architecture, layer by layer, independently
of the modules: a missing, extra or mis-sized layer changes them."""


def lin(i: int, o: int, bias: bool = True) -> int:
    return i * o + (o if bias else 0)


def ln(c: int) -> int:
    return 2 * c


def conv(i: int, o: int, k: int, bias: bool = True) -> int:
    return i * o * k * k + (o if bias else 0)


def conv_bn(i: int, o: int, k: int = 3) -> int:  # conv without bias, then BatchNorm's weight and bias
    return conv(i, o, k, bias=False) + 2 * o


def double_conv(i: int, o: int) -> int:
    return conv_bn(i, o) + conv_bn(o, o)


def bert(layers: int, d: int, vocab: int = 30522, positions: int = 512, types: int = 2) -> int:
    """BERT without its pooler: embeddings + LayerNorm, then per layer q/k/v/out, LN, FFN (4d), LN."""
    layer = 4 * lin(d, d) + ln(d) + lin(d, 4 * d) + lin(4 * d, d) + ln(d)
    return (vocab + positions + types) * d + ln(d) + layers * layer


def swin(dims=(96, 192, 384, 768), depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), ws: int = 7) -> int:
    """Patch embedding (4×4 conv + LN), blocks (2 LN, qkv, proj, (2ws−1)² × nH bias table, MLP 4C),
    patch merging (LN(4C), Linear 4C→2C without bias) after stages 1-3, the final LN."""
    n = conv(3, dims[0], 4) + ln(dims[0])
    for i, (c, d, h) in enumerate(zip(dims, depths, heads)):
        n += d * (2 * ln(c) + lin(c, 3 * c) + lin(c, c) + (2 * ws - 1) ** 2 * h + lin(c, 4 * c) + lin(4 * c, c))
        if i < len(dims) - 1:
            n += ln(4 * c) + lin(4 * c, 2 * c, bias=False)
    return n + ln(dims[-1])


def mcm_direction(c: int) -> int:
    """One direction of an MCM block: LN of queries and keys, q/k/v/out projections, LN, MLP (4c)."""
    return 2 * ln(c) + 4 * lin(c, c) + ln(c) + lin(c, 4 * c) + lin(4 * c, c)


def vit_block(d: int) -> int:
    return 2 * ln(d) + lin(d, 3 * d) + lin(d, d) + lin(d, 4 * d) + lin(4 * d, d)


def decoder(ch=(96, 192, 384, 768), s: int = 32, vit_depth: int = 1, in_chans: int = 3) -> int:
    """The dual U-decoder: CNN stem (H, H/2, H/4) and patch embedding; per stage a DownCNN, a ViT
    stage (Linear 2C→C, blocks, LN), a 2×2 merge and a 1×1 skip; the bottleneck on cat(X, Ŷ, F_V);
    the UpCNN blocks (double conv + 2×2 transposed conv), the full-resolution path and the head."""
    n = double_conv(in_chans, s) + double_conv(s, 2 * s) + double_conv(2 * s, ch[0]) + conv(in_chans, ch[0], 4)
    n += sum(double_conv(2 * ch[i], ch[i + 1]) + conv(ch[i], ch[i + 1], 2) + conv_bn(2 * ch[i], ch[i], 1)
             for i in range(len(ch) - 1))
    n += sum(lin(2 * c, c) + vit_depth * vit_block(c) + ln(c) for c in ch)
    n += double_conv(3 * ch[-1], ch[-1])
    outs = (2 * s, *ch[:-1])
    n += sum(double_conv(3 * c, c) + conv(c, o, 2) for c, o in zip(ch, outs))
    n += double_conv(4 * s, 2 * s) + conv(2 * s, s, 2) + double_conv(2 * s, s) + conv(s, 1, 1)
    return n
