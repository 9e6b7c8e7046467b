"""What a documentation knowledge package costs on a board: bytes per 1,000 passages and the RSS it adds.

For each knowledge package directory (`hublab knowledge build`, scripts/knowledge-packs), in a fresh process:
passages, pack text and index bytes (float16 embeddings, 384 dims), both per 1,000 passages, the RSS the
runtime's Library adds when it loads the pack (records + float16 index), and the time of one lookup.

    .venv/bin/python bench/knowledge_index.py ~/.local/share/hublab/models/knowledge/*-docs
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, gc
from pathlib import Path
import numpy as np, psutil
from hublab.runtime.routing.knowledge import Library, load_doc_pack
from hublab.runtime.routing.router import Router
router = Router.load(Path(sys.argv[2]), [], threads=1)
q = router.embed(["How do I join two paths?"])[0]
gc.collect()
before = psutil.Process().memory_info().rss
doc = load_doc_pack(Path(sys.argv[1]) / "knowledge.toml")
pack = Library(router.embed, router.encoder_id).pack(doc.path)
gc.collect()
after = psutil.Process().memory_info().rss
t = time.perf_counter()
for _ in range(20):
    pack.nearest(q, 1, -1.0)
print(json.dumps({"passages": len(pack.records), "rss_added": after - before,
                  "lookup_ms": round((time.perf_counter() - t) / 20 * 1000, 2)}))
"""


def measure(directory: Path, router: Path) -> dict:
    from hublab.runtime.routing.knowledge import load_doc_pack

    doc = load_doc_pack(directory / "knowledge.toml")
    index = [p for p in doc.path.parent.glob(f"{doc.path.stem}.*.npy")]
    out = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(router)], capture_output=True, text=True,
                         check=True, cwd=REPO)
    row = json.loads(out.stdout)
    text, idx = doc.path.stat().st_size, sum(p.stat().st_size for p in index)
    k = row["passages"] / 1000
    return {"package": directory.name, "domain": doc.domain, **row, "text_bytes": text, "index_bytes": idx,
            "text_per_1000": round(text / k), "index_per_1000": round(idx / k),
            "rss_per_1000": round(row["rss_added"] / k)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", type=Path, help="knowledge package directories")
    parser.add_argument("--router", type=Path, default=REPO / "models" / "router")
    args = parser.parse_args(argv)
    rows = [measure(d, args.router) for d in args.packages]
    print(json.dumps(rows, indent=1))
    print("| package | passages | text MB | index MB | per 1,000: text KB | index KB | RSS KB | lookup ms |\n"
          "|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        print(f"| {r['package']} | {r['passages']} | {r['text_bytes'] / 1e6:.1f} | {r['index_bytes'] / 1e6:.1f} | "
              f"{r['text_per_1000'] / 1e3:.0f} | {r['index_per_1000'] / 1e3:.0f} | {r['rss_per_1000'] / 1e3:.0f} | "
              f"{r['lookup_ms']:.1f} |", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
