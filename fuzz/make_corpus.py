#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/npy, fuzz/corpus/cli). Standard library
only; rerun after changing it: the generated files are committed."""
import os
import struct

here = os.path.dirname(os.path.abspath(__file__))


def npy(descr, shape, payload, version=1, order="False", pad=True):
    shape_text = "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (descr, order, shape_text)
    prefix = 10 if version == 1 else 12
    if pad:
        header += " " * ((64 - (prefix + len(header) + 1) % 64) % 64)
    header += "\n"
    length = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + length + header.encode() + payload


def floats(n, fmt="<f"):
    return b"".join(struct.pack(fmt, 0.25 * (i % 9) - 1.0) for i in range(n))


def write(folder, name, data):
    os.makedirs(os.path.join(here, "corpus", folder), exist_ok=True)
    with open(os.path.join(here, "corpus", folder, name), "wb") as f:
        f.write(data)


seeds = {
    "f4_2x3x5.npy": npy("<f4", (2, 3, 5), floats(30)),
    "f8_2x4.npy": npy("<f8", (2, 4), floats(8, "<d")),
    "i4_2x3.npy": npy("<i4", (2, 3), struct.pack("<6i", -100, 1, 2, 3, -100, 0)),
    "i8_3.npy": npy("<i8", (3,), struct.pack("<3q", 1, 2, 3)),
    "u1_4.npy": npy("|u1", (4,), bytes([0, 1, 254, 255])),
    "scalar_f4.npy": npy("<f4", (), floats(1)),
    "empty_0x3.npy": npy("<f4", (0, 3), b""),
    "v2_f4.npy": npy("<f4", (2, 2), floats(4), version=2),
    "v3_f4.npy": npy("<f4", (2, 2), floats(4), version=3),
    "bad_f2.npy": npy("<f2", (2,), b"\0\0\0\0"),
    "bad_bigendian.npy": npy(">f4", (2,), b"\0" * 8),
    "bad_fortran.npy": npy("<f4", (2, 2), floats(4), order="True"),
    "bad_truncated.npy": npy("<f4", (2, 3, 5), floats(30))[:-7],
    "bad_magic.npy": b"\x93NUMPZ" + npy("<f4", (1,), floats(1))[6:],
    "bad_header_len.npy": b"\x93NUMPY\x01\x00\xff\xff{'descr'",
    "bad_overflow_shape.npy": npy("<f8", (4294967296, 4294967296, 16), b""),
}
for name, data in seeds.items():
    write("npy", name, data)

# CLI seeds: byte 0 picks the replaced input file, then the command line, NUL, the file content.
P, LC, LR, V = 2, 3, 4, 5
cli = {
    "loss_tpo": (0, "loss --dir {D}", None),
    "loss_dpo_grad": (0, "loss --dir {D} --method dpo --grad-dir {O}/g", None),
    "loss_combined": (1, "loss --dir {D} --loss sigmoid,bco_pair,sft --loss-weights 0.8,0.2,1.0 --use-weighting", None),
    "loss_options": (2, "loss --dir {D} --score prob --form multiplicative --average --detach-weights --no-shift "
                        "--ignore-index 0 --f-divergence-type alpha_divergence --ld-alpha 0.5 --grad-dir {O}", None),
    "loss_bad_labels": (8, "loss --dir {D}", npy("<i4", (P, LC), struct.pack("<6i", -100, 7, 1, 1, 1, 1))),
    "loss_nan": (0, "loss --dir {D}", npy("<f4", (P, LC, V), floats(29) + struct.pack("<f", float("nan")))),
    "loss_shape": (3, "loss --dir {D}", npy("<f4", (P, LR + 1, V), floats(P * (LR + 1) * V))),
    "score": (0, "score --clean {D}/policy_chosen.npy --noisy {D}/policy_chosen_noisy.npy --labels "
                 "{D}/labels_chosen.npy --side chosen --out {O}/s", None),
    "corrupt_npy": (10, "corrupt --in {D}/image.npy --out {O}/x.npy --step 999 --space normalized --seed 7", None),
    "corrupt_kinds": (10, "corrupt --in {D}/image.npy --out {O}/y.npy --kind blur", None),
    "corrupt_crop": (10, "corrupt --in {D}/image.npy --out {O}/y.npy --kind crop --stream 3", None),
    "corrupt_patch": (10, "corrupt --in {D}/image.npy --out {O}/y.npy --kind patch-mask --schedule cosine --steps 10 --step 9", None),
    "corrupt_small": (10, "corrupt --in {D}/image.npy --out {O}/z.npy --kind blur", npy("<f4", (1, 1, 2), floats(2))),
    "usage": (0, "loss --dir {D} --beta nope", None),
    "demo": (0, "demo", None),
}
for name, (which, command, blob) in cli.items():
    write("cli", name, bytes([which]) + command.encode() + (b"\0" + blob if blob is not None else b""))
