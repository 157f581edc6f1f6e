# split-KV alignment hint: kernel A/B, GPU tests (waves 4 + hint), decode-step A/B at 200K
. .park/env.sh
export FLOWKV_GIT="$(cat .park/sha)+align" TRITON_CACHE_DIR=/root/park/tc
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
timeout 150 python3 .park/kab.py 2>&1 | tee $OUT/kab.txt | grep -v "^ptx" ; grep "^ptx" $OUT/kab.txt
timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu -n 6 tests/test_gpu.py tests/test_layerwise.py tests/test_tensor_parallel.py 2>&1 | tail -25 > $OUT/pytest_gpu.txt; tail -4 $OUT/pytest_gpu.txt
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gpu" 2>&1 | tail -3 | tee $OUT/pytest_kernels.txt
B="python3 -m flowkv_utils.bench gpu --quick --no-checks --contexts 204800 --steps 20 --policies fullkv flowkv_global snapkv --budgets 0.05"
timeout 170 $B --out /root/park/dn 2>&1 | grep -a "floor×" | grep "B=1 " | grep "fused+compiled+graph" | sed 's/^/new /'
cp flowkv_utils/kernels/split_kv.py /root/park/split_kv_new.py; cp .park/split_kv_old.py flowkv_utils/kernels/split_kv.py
timeout 170 $B --out /root/park/do 2>&1 | grep -a "floor×" | grep "B=1 " | grep "fused+compiled+graph" | sed 's/^/old /'
cp /root/park/split_kv_new.py flowkv_utils/kernels/split_kv.py
mkdir -p /root/park/ab; cp /root/park/dn/decode.csv /root/park/ab/decode_new.csv; cp /root/park/do/decode.csv /root/park/ab/decode_old.csv; cp /root/park/dn/meta.json /root/park/ab/ 2>/dev/null; tar czf $OUT/ab.tgz -C /root/park ab
