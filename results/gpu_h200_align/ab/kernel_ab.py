"""A/B of the split-KV kernel on one layer (bench.gpu.kernel_speed's timing): the committed kernel (no alignment
hint; .park/split_kv_old.py) against the working tree's (tl.multiple_of on the tables' offsets), twice each."""
import glob, importlib.util, os, re, sys
import torch
import flowkv_utils.bench.gpu as bg
import flowkv_utils.kernels.split_kv  # noqa: F401
new = sys.modules["flowkv_utils.kernels.split_kv"]
from flowkv_utils.bench.timing import copy_bandwidth
spec = importlib.util.spec_from_file_location("flowkv_utils.kernels._split_kv_old", ".park/split_kv_old.py")
old = importlib.util.module_from_spec(spec); sys.modules[spec.name] = old; spec.loader.exec_module(old)

class Rec:
    def __init__(self): self.rows = []
    def add(self, table, **row): self.rows.append(row)

bw = copy_bandwidth("cuda")
print(f"copy {bw['GBps']:.0f} GB/s (R+W)")
for rnd in range(int(os.environ.get("ROUNDS", "2"))):
    for name, mod in (("old", old), ("new", new)):
        bg.split_kv_triton, bg.triton_tables = mod.split_kv_triton, mod.triton_tables
        import flowkv_utils.kernels._triton as T; T._BUILT.clear()  # both modules build under one name
        rec = Rec()
        bg.kernel_speed(rec, bw, reps=50)
        for r in rec.rows:
            print(f"round {rnd} {name:3s} {r['lengths']:8s} split={r['split']:5d} {r['us']:8.1f} us "
                  f"{r['GBps']:7.0f} GB/s {r['frac_of_copy']:.3f} of copy")
cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
for f in sorted(glob.glob(f"{cache}/**/split_kernel.ptx", recursive=True), key=os.path.getmtime):
    s = open(f).read()
    loads = re.findall(r"ld\.global[\.\w]*", s)
    counts = {k: loads.count(k) for k in sorted(set(loads))}
    print("ptx", os.path.basename(os.path.dirname(f))[:10], counts)
