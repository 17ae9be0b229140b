"""Why blosc gets 1 MiB blocks (codecs.BLOSC_BLOCK_BYTES): encoded bytes / raw of each array kind of a trained
checkpoint under blosc-zstd (byte shuffle, level 3's clevel) at several block sizes, each array one chunk as on
one device, through TensorStore's zarr3 codec in memory. Sizes are deterministic: one run.

    PYTHONPATH=. python benchmarks/blosc_blocksize.py --from RUN/checkpoints/300 [--from ...]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from picotron_jax.checkpoint.codecs import KINDS, array_kind, blosc_level

BLOCKS = (0, 256 << 10, 1 << 20, 4 << 20)  # 0: blosc's own choice (from clevel and the type size)


def encoded(x: np.ndarray, blocksize: int, level: int) -> int:
    spec = {"driver": "zarr3", "kvstore": "memory://", "create": True, "store_data_equal_to_fill_value": True,
            "metadata": {"shape": list(x.shape), "data_type": str(x.dtype),
                         "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(x.shape)}},
                         "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                    {"name": "blosc", "configuration": {"cname": "zstd", "clevel": blosc_level(level),
                                                                        "shuffle": "shuffle", "blocksize": blocksize}}]}}
    store = ts.open(spec).result()
    store.write(x).result()
    kv = store.kvstore
    return sum(len(kv.read(k).result().value) for k in kv.list().result() if not k.endswith(b"zarr.json"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="sources", action="append", required=True)
    parser.add_argument("--level", type=int, default=3)
    args = parser.parse_args()
    for source in args.sources:
        ckptr = ocp.PyTreeCheckpointer()
        tree = ckptr.metadata(f"{source}/state").item_metadata.tree
        state = ckptr.restore(f"{source}/state", args=ocp.args.PyTreeRestore(item=tree, restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)))
        arrays = [(array_kind(jax.tree_util.keystr(p, simple=True, separator="/")), np.asarray(x))
                  for p, x in jax.tree_util.tree_flatten_with_path(state)[0]]
        print(f"{source}: blosc-zstd bytes / raw per kind")
        for blocksize in BLOCKS:
            cells = []
            for kind in KINDS[:3]:
                xs = [x for k, x in arrays if k == kind and x.size]
                cells.append(f"{kind} {sum(encoded(x, blocksize, args.level) for x in xs) / sum(x.nbytes for x in xs):.4f}")
            print(f"  blocksize {blocksize or 'auto':>8}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
