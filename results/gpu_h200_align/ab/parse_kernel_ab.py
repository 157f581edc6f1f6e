"""Parse kernel_ab.txt (the device's printout of kernel_ab.py) into kernel_ab.csv and ptx_loads.csv, the tables
notebook 04 draws. Run from this folder: python parse_kernel_ab.py"""
import ast
import re

import pandas as pd

LINE = re.compile(r"round (\d) (old|new)\s+(\w+)\s+split=\s*(\d+)\s+([\d.]+) us\s+(\d+) GB/s ([\d.]+) of copy")
NAME = {"old": "before (a50f3f8)", "new": "alignment hint"}
rows, ptx = [], []
for line in open("kernel_ab.txt"):
    if m := LINE.match(line):
        r, k, lengths, split, us, gbps, frac = m.groups()
        rows.append(dict(round=int(r), kernel=NAME[k], lengths=lengths, split=int(split), us=float(us),
                         GBps=float(gbps), frac_of_copy=float(frac)))
    elif line.startswith("ptx"):
        _, key, counts = line.split(" ", 2)
        ptx += [dict(cache_key=key, load=form, count=n) for form, n in ast.literal_eval(counts.strip()).items()]
p = pd.DataFrame(ptx)
keys = list(dict.fromkeys(p.cache_key))  # kernel_ab.py lists the PTX files in compile order: the old kernel first
p.insert(0, "kernel", p.cache_key.map({keys[0]: NAME["old"], keys[1]: NAME["new"]}))
pd.DataFrame(rows).to_csv("kernel_ab.csv", index=False)
p.to_csv("ptx_loads.csv", index=False)
