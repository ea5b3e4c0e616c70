"""The i-quant lattices of ggufkit.kquants.iq_grids: the embedded points are ggml's (as gguf-py
dequantizes them, and as ggml-quants.c lists them), and the tables built from them equal those ggml
builds, dumped by a small C program compiled against the vendored ggml-quants.c."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import gguf.quants
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from ggufkit.kquants.iq_grids import SPECS, lattice, unpack
from reference.llama_cpp import llama_cpp_source

# ggml's names for the point tables (ggml-quants.c) and its index of each type's tables.
C_TABLES = {T.IQ3_XXS: ("kgrid_256", "iq3", 0), T.IQ3_S: ("kgrid_512", "iq3", 1),
            T.IQ2_XXS: ("kgrid_2bit_256", "iq2", 0), T.IQ2_XS: ("kgrid_2bit_512", "iq2", 1),
            T.IQ1_S: ("kgrid_1bit_2048", "iq2", 2), T.IQ1_M: ("kgrid_1bit_2048", "iq2", 2),
            T.IQ2_S: ("kgrid_2bit_1024", "iq2", 3)}

# Writes each initialised type's grid, map and neighbour list as raw arrays (<family>_<index>_<table>).
DUMP_C = r"""
#include "ggml-quants.c"
static void dump(const char * family, int g, const char * table, const void * p, size_t bytes) {
    char name[64];
    snprintf(name, sizeof name, "%s_%d_%s", family, g, table);
    FILE * f = fopen(name, "wb");
    fwrite(p, 1, bytes, f);
    fclose(f);
}
static size_t neighbours_length(const int * map, int keys, const uint16_t * nb) {
    size_t len = 0;
    for (int i = 0; i < keys; ++i) {
        if (map[i] < 0) {
            const size_t end = (size_t)(-map[i] - 1) + 1 + nb[-map[i] - 1];
            if (end > len) len = end;
        }
    }
    return len;
}
int main(void) {
    const enum ggml_type iq2[4] = {GGML_TYPE_IQ2_XXS, GGML_TYPE_IQ2_XS, GGML_TYPE_IQ1_S, GGML_TYPE_IQ2_S};
    for (int t = 0; t < 4; ++t) {
        iq2xs_init_impl(iq2[t]);
        const int g = iq2_data_index(iq2[t]);
        dump("iq2", g, "grid", iq2_data[g].grid, 8 * iq2_grid_size(iq2[t]));
        dump("iq2", g, "map", iq2_data[g].map, 4 * 43692);
        const size_t length = neighbours_length(iq2_data[g].map, 43692, iq2_data[g].neighbours);
        dump("iq2", g, "nb", iq2_data[g].neighbours, 2 * length);
    }
    for (int size = 256; size <= 512; size *= 2) {
        iq3xs_init_impl(size);
        const int g = iq3_data_index(size);
        dump("iq3", g, "grid", iq3_data[g].grid, 4 * size);
        dump("iq3", g, "map", iq3_data[g].map, 4 * 4096);
        const size_t length = neighbours_length(iq3_data[g].map, 4096, iq3_data[g].neighbours);
        dump("iq3", g, "nb", iq3_data[g].neighbours, 2 * length);
    }
    return 0;
}
"""


@pytest.mark.parametrize("qtype", list(SPECS), ids=lambda t: t.name)
def test_points_are_gguf_py_grids(qtype):
    points, dims, bits, _, _ = SPECS[qtype]
    grid = getattr(gguf.quants, qtype.name)
    grid.init_grid()
    values = np.array(grid.grid_map, np.float32)[unpack(points, dims, bits)]
    np.testing.assert_array_equal(values, grid.grid.reshape(len(points), dims))


@pytest.fixture(scope="module")
def ggml_tables(tmp_path_factory) -> Path:
    import llama_cpp

    ggml = llama_cpp_source() / "ggml"
    lib = Path(llama_cpp.__file__).parent / "lib"
    out = tmp_path_factory.mktemp("iq_tables")
    (out / "dump.c").write_text(DUMP_C)
    subprocess.run(["cc", "-O2", "-w", "-fopenmp", "-DGGML_USE_OPENMP", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}",
                    "dump.c", "-o", "dump", str(lib / "libggml-base.so"), f"-Wl,-rpath,{lib}", "-lm"],
                   cwd=out, check=True)
    subprocess.run(["./dump"], cwd=out, check=True)
    return out


@pytest.mark.tools
@pytest.mark.slow
@pytest.mark.parametrize("qtype", list(SPECS), ids=lambda t: t.name)
def test_tables_equal_ggmls(ggml_tables, qtype):
    name, family, g = C_TABLES[qtype]
    source = (llama_cpp_source() / "ggml" / "src" / "ggml-quants.c").read_text()
    listed = re.search(rf"static const uint16_t {name}\[[^\]]*\] = \{{(.*?)\}};", source, re.S).group(1)
    np.testing.assert_array_equal(SPECS[qtype][0], np.array(listed.replace(",", " ").split(), np.uint16))
    tables = lattice(qtype)
    dump = ggml_tables / f"{family}_{g}"
    np.testing.assert_array_equal(tables.coords.reshape(-1), np.fromfile(f"{dump}_grid", np.int8))
    np.testing.assert_array_equal(tables.index, np.fromfile(f"{dump}_map", np.int32))
    np.testing.assert_array_equal(tables.neighbours, np.fromfile(f"{dump}_nb", np.uint16))
