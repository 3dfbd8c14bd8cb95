"""Cut a small Qlib provider folder out of a larger one (how tests/fixtures/qlib_cn and examples/data were made).

    python tools/cut_qlib_sample.py SRC DST --start 2019-01-01 --symbols 10 [--indices SH000300 SH000905]
        [--exclude-folder examples/data/qlib_cn_demo]   # stocks another folder holds are left out (a held-out set)

Keeps the calendar from --start on, the first N stocks (by name) that are CSI 300 members somewhere in the
kept period, the given indices, and rewrites every feature bin against the cut calendar.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--start", required=True)
    ap.add_argument("--end", default="2100-01-01")
    ap.add_argument("--symbols", type=int, default=10)
    ap.add_argument("--indices", nargs="*", default=["SH000300", "SH000905"])
    ap.add_argument("--exclude-folder", default=None, help="leave out the stocks this Qlib folder holds")
    a = ap.parse_args(argv)
    src, dst = Path(a.src), Path(a.dst)
    cal = [d.strip() for d in (src / "calendars/day.txt").read_text().split() if d.strip()]
    keep = [i for i, d in enumerate(cal) if a.start <= d <= a.end]
    first, last = keep[0], keep[-1]
    new_cal = cal[first : last + 1]
    rows = [r.split("\t") for r in (src / "instruments/csi300.txt").read_text().splitlines() if r.strip()]
    spans = [(s, max(b, new_cal[0]), min(e, new_cal[-1])) for s, b, e in rows if e >= new_cal[0] and b <= new_cal[-1]]
    excluded = set()
    if a.exclude_folder:
        excluded = {p.name.upper() for p in (Path(a.exclude_folder) / "features").iterdir()}
    stocks = sorted({s for s, _, _ in spans if s.upper() not in excluded})[: a.symbols]
    (dst / "calendars").mkdir(parents=True, exist_ok=True)
    (dst / "instruments").mkdir(parents=True, exist_ok=True)
    (dst / "calendars/day.txt").write_text("\n".join(new_cal) + "\n")
    (dst / "instruments/csi300.txt").write_text("".join(f"{s}\t{b}\t{e}\n" for s, b, e in spans if s in stocks))
    all_rows = []
    for sym in stocks + list(a.indices):
        fdir = src / "features" / sym.lower()
        out = dst / "features" / sym.lower()
        out.mkdir(parents=True, exist_ok=True)
        lo_hi = None
        for fb in sorted(fdir.glob("*.day.bin")):
            raw = np.fromfile(fb, dtype="<f4")
            start = int(raw[0])
            values = raw[1:]
            full = np.full(len(cal), np.nan, dtype="<f4")
            full[start : start + len(values)] = values
            cut = full[first : last + 1]
            valid = np.flatnonzero(~np.isnan(cut))
            if len(valid) == 0:
                continue
            s, e = valid[0], valid[-1]
            np.concatenate([[np.float32(s)], cut[s : e + 1]]).astype("<f4").tofile(out / fb.name)
            if fb.name.startswith("close"):
                lo_hi = (new_cal[s], new_cal[e])
        if lo_hi:
            all_rows.append(f"{sym}\t{lo_hi[0]}\t{lo_hi[1]}\n")
    (dst / "instruments/all.txt").write_text("".join(all_rows))
    print(f"{dst}: {len(new_cal)} days, {len(stocks)} stocks + {len(a.indices)} indices")


if __name__ == "__main__":
    main()
