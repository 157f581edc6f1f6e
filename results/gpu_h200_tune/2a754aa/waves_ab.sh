# decode step at 200K, batch 1: split-KV default waves 8 against waves 4 (the tune's best on all three layer configs)
. .park/env.sh
export FLOWKV_GIT="$(cat .park/sha)+kth_largest"
B="python3 -m flowkv_utils.bench gpu --quick --no-checks --contexts 204800 --steps 20 --policies fullkv flowkv_global snapkv --budgets 0.05"
timeout 200 $B --out /root/park/w8 2>&1 | grep -a "floor×" | grep "B=1 " | grep "fused+compiled+graph" | sed 's/^/waves8 /'
sed -i 's/    waves: int = 8/    waves: int = 4/' flowkv_utils/kernels/split_kv.py && grep -n "waves: int" flowkv_utils/kernels/split_kv.py
timeout 200 $B --out /root/park/w4 2>&1 | grep -a "floor×" | grep "B=1 " | grep "fused+compiled+graph" | sed 's/^/waves4 /'
mkdir -p /root/park/w; cp /root/park/w8/decode.csv /root/park/w/decode_w8.csv; cp /root/park/w4/decode.csv /root/park/w/decode_w4.csv; cp /root/park/w4/meta.json /root/park/w/; tar czf $OUT/w.tgz -C /root/park w
