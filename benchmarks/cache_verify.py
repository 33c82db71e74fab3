"""What checking the zoo cache costs on every load, for each fetched zoo model.

1. The first load after a fetch, a copy or any write hashes every stored file (sha256) against the
   manifest: `zoo.fetch(alias, verify=True)`.
2. Every later load trusts a file whose size, times and inode are unchanged since it was found whole:
   `zoo.fetch(alias, verify="stamp")`, which is what `load_model` does.
Both are printed beside the load itself (`load_model`), best of `--repeats`.

    .venv/bin/python benchmarks/cache_verify.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

from mechscope import load_model
from mechscope.models import zoo


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    print(f"{'model':<14} {'stored MB':>10} {'full hash s':>12} {'MB/s':>7} {'stamped ms':>11} {'load s':>7}")
    for alias in (a for a, m in zoo.ZOO.items() if m.hub_id is None):
        if not zoo.is_fetched(alias):
            print(f"{alias:<14} not fetched (mechscope models fetch {alias})")
            continue
        folder = zoo.model_dir(alias) / "hf"
        size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        full = best(lambda: zoo.fetch(alias, verify=True), args.repeats)
        stamped = best(lambda: zoo.fetch(alias, verify="stamp"), args.repeats)
        load = best(lambda: load_model(alias), args.repeats)
        print(f"{alias:<14} {size:>10.0f} {full:>12.2f} {size / full:>7.0f} {stamped * 1e3:>11.2f} {load:>7.2f}")


if __name__ == "__main__":
    main()
