#!/usr/bin/env python3
"""Writes the small images of the CLI tests (tests/cli/images): valid PNGs of every colour type,
bit depth and interlacing, valid JPEGs (baseline, progressive, subsampled, greyscale, CMYK, with
restart markers), and hostile ones built from them. PNGs with the standard library alone; JPEGs
need Pillow (pip install pillow). Rerun after changing it: the generated files are committed."""
import os
import random
import struct
import zlib

here = os.path.dirname(os.path.abspath(__file__))


def write(name, data):
    with open(os.path.join(here, name), "wb") as f:
        f.write(data)


def chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def pack_row(samples, depth):
    if depth == 8:
        return bytes(samples)
    if depth == 16:
        return b"".join(struct.pack(">H", s) for s in samples)
    out, acc, bits = bytearray(), 0, 0
    for s in samples:
        acc = (acc << depth) | s
        bits += depth
        if bits == 8:
            out.append(acc)
            acc, bits = 0, 0
    if bits:
        out.append(acc << (8 - bits))
    return bytes(out)


def png(width, height, color, depth, pixel, interlace=0, palette=None, filters=(0, 1, 2, 3, 4), extra=b""):
    """pixel(x, y) -> tuple of samples; rows filtered with the given filter types in turn."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    bpp = max(1, channels * depth // 8)
    raw = bytearray()
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    row_number = 0
    for x0, y0, dx, dy in passes:
        xs = list(range(x0, width, dx))
        ys = list(range(y0, height, dy))
        if not xs or not ys:
            continue
        prior = bytes(len(pack_row([0] * len(xs) * channels, depth)))
        for y in ys:
            line = pack_row([s for x in xs for s in pixel(x, y)], depth)
            f = filters[row_number % len(filters)]
            row_number += 1
            out = bytearray()
            for i, v in enumerate(line):
                a = line[i - bpp] if i >= bpp else 0
                b = prior[i]
                c = prior[i - bpp] if i >= bpp else 0
                if f == 0:
                    p = 0
                elif f == 1:
                    p = a
                elif f == 2:
                    p = b
                elif f == 3:
                    p = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                out.append((v - p) & 0xFF)
            raw += bytes([f]) + out
            prior = line
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace))
    if palette is not None:
        data += chunk(b"PLTE", palette)
    data += extra + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b"")
    return data, bytes(raw)


def main():
    rng = random.Random(2026)
    w, h = 13, 11
    for color, depths in [(0, [1, 2, 4, 8, 16]), (2, [8, 16]), (3, [1, 2, 4, 8]), (4, [8, 16]), (6, [8, 16])]:
        for depth in depths:
            channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
            top = (1 << depth) - 1
            entries = min(1 << depth, 5) if color == 3 else 0
            limit = entries - 1 if color == 3 else top
            samples = {(x, y): tuple(rng.randint(0, limit) for _ in range(channels)) for x in range(w) for y in range(h)}
            palette = bytes(rng.randrange(256) for _ in range(3 * entries)) if color == 3 else None
            for interlace in (0, 1):
                data, _ = png(w, h, color, depth, lambda x, y: samples[(x, y)], interlace, palette)
                write("valid_c%d_d%d%s.png" % (color, depth, "_i" if interlace else ""), data)
    # Palette of 2 entries with an index of 3 (row 4, column 7), plain and interlaced.
    for interlace in (0, 1):
        data, _ = png(w, h, 3, 2, lambda x, y: (3 if (x, y) == (7, 4) else (x + y) % 2,), interlace, bytes(6))
        write("bad_palette_index%s.png" % ("_i" if interlace else ""), data)
    good, raw = png(w, h, 2, 8, lambda x, y: (x * 19 % 256, y * 23 % 256, (x ^ y) * 9 % 256))
    # A bit flipped inside IDAT: the chunk's CRC no longer matches.
    flipped = bytearray(good)
    flipped[good.find(b"IDAT") + 10] ^= 0x04
    write("bad_crc.png", bytes(flipped))
    # The compressed stream cut short (chunk CRC recomputed, so only the zlib data is short).
    header = good[: good.find(b"IDAT") - 4]
    short = zlib.compress(raw, 9)[:-9]
    write("truncated_stream.png", header + chunk(b"IDAT", short) + chunk(b"IEND", b""))
    # A stream that inflates to 8 MiB where the header needs 440 bytes (a decompression bomb).
    write("zlib_bomb.png", header + chunk(b"IDAT", zlib.compress(raw + bytes(8 << 20), 9)) + chunk(b"IEND", b""))
    # 16384 x 16384 declared, a few bytes of data.
    write("huge.png", b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 16384, 16384, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    write("valid_rgb.png", good)

    try:
        from PIL import Image
    except ImportError:
        print("Pillow not found: JPEGs not rewritten")
        return
    w, h = 37, 29
    im = Image.new("RGB", (w, h))
    im.putdata([(rng.randrange(256), (x * 7) % 256, (y * 9) % 256) for y in range(h) for x in range(w)])
    im.save(os.path.join(here, "valid_baseline.jpg"), quality=90)
    im.save(os.path.join(here, "valid_444.jpg"), quality=90, subsampling=0)
    im.save(os.path.join(here, "valid_progressive.jpg"), quality=90, progressive=True)
    im.save(os.path.join(here, "valid_progressive_444.jpg"), quality=95, progressive=True, subsampling=0)
    im.save(os.path.join(here, "valid_restart.jpg"), quality=85, restart_marker_blocks=2)
    im.save(os.path.join(here, "valid_progressive_restart.jpg"), quality=85, progressive=True,
            restart_marker_blocks=3)
    im.convert("L").save(os.path.join(here, "valid_gray.jpg"), quality=85)
    im.convert("L").save(os.path.join(here, "valid_gray_progressive.jpg"), quality=85, progressive=True)
    im.convert("CMYK").save(os.path.join(here, "valid_cmyk.jpg"), quality=85)
    im.resize((1, 1)).save(os.path.join(here, "valid_1x1.jpg"), quality=90)
    im.resize((17, 3)).save(os.path.join(here, "valid_17x3_progressive.jpg"), quality=90, progressive=True)
    base = open(os.path.join(here, "valid_baseline.jpg"), "rb").read()
    sof = base.find(b"\xff\xc0")
    huge = bytearray(base)
    huge[sof + 5:sof + 9] = bytes([0x40, 0, 0x40, 0])  # 16384 x 16384 declared over 37 x 29 of data
    write("huge.jpg", bytes(huge))
    sos = base.find(b"\xff\xda")
    write("truncated.jpg", base[: sos + 60])
    write("truncated_with_eoi.jpg", base[: sos + 60] + b"\xff\xd9")


if __name__ == "__main__":
    main()
