"""Cost of checkpoint integrity: hashing a checkpoint at save time and verifying it (sizes,
sha256, pickle scan) at load time, against torch.save / torch.load of the same state.

    python benchmarks/checkpoint_verify.py [--mb 1024] [--rounds 3]

Prints JSON: seconds of each and the ratios verify/load and digest/save (one rank; with W ranks
the digest and verify work is split W ways, see platform/checkpoint_integrity.py).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from scaleyard.platform.checkpoint_integrity import collect_digests, verify, write_digests


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1024, help="size of the saved state")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    # a model + AdamW-shaped state: many tensors of a few MB
    count = max(1, args.mb // 4)
    state = {"model": {f"w{i}": torch.randn(2**20) for i in range(count)}}
    save_s, digest_s, verify_s, load_s = [], [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for _ in range(args.rounds):
            save_s.append(timed(lambda: torch.save(state, folder / "train_state.pt")))

            def digest() -> None:
                write_digests(folder, 0, 1)
                meta = {"step": 1, "files": collect_digests(folder, 1)}
                (folder / "meta.json").write_text(json.dumps(meta))

            digest_s.append(timed(digest))
            verify_s.append(timed(lambda: verify(folder)))
            load_s.append(timed(lambda: torch.load(folder / "train_state.pt", weights_only=True)))
    best = {name: min(values) for name, values in
            (("save_s", save_s), ("digest_s", digest_s), ("verify_s", verify_s), ("load_s", load_s))}
    print(json.dumps({"benchmark": "checkpoint_verify", "mb": count * 4, **{k: round(v, 3) for k, v in best.items()},
                      "verify_over_load": round(best["verify_s"] / best["load_s"], 2),
                      "digest_over_save": round(best["digest_s"] / best["save_s"], 2)}))


if __name__ == "__main__":
    main()
